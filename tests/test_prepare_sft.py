from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.rules.config import PrepareSFTConfig
from sap.rules.prompts import build_prompt
from sap.stages.prepare_sft import DATA_FILE, DATASET_INFO_FILE, REPORT_FILE, prepare

PAPER = "<think> T1 </think>\n<search> S1 </search>\n<information> I1 </information>\n<think> T2 </think>\n<answer> A </answer>"

runner = CliRunner()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_cli(tmp_path, *args):
    result = runner.invoke(app, ["prepare-sft", *map(str, args), "--set", f"run_root={tmp_path / 'runs'}"])
    return result


def test_paper_example_gives_exactly_two_samples(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "who?", "golden_answers": ["A"], "trajectory": PAPER}])
    res = prepare([src], PrepareSFTConfig())
    prompt = build_prompt("who?")
    assert res.samples == [
        {"instruction": prompt, "input": "", "output": "<think> T1 </think> <search> S1 </search>"},
        {
            "instruction": prompt + "<think> T1 </think><search> S1 </search><information> I1 </information>",
            "input": "",
            "output": "<think> T2 </think> <answer> A </answer>",
        },
    ]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_n_searches_give_n_plus_one_samples(tmp_path, n):
    traj = (
        "".join(f"<think>t{i}</think><search>q{i}</search><information>d{i}</information>" for i in range(n))
        + "<think>t</think><answer>a</answer>"
    )
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "trajectory": traj}])
    res = prepare([src], PrepareSFTConfig())
    assert len(res.samples) == n + 1
    assert res.searches == {n: 1}
    for k, s in enumerate(res.samples):
        assert s["instruction"].count("<information>") - build_prompt("q").count("<information>") == k
        assert s["input"] == ""


def test_every_input_shape(tmp_path, data_dir):
    traj = "<think>t</think><search>s</search><information>i</information><answer>a</answer>"
    alpaca = {"instruction": build_prompt("x").split("Question:")[0], "input": "Question: who is x?", "output": traj}
    qa = {"question": "who is x", "golden_answers": ["a"], "response": traj}
    chat = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": build_prompt("who is x")},
            {"role": "assistant", "content": "<think>t</think><search>s</search>"},
            {"role": "tool", "content": "i"},
            {"role": "assistant", "content": "<answer>a</answer>"},
        ]
    }
    sharegpt = {"conversations": [{"from": "human", "value": "Question: who is x?"}, {"from": "gpt", "value": traj}]}
    raw = {
        "text": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + build_prompt("who is x")
        + "<|im_end|>\n<|im_start|>assistant\n"
        + traj
    }
    src = write_jsonl(tmp_path / "shapes.jsonl", [alpaca, qa, chat, sharegpt, raw])
    as_list = tmp_path / "shapes.json"
    as_list.write_text(json.dumps([qa, chat]))
    res = prepare([src, as_list], PrepareSFTConfig())
    assert res.rejections == []
    assert res.trajectories_kept == 7 and len(res.samples) == 14
    # every shape yields the same two samples
    first = res.samples[:2]
    for k in range(7):
        assert res.samples[2 * k : 2 * k + 2] == first
    assert first[1]["instruction"].endswith("Question: who is x?\n<think> t </think><search> s </search><information> i </information>")
    # the raw Search-R1 rollouts of the example file (data/examples/)
    res = prepare([data_dir / "examples" / "searchr1_example_case.txt"], PrepareSFTConfig())
    assert res.trajectories_read == 2 and res.trajectories_kept == 2
    assert res.searches == {1: 1, 2: 1}
    assert res.samples[-1]["output"].endswith("<answer> sinoatrial (SA) node </answer>")


def test_keep_prompt_uses_the_records_own_prompt(tmp_path):
    traj = "<answer>a</answer>"
    src = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Custom system. ", "input": "Question: q?", "output": traj}])
    res = prepare([src], PrepareSFTConfig(keep_prompt=True))
    assert res.samples[0]["instruction"] == "Custom system. Question: q?\n"


