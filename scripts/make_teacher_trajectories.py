#!/usr/bin/env python3
"""Write synthetic teacher demonstrations for the demo: real retrieval, templated reasoning.

    python scripts/make_teacher_trajectories.py --index indexes/demo-bm25 \
        --questions data/nq/train.jsonl --out data/teacher/trajectories.jsonl

For every question the script starts the real retriever over ``--index`` (or uses ``--url``),
searches the question, and writes a ``<think> <search> <information> <answer>`` trajectory from
the passages that really came back: when a gold answer appears in them, the final think step
cites that document and the answer is that gold string; when none does, it searches once more
with a reformulated query (content words only) and tries again; questions whose answer never
shows up are left out (and counted) rather than answered without evidence. The reasoning text
is templated, not written by a model: every record is labelled ``synthetic demonstration``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "retriever"))

from sap.agent.retrieval import Hit, RetrieverClient, docs_text  # noqa: E402
from sap.rules.prompts import split_contents  # noqa: E402
from sap.rules.scoring import normalize  # noqa: E402

SOURCE = "synthetic demonstration: templated reasoning over real retrieval (scripts/make_teacher_trajectories.py)"

_STOP = set(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "who",
        "whom",
        "whose",
        "what",
        "which",
        "when",
        "where",
        "why",
        "how",
        "did",
        "do",
        "does",
        "many",
        "much",
        "name",
        "first",
        "last",
        "does",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "into",
        "than",
        "then",
        "there",
        "their",
        "they",
        "he",
        "she",
    ]
)

OPENERS = (
    "I need to find out {q} I will search for it.",
    "To answer this I should look it up: {q}",
    "I am not sure about {q} Let me search.",
)
FOUND = (
    "Doc {k} ({title}) says the answer is {a}.",
    "According to Doc {k} ({title}), the answer is {a}.",
    "The information in Doc {k} ({title}) answers the question: {a}.",
)
MISSED = (
    "The documents do not mention the answer. I will search again with a different query.",
    "None of these documents answers the question. Let me try another query.",
)


def reformulate(question: str) -> str:
    words = [w for w in re.findall(r"[\w']+", question.lower()) if w not in _STOP]
    return " ".join(words) or question


def find_answer(hits: list[Hit], golds: list[str]) -> tuple[int, str] | None:
    """(1-based doc index, gold string) of the first gold answer found in the hits."""
    for k, hit in enumerate(hits, start=1):
        text = f" {normalize(hit.contents)} "
        for gold in golds:
            g = normalize(gold)
            if g and f" {g} " in text:
                return k, gold
    return None


def trajectory_for(
    question: str, golds: list[str], first: list[Hit], client: RetrieverClient, rng: random.Random
) -> tuple[str, int] | None:
    q = question.strip().rstrip("?") + "?"
    parts = [
        f"<think> {rng.choice(OPENERS).format(q=q)} </think>",
        f"<search> {question.strip()} </search>",
        f"<information> {docs_text(first).strip()} </information>",
    ]
    hits, searches = first, 1
    found = find_answer(hits, golds)
    if found is None:
        query = reformulate(question)
        hits = client.search([query])[0]
        searches = 2
        parts += [
            f"<think> {rng.choice(MISSED)} </think>",
            f"<search> {query} </search>",
            f"<information> {docs_text(hits).strip()} </information>",
        ]
        found = find_answer(hits, golds)
    if found is None:
        return None
    k, answer = found
    title = split_contents(hits[k - 1].contents)[0]
    parts += [f"<think> {rng.choice(FOUND).format(k=k, title=title, a=answer)} </think>", f"<answer> {answer} </answer>"]
    return "\n".join(parts), searches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=REPO / "data/nq/train.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "data/teacher/trajectories.jsonl")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", type=Path, help="index directory: the script serves it on 127.0.0.1 while it runs")
    where.add_argument("--url", help="a running retriever")
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = [json.loads(line) for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(args.seed)

    def run(url: str) -> None:
        client = RetrieverClient(url, topk=args.topk)
        first: list[list[Hit]] = []
        for i in range(0, len(rows), 256):
            first += client.search([r["question"] for r in rows[i : i + 256]])
        kept, skipped, by_searches = [], 0, {1: 0, 2: 0}
        for row, hits in zip(rows, first, strict=True):
            made = trajectory_for(row["question"], row["golden_answers"], hits, client, rng)
            if made is None:
                skipped += 1
                continue
            text, n = made
            by_searches[n] += 1
            kept.append(
                {
                    "id": row["id"],
                    "question": row["question"],
                    "golden_answers": row["golden_answers"],
                    "trajectory": text,
                    "source": SOURCE,
                }
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        print(
            f"{args.out}: {len(kept)} trajectories ({by_searches[1]} with one search, {by_searches[2]} with two); {skipped} questions left out (answer not retrieved)"
        )

    if args.url:
        run(args.url)
    else:
        from sap_retriever.launch import RetrieverServer

        with RetrieverServer(args.index) as url:
            run(url)


if __name__ == "__main__":
    main()
