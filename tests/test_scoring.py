from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from sap.rules.scoring import aggregate, em, f1, normalize, rouge_l, score, subem


def test_normalize_squad_rules():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize("an apple a day") == "apple day"
    assert normalize("  A  ") == ""


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("Paris", ["paris"], 1.0),
        ("the Paris.", ["Paris"], 1.0),
        ("Paris, France", ["Paris"], 0.0),
        ("", ["Paris"], 0.0),
        ("Lyon", ["Paris", "lyon"], 1.0),
    ],
)
def test_em(pred, gold, expected):
    assert em(pred, gold) == expected


def test_subem():
    assert subem("Paris, France", ["paris"]) == 1.0
    assert subem("France", ["paris"]) == 0.0
    assert subem("", ["paris"]) == 0.0
    assert subem("anything", ["the"]) == 0.0  # a gold that normalises to nothing never matches


def test_f1_hand_worked():
    # pred tokens: [wilhelm, rontgen]; gold tokens: [wilhelm, conrad, rontgen]
    # precision 2/2, recall 2/3 -> F1 = 0.8
    assert f1("Wilhelm Rontgen", ["Wilhelm Conrad Rontgen"]) == pytest.approx(0.8)
    assert f1("x", ["y", "x z"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1("", ["x"]) == 0.0


def test_rouge_l_matches_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cases = [
        ("the sinoatrial node", ["sinoatrial (SA) node"]),
        ("Bobby Scott and Bob Russell", ["Bob Russell", "Bobby Scott"]),
        ("running", ["run"]),
    ]
    for pred, golds in cases:
        expected = max(scorer.score(g, pred)["rougeL"].fmeasure for g in golds)
        assert rouge_l(pred, golds) == pytest.approx(expected)
    # hand-worked: LCS("a b c d", "a c e") = 2 -> P=2/4, R=2/3, F=4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("running", ["run"]) == 0.0  # no stemming
    assert rouge_l("  ", ["x"]) == 0.0


def test_score_and_aggregate():
    rows = [score("Paris", ["Paris"]), score("", ["Paris"])]
    agg = aggregate(rows)
    assert agg == {"n": 2, "em": 0.5, "subem": 0.5, "f1": 0.5, "rouge_l": 0.5}
    assert aggregate([]) == {"n": 0, "em": 0.0, "subem": 0.0, "f1": 0.0, "rouge_l": 0.0}
