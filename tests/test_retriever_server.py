"""The real server (uvicorn on 127.0.0.1, a subprocess) over a BM25 index of the oracle passages."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from sap.agent.retrieval import RetrieverClient
from sap.rules.prompts import format_docs
from sap_retriever.corpus import read_oracle


def post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/retrieve", content=data, headers={"Content-Type": content_type}, timeout=10)


def test_response_shape_topk_and_sorted_scores(retriever_url):
    r = post(
        retriever_url, {"queries": ["who got the first nobel prize in physics", "capital of france"], "topk": 5, "return_scores": True}
    )
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == 2
    for row in result:
        assert len(row) == 5
        for hit in row:
            assert set(hit) == {"document", "score"}
            assert set(hit["document"]) == {"id", "contents"}
            assert isinstance(hit["score"], float)
        scores = [h["score"] for h in row]
        assert scores == sorted(scores, reverse=True)
    assert "Nobel" in result[0][0]["document"]["contents"]


def test_return_scores_false_gives_bare_documents(retriever_url):
    for body in ({"queries": ["nobel prize physics"], "topk": 2, "return_scores": False}, {"queries": ["nobel prize physics"], "topk": 2}):
        r = post(retriever_url, body)
        assert r.status_code == 200, r.text
        row = r.json()["result"][0]
        assert len(row) == 2
        assert all(set(doc) == {"id", "contents"} for doc in row)


def test_default_topk_is_three(retriever_url):
    r = post(retriever_url, {"queries": ["nobel prize physics"]})
    assert len(r.json()["result"][0]) == 3


def test_client_gets_hits_and_the_searchr1_text(retriever_url):
    hits = RetrieverClient(retriever_url, topk=3).search(["who got the first nobel prize in physics"])[0]
    assert len(hits) == 3
    text = format_docs([h.as_doc() for h in hits])
    assert text.startswith('Doc 1(Title: "')
    assert text.count("\n") == 3


def test_gold_passage_hit_at_3_on_the_oracle_questions(retriever_url, data_dir):
    questions = read_oracle(data_dir / "corpus" / "nq-open-oracle.jsonl.gz")
    client = RetrieverClient(retriever_url, topk=3, timeout_s=60)
    hits = 0
    for i in range(0, len(questions), 256):
        chunk = questions[i : i + 256]
        for q, row in zip(chunk, client.search([q.question for q in chunk]), strict=True):
            hits += any(h.contents == q.gold_contents for h in row)
    rate = hits / len(questions)
    print(f"\nBM25 hit@3 on {len(questions)} oracle questions: {rate:.4f}")
    assert rate >= 0.75


BAD_INPUTS = [
    ("empty queries", {"queries": []}, 422, "invalid_queries"),
    ("missing queries", {"topk": 3}, 422, "invalid_request"),
    ("queries not a list", {"queries": "who?"}, 422, "invalid_queries"),
    ("non-string query", {"queries": ["ok", 3]}, 422, "invalid_queries"),
    ("null query", {"queries": [None]}, 422, "invalid_queries"),
    ("blank query", {"queries": ["  "]}, 422, "invalid_queries"),
    ("too many queries", {"queries": ["q"] * 513}, 413, "too_many_queries"),
    ("over-long query", {"queries": ["x" * 2049]}, 413, "query_too_long"),
    ("topk zero", {"queries": ["q"], "topk": 0}, 422, "invalid_topk"),
    ("topk too big", {"queries": ["q"], "topk": 101}, 422, "invalid_topk"),
    ("topk a string", {"queries": ["q"], "topk": "3"}, 422, "invalid_topk"),
    ("topk a float", {"queries": ["q"], "topk": 2.5}, 422, "invalid_topk"),
    ("topk a bool", {"queries": ["q"], "topk": True}, 422, "invalid_topk"),
    ("return_scores a string", {"queries": ["q"], "return_scores": "yes"}, 422, "invalid_return_scores"),
    ("body a list", ["q"], 422, "invalid_request"),
]


@pytest.mark.parametrize(("name", "body", "status", "kind"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_json_error(retriever_url, name, body, status, kind):
    r = post(retriever_url, body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind
    assert r.json()["detail"]


def test_malformed_json_wrong_content_type_and_huge_body(retriever_url):
    r = post(retriever_url, b'{"queries": ["a"', "application/json")
    assert (r.status_code, r.json()["error"]) == (400, "malformed_json")
    r = post(retriever_url, b"\xff\xfe", "application/json")
    assert (r.status_code, r.json()["error"]) == (400, "malformed_json")
    r = post(retriever_url, {"queries": ["a"]}, "text/plain")
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    r = httpx.post(f"{retriever_url}/retrieve", data={"queries": "a"}, timeout=10)  # a form post
    assert r.status_code == 415
    r = post(retriever_url, b"x" * (5 << 20))
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")
    r = httpx.get(f"{retriever_url}/retrieve", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{retriever_url}/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    # ... and the server is still up and answering
    assert post(retriever_url, {"queries": ["nobel"], "topk": 1}).status_code == 200


def test_health(retriever_url):
    h = httpx.get(f"{retriever_url}/health", timeout=10).json()
    assert h["status"] == "ok"
    assert h["backend"] == "bm25" and h["index_type"] == "bm25"
    assert h["n_docs"] > 2000
    assert h["uptime_s"] >= 0 and h["rss_mib"] > 0
    assert h["requests_served"] >= 0 and "encoder" in h


def test_concurrent_burst_is_micro_batched_without_errors(retriever_url, data_dir):
    questions = [q.question for q in read_oracle(data_dir / "corpus" / "nq-open-oracle.jsonl.gz")[:200]]
    before = httpx.get(f"{retriever_url}/health", timeout=10).json()

    async def burst():
        client = RetrieverClient(retriever_url, topk=3, timeout_s=30, max_retries=0)
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as http:

            async def one(q):
                async with sem:
                    return await client.asearch([q], client=http)

            return await asyncio.gather(*(one(q) for q in questions))

    results = asyncio.run(burst())
    assert all(len(r) == 1 and len(r[0]) == 3 for r in results)
    after = httpx.get(f"{retriever_url}/health", timeout=10).json()
    assert after["requests_served"] - before["requests_served"] == len(questions)
    assert after["errors"] == before["errors"]
    batches = after["batches"] - before["batches"]
    assert batches < len(questions)  # concurrent requests shared encoder calls and index searches
    print(f"\n{len(questions)} concurrent requests in {batches} micro-batches")


@pytest.mark.slow
def test_sigterm_shuts_down_gracefully(bm25_index, tmp_path):
    import sys

    from sap_retriever.launch import RetrieverServer

    server = RetrieverServer(bm25_index, python=sys.executable, log_path=tmp_path / "server.log")
    with server as url:
        assert post(url, {"queries": ["nobel"]}).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    log = (tmp_path / "server.log").read_text()
    assert "ready: bm25 index" in log and "rss" in log
    assert "shut down after 1 requests" in log


@pytest.mark.slow
def test_cli_build_then_launch_as_other_environments_do(tmp_path):
    """What the eval/PPO tests and the demo do: build with the CLI, serve with the launcher."""
    import sys

    from sap_retriever.launch import RetrieverServer, build_oracle_index

    index = build_oracle_index(tmp_path / "idx", backend="bm25", limit=500, python=sys.executable)
    assert json.loads((index / "meta.json").read_text())["n_docs"] == 500
    assert build_oracle_index(index, python="/nonexistent/python") == index  # a finished index is reused
    with RetrieverServer(index, python=sys.executable) as url:
        assert httpx.get(f"{url}/health", timeout=10).json()["n_docs"] == 500


def test_cli_errors_are_clear(tmp_path):
    from typer.testing import CliRunner

    from sap.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app, ["retriever", "index", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "i"), "--backend", "bm25"]
    )
    assert r.exit_code == 2 and "corpus file not found" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0", "contents": "ok"}\n{"id": "1"}\n')
    r = runner.invoke(app, ["retriever", "index", "--corpus", str(bad), "--out", str(tmp_path / "i"), "--backend", "bm25"])
    assert r.exit_code == 2 and "bad.jsonl:2: missing field 'contents'" in r.output
    r = runner.invoke(app, ["retriever", "index", "--corpus", str(bad), "--out", str(tmp_path / "i"), "--backend", "nope"])
    assert r.exit_code == 2 and "backend" in r.output
    r = runner.invoke(app, ["retriever", "serve", "--index", str(tmp_path / "none")])
    assert r.exit_code == 2 and "not an index directory" in r.output


def test_worker_and_thread_defaults(monkeypatch):
    import os

    from sap.rules.config import RetrieverServeConfig
    from sap_retriever.server import resolve_parallelism

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    eager = resolve_parallelism(RetrieverServeConfig())
    assert (eager.workers, eager.threads) == (4, 1)  # CPU, eager: one single-threaded batch per core
    compiled = resolve_parallelism(RetrieverServeConfig(compile=True))
    assert (compiled.workers, compiled.threads) == (1, 4)  # compiled: one batch on every core
    explicit = resolve_parallelism(RetrieverServeConfig(compile=True, workers=2, threads=3))
    assert (explicit.workers, explicit.threads) == (2, 3)
