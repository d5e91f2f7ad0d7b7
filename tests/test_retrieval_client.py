from __future__ import annotations

import asyncio
import socket
import time

import pytest

from sap.agent.retrieval import Hit, RetrievalError, RetrieverClient, docs_text


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_then_fails_clearly_when_the_server_is_down():
    client = RetrieverClient(f"http://127.0.0.1:{closed_port()}", max_retries=2, backoff_s=0.01, timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError, match=r"failed after 3 attempt\(s\)"):
        client.search(["who?"])
    assert time.monotonic() - t0 < 10
    with pytest.raises(RetrievalError, match="failed after 3 attempt"):
        asyncio.run(client.asearch(["who?"]))
    with pytest.raises(RetrievalError, match="not answering /health"):
        client.health()


def test_queries_must_be_a_list():
    with pytest.raises(TypeError):
        RetrieverClient().search("one string")
    assert RetrieverClient().search([]) == []


def test_docs_text_uses_the_searchr1_format():
    hits = [Hit("1", '"Paris"\nParis is the capital.', 0.9), Hit("2", '"Lyon"\nLyon is a city.')]
    assert docs_text(hits) == 'Doc 1(Title: "Paris") Paris is the capital.\nDoc 2(Title: "Lyon") Lyon is a city.\n'
    assert RetrieverClient("http://h:1/retrieve/").base_url == "http://h:1"
