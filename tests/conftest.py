from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's ``data/`` (public data with sources and licenses in data/README.md)."""
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_dir) -> Path:
    """A tiny random Qwen2 model with a ChatML tokenizer, built once per test session."""
    from sap.tiny_model import build_tiny_qwen2, oracle_texts

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), oracle_texts(data_dir / "corpus" / "nq-open-oracle.jsonl.gz"))


# --- the retrieval service (retriever/sap_retriever) ---------------------------------------


@pytest.fixture(scope="session")
def oracle_corpus(tmp_path_factory, data_dir) -> Path:
    """The oracle gold passages as a Search-R1 corpus JSONL ({id, contents})."""
    from sap_retriever.corpus import convert_oracle

    out = tmp_path_factory.mktemp("oracle-corpus") / "corpus.jsonl"
    convert_oracle(data_dir / "corpus" / "nq-open-oracle.jsonl.gz", out)
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
