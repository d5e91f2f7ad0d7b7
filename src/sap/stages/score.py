"""``sap score``: metrics of an existing predictions file.

Reads JSONL records with gold answers (``golden_answers``, ``answer``, ...: the one rule of
:mod:`sap.rules.questions`) and either a
``prediction`` or a ``response`` (the answer is extracted from it), or the JSON list written
by the paper's evaluation script (``ground_truth`` and ``model_output``).

``metrics="paper"`` scores the way the paper's ``compute_metrics.py`` does, record rules
included (see :func:`sap.rules.scoring.paper_record`): a JSON list (or a ``.jsonl`` file),
output ``n``, ``em``, ``rouge_l``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sap.rules.errors import SapError
from sap.rules.questions import ANSWER_FIELDS, find_gold_answers
from sap.rules.records import read_records
from sap.rules.scoring import METRIC_SETS, Scores, aggregate, paper_aggregate, paper_record, paper_score, score
from sap.rules.tags import extract_answer


class PredictionsError(SapError, ValueError):
    pass


_RESPONSE_KEYS = ("response", "model_output")


def _gold(record: dict[str, Any], where: str) -> list[str]:
    gold = find_gold_answers(record, where, error=PredictionsError)
    if gold is None:
        raise PredictionsError(f"{where}: no gold answers (expected one of {', '.join(ANSWER_FIELDS)})")
    return gold


def _prediction(record: dict[str, Any], where: str) -> str:
    if "prediction" in record:
        value = record["prediction"]
        if not isinstance(value, str):
            raise PredictionsError(f"{where}: field 'prediction' must be a string")
        return value
    for key in _RESPONSE_KEYS:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise PredictionsError(f"{where}: field {key!r} must be a string")
            return extract_answer(value)
    raise PredictionsError(f"{where}: no prediction (expected 'prediction', 'response' or 'model_output')")


def load_predictions(path: str | Path) -> list[tuple[str, list[str]]]:
    """(prediction, gold answers) pairs of a predictions file; errors name file and line."""
    pairs = []
    for where, r in read_records(path, PredictionsError, layout="auto"):
        if not isinstance(r, dict):
            raise PredictionsError(f"{where}: record is not an object")
        pairs.append((_prediction(r, str(where)), _gold(r, str(where))))
    return pairs


def load_paper_records(path: str | Path) -> list[tuple[str, list[str]]]:
    """(prediction, gold answers) of each record, read as ``compute_metrics.py`` reads them:
    the file holds one JSON list (a ``.jsonl`` file: one record per line)."""
    hint = "the prediction JSON must contain a list of records (the paper's infer.py output)"
    pairs = []
    for where, r in read_records(path, PredictionsError, layout="suffix", list_hint=hint):
        try:
            pairs.append(paper_record(r))
        except ValueError as e:
            raise PredictionsError(f"{where}: {e}") from None
    return pairs


def score_file(path: str | Path, metrics: str = "sap") -> dict[str, float | int | None]:
    """Mean metrics of a predictions file with the named metric set (``sap`` or ``paper``)."""
    if metrics == "paper":
        return paper_aggregate(paper_score(pred, gold) for pred, gold in load_paper_records(path))
    if metrics != "sap":
        raise PredictionsError(f"--metrics {metrics}: unknown metric set (expected {' or '.join(METRIC_SETS)})")
    rows: list[Scores] = [score(pred, gold) for pred, gold in load_predictions(path)]
    return aggregate(rows)


def describe(metrics: dict[str, float | int | None], as_json: bool = False, metrics_set: str = "sap") -> str:
    """``sap score``'s output: the JSON object, or the set's name and one metric per line."""
    if as_json:
        return json.dumps(metrics)
    labels = (("em", "EM"), ("subem", "SubEM"), ("f1", "F1"), ("rouge_l", "ROUGE-L"))
    shown = [f"{label:<8} {metrics[k]:.4f}" if metrics[k] is not None else f"{label:<8} -" for k, label in labels if k in metrics]
    return "\n".join([f"metrics  {metrics_set}", f"n        {metrics['n']}", *shown])
