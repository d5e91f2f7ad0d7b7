from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (the repo must sit beside shared/)")
    return SHARED_DATA


def tokenizer_texts(shared_data: Path, n: int = 400) -> list[str]:
    """Text to train the tiny tokenizer on: the first ``n`` oracle questions and passages."""
    import gzip
    import json

    from sap.tiny_model import protocol_texts

    with gzip.open(shared_data / "corpus" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return protocol_texts(
        [r["question"] for r in rows], [(r["ctxs"][0]["title"], r["ctxs"][0]["text"]) for r in rows], [r["answers"][0] for r in rows]
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, shared_data) -> Path:
    """A tiny random Qwen2 model with a ChatML tokenizer, built once per test session."""
    from sap.tiny_model import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_texts(shared_data))


# --- the retrieval service (retriever/sap_retriever) ---------------------------------------


@pytest.fixture(scope="session")
def oracle_corpus(tmp_path_factory, shared_data) -> Path:
    """The oracle gold passages as a Search-R1 corpus JSONL ({id, contents})."""
    from sap_retriever.corpus import convert_oracle

    out = tmp_path_factory.mktemp("oracle-corpus") / "corpus.jsonl"
    convert_oracle(shared_data / "corpus" / "nq-open-oracle.jsonl.gz", out)
    return out


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory, oracle_corpus) -> Path:
    """A BM25 index over all oracle passages (about a second to build)."""
    from sap_retriever.index import build_index

    out = tmp_path_factory.mktemp("index") / "oracle-bm25"
    build_index(oracle_corpus, out, backend="bm25", progress=False)
    return out


@pytest.fixture(scope="session")
def retriever_url(bm25_index) -> Iterator[str]:
    """Base URL of a real retrieval server (uvicorn, 127.0.0.1, free port) over ``bm25_index``,
    run as a subprocess of this interpreter and stopped with SIGTERM at the end of the session."""
    from sap_retriever.launch import RetrieverServer

    with RetrieverServer(bm25_index, python=sys.executable, startup_timeout_s=60) as url:
        yield url
