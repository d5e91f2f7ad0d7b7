"""AFM teacher data through ``sap prepare-sft``: under ``protocol: paper`` the output file equals,
byte for byte, what the paper's two scripts make of it (``afm_mhqa_search.py``, then
``make_iterative_sft_data.py``), both reimplemented here from their published definitions; under
``sap`` the same file goes through sap's validated layout with AFM tag aliases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.rules.config import PrepareSFTConfig
from sap.stages.prepare_sft import PrepareError, paper_samples, prepare

REPO = Path(__file__).resolve().parents[1]
AFM = REPO / "tests" / "data" / "afm_mhqa_sample.json"

# afm_mhqa_search.py: the instruction every record gets, and its output mapping
TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query "
    "</search> and it will return the top searched results between <information> and </information>. You can search as "
    "many times as your want. If you find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>."
)


def ref_afm(output: str) -> str:
    if not output:
        return ""
    for old, new in (("plan", "think"), ("reflection", "think"), ("wiki_search", "search"), ("observation", "information")):
        output = output.replace("<" + old + ">", "<" + new + ">").replace("</" + old + ">", "</" + new + ">")
    return re.sub(r"</think>\s*<think>", "\n", output)


def ref_split(system: str, question: str, output: str) -> list[dict]:
    """make_iterative_sft_data.split_trajectory, from its definition."""
    pieces = re.split(r"(<information>.*?</information>)", output, flags=re.DOTALL)
    history, out = system + "\n\n" + question + "\n", []
    i = 0
    while i < len(pieces):
        step = pieces[i].strip()
        if step:
            out.append({"instruction": history, "input": "", "output": step})
            history = history + step + (pieces[i + 1] if i + 1 < len(pieces) else "")
        i += 2
    return out


def ref_pipeline(records: list[dict], afm: bool) -> bytes:
    samples = []
    for item in records:
        system, question, output = item.get("instruction", ""), item.get("input", ""), item.get("output", "")
        if afm:
            system, output = TEMPLATE, ref_afm(output)
        samples.extend(ref_split(system, question, output))
    return json.dumps(samples, indent=2, ensure_ascii=False).encode("utf-8")


def run_prepare(tmp_path: Path, *inputs: Path, protocol: str = "paper", extra: tuple[str, ...] = ()) -> Path:
    out = tmp_path / f"out-{protocol}"
    args = ["prepare-sft", *map(str, inputs), "--out", str(out), "--set", f"protocol={protocol}", "--set", f"run_root={tmp_path / 'runs'}"]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return out


def test_afm_sample_has_the_shape_of_the_real_data():
    records = json.loads(AFM.read_text(encoding="utf-8"))
    text = " ".join(r["output"] for r in records)
    for tag in ("<plan>", "<reflection>", "<wiki_search>", "<observation>", "</think>\n\n<think>"[:8]):
        assert tag in text
    assert all(r["input"].startswith("Question: ") and "wiki_search" in r["instruction"] for r in records)
    assert re.search(r"</think>\s+<think>", text)  # adjacent thinks, to be merged


def test_paper_layout_equals_the_papers_scripts_byte_for_byte(tmp_path):
    records = json.loads(AFM.read_text(encoding="utf-8"))
    out = run_prepare(tmp_path, AFM)
    got = (out / "iterative_sft_data.json").read_bytes()
    assert got == ref_pipeline(records, afm=True)
    samples = json.loads(got)
    assert len(samples) == 3 + 1 + 2  # 2 searches -> 3 samples; none -> 1; 1 -> 2
    assert samples[0]["instruction"] == TEMPLATE + "\n\nQuestion: What occupation do John Frankenheimer and Tiffanie DeBartolo share?\n"
    assert samples[0]["output"].startswith("<think>I need the occupation") and "<plan>" not in got.decode()
    assert (
        samples[3]["output"] == "<think>I remember this well.\nIt was Röntgen, for X-rays.</think>\n<answer>Wilhelm Conrad Röntgen</answer>"
    )
    # segments are stripped, so the blank line before each <information> is lost (a quirk kept)
    assert samples[1]["instruction"].endswith("</information>") and "</search><information>Doc 1" in samples[1]["instruction"]
    report = json.loads((out / "prepare_sft_report.json").read_text())
    assert report["layout"] == "paper" and report["afm_files"] == [str(AFM)]
    # the already-processed file (afm_mhqa_search.py's output) gives the same bytes: its own instruction is kept
    processed = tmp_path / "AFM-MHQA-Agent-SFT-Dataset-Processed.json"
    processed.write_text(json.dumps([{"instruction": TEMPLATE, "input": r["input"], "output": ref_afm(r["output"])} for r in records]))
    assert (run_prepare(tmp_path / "p", processed) / "iterative_sft_data.json").read_bytes() == got


@pytest.mark.parametrize(
    "output",
    [
        "<information>leading block</information><think>a</think><answer>x</answer>",  # empty first segment: block dropped
        "<think>a</think><search>q</search><information>unclosed <think>b</think><answer>x</answer>",
        "",
        "   \n",
        "<think>a</think><search>q</search><information>i1</information>  \n <information>i2</information><think>b</think><answer>x</answer>",
        "<think>a</think><search>q</search><information>\nline\n</information>\n\n<think>b</think> <answer> x </answer>\n",
        "plain text, no tags",
    ],
)
def test_splitter_quirks_match(output):
    assert paper_samples("SYS", "Question: q?", output) == ref_split("SYS", "Question: q?", output)


def test_a_non_afm_file_keeps_its_own_prompt_and_folders_are_read(tmp_path):
    own = [
        {
            "instruction": "My own system prompt.",
            "input": "Question: who?",
            "output": "<think>t</think><search>s</search><information>i</information><answer>a</answer>",
        },
        {"instruction": "Other.", "output": "<think>t</think><answer>b</answer>"},  # no input: ""
    ]
    folder = tmp_path / "afm_mhqa_sft"
    (folder / ".sap-partial").mkdir(parents=True)
    (folder / "data.json").write_text(json.dumps(own))
    (folder / ".sap-verified.json").write_text("{}")
    (folder / ".sap-partial" / "x.json").write_text("[]")
    (folder / "README.md").write_text("# card")
    out = run_prepare(tmp_path, folder)
    assert (out / "iterative_sft_data.json").read_bytes() == ref_pipeline(own, afm=False)


def test_paper_layout_refuses_sap_filters(tmp_path):
    with pytest.raises(PrepareError, match="no filters"):
        prepare([AFM], PrepareSFTConfig(min_f1=0.5), layout="paper")


def test_sap_layout_reads_the_afm_sample_with_aliases(tmp_path):
    aliases = [
        "--alias",
        "plan=think",
        "--alias",
        "reflection=think",
        "--alias",
        "wiki_search=search",
        "--alias",
        "observation=information",
    ]
    out = run_prepare(tmp_path, AFM, protocol="sap", extra=tuple(aliases))
    report = json.loads((out / "prepare_sft_report.json").read_text())
    assert report["layout"] == "sap" and report["trajectories_kept"] == 3, report["rejected"]
    samples = json.loads((out / "iterative_sft_data.json").read_text())
    assert len(samples) == 6 and all("<plan>" not in s["output"] for s in samples)
