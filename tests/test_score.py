from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.stages.score import PredictionsError, score_file

runner = CliRunner()


def test_jsonl_with_prediction_or_response(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"golden_answers": ["Paris"], "prediction": "paris"},
        {"golden_answers": ["Paris"], "response": "<think>x</think><answer> Lyon </answer>"},
        {"golden_answers": ["Paris"], "response": "no answer at all"},
        {"answer": "Bob Russell", "prediction": "Bob Russell and Bobby Scott"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = score_file(path)
    assert m["n"] == 4
    assert m["em"] == pytest.approx(1 / 4)
    assert m["subem"] == pytest.approx(2 / 4)


def test_paper_script_json_list(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            [
                {"question": "q", "ground_truth": ["Paris"], "model_output": "<answer>Paris</answer>"},
                {"ground_truth": "Rome", "model_output": "<answer>Milan</answer>"},
            ]
        )
    )
    m = score_file(path)
    assert (m["n"], m["em"]) == (2, 0.5)


def test_cli_json_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"golden_answers": ["x"], "prediction": "x"}) + "\n")
    result = runner.invoke(app, ["score", "--predictions", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"n": 1, "em": 1.0, "subem": 1.0, "f1": 1.0, "rouge_l": 1.0}
    result = runner.invoke(app, ["score", "--predictions", str(path)])
    assert "EM" in result.output and "ROUGE-L" in result.output


def test_bad_files_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"golden_answers": ["a"], "prediction": "a"}) + "\n" + json.dumps({"prediction": "a"}) + "\n")
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: no gold answers"):
        score_file(path)
    result = runner.invoke(app, ["score", "--predictions", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "file not found" in result.output
