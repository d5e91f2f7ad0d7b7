"""``sap data download`` against a stand-in hub on 127.0.0.1 (``HF_ENDPOINT``), through the real
``huggingface_hub`` client: the plan with its GB first, a download killed mid-file and resumed
with a ``Range`` request, checksums, post-processing (NQ parquet equal to Search-R1's, the
corpus gunzipped, the index parts joined into a FAISS index that loads), and a rerun that
fetches nothing."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap.stages.download import PAPER_SOURCES
from tests.hub_standin import HubStandIn, Repo

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
STALL_AT = 10 * 1024 * 1024 + 4096  # past huggingface_hub's 10 MiB write chunk, so a partial file exists


def flat_index_bytes(n: int = 26_000, dim: int = 128) -> tuple[bytes, int]:
    import faiss

    index = faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(0).standard_normal((n, dim)).astype("float32"))
    return faiss.serialize_index(index).tobytes(), n


def stand_in_repos() -> tuple[list[Repo], dict]:
    test = pd.read_parquet(DATA / "nq" / "searchr1_nq_search_test.parquet")
    test_jsonl = "".join(
        json.dumps({"id": r.id, "question": r.question, "golden_answers": list(r.golden_answers)}) + "\n" for r in test.itertuples()
    )
    train_rows = [json.loads(x) for x in (DATA / "nq" / "train.jsonl").read_text().splitlines()[:40]]
    train_jsonl = "".join(
        json.dumps({"id": f"train_{i}", "question": r["question"], "golden_answers": r["golden_answers"]}) + "\n"
        for i, r in enumerate(train_rows)
    )
    corpus_lines = (DATA / "corpus" / "nq_oracle_corpus.jsonl").read_bytes().splitlines(keepends=True)[:50]
    index, n_vectors = flat_index_bytes()
    cut = STALL_AT + 1_000_000
    model = {"config.json": b'{"model_type": "stand-in"}\n', "model.safetensors": os.urandom(20_000)}
    afm = (REPO / "tests" / "data" / "afm_mhqa_sample.json").read_bytes()
    repos = [
        Repo("RUC-NLPIR/FlashRAG_datasets", "dataset", {"nq/train.jsonl": train_jsonl.encode(), "nq/test.jsonl": test_jsonl.encode()}),
        Repo("PeterJinGo/wiki-18-corpus", "dataset", {"wiki-18.jsonl.gz": gzip.compress(b"".join(corpus_lines))}),
        Repo("PeterJinGo/wiki-18-e5-index", "dataset", {"part_aa": index[:cut], "part_ab": index[cut:]}),
        Repo("intfloat/e5-base-v2", "model", dict(model)),
        Repo("Qwen/Qwen2.5-3B-Instruct", "model", dict(model)),
        Repo("PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-3b-it-em-ppo", "model", dict(model)),
        Repo("PersonalAILab/AFM-MHQA-Agent-SFT-Dataset", "dataset", {"AFM-MHQA-Agent-SFT-Dataset.json": afm, "README.md": b"# AFM\n"}),
    ]
    return repos, {"test": test, "train_rows": train_rows, "corpus": b"".join(corpus_lines), "index": index, "n_vectors": n_vectors}


def sap_download(hub: HubStandIn, root: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(root.parent / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    cmd = [sys.executable, "-m", "sap", "data", "download", "--root", str(root), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.slow
def test_download_plan_resume_checksums_and_outputs(tmp_path):
    repos, truth = stand_in_repos()
    assert {(r.repo_id, r.repo_type) for r in repos} == {(s.repo_id, s.repo_type) for s in PAPER_SOURCES}
    root = tmp_path / "downloads"
    with HubStandIn(repos) as hub:
        rc, out = finish(sap_download(hub, root, "--dry-run"))
        assert rc == 0, out
        total = sum(len(b) for r in repos for b in r.files.values())
        assert f"total to download: {total / 1e9:.2f} GB" in out
        assert f"PeterJinGo/wiki-18-e5-index: 2 file(s), {len(truth['index']) / 1e9:.2f} GB to fetch" in out
        assert not root.exists() or not any(root.rglob("*.json*"))

        # killed in the middle of part_aa ...
        hub.stall[("PeterJinGo/wiki-18-e5-index", "part_aa")] = STALL_AT
        proc = sap_download(hub, root)
        partial_dir = root / "wiki-18" / ".sap-partial"
        deadline = time.monotonic() + 180
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in partial_dir.glob("*.part") if p.stat().st_size > 0] if partial_dir.is_dir() else []
            if partial:
                break
            time.sleep(0.2)
        assert partial, f"no partial download appeared (rc={proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        have = partial[0].stat().st_size
        assert 0 < have < len(truth["index"])
        assert not (root / "wiki-18" / "part_aa").exists()

        # ... and resumed where it stopped
        n_before = len(hub.requests)
        rc, out = finish(sap_download(hub, root))
        assert rc == 0, out
        gets = [(m, p, r) for m, p, r in hub.requests[n_before:] if m == "GET" and "/resolve/" in p]
        assert ("GET", "/datasets/PeterJinGo/wiki-18-e5-index/resolve/" + repos[2].sha + "/part_aa", f"bytes={have}-") in gets
        # files checked in the first run are not fetched again
        assert not any("FlashRAG" in p or "wiki-18-corpus" in p for _, p, _ in gets)

    import faiss

    index = faiss.read_index(str(root / "wiki-18" / "e5_Flat.index"))
    assert index.ntotal == truth["n_vectors"] and index.d == 128
    assert (root / "wiki-18" / "e5_Flat.index").read_bytes() == truth["index"]
    assert not (root / "wiki-18" / "part_aa").exists() and not (root / "wiki-18" / "part_ab").exists()
    assert (root / "wiki-18" / "wiki-18.jsonl").read_bytes() == truth["corpus"]
    # Search-R1's test parquet rebuilt from FlashRAG's records: the same 3,610 rows
    built = pd.read_parquet(root / "nq_search" / "test.parquet")
    want = truth["test"]
    assert len(built) == 3610 and list(built.columns) == list(want.columns)
    for b, w in zip(built.itertuples(), want.itertuples(), strict=True):
        assert (b.id, b.question, list(b.golden_answers)) == (w.id, w.question, list(w.golden_answers))
        assert b.prompt[0]["content"] == w.prompt[0]["content"] and b.prompt[0]["role"] == "user"
        assert list(b.reward_model["ground_truth"]["target"]) == list(w.reward_model["ground_truth"]["target"])
        assert (b.extra_info["split"], b.extra_info["index"], b.data_source, b.ability) == (
            w.extra_info["split"],
            w.extra_info["index"],
            w.data_source,
            w.ability,
        )
    train = pd.read_parquet(root / "nq_search" / "train.parquet")
    assert len(train) == 40 and train.question.str.endswith("?").all()
    assert (root / "models" / "Qwen2.5-3B-Instruct" / "config.json").is_file()
    assert (root / "afm_mhqa_sft" / "AFM-MHQA-Agent-SFT-Dataset.json").read_bytes() == repos[-1].files["AFM-MHQA-Agent-SFT-Dataset.json"]

    # a rerun fetches nothing
    with HubStandIn(repos) as hub:
        rc, out = finish(sap_download(hub, root))
        assert rc == 0, out
        assert "total to download: 0.00 GB" in out and "done: 0 file(s) fetched" in out
        assert not [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]


def test_checksum_mismatch_deletes_the_file_and_fails(tmp_path):
    model = {"config.json": b'{"model_type": "stand-in"}\n', "model.safetensors": os.urandom(20_000)}
    repos = [Repo("Qwen/Qwen2.5-3B-Instruct", "model", model)]
    root = tmp_path / "downloads"
    with HubStandIn(repos) as hub:
        hub.corrupt.add(("Qwen/Qwen2.5-3B-Instruct", "model.safetensors"))
        rc, out = finish(sap_download(hub, root, "--only", "qwen2.5_3b_instruct"))
        assert rc == 1, out
        assert "checksum mismatch for Qwen/Qwen2.5-3B-Instruct/model.safetensors" in out
        assert not (root / "models" / "Qwen2.5-3B-Instruct" / "model.safetensors").exists()
        hub.corrupt.clear()
        rc, out = finish(sap_download(hub, root, "--only", "qwen2.5_3b_instruct"))
        assert rc == 0, out
        assert (root / "models" / "Qwen2.5-3B-Instruct" / "model.safetensors").read_bytes() == model["model.safetensors"]
        rc, out = finish(sap_download(hub, root, "--only", "nope"))
        assert rc == 2 and "unknown source" in out
