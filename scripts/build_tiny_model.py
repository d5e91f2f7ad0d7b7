#!/usr/bin/env python3
"""Build the demo's tiny policy model locally: Qwen2 architecture, random weights, a ChatML
byte-level BPE tokenizer trained on the demo's own text. Nothing is downloaded.

    python scripts/build_tiny_model.py --out models/tiny-qwen2

Reuses an existing model in --out unless --force. LLaMA-Factory's `qwen` template, vLLM and VeRL
load it like Qwen2.5-Instruct (same architecture class, tokenizer class and chat markup).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sap.rules.prompts import split_contents  # noqa: E402
from sap.tiny_model import TinySpec, build_tiny_qwen2, protocol_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models/tiny-qwen2")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size)
    ap.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size)
    ap.add_argument("--layers", type=int, default=TinySpec.num_hidden_layers)
    ap.add_argument("--heads", type=int, default=TinySpec.num_attention_heads)
    ap.add_argument("--kv-heads", type=int, default=TinySpec.num_key_value_heads)
    ap.add_argument("--intermediate-size", type=int, default=TinySpec.intermediate_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding-std", type=float, default=0.2, help="embedding init std (0.2 lets LoRA SFT learn; see TinySpec)")
    ap.add_argument("--force", action="store_true", help="rebuild even if --out holds a model")
    args = ap.parse_args()

    if (args.out / "config.json").is_file() and not args.force:
        print(f"{args.out}: tiny model already built (use --force to rebuild)")
        return
    questions = [json.loads(line) for line in (args.data / "nq" / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    passages = [
        split_contents(json.loads(line)["contents"])
        for line in (args.data / "corpus" / "nq_oracle_corpus.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    texts = protocol_texts(
        [q["question"] for q in questions], [(t.strip('"'), x) for t, x in passages], [q["golden_answers"][0] for q in questions]
    )
    teacher = args.data / "teacher" / "trajectories.jsonl"
    if teacher.is_file():
        texts += [json.loads(line)["trajectory"] for line in teacher.read_text(encoding="utf-8").splitlines() if line.strip()]
    spec = TinySpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
        embedding_std=args.embedding_std,
    )
    out = build_tiny_qwen2(args.out, texts, spec)
    config = json.loads((out / "config.json").read_text())
    print(f"{out}: tiny Qwen2 built (vocab {config['vocab_size']}, hidden {config['hidden_size']}, layers {config['num_hidden_layers']})")


if __name__ == "__main__":
    main()
