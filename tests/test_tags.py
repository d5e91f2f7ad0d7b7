from __future__ import annotations

import pytest

from sap.rules.tags import (
    ANSWER,
    INFORMATION,
    SEARCH,
    TEXT,
    THINK,
    Step,
    extract_answer,
    extract_queries,
    parse,
    parse_action,
    render,
    render_action,
    render_history,
    split_actions,
    validate,
)

PAPER = "<think> T1 </think>\n<search> S1 </search>\n<information> I1 </information>\n<think> T2 </think>\n<answer> A </answer>"


def test_parse_paper_trajectory():
    parsed = parse(PAPER)
    assert parsed.ok and parsed.problems == []
    assert parsed.steps == [
        Step(THINK, "T1"),
        Step(SEARCH, "S1"),
        Step(INFORMATION, "I1"),
        Step(THINK, "T2"),
        Step(ANSWER, "A"),
    ]
    assert validate(parsed.steps) == []


def test_split_and_render_paper_example():
    actions = split_actions(parse(PAPER).steps)
    assert len(actions) == 2
    assert render_action(actions[0]) == "<think> T1 </think> <search> S1 </search>"
    assert render_history(actions[:1]) == "<think> T1 </think><search> S1 </search><information> I1 </information>"
    assert render_action(actions[1]) == "<think> T2 </think> <answer> A </answer>"
    assert actions[0].information == "I1" and actions[1].information is None


@pytest.mark.parametrize("n", [0, 1, 3])
def test_n_searches_give_n_plus_one_actions(n):
    text = "".join(f"<think>t{i}</think><search>q{i}</search><information>d{i}</information>" for i in range(n))
    text += "<think>done</think><answer>x</answer>"
    steps = parse(text).steps
    assert validate(steps) == []
    actions = split_actions(steps)
    assert len(actions) == n + 1
    assert [a.information for a in actions] == [f"d{i}" for i in range(n)] + [None]


def test_render_round_trip():
    steps = parse(PAPER).steps
    assert parse(render(steps)).steps == steps


def test_untagged_text_is_kept_as_text():
    steps = parse("<search>q</search><information>d</information>Thinking aloud.<answer>a</answer>").steps
    assert Step(TEXT, "Thinking aloud.") in steps
    assert validate(steps) == []


def test_missing_opening_think_is_repaired_with_warning():
    parsed = parse("reasoning here </think><answer>a</answer>")
    assert parsed.ok
    assert parsed.steps[0] == Step(THINK, "reasoning here")
    assert [p.fatal for p in parsed.problems] == [False]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<think>a<search>q</search></think><answer>x</answer>", "<search> opened inside <think>"),
        ("<think>a</search><answer>x</answer>", "</search> closes <think>"),
        ("<think>a</think><answer>x", "<answer> is never closed"),
        ("</think><answer>x</answer>", "</think> without <think>"),
    ],
)
def test_parse_errors(text, reason):
    parsed = parse(text)
    assert not parsed.ok
    assert reason in [p.reason for p in parsed.problems]


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("just text", "no tags"),
        ("<think>a</think>", "no final <answer>"),
        ("<answer>x</answer><answer>y</answer>", "2 <answer> blocks"),
        ("<answer>x</answer><think>more</think>", "<think> after the final <answer>"),
        ("<think>a</think><answer> </answer>", "empty <answer>"),
        ("<search> </search><information>d</information><answer>x</answer>", "empty <search>"),
        ("<search>q</search><answer>x</answer>", "has no <information> after it"),
        ("<information>d</information><answer>x</answer>", "<information> not preceded by a <search>"),
    ],
)
def test_validate_reasons(text, reason_part):
    reasons = [p.reason for p in validate(parse(text).steps)]
    assert any(reason_part in r for r in reasons), reasons


def test_aliases_map_to_canonical_tags():
    text = "<plan>p</plan><wiki_search>q</wiki_search><observation>o</observation><reflection>r</reflection><answer>a</answer>"
    aliases = {"plan": "think", "wiki_search": "search", "observation": "information", "reflection": "think"}
    steps = parse(text, aliases).steps
    assert [s.kind for s in steps] == [THINK, SEARCH, INFORMATION, THINK, ANSWER]
    assert validate(steps) == []
    # without aliases the unknown tags are plain text
    assert [s.kind for s in parse(text).steps] == [TEXT, ANSWER]


def test_extract_answer_takes_last_answer_of_response():
    assert extract_answer("<answer> a </answer> then <answer> b </answer>") == "b"
    assert extract_answer("no answer here") == ""
    assert extract_answer("<answer>unclosed") == ""
    from sap.rules.prompts import INVALID_ACTION_MESSAGE

    assert extract_answer("<think>hmm</think>" + INVALID_ACTION_MESSAGE + "<think>x</think>") == ""
    assert extract_answer("<answer> a </answer>" + INVALID_ACTION_MESSAGE) == "a"
    assert extract_queries("<search> q1 </search> x <search>q2</search>") == ["q1", "q2"]


def test_parse_action():
    assert parse_action("<think>x</think><search> who </search>").kind == "search"
    assert parse_action("<think>x</think><search> who </search>").content == "who"
    assert parse_action("<answer> Paris </answer>").content == "Paris"
    assert parse_action("<think>hmm</think> I think so.").kind == "invalid"
    # the first complete block decides, like Search-R1's rollout
    assert parse_action("<search>q</search><answer>a</answer>").kind == "search"
