from __future__ import annotations

import json

import pytest

from sap.rules.prompts import (
    INVALID_ACTION_MESSAGE,
    build_prompt,
    chat_messages,
    format_docs,
    information_block,
    normalize_question,
    split_contents,
)


def test_prompt_matches_searchr1_parquet_for_every_row(data_dir):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(data_dir / "nq" / "searchr1_nq_search_test.parquet")
    assert len(df) == 3610
    mismatches = [i for i, (q, p) in enumerate(zip(df["question"], df["prompt"], strict=True)) if build_prompt(q) != p[0]["content"]]
    assert mismatches == []


def test_prompt_matches_the_rollouts_of_the_example_case(data_dir):
    text = (data_dir / "examples" / "searchr1_example_case.txt").read_text()
    for q in (
        "paul walkers cars in fast and furious list",
        "the heart muscle is stimulated to contract by electrical impulses which are generated where?",
    ):
        assert build_prompt(q) in text


def test_normalize_question():
    assert normalize_question("  who am i ") == "who am i?"
    assert normalize_question("who am i?") == "who am i?"
    assert chat_messages("x")[0]["role"] == "user"
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt("x", "nope")


def test_format_docs_reproduces_the_example_case_block(data_dir):
    corpus = [json.loads(line) for line in (data_dir / "examples" / "searchr1_example_corpus.jsonl").read_text().splitlines()]
    title, text = split_contents(corpus[0]["contents"])
    assert title == '"Evan Morris"' and text.startswith("Evan Morris Evan L. Morris")
    docs = format_docs(corpus[:2])
    lines = docs.splitlines()
    assert lines[0] == f"Doc 1(Title: {title}) {text}"
    assert lines[1].startswith('Doc 2(Title: "')
    block = information_block(docs)
    assert block.startswith("\n\n<information>Doc 1(Title: ") and block.endswith("</information>\n\n")
    # the example rollouts carry exactly this shape of block
    case = (data_dir / "examples" / "searchr1_example_case.txt").read_text()
    assert '\n\n<information>Doc 1(Title: "Paul Walker") also had' in case
    # title/text documents format the same way
    assert format_docs([{"title": "T", "text": "body"}]) == "Doc 1(Title: T) body\n"


def test_invalid_action_message_restates_both_actions():
    assert "<search> and </search>" in INVALID_ACTION_MESSAGE
    assert "<answer> and </answer>" in INVALID_ACTION_MESSAGE
