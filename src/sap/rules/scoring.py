"""Answer scoring, shared by ``sap score``, eval, prepare-sft's filters and the RL reward.

Every metric is computed against each gold answer and the maximum is kept; an empty
prediction scores 0 on all of them.

- ``normalize``: lower-case, delete ASCII punctuation, drop the articles a/an/the, collapse
  whitespace (SQuAD's normalisation).
- ``em``: normalised prediction equals a normalised gold answer.
- ``subem``: a normalised gold answer is a substring of the normalised prediction.
- ``f1``: token F1 between normalised prediction and gold tokens (bag of words).
- ``rouge_l``: ROUGE-L F1 (beta = 1) from the ``rouge-score`` package on the raw strings, with
  its default tokenizer (lower-case, alphanumeric tokens) and no stemming.

Two named metric sets (:data:`METRIC_SETS`), both always computed by eval:

- ``sap``: the functions above (SQuAD EM, which equals Search-R1's reward; rouge-score ROUGE-L).
- ``paper``: the paper's ``compute_metrics.py``, quirks included. :func:`paper_normalize`
  lower-cases, replaces the articles a/an/the by spaces, then replaces every character outside
  ``[a-z0-9]`` or whitespace by a space (so accented and other non-ASCII letters become spaces, and
  ``Jay-Z`` equals ``Jay Z``), collapses whitespace and strips. :func:`paper_em` compares
  normalised strings (an empty normalised prediction never matches). :func:`paper_rouge_l` is the
  F1 of the longest common subsequence of lower-cased *whitespace* tokens, punctuation kept
  (``Paris.`` vs ``Paris`` scores 0), best over the gold answers that have tokens.
  :func:`paper_score_records` scores the paper's prediction JSON exactly as the script does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from sap.rules.tags import extract_answer_paper

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

METRICS: tuple[str, ...] = ("em", "subem", "f1", "rouge_l")
PAPER_METRICS: tuple[str, ...] = ("em", "rouge_l")
METRIC_SETS: dict[str, tuple[str, ...]] = {"sap": METRICS, "paper": PAPER_METRICS}
"""Metric set name -> the metrics it has (the names under which metrics.json stores them)."""


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


def em(prediction: str, gold: str | Sequence[str]) -> float:
    p = normalize(prediction)
    if not p:
        return 0.0
    return float(any(p == normalize(g) for g in _golds(gold)))


def subem(prediction: str, gold: str | Sequence[str]) -> float:
    p = normalize(prediction)
    if not p:
        return 0.0
    return float(any((ng := normalize(g)) and ng in p for g in _golds(gold)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, gold: str | Sequence[str]) -> float:
    p = normalize(prediction).split()
    if not p:
        return 0.0
    return max((_token_f1(p, normalize(g).split()) for g in _golds(gold)), default=0.0)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, gold: str | Sequence[str]) -> float:
    if not prediction.strip():
        return 0.0
    scorer = _rouge_scorer()
    return max((scorer.score(g, prediction)["rougeL"].fmeasure for g in _golds(gold)), default=0.0)


@dataclass(frozen=True)
class Scores:
    em: float
    subem: float
    f1: float
    rouge_l: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(prediction: str, gold: str | Sequence[str]) -> Scores:
    return Scores(em(prediction, gold), subem(prediction, gold), f1(prediction, gold), rouge_l(prediction, gold))


def aggregate(scores: Iterable[Scores]) -> dict[str, float | int]:
    """Mean of each metric over questions, with ``n``."""
    rows = list(scores)
    n = len(rows)
    out: dict[str, float | int] = {"n": n}
    for m in METRICS:
        out[m] = sum(getattr(s, m) for s in rows) / n if n else 0.0
    return out


# --- the paper's metric set (compute_metrics.py) --------------------------------------------

_PAPER_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PAPER_NOT_ALNUM = re.compile(r"[^a-z0-9\s]")
_WHITESPACE = re.compile(r"\s+")


def paper_normalize(text: str | None) -> str:
    """The paper's EM normalisation, in its order: lower-case, articles -> space, every
    character outside ``[a-z0-9\\s]`` -> space, whitespace runs -> one space, strip."""
    text = (text or "").lower()
    text = _PAPER_ARTICLES.sub(" ", text)
    text = _PAPER_NOT_ALNUM.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


def paper_em(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction is non-empty and equals a normalised gold answer."""
    p = paper_normalize(prediction)
    if not p:
        return 0.0
    return float(any(paper_normalize(g) == p for g in _golds(gold)))