def test_aliases(tmp_path):
    traj = "<plan>p</plan><wiki_search>w</wiki_search><observation>o</observation><answer>a</answer>"
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "trajectory": traj}])
    # without aliases the unknown tags are untagged text before the answer: one sample
    plain = prepare([src], PrepareSFTConfig())
    assert len(plain.samples) == 1 and plain.samples[0]["output"].startswith("<plan>p</plan>")
    res = prepare([src], PrepareSFTConfig(tag_aliases={"plan": "think", "wiki_search": "search", "observation": "information"}))
    assert [s["output"] for s in res.samples] == ["<think> p </think> <search> w </search>", "<answer> a </answer>"]


MALFORMED = [
    ("not json at all", "not valid JSON"),
    ('["a list"]', "record is a JSON list"),
    ('{"question": "q"}', "no trajectory"),
    ('{"question": "q", "trajectory": 5}', "field 'trajectory' must be a string"),
    (
        '{"question": "q", "golden_answers": 3, "trajectory": "<answer>a</answer>"}',
        "field 'golden_answers' must be a string or a non-empty list of strings",
    ),
    ('{"trajectory": "<answer>a</answer>"}', "no question found"),
    ('{"question": "q", "trajectory": "<think>a</think>"}', "no final <answer>"),
    ('{"question": "q", "trajectory": "<search>s</search><answer>a</answer>"}', "has no <information> after it"),
    ('{"question": "q", "trajectory": "<think>a<answer>b</answer></think>"}', "<answer> opened inside <think>"),
    ('{"messages": [{"role": "user", "content": "Question: q"}]}', "no assistant message"),
]


def test_each_malformed_record_is_reported_with_file_line_and_reason(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(line for line, _ in MALFORMED) + "\n")
    res = prepare([src], PrepareSFTConfig())
    assert res.samples == []
    assert len(res.rejections) == len(MALFORMED)
    for i, (rej, (_, reason)) in enumerate(zip(res.rejections, MALFORMED, strict=True)):
        assert rej.where.file == str(src) and rej.where.line == i + 1
        assert reason in rej.reason, (rej.reason, reason)
        assert rej.kind == "malformed"


def test_filters(tmp_path):
    good = {
        "question": "q",
        "golden_answers": ["Paris"],
        "trajectory": "<think>t</think><search>s</search><information>i</information><answer>Paris</answer>",
    }
    wrong = {**good, "trajectory": good["trajectory"].replace("Paris</answer>", "Lyon</answer>")}
    no_search = {**good, "trajectory": "<think>t</think><answer>Paris</answer>"}
    remember = {
        **good,
        "trajectory": "<think>I remember it is Paris</think><search>s</search><information>i</information><answer>Paris</answer>",
    }
    no_gold = {"question": "q3", "trajectory": good["trajectory"].replace("Paris</answer>", "Lyon</answer>")}
    src = write_jsonl(tmp_path / "t.jsonl", [good, wrong, no_search, remember, good, no_gold])
    assert prepare([src], PrepareSFTConfig()).trajectories_kept == 6
    res = prepare([src], PrepareSFTConfig(min_f1=0.65))
    assert [r.where.line for r in res.rejections] == [2]
    assert "answer F1 0.00 < 0.65" in res.rejections[0].reason
    res = prepare([src], PrepareSFTConfig(require_search=True))
    assert [(r.where.line, r.kind) for r in res.rejections] == [(3, "filtered")]
    res = prepare([src], PrepareSFTConfig(reject_phrases=["i REMEMBER"]))
    assert [r.where.line for r in res.rejections] == [4]
    res = prepare([src], PrepareSFTConfig(dedupe=True))
    assert [r.where.line for r in res.rejections] == [5]
    assert "duplicate of" in res.rejections[0].reason
    # the first action of 'good', 'wrong' and 'remember'... repeats: dedupe drops repeated samples too
    assert res.duplicate_samples >= 1
    assert len({(s["instruction"], s["output"]) for s in res.samples}) == len(res.samples)


