"""The PPO reward (``sap.rl.reward``) on hand-worked trajectories. It imports only sap.rules,
so it runs in the core environment too."""

from __future__ import annotations

import numpy as np
import pytest

from sap.rl.reward import compute_score, trajectory_format
from sap.rules.prompts import INVALID_ACTION_MESSAGE, information_block
from sap.rules.questions import gold_answers

INFO_PARIS = information_block('Doc 1(Title: "France") Paris is the capital of France.\n')
INFO_OTHER = information_block('Doc 1(Title: "Lyon") Lyon is a city.\n')
GOLD = {"target": np.array(["Paris"], dtype=object)}  # as VeRL hands it over from the parquet

GOOD = (
    "<think> I should look it up. </think> <search> capital of france </search>"
    + INFO_PARIS
    + "<think> Doc 1 says Paris. </think> <answer> Paris </answer>"
)
WRONG_HIT = GOOD.replace("<answer> Paris </answer>", "<answer> Lyon </answer>")
WRONG_MISS = "<think> x </think> <search> capital of france </search>" + INFO_OTHER + "<answer> Lyon </answer>"
NO_ANSWER = "<think> I should look it up. </think> <search> capital of france </search>" + INFO_PARIS
TWO_ANSWERS = "<answer> Rome </answer> <answer> the Paris </answer>"


def score(response: str, reward: str = "em", **extra) -> dict[str, float]:
    return compute_score("nq", response, GOLD, extra_info=extra, reward=reward)


def test_exact_match_of_the_last_answer():
    r = score(GOOD)
    assert (r["score"], r["em"], r["valid_format"], r["searches"], r["answered"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert score(WRONG_HIT)["score"] == 0.0
    assert score(NO_ANSWER)["score"] == 0.0 and score(NO_ANSWER)["answered"] == 0.0
    # the last <answer> counts, normalised (articles dropped); two answers break the format
    r = score(TWO_ANSWERS)
    assert (r["score"], r["valid_format"]) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("response", "extra", "expected"),
    [
        (GOOD, {}, 1.0),  # right and well formed
        (TWO_ANSWERS, {}, 0.8),  # right, ill formed: 1 - structure_format_score
        (GOOD, {"sap_invalid_actions": 1}, 0.8),  # right, but needed the invalid-action message
        (WRONG_HIT, {}, 0.1),  # wrong, well formed, a retrieved passage holds the gold answer
        (WRONG_MISS, {}, 0.2),  # wrong, well formed, retrieval missed
        ("<answer> Lyon </answer> <answer> Nice </answer>", {}, 0.1),  # wrong, ill formed, but answered
        (NO_ANSWER, {}, 0.0),  # no answer at all
    ],
)
def test_searchr1_format_reward(response: str, extra: dict, expected: float):
    assert score(response, "em_format", **extra)["score"] == pytest.approx(expected)


def test_agent_loop_fields_become_metrics():
    r = score(GOOD, sap_searches=2, sap_turns=3, sap_retrieval_failures=1, sap_invalid_actions=0, sap_budget_exhausted=True)
    assert (r["searches"], r["turns"], r["retrieval_failures"], r["budget_exhausted"]) == (2.0, 3.0, 1.0, 1.0)
    assert all(isinstance(v, float) for v in r.values())


def test_format_check_uses_the_shared_grammar():
    assert trajectory_format(GOOD) == (True, [])
    ok, problems = trajectory_format(NO_ANSWER)
    assert not ok and any("answer" in p for p in problems)
    ok, problems = trajectory_format(GOOD.replace("<answer>", INVALID_ACTION_MESSAGE + "<answer>"), invalid_actions=1)
    assert not ok and "1 invalid action(s)" in problems


def test_gold_answer_forms_and_bad_options():
    assert gold_answers({"target": np.array(["a", "b"], dtype=object)}) == ["a", "b"]
    assert gold_answers(["a"]) == ["a"] and gold_answers("a") == ["a"]
    for bad in (3, [], {"target": []}, ["a", 1]):
        with pytest.raises(ValueError, match="must be a string or a non-empty list of strings"):
            gold_answers(bad)
    with pytest.raises(ValueError, match="unknown reward"):
        compute_score("nq", GOOD, GOLD, reward="f1")
