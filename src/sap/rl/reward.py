"""The PPO reward: exact match of the response's last ``<answer>`` (the paper's reward).

VeRL calls :func:`compute_score` once per trajectory (``reward.custom_reward_function`` =
``pkg://sap.rl.reward`` / ``compute_score``) with the decoded response, the parquet's
``reward_model.ground_truth`` and ``extra_info`` (which VeRL fills with the agent loop's
``extra_fields``). It returns a dict: ``score`` is the reward; every other key is logged by
VeRL per step (``reward_extra_info``), so searches, turns, format validity and retrieval
failures show up in the training metrics.

``reward="em_format"`` is Search-R1's format-aware variant: a correct answer in a well-formed
trajectory scores 1 (ill-formed: ``1 - structure_format_score``); a wrong answer scores
``retrieval_score`` when the trajectory is well-formed and a retrieved passage holds a gold
answer, ``structure_format_score`` when it is well-formed, ``final_format_score`` when it is
ill-formed but ends with an answer, else 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sap.rules.questions import gold_answers
from sap.rules.scoring import em, subem
from sap.rules.tags import ANSWER, INFORMATION, SEARCH, extract_answer, parse, validate, without_invalid_messages


def trajectory_format(response: str, invalid_actions: int = 0) -> tuple[bool, list[str]]:
    """Is the response a well-formed Search-R1 trajectory (``sap.rules.tags`` episode rules)?
    A trajectory that needed the invalid-action message is not."""
    parsed = parse(response)
    problems = [p.reason for p in parsed.problems if p.fatal]
    if parsed.ok:
        problems += [p.reason for p in validate(parsed.steps) if p.fatal]
    if invalid_actions:
        problems.append(f"{invalid_actions} invalid action(s)")
    return not problems, problems


def _information(response: str) -> list[str]:
    parsed = parse(response)
    return [s.content for s in parsed.steps if s.kind == INFORMATION]


def _int(extra: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = extra.get(key)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    reward: str = "em",
    structure_format_score: float = 0.2,
    final_format_score: float = 0.1,
    retrieval_score: float = 0.1,
    **_: Any,
) -> dict[str, float]:
    """Reward and metrics of one trajectory. ``solution_str`` is the *response* only (never the
    prompt, whose example contains ``<answer> Beijing </answer>``)."""
    if reward not in ("em", "em_format"):
        raise ValueError(f"unknown reward {reward!r}: expected 'em' or 'em_format'")
    extra = dict(extra_info or {})
    golds = gold_answers(ground_truth, "reward", "reward_model.ground_truth")
    answer = extract_answer(solution_str)
    correct = em(answer, golds)
    invalid = _int(extra, "sap_invalid_actions")
    valid, _problems = trajectory_format(solution_str, invalid)
    parsed = parse(without_invalid_messages(solution_str))
    searches = _int(extra, "sap_searches", sum(1 for s in parsed.steps if s.kind == SEARCH))

    if reward == "em":
        score = correct
    elif correct:
        score = 1.0 if valid else 1.0 - structure_format_score
    elif valid:
        hit = any(subem(info, golds) for info in _information(solution_str))
        score = retrieval_score if hit else structure_format_score
    elif any(s.kind == ANSWER for s in parsed.steps):
        score = final_format_score
    else:
        score = 0.0

    return {
        "score": float(score),
        "em": float(correct),
        "answered": float(bool(answer)),
        "valid_format": float(valid),
        "searches": float(searches),
        "turns": float(_int(extra, "sap_turns", searches + 1)),
        "invalid_actions": float(invalid),
        "retrieval_failures": float(_int(extra, "sap_retrieval_failures")),
        "budget_exhausted": float(bool(extra.get("sap_budget_exhausted", False))),
    }
