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
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

METRICS: tuple[str, ...] = ("em", "subem", "f1", "rouge_l")


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