def _paper_tokens(text: str | None) -> list[str]:
    return (text or "").strip().lower().split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b):
            above = row[j + 1]
            row[j + 1] = diag + 1 if x == y else max(above, row[j])
            diag = above
    return row[-1]


def paper_rouge_l(prediction: str, gold: str | Sequence[str]) -> float:
    """LCS F1 over lower-cased whitespace tokens, best over the gold answers (those without
    tokens are skipped); 0.0 for a prediction without tokens."""
    pred = _paper_tokens(prediction)
    if not pred:
        return 0.0
    best = 0.0
    for g in _golds(gold):
        ref = _paper_tokens(g)
        if not ref:
            continue
        lcs = _lcs(pred, ref)
        if lcs == 0:
            continue
        precision = lcs / len(pred)
        recall = lcs / len(ref)
        best = max(best, (2 * precision * recall) / (precision + recall))
    return best


@dataclass(frozen=True)
class PaperScores:
    em: float
    rouge_l: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paper_score(prediction: str, gold: str | Sequence[str]) -> PaperScores:
    return PaperScores(paper_em(prediction, gold), paper_rouge_l(prediction, gold))


def paper_aggregate(scores: Iterable[PaperScores]) -> dict[str, float | int | None]:
    """``compute_metrics.py``'s averages: EM hits / n and the ROUGE-L sum / n, summed in
    record order. With no records the script prints no score: ``em``/``rouge_l`` are None."""
    em_hits = 0
    rouge_sum = 0.0
    n = 0
    for s in scores:
        n += 1
        em_hits += int(s.em)
        rouge_sum += s.rouge_l
    if not n:
        return {"n": 0, "em": None, "rouge_l": None}
    return {"n": n, "em": em_hits / n, "rouge_l": rouge_sum / n}


def paper_record(entry: dict) -> tuple[str, list[str]]:
    """(prediction, gold answers) of one record of the paper's prediction JSON, read as
    ``compute_metrics.py`` reads it: ``prediction`` as a string when it is present and not
    null, else the paper's extraction from ``model_output``; gold from ``ground_truth``, or from
    ``golden_answers`` when ``ground_truth`` is missing or empty; a list's items and a single
    value turned into strings. Raises ValueError where the script would crash."""
    if not isinstance(entry, dict):
        raise ValueError(f"record is a JSON {type(entry).__name__}, expected an object")
    prediction = entry.get("prediction")
    if prediction is not None:
        pred = str(prediction)
    else:
        output = entry.get("model_output", "")
        if output and not isinstance(output, str):
            raise ValueError(f"field 'model_output' must be a string, got {type(output).__name__}")
        pred = extract_answer_paper(output)
    raw = entry.get("ground_truth") or entry.get("golden_answers")
    if raw is None:
        golds: list[str] = []
    elif isinstance(raw, list):
        golds = [str(g) for g in raw]
    else:
        golds = [str(raw)]
    return pred, golds


def score_set(prediction: str, gold: str | Sequence[str], metric_set: str) -> dict[str, float]:
    """One prediction scored with the named metric set (``sap`` or ``paper``)."""
    if metric_set == "paper":
        return paper_score(prediction, gold).as_dict()
    if metric_set == "sap":
        return score(prediction, gold).as_dict()
    raise ValueError(f"unknown metric set {metric_set!r}: expected one of {', '.join(METRIC_SETS)}")
