"""Runs that would be meaningless stop early: ``sap eval`` checks the retriever before it loads
a model, a run whose searches fail too often stops (keeping what it finished for the resume),
and the report marks any group whose metrics include failed searches."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sap.agent.engines.scripted import ScriptedEngine
from sap.agent.retrieval import RetrieverUnavailable, SearchFailureGuard, require_healthy
from sap.rules.atomic import read_jsonl
from sap.rules.config import load_config
from sap.rules.errors import RunFailed
from sap.stages.evaluate import evaluate_group
from sap.stages.report import markdown
from sap_retriever.launch import RetrieverServer, free_port

REPO = Path(__file__).resolve().parents[1]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_guard_counts_over_at_least_min_searches():
    guard = SearchFailureGuard(0.01, min_searches=100)
    guard.add(1, 1)
    assert not guard.exceeded  # one early failure: 1 > 0.01 * 100 is false
    guard.add(1, 1)
    assert guard.exceeded
    big = SearchFailureGuard(0.01)
    big.add(1000, 10)
    assert not big.exceeded
    big.add(1, 1)
    assert big.exceeded and "11 of 1001 searches failed" in big.summary()
    never = SearchFailureGuard(1.0)
    never.add(5, 5)
    assert not never.exceeded


def test_require_healthy_says_how_to_start_the_retriever(retriever_url):
    assert require_healthy(load_config(None, [f"retriever.url={retriever_url}"]).retriever)["status"] == "ok"
    url = dead_url()
    with pytest.raises(RetrieverUnavailable, match=r"not answering /health.*sap retriever serve --index INDEX_DIR --port \d+"):
        require_healthy(load_config(None, [f"retriever.url={url}"]).retriever)


def test_cli_eval_refuses_to_start_against_a_dead_retriever(tmp_path):
    """The real CLI in a child process; the group's model does not exist, so an error about
    the retriever (not the model) shows the check comes before the model is loaded."""
    cmd = [
        sys.executable,
        "-m",
        "sap",
        "eval",
        "--group",
        "base",
        "--limit",
        "3",
        "--set",
        f"run_root={tmp_path / 'runs'}",
        "--set",
        "experiment=dead",
        "--set",
        f"retriever.url={dead_url()}",
        "--set",
        f"eval.dataset={REPO / 'data' / 'nq' / 'test.jsonl'}",
        "--set",
        "eval.engine=hf",
        "--set",
        f"eval.groups={{base: {{model: {tmp_path / 'no-such-model'}}}}}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "not answering /health" in out and "sap retriever serve" in out and "no-such-model" not in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "runs" / "dead" / "eval" / "base" / "predictions.jsonl").exists()
    assert not (tmp_path / "runs" / "dead" / "eval" / "base" / "metrics.json").exists()


def search_then_answer(context: str) -> str:
    q = re.search(r"Question: (.*?)\n<\|im_end\|>", context, re.DOTALL).group(1)
    if "</information>\n\n" not in context:
        return f"<think> search </think> <search> {q} </search>"
    return "<answer> no idea </answer>"


@pytest.mark.slow
def test_eval_stops_when_searches_fail_and_resumes(tmp_path, tiny_model, bm25_index):
    """A real retriever stopped mid-run: the run stops with RunFailed once the failed share
    passes retriever.max_failure_rate, keeps the finished questions, and a resume against a
    restarted retriever plays the failed questions again and finishes clean."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)

    def cfg(url: str, *extra: str):
        return load_config(
            None,
            [
                f"run_root={tmp_path / 'runs'}",
                "experiment=guard",
                f"retriever.url={url}",
                "retriever.max_retries=0",
                "retriever.timeout_s=5",
                f"eval.dataset={REPO / 'data' / 'nq' / 'test.jsonl'}",
                "eval.groups={scripted: {model: scripted}}",
                "eval.limit=12",
                "eval.max_in_flight=1",
                "eval.max_new_tokens=64",
                *extra,
            ],
        )

    server = RetrieverServer(bm25_index, python=sys.executable, startup_timeout_s=60)
    seen = []

    def stop_after_five(_ep):
        seen.append(1)
        if len(seen) == 5:
            server.stop()

    url = server.start()
    try:
        with pytest.raises(RunFailed, match=r"stopped: 2 of 7 searches failed .*max_failure_rate=0.01.*7 finished questions are kept"):
            evaluate_group(cfg(url), "scripted", engine=ScriptedEngine(tok, search_then_answer), on_episode=stop_after_five)
    finally:
        server.stop()
    group = tmp_path / "runs" / "guard" / "eval" / "scripted"
    rows = list(read_jsonl(group / "predictions.jsonl"))
    assert [r["retrieval_failures"] for r in rows] == [0] * 5 + [1, 1]
    metrics = json.loads((group / "metrics.json").read_text())
    assert (metrics["n"], metrics["searches"], metrics["retrieval_failures"]) == (7, 7, 2)

    # the report marks the group
    report = markdown("guard", {"scripted": metrics})
    assert "**[2 failed searches]**" in report and "Warning: `scripted`: 2 of 7 searches failed" in report

    # resume against a restarted retriever (another port): the two failed questions are played again
    with RetrieverServer(bm25_index, python=sys.executable, startup_timeout_s=60) as url2:
        resumed = evaluate_group(cfg(url2), "scripted", engine=ScriptedEngine(tok, search_then_answer))
    assert (resumed["n"], resumed["new_this_run"], resumed["retrieval_failures"], resumed["searches"]) == (12, 7, 0, 12)
    assert "failed searches" not in markdown("guard", {"scripted": resumed})


def test_retriever_wait_cli(tmp_path, retriever_url):
    """``sap retriever wait`` (what scripts/pipeline.sh calls after starting the server):
    returns once /health answers; fails fast, with the log's end, when the server exits."""
    from typer.testing import CliRunner

    from sap.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["retriever", "wait", "--url", retriever_url, "--timeout", "10"])
    assert r.exit_code == 0 and f"retriever ready at {retriever_url}" in r.output, r.output

    log = tmp_path / "retriever.log"
    log.write_text("Traceback ...\nCorpusError: no passages\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    t0 = time.monotonic()
    r = runner.invoke(app, ["retriever", "wait", "--url", dead_url(), "--pid", str(gone.pid), "--timeout", "60", "--log", str(log)])
    assert r.exit_code == 1 and "exited" in r.output and "CorpusError: no passages" in r.output, r.output
    assert time.monotonic() - t0 < 30  # did not wait for the timeout
    r = runner.invoke(app, ["retriever", "wait", "--url", dead_url(), "--timeout", "1"])
    assert r.exit_code == 1 and "not ready after 1s" in r.output, r.output
