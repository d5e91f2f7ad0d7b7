"""``sap report``: the metric set and protocol in the header, never sap's numbers under the
paper's name, and a warning for a group evaluated on fewer questions than its dataset has."""

from __future__ import annotations

import json

import pytest

from sap.stages.report import ReportError, markdown, write_report


def group(metric_set: str, n: int = 3610, protocol: str | None = None, **extra) -> dict:
    return {
        "n": n,
        "dataset_questions": 3610,
        "dataset": "data/nq_search/test.parquet",
        "model": "m",
        "protocol": protocol or metric_set,
        "metric_set": metric_set,
        "em": 0.11,
        "rouge_l": 0.22,
        "sap": {"em": 0.11, "subem": 0.5, "f1": 0.3, "rouge_l": 0.22},
        "paper": {"em": 0.33, "rouge_l": 0.44},
        **extra,
    }


def test_paper_protocol_shows_the_papers_metrics():
    md = markdown("x", {"baseline": group("paper"), "sft": group("paper")})
    assert "Protocol: `paper`. Metrics: `paper`, the paper's metrics" in md
    assert "| EM (paper) | ROUGE-L (paper) |" in md
    assert "| 0.3300 | 0.4400 |" in md and "0.1100" not in md
    assert "Warning" not in md


def test_sap_protocol_is_never_labelled_as_the_papers():
    md = markdown("x", {"baseline": group("sap")})
    assert "Protocol: `sap`. Metrics: `sap`, sap's metrics" in md and "not the paper's" in md
    assert "| EM (sap) | ROUGE-L (sap) |" in md and "| 0.1100 | 0.2200 |" in md
    assert "as in the paper's table 3" not in md and "as in its table 3" not in md


def test_warns_on_a_group_evaluated_on_fewer_questions(tmp_path):
    groups = {"baseline": group("paper"), "sft": group("paper", n=350)}
    md = markdown("x", groups)
    assert "Warning: `sft` was evaluated on 350 of the 3610 questions of `data/nq_search/test.parquet`" in md
    assert "`baseline` was evaluated" not in md
    for g, m in groups.items():
        (tmp_path / "eval" / g).mkdir(parents=True)
        (tmp_path / "eval" / g / "metrics.json").write_text(json.dumps(m))
    md_path, png = write_report(tmp_path, "x")
    assert "Warning: `sft`" in md_path.read_text() and png.stat().st_size > 0


def test_mixed_or_old_metric_files():
    old = {"n": 5, "em": 0.5, "rouge_l": 0.6, "model": "m", "dataset": "d"}  # before metric sets
    md = markdown("x", {"baseline": old})
    assert "Metrics: `sap`" in md and "| 0.5000 | 0.6000 |" in md
    md = markdown("x", {"baseline": group("paper"), "sft": group("sap")})
    assert "different metric sets (paper, sap); sap's set is shown" in md
    with pytest.raises(ReportError, match="no 'paper' metrics"):
        markdown("x", {"baseline": old | {"metric_set": "paper"}})
