"""``sap eval`` / ``sap report``: datasets, resume after an interruption, metrics, the CLI with
the real HF engine on the tiny model, and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap.agent.engines.scripted import ScriptedEngine
from sap.cli import app
from sap.rules.atomic import read_jsonl
from sap.rules.config import load_config
from sap.stages.evaluate import EvalError, evaluate_group, load_questions, resolve_groups

METRIC_KEYS = {
    "n",
    "em",
    "subem",
    "f1",
    "rouge_l",
    "valid_format_rate",
    "mean_searches",
    "mean_turns",
    "tokens_per_question",
    "questions_per_second",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def gold_by_question(path: Path) -> dict[str, list[str]]:
    return {q.question: q.golden_answers for q in load_questions(path)}


def oracle_agent(golds: dict[str, list[str]]):
    """Searches once, then answers right for even-length questions and wrongly otherwise."""

    def respond(context: str) -> str:
        q = re.search(r"Question: (.*?)\n<\|im_end\|>", context, re.DOTALL).group(1)
        q0 = q[:-1] if q.endswith("?") and q[:-1] in golds else q
        if "</information>\n\n" not in context:
            return f"<think> search </think> <search> {q0} </search>"
        return f"<answer> {golds[q0][0] if len(q0) % 2 == 0 else 'no idea'} </answer>"

    return respond


def make_cfg(tmp_path: Path, dataset: Path, retriever_url: str, **eval_keys):
    overrides = [
        f"run_root={tmp_path / 'runs'}",
        "experiment=t",
        f"retriever.url={retriever_url}",
        f"eval.dataset={dataset}",
        "eval.groups={scripted: {model: scripted}}",
        "eval.max_new_tokens=64",
    ] + [f"eval.{k}={v}" for k, v in eval_keys.items()]
    return load_config(None, overrides)


# --- datasets --------------------------------------------------------------------------------


def test_loads_nq_jsonl_parquet_and_multihop(data_dir):
    jsonl = load_questions(data_dir / "nq" / "NQ-open.dev.jsonl", limit=5)
    parquet = load_questions(data_dir / "nq" / "searchr1_nq_search_test.parquet", limit=5)
    assert [q.id for q in jsonl] == ["0", "1", "2", "3", "4"]
    assert len(jsonl) == len(parquet) == 5
    # the same questions and answers in another order
    nq = {q.question.strip().rstrip("?"): sorted(q.golden_answers) for q in load_questions(data_dir / "nq" / "NQ-open.dev.jsonl")}
    for q in parquet:
        assert nq[q.question.strip().rstrip("?")] == sorted(q.golden_answers)
    assert parquet[0].meta["source_id"] == "test_0"
    hop = load_questions(data_dir / "multihop" / "r1searcher_bamboogle.jsonl")
    assert len(hop) == 125 and all(q.golden_answers for q in hop)
    assert len(nq) == 3610


def test_bad_dataset_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2"}\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: missing field 'answer' \(or 'answers', 'golden_answers', 'ground_truth'\)"):
        load_questions(bad)
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{not json\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: not valid JSON"):
        load_questions(bad)
    bad.write_text('{"query": "q1", "answer": ["a"]}\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:1: missing field 'question'"):
        load_questions(bad)
    with pytest.raises(EvalError, match="dataset not found"):
        load_questions(tmp_path / "none.jsonl")


def test_groups_resolve_all_and_reject_unknown():
    cfg = load_config()
    assert resolve_groups(cfg, ["all"]) == ["baseline", "sft", "rl", "sft_rl"]
    assert resolve_groups(cfg, ["sft", "all"]) == ["sft", "baseline", "rl", "sft_rl"]
    with pytest.raises(EvalError, match="unknown eval group 'nope'"):
        resolve_groups(cfg, ["nope"])
    assert load_config(None, ["experiment=x"]).expand(cfg.eval.groups["sft"].model) == "runs/x/sft/merged"


# --- a group, resumed ----------------------------------------------------------------------


def test_interrupted_run_resumes_to_the_same_result(tmp_path, data_dir, tokenizer, retriever_url):
    dataset = data_dir / "nq" / "NQ-open.dev.jsonl"
    respond = oracle_agent(gold_by_question(dataset))

    def engine():
        return ScriptedEngine(tokenizer, respond)

    full_cfg = make_cfg(tmp_path / "full", dataset, retriever_url, limit=12, max_in_flight=4)
    full = evaluate_group(full_cfg, "scripted", engine=engine())
    assert full.keys() >= METRIC_KEYS and full["n"] == 12
    assert full["mean_searches"] == 1 and full["mean_turns"] == 2 and full["valid_format_rate"] == 1
    assert 0 < full["em"] < 1 and full["em"] == pytest.approx(sum(len(q.question) % 2 == 0 for q in load_questions(dataset, 12)) / 12)
    assert full["sap"]["em"] == full["em"] and set(full["paper"]) == {"em", "rouge_l"}  # both metric sets, by name
    assert (full["metric_set"], full["protocol"], full["dataset_questions"]) == ("sap", "sap", 3610)

    cfg = make_cfg(tmp_path / "resumed", dataset, retriever_url, limit=12, max_in_flight=4)
    seen = []

    def crash_after_five(_ep):
        seen.append(1)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_group(cfg, "scripted", engine=engine(), on_episode=crash_after_five)
    pred = cfg.run_dir / "eval" / "scripted" / "predictions.jsonl"
    assert len(list(read_jsonl(pred))) == 5
    with pred.open("a") as f:  # a line torn by the crash
        f.write('{"id": "99", "quest')
    resumed = evaluate_group(cfg, "scripted", engine=engine())
    assert resumed["new_this_run"] == 7

    def by_id(path):
        rows = list(read_jsonl(path))
        assert len(rows) == len({r["id"] for r in rows}), "duplicated question"
        return {r["id"]: {k: v for k, v in r.items() if k != "latency_s"} for r in rows}

    assert by_id(pred) == by_id(full_cfg.run_dir / "eval" / "scripted" / "predictions.jsonl")
    strip = {"questions_per_second", "new_this_run", "wall_s_this_run"}
    assert {k: v for k, v in resumed.items() if k not in strip} == {k: v for k, v in full.items() if k not in strip}
    # a finished group is not run again; a larger limit runs only the new questions
    assert evaluate_group(cfg, "scripted", engine=engine())["new_this_run"] == 0
    more = make_cfg(tmp_path / "resumed", dataset, retriever_url, limit=14, max_in_flight=4)
    assert evaluate_group(more, "scripted", engine=engine())["n"] == 14
    # other settings: refused, unless restarted
    changed = make_cfg(tmp_path / "resumed", dataset, retriever_url, limit=14, max_turns=3)
    with pytest.raises(EvalError, match=r"different settings \(agent\).*--restart"):
        evaluate_group(changed, "scripted", engine=engine())
    assert evaluate_group(changed, "scripted", engine=engine(), restart=True)["new_this_run"] == 14


def test_model_retrained_in_place_is_noticed_on_resume(tmp_path, data_dir, tiny_model, tokenizer, retriever_url):
    """Retraining into the same folder (``sft/merged``) must not reuse the old model's predictions."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from sap.stages.evaluate import model_identity

    model_dir = tmp_path / "sft" / "merged"
    shutil.copytree(tiny_model, model_dir)
    cfg = make_cfg(tmp_path, data_dir / "nq" / "NQ-open.dev.jsonl", retriever_url, limit=3, groups=f"{{sft: {{model: {model_dir}}}}}")

    def run(**kw):
        return evaluate_group(cfg, "sft", engine=ScriptedEngine(tokenizer, lambda _ctx: "<answer> Paris </answer>"), **kw)

    assert run()["new_this_run"] == 3
    settings = cfg.run_dir / "eval" / "sft" / "settings.json"
    assert "model.safetensors" in json.loads(settings.read_text())["model_files"]
    assert run()["new_this_run"] == 0  # same model: resumed
    # settings written before the model's files were recorded: resumed (cannot tell)
    old = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in old.items() if k != "model_files"}))
    assert run()["new_this_run"] == 0

    # "retrain": new weights saved into the same folder
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(model_dir)
    with pytest.raises(
        EvalError, match=r"the model in .*merged changed since the earlier predictions were made \(.*model\.safetensors.*--restart"
    ):
        run()
    assert run(restart=True)["new_this_run"] == 3
    assert run()["new_this_run"] == 0
    # a hub id (not a local folder) is known by its name only
    assert model_identity("Qwen/Qwen2.5-3B-Instruct") is None


