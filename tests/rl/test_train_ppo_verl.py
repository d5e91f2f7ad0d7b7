"""``sap train-ppo`` against VeRL itself: the parquet through ``RLHFDataset``, ``--dry-run``
through VeRL's Hydra config and ``validate_config`` (PPO, GRPO, LoRA), and the clear stop of a
real launch on a machine without a CUDA GPU."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sap.rules.prompts import build_prompt, normalize_question
from sap.stages import train_ppo as stage

from .conftest import QUESTIONS, set_args, small_config, small_sets

pytestmark = [pytest.mark.rl_env]

REPO = Path(__file__).resolve().parents[2]


def sap_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sap", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_parquet_loads_with_verl_rlhf_dataset(tmp_path: Path, tiny_model: Path):
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from sap.rl.compose import compose

    cfg = small_config(tmp_path, tiny_model, "http://127.0.0.1:9")
    counts = stage.build_dataset(cfg, tmp_path / "data")
    assert counts == {"train": len(QUESTIONS), "val": len(QUESTIONS)}
    config = compose(stage.plan(cfg, "base").overrides)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = RLHFDataset(data_files=[str(tmp_path / "data" / "train.parquet")], tokenizer=tok, config=config.data, processor=None)
    assert len(ds) == len(QUESTIONS)
    item = ds[0]
    question = QUESTIONS[0]["question"]
    assert list(item["raw_prompt"]) == [{"role": "user", "content": build_prompt(question)}]
    assert item["agent_name"] == "sap_search"
    assert list(item["reward_model"]["ground_truth"]["target"]) == QUESTIONS[0]["answer"]
    assert item["data_source"] == "nq" and item["extra_info"]["index"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "sets", "expect"),
    [
        (  # with the paper's warm-up, entropy and top_p (configs/paper): VeRL must accept them where sap puts them
            "ppo",
            ["ppo.actor_warmup_ratio=0.285", "ppo.critic_warmup_ratio=0.015", "ppo.entropy_coeff=0.001", "ppo.top_p=0.95"],
            {"adv": "gae", "critic": True, "lora": 0, "n": 1, "kl_loss": False, "kl_reward": True},
        ),
        ("grpo", ["ppo.algorithm=grpo"], {"adv": "grpo", "critic": False, "lora": 0, "n": 5, "kl_loss": True, "kl_reward": False}),
        (
            "lora",
            ["ppo.lora_rank=16", "ppo.lora_alpha=32"],
            {"adv": "gae", "critic": True, "lora": 16, "n": 1, "kl_loss": False, "kl_reward": True},
        ),
    ],
)
def test_dry_run_composes_a_config_verl_accepts(tmp_path: Path, tiny_model: Path, name: str, sets: list[str], expect: dict):
    args = small_sets(
        tmp_path,
        tiny_model,
        "http://127.0.0.1:9",  # nothing listens: --dry-run only warns
        f"experiment={name}",
        "ppo.ppo_micro_batch_size_per_gpu=1",  # 4 prompts over 2x2 GPUs: 1 row per GPU
        "ppo.n_gpus_per_node=2",
        "ppo.nnodes=2",
        "ppo.agent_workers=4",
        "tracking.backend=tensorboard",
        f"environments.rl_python={sys.executable}",
        *sets,
    )
    done = sap_cli("train-ppo", "--dry-run", "--init", "base", *set_args(args))
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and "/health" in done.stderr
    ppo = tmp_path / "runs" / name / "ppo"
    command = (ppo / "command.txt").read_text().strip()
    assert command in done.stdout
    argv = shlex.split(command)
    n_env = argv.index(sys.executable)
    assert "TENSORBOARD_DIR=" + str((ppo / "tensorboard").resolve()) in argv[:n_env]
    assert argv[n_env : n_env + 3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    resolved = yaml.safe_load((ppo / "verl_config.yaml").read_text())
    assert resolved["algorithm"]["adv_estimator"] == expect["adv"]
    assert resolved["critic"]["enable"] is expect["critic"]
    assert resolved["actor_rollout_ref"]["model"]["lora_rank"] == expect["lora"]
    assert resolved["actor_rollout_ref"]["rollout"]["n"] == expect["n"]
    assert resolved["actor_rollout_ref"]["actor"]["use_kl_loss"] is expect["kl_loss"]
    assert resolved["algorithm"]["use_kl_in_reward"] is expect["kl_reward"]
    assert resolved["trainer"]["n_gpus_per_node"] == 2 and resolved["trainer"]["nnodes"] == 2
    assert resolved["trainer"]["logger"][:2] == ["console", "tensorboard"]
    assert resolved["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "sap_search"
    assert resolved["data"]["max_response_length"] == 3 * 500 + 2 * 500
    assert resolved["reward"]["custom_reward_function"]["path"] == "pkg://sap.rl.reward"
    agent_loops = yaml.safe_load((ppo / "agent_loop.yaml").read_text())
    assert agent_loops[0]["max_turns"] == 2 and agent_loops[0]["retriever"]["url"] == "http://127.0.0.1:9"
    assert (ppo / "data" / "train.parquet").is_file() and (tmp_path / "runs" / name / "manifest.json").is_file()
    if name == "ppo":
        actor = resolved["actor_rollout_ref"]["actor"]
        assert (actor["optim"]["lr_warmup_steps_ratio"], resolved["critic"]["optim"]["lr_warmup_steps_ratio"]) == (0.285, 0.015)
        assert actor["entropy_coeff"] == 0.001 and resolved["actor_rollout_ref"]["rollout"]["top_p"] == 0.95


def test_dry_run_reports_what_verl_rejects(tmp_path: Path, tiny_model: Path):
    sets = small_sets(
        tmp_path,
        tiny_model,
        "http://127.0.0.1:9",
        "ppo.lora_rank=1024",  # above vLLM's largest LoRA rank (512)
        f"environments.rl_python={sys.executable}",
    )
    done = sap_cli("train-ppo", "--dry-run", "--init", "base", *set_args(sets))
    assert done.returncode == 2
    assert "VeRL rejected the configuration" in done.stderr and "lora_rank must be less than or equal to 512" in done.stderr
    assert "Traceback" not in done.stderr
    # 4 prompts over 3 GPUs: the preflight refuses it before VeRL is asked
    sets = [s for s in sets if not s.startswith(("ppo.n_gpus_per_node", "ppo.lora_rank"))] + ["ppo.n_gpus_per_node=3"]
    done = sap_cli("train-ppo", "--dry-run", "--init", "base", *set_args(sets))
    assert done.returncode == 2 and "preflight" in done.stderr and "not a whole number of rows per GPU" in done.stderr
    assert "VeRL rejected" not in done.stderr and "Traceback" not in done.stderr


def test_dry_run_works_from_another_working_directory(tmp_path: Path, tiny_model: Path):
    """The RL interpreter is found by sap.envs' one rule (the configured relative path against the
    sap checkout), not against the working directory: ``sap train-ppo`` runs from any folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sets = small_sets(tmp_path, tiny_model, "http://127.0.0.1:9")  # environments.rl_python left at its default, .venv-rl/bin/python
    assert not (elsewhere / ".venv-rl").exists()
    done = sap_cli("train-ppo", "--dry-run", "--init", "base", *set_args(sets), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    command = (tmp_path / "runs" / "rl-test" / "ppo" / "command.txt").read_text()
    assert str(REPO / ".venv-rl" / "bin" / "python") in command
    assert (tmp_path / "runs" / "rl-test" / "ppo" / "validate.log").read_text().startswith("$ ")


@pytest.mark.slow
def test_dry_run_rollouts_play_questions_through_verls_worker(tmp_path: Path, searching_model: Path, core_retriever_url: str):
    """``--dry-run --rollouts 2``: VeRL's agent-loop worker plays two training questions with sap's
    loop and the real retriever on CPU; each trajectory has its searches, its masked
    ``<information>`` tokens and the reward VeRL would load."""
    sets = small_sets(
        tmp_path,
        searching_model,
        core_retriever_url,
        "ppo.temperature=0.01",  # all but greedy: the taught search comes out as taught
    )
    done = sap_cli("train-ppo", "--dry-run", "--rollouts", "2", "--init", "base", *set_args(sets))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "rl-test" / "ppo" / "cpu_rollouts.jsonl"
    assert "rollouts: 2 trajectories" in done.stdout and str(out) in done.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == [normalize_question(q["question"]) for q in QUESTIONS[:2]]
    for row, q in zip(rows, QUESTIONS, strict=False):
        assert row["golden_answers"] == q["answer"]
        assert row["response"].startswith(f"<search> {q['question']} </search>")  # what the model was taught
        assert "<information>" in row["response"] and row["observation_tokens"] > 0 and row["generated_tokens"] > 0
        assert set(row["reward"]) >= {"score"} and 0.0 <= row["reward"]["score"] <= 1.0
        assert row["sap_searches"] >= 1
