"""The demo pipeline end to end on a small slice: scripts/pipeline.sh with the demo config.

Every stage runs for real: BM25 index and retriever server (127.0.0.1), prepare-sft,
LLaMA-Factory LoRA SFT on the tiny Qwen2 (a few steps) and merge, train-ppo's real PPO steps on
CPU (VeRL's trainer in sap's CPU mode) and merge, eval of the base, SFT and SFT+RL models, and the
report with its PPO section.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

NEEDS = [REPO / ".venv-sft" / "bin" / "python", REPO / ".venv-rl" / "bin" / "python"]


def test_demo_pipeline_on_a_small_slice(tmp_path: Path, tiny_model: Path):
    missing = [str(p) for p in NEEDS if not p.exists()]
    if missing:
        pytest.fail(f"environments missing: {missing} (make test creates them: make setup-sft setup-rl)")
    overrides = [
        f"run_root={tmp_path / 'runs'}",
        "experiment=pipe",
        f"model.path={tiny_model}",
        f"retriever.index_dir={tmp_path / 'index'}",
        "sft.max_steps=4",
        "sft.logging_steps=1",
        "sft.save_steps=4",
        "ppo.val_limit=4",
        "ppo.total_training_steps=2",
        "eval.limit=4",
        f"eval.groups.baseline.model={tiny_model}",
    ]
    env = {**os.environ, "SAP": str(REPO / ".venv" / "bin" / "sap")}
    proc = subprocess.run(
        ["bash", "scripts/pipeline.sh", "configs/demo/tiny_cpu.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "retriever stopped" in proc.stdout
    run = tmp_path / "runs" / "pipe"
    for path in (
        "config.yaml",
        "manifest.json",
        "sft/data/iterative_sft_data.json",
        "sft/summary.json",
        "sft/merged/config.json",
        "ppo/data/train.parquet",
        "ppo/verl_config.yaml",
        "ppo/command.txt",
        "ppo/metrics.jsonl",
        "ppo/summary.json",
        "ppo/rollouts/step_2.jsonl",
        "ppo/checkpoints/global_step_2/actor/huggingface/config.json",
        "ppo/merged/config.json",
        "eval/baseline/predictions.jsonl",
        "eval/sft/metrics.json",
        "eval/sft_rl/metrics.json",
        "report.md",
        "report.png",
        "logs/retriever.log",
    ):
        assert (run / path).is_file(), path
    summary = json.loads((run / "ppo/summary.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 2
    steps = [json.loads(line)["step"] for line in (run / "ppo/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    rollouts = [json.loads(line) for line in (run / "ppo/rollouts/step_1.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 and all(r["response"] and r["golden_answers"] for r in rollouts)
    for group in ("baseline", "sft", "sft_rl"):
        metrics = json.loads((run / "eval" / group / "metrics.json").read_text())
        assert metrics["n"] == 4
        assert len((run / "eval" / group / "predictions.jsonl").read_text().splitlines()) == 4
    report = (run / "report.md").read_text()
    assert "| 1 | Baseline" in report and "| 2 | SFT Only" in report and "| 4 | SFT + RL" in report
    assert "## PPO" in report and (run / "ppo/reward.png").is_file()
    stages = [c["stage"] for c in json.loads((run / "manifest.json").read_text())["commands"]]
    assert {"prepare-sft", "train-sft", "train-ppo", "eval", "report"} <= set(stages)
    # a second run reuses the index, the SFT model and the finished eval questions
    again = subprocess.run(
        ["bash", "scripts/pipeline.sh", "configs/demo/tiny_cpu.yaml", *overrides],
        cwd=REPO,
        env={**env, "STAGES": "index retriever train-sft eval"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing" in again.stdout and "sft/merged" in again.stdout