# --- the CLI with the real HF engine, then the report ---------------------------------------


@pytest.mark.slow
def test_cli_eval_hf_engine_and_report(tmp_path, data_dir, tiny_model, retriever_url):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(
        json.dumps(
            {
                "experiment": "cli",
                "run_root": str(tmp_path / "runs"),
                "retriever": {"url": retriever_url},
                "eval": {
                    "dataset": str(data_dir / "nq" / "NQ-open.dev.jsonl"),
                    "engine": "hf",
                    "max_new_tokens": 24,
                    "max_turns": 3,
                    "groups": {"baseline": {"model": str(tiny_model)}, "tiny_greedy": {"model": str(tiny_model)}},
                },
            }
        )
    )
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "-c", str(cfg_file), "--group", "baseline", "--limit", "6", "--seed", "1"])
    assert r.exit_code == 0, r.output
    group_dir = tmp_path / "runs" / "cli" / "eval" / "baseline"
    rows = list(read_jsonl(group_dir / "predictions.jsonl"))
    assert sorted(int(r["id"]) for r in rows) == list(range(6))
    for row in rows:
        assert 1 <= row["turns"] <= 4 and row["tokens_generated"] <= 4 * 24  # 3 search rounds + the answer turn
        assert row["prediction"] == "" or "<answer>" in row["response"]
    metrics = json.loads((group_dir / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS and metrics["n"] == 6 and metrics["engine"] == "hf"
    assert metrics["questions_per_second"] > 0 and metrics["tokens_per_question"] > 0
    manifest = json.loads((tmp_path / "runs" / "cli" / "manifest.json").read_text())
    assert manifest["commands"][-1]["stage"] == "eval"

    r = runner.invoke(app, ["eval", "-c", str(cfg_file), "--group", "all", "--limit", "2", "--set", "eval.temperature=0"])
    # baseline's settings changed (limit may grow or shrink, temperature may not): refused
    assert r.exit_code == 2 and "different settings" in r.output

    r = runner.invoke(app, ["report", "-c", str(cfg_file)])
    assert r.exit_code == 0, r.output
    report = (tmp_path / "runs" / "cli" / "report.md").read_text()
    assert "| 1 | Baseline (no SFT, no RL)" in report and "0.2374" in report and "tokens/q" in report
    assert "Not evaluated yet: `sft`, `rl`, `sft_rl`" in report
    png = (tmp_path / "runs" / "cli" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    r = runner.invoke(app, ["eval", "-c", str(cfg_file), "--group", "nope"])
    assert r.exit_code == 2 and "unknown eval group 'nope'" in r.output
