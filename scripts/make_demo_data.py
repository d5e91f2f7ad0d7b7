#!/usr/bin/env python3
"""Build the embedded demo data in data/ from the public source files in data/ (run once; output committed).

    python scripts/make_demo_data.py --src data --out data

Writes data/nq/test.jsonl (NQ-open dev questions: a sample whose gold passage is in the demo
corpus, plus some whose is not) and data/nq/train.jsonl (other NQ-open dev questions whose
gold passage is in the corpus, for teacher trajectories and PPO). The corpus itself is written
by `sap retriever convert` (see data/README.md). Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("data"), help="holds corpus/nq-open-oracle.jsonl.gz and nq/NQ-open.dev.jsonl")
    ap.add_argument("--out", type=Path, default=Path("data"))
    ap.add_argument("--test-in-corpus", type=int, default=300)
    ap.add_argument("--test-not-in-corpus", type=int, default=50)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with gzip.open(args.src / "corpus" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
        in_corpus = {json.loads(line)["question"] for line in f}
    dev = [json.loads(line) for line in (args.src / "nq" / "NQ-open.dev.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [
        {
            "id": f"nq_dev_{i}",
            "question": r["question"],
            "golden_answers": r["answer"],
            "gold_passage_in_corpus": r["question"] in in_corpus,
        }
        for i, r in enumerate(dev)
    ]
    rng = random.Random(args.seed)
    have = [r for r in rows if r["gold_passage_in_corpus"]]
    lack = [r for r in rows if not r["gold_passage_in_corpus"]]
    rng.shuffle(have)
    rng.shuffle(lack)
    test = have[: args.test_in_corpus] + lack[: args.test_not_in_corpus]
    train = have[args.test_in_corpus : args.test_in_corpus + args.train]
    test.sort(key=lambda r: int(r["id"].rsplit("_", 1)[1]))
    train.sort(key=lambda r: int(r["id"].rsplit("_", 1)[1]))
    for name, data in (("test", test), ("train", train)):
        path = args.out / "nq" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        print(f"{path}: {len(data)} questions")


if __name__ == "__main__":
    main()