def test_cli_writes_data_info_and_report_deterministically(tmp_path):
    src = write_jsonl(
        tmp_path / "t.jsonl", [{"question": "q", "trajectory": PAPER}, "oops", {"question": "q2", "trajectory": PAPER.replace("A", "B")}]
    )
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        result = run_cli(tmp_path, src, "--out", out)
        assert result.exit_code == 0, result.output
        assert "3 trajectories read, 2 kept, 1 malformed" in result.output
        outs.append(out)
    for name in (DATA_FILE, DATASET_INFO_FILE, REPORT_FILE):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    data = json.loads((outs[0] / DATA_FILE).read_text())
    assert len(data) == 4 and set(data[0]) == {"instruction", "input", "output"}
    info = json.loads((outs[0] / DATASET_INFO_FILE).read_text())
    (entry,) = info.values()
    assert entry["file_name"] == DATA_FILE and entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    report = json.loads((outs[0] / REPORT_FILE).read_text())
    assert report["samples_written"] == 4 and report["searches_per_trajectory"] == {"1": 2}
    assert report["rejected"] == [
        {"file": str(src), "line": 2, "kind": "malformed", "reason": "not valid JSON: Expecting value (column 1)"}
    ]
    assert not list(outs[0].glob(".*.tmp"))
    manifest = json.loads((tmp_path / "runs" / "default" / "manifest.json").read_text())
    assert [c["stage"] for c in manifest["commands"]] == ["prepare-sft", "prepare-sft"]
    assert (tmp_path / "runs" / "default" / "config.yaml").is_file()


def test_real_command_records_its_command_line(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "trajectory": PAPER}])
    cmd = [
        sys.executable,
        "-m",
        "sap",
        "prepare-sft",
        str(src),
        "--dedupe",
        "--set",
        f"run_root={tmp_path / 'runs'}",
        "--set",
        "experiment=exp1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "exp1"
    assert json.loads((run_dir / "sft" / "data" / DATA_FILE).read_text())[0]["output"] == "<think> T1 </think> <search> S1 </search>"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["commands"][0]["command"].startswith("sap prepare-sft ") and "--dedupe" in manifest["commands"][0]["command"]
    assert "git_commit" in manifest and manifest["packages"]["sap"]
    assert "sft:" in (run_dir / "config.yaml").read_text()


def test_cli_strict_fails_and_writes_no_data(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "trajectory": PAPER}, "oops"])
    result = run_cli(tmp_path, src, "--out", tmp_path / "out", "--strict")
    assert result.exit_code == 1
    assert "--strict: 1 malformed" in result.output
    assert not (tmp_path / "out" / DATA_FILE).exists()
    assert (tmp_path / "out" / REPORT_FILE).exists()


def test_cli_errors_are_clear(tmp_path):
    result = run_cli(tmp_path, tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and "input file not found" in result.output
    result = run_cli(tmp_path, "--out", tmp_path)
    assert result.exit_code == 2 and "no input files" in result.output
    src = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "trajectory": PAPER}])
    result = run_cli(tmp_path, src, "--alias", "plan")
    assert result.exit_code == 2 and "expected NAME=TAG" in result.output
    result = run_cli(tmp_path, src, "--min-f1", "2")
    assert result.exit_code == 2 and "min_f1" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", ["oops"])
    result = run_cli(tmp_path, bad, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "no samples written" in result.output


def test_cli_help_explains_every_option_with_an_example():
    result = runner.invoke(app, ["prepare-sft", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for opt in (
        "--out",
        "--min-f1",
        "--require-search",
        "--reject-phrase",
        "--dedupe",
        "--alias",
        "--strict",
        "--keep-prompt",
        "--config",
        "--set",
    ):
        assert opt in result.output
    assert "Example" in result.output and "sap prepare-sft teacher.jsonl" in result.output
