"""A few real rollouts of the sap agent loop on CPU, through VeRL's own agent-loop worker.

VeRL's PPO trainer needs CUDA GPUs. What runs anywhere is the part sap adds to it: VeRL's
``AgentLoopWorker`` reads the training parquet with ``RLHFDataset`` and plays each question
with sap's ``SearchAgentLoop`` against the real retriever, while an in-process HF model
(:mod:`sap.rl.hf_server`, VeRL's ``generate`` interface) stands in for the vLLM rollout
server. Each trajectory is scored with the reward function VeRL would load. Used by
``sap train-ppo --dry-run --rollouts N`` (and so by ``make demo``); run in the RL environment::

    python -m sap.rl.cpu_rollouts --overrides ppo/verl_config.overrides.json --n 4 --out ppo/cpu_rollouts.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def run(overrides: list[str], n: int, out: Path) -> dict[str, Any]:
    """Play the first ``n`` training questions; write one JSON line per trajectory to ``out``
    and return the mean of each reward metric."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.protocol import DataProto
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    from sap.rl.compose import compose
    from sap.rl.hf_server import HFGenerationServer
    from sap.rules.atomic import JsonlAppender
    from sap.rules.questions import gold_answers

    config = compose(overrides)
    server = HFGenerationServer(config.actor_rollout_ref.model.path)
    worker = AgentLoopWorker(config, server)
    tok = worker.tokenizer
    files = config.data.train_files
    files = [files] if isinstance(files, str) else list(files)
    dataset = RLHFDataset(data_files=files, tokenizer=tok, config=config.data, processor=None)
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(min(n, len(dataset)))]))
    result = asyncio.run(worker.generate_sequences(batch))
    reward_fn = get_custom_reward_fn(config)

    width = result.batch["responses"].shape[1]
    totals: dict[str, float] = {}
    out.unlink(missing_ok=True)
    with JsonlAppender(out) as sink:
        for i in range(len(result)):
            length = int(result.batch["attention_mask"][i][-width:].sum())
            ids = result.batch["responses"][i][:length].tolist()
            mask = result.batch["response_mask"][i][:length].tolist()
            fields = {k: result.non_tensor_batch[k][i] for k in result.non_tensor_batch}
            extra = {k: _plain(v) for k, v in fields.items() if k.startswith("sap_")}
            response = tok.decode(ids, skip_special_tokens=True)
            gold = fields["reward_model"]["ground_truth"]
            scores = reward_fn(data_source="nq", solution_str=response, ground_truth=gold, extra_info=extra)
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            sink.write(
                {
                    "question": _plain(fields.get("question")),
                    "golden_answers": gold_answers(gold),
                    "response": response,
                    "generated_tokens": sum(mask),
                    "observation_tokens": len(mask) - sum(mask),
                    "reward": scores,
                    **extra,
                }
            )
    count = len(result)
    return {"n": count, **{k: v / count for k, v in totals.items()}} if count else {"n": 0}


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", type=Path, required=True, help="JSON list of VeRL Hydra overrides (written by sap train-ppo)")
    ap.add_argument("--n", type=int, default=4, help="training questions to play")
    ap.add_argument("--out", type=Path, required=True, help="JSONL: one line per trajectory")
    args = ap.parse_args(argv)
    summary = run(json.loads(args.overrides.read_text(encoding="utf-8")), args.n, args.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
