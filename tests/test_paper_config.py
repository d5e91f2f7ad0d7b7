"""``configs/paper/nq_qwen2.5-3b.yaml`` against a table of the paper's values, each with the file
of the paper's code that fixes it, and the values as they reach VeRL and LLaMA-Factory."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import sap.stages.train_ppo as ppo_stage
import sap.stages.train_sft as sft_stage
from sap.cli import app
from sap.rules.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "nq_qwen2.5-3b.yaml"

# key path -> (the paper's value, where it is written in the paper's code)
PAPER_VALUES: dict[str, tuple[object, str]] = {
    "protocol": ("paper", "compute_metrics.py, infer.py, SFT/make_iterative_sft_data.py"),
    # SFT: SFT_Readme.md's llamafactory-cli command; the rest LLaMA-Factory 0.9's defaults
    "sft.lora.rank": (8, "LLaMA-Factory default lora_rank"),
    "sft.lora.alpha": (16, "LLaMA-Factory default lora_alpha = 2 x rank"),
    "sft.lora.dropout": (0.0, "LLaMA-Factory default lora_dropout"),
    "sft.lora.target": ("all", "SFT_Readme.md --lora_target all"),
    "sft.learning_rate": (1e-4, "SFT_Readme.md --learning_rate 1e-4"),
    "sft.num_train_epochs": (1, "SFT_Readme.md --num_train_epochs 1"),
    "sft.per_device_train_batch_size": (2, "SFT_Readme.md"),
    "sft.gradient_accumulation_steps": (4, "SFT_Readme.md"),
    "sft.nproc_per_node": (1, "SFT_Readme.md: one Colab A100 (global batch 8)"),
    "sft.precision": ("fp16", "SFT_Readme.md --fp16"),
    "sft.cutoff_len": (2048, "LLaMA-Factory default cutoff_len"),
    "sft.lr_scheduler_type": ("linear", "transformers default"),
    "sft.warmup_ratio": (0.0, "transformers default: no warm-up"),
    "model.chat_template": ("qwen", "SFT_Readme.md --template qwen"),
    # PPO: train_ppo.sh, verl/trainer/config/ppo_trainer.yaml
    "ppo.algorithm": ("ppo", "train_ppo.sh algorithm.adv_estimator=gae"),
    "ppo.init": ("sft", "train_ppo.sh BASE_MODEL=...Iterative-SFT-Merged"),
    "ppo.total_training_steps": (1005, "train_ppo.sh trainer.total_training_steps=1005"),
    "ppo.merge_step": (600, "run_nq_eval.sh ..._RL-600steps_results.json; table 1: 600 steps"),
    "ppo.train_batch_size": (32, "train_ppo.sh data.train_batch_size"),
    "ppo.ppo_mini_batch_size": (32, "train_ppo.sh actor.ppo_mini_batch_size"),
    "ppo.ppo_micro_batch_size_per_gpu": (8, "train_ppo.sh actor.ppo_micro_batch_size=8 (16 rows over 2 GPUs)"),
    "ppo.actor_lr": (1e-6, "train_ppo.sh actor.optim.lr"),
    "ppo.critic_lr": (1e-5, "train_ppo.sh critic.optim.lr"),
    "ppo.actor_warmup_ratio": (0.285, "train_ppo.sh actor.optim.lr_warmup_steps_ratio"),
    "ppo.critic_warmup_ratio": (0.015, "train_ppo.sh critic.optim.lr_warmup_steps_ratio"),
    "ppo.entropy_coeff": (0.001, "ppo_trainer.yaml actor.entropy_coeff"),
    "ppo.kl_coef": (0.001, "train_ppo.sh algorithm.kl_ctrl.kl_coef"),
    "ppo.temperature": (1.0, "train_ppo.sh rollout.temperature=1"),
    "ppo.top_p": (0.95, "ppo_trainer.yaml rollout.top_p"),
    "ppo.max_turns": (2, "train_ppo.sh max_turns=2"),
    "ppo.max_prompt_length": (4096, "train_ppo.sh data.max_prompt_length"),
    "ppo.max_response_length": (500, "train_ppo.sh data.max_response_length"),
    "ppo.max_obs_length": (500, "train_ppo.sh data.max_obs_length"),
    "ppo.train_data": ("downloads/nq_search/train.parquet", "train_ppo.sh data/nq_search/train.parquet (nq_search.py)"),
    "ppo.val_data": ("downloads/nq_search/test.parquet", "train_ppo.sh data/nq_search/test.parquet"),
    "ppo.val_limit": (None, "train_ppo.sh data.val_data_num=null"),
    "ppo.gpu_memory_utilization": (0.4, "train_ppo.sh rollout.gpu_memory_utilization"),
    "ppo.save_freq": (100, "train_ppo.sh trainer.save_freq"),
    "ppo.test_freq": (50, "train_ppo.sh trainer.test_freq"),
    "ppo.n_gpus_per_node": (2, "train_ppo.sh trainer.n_gpus_per_node=2"),
    "ppo.nnodes": (1, "train_ppo.sh trainer.nnodes"),
    "retriever.topk": (3, "retrieval_launch.sh --topk 3; train_ppo.sh retriever.topk"),
    "retriever.index.index_types": (["flat"], "retrieval_launch.sh e5_Flat.index"),
    "retriever.index.prebuilt": ("downloads/wiki-18/e5_Flat.index", "retrieval_launch.sh"),
    "retriever.corpus": ("downloads/wiki-18/wiki-18.jsonl", "retrieval_launch.sh wiki-18.jsonl"),
    "retriever.encoder.model": ("downloads/models/e5-base-v2", "retrieval_launch.sh intfloat/e5-base-v2"),
    # eval: run_nq_eval.sh / infer.py
    "eval.dataset": ("downloads/nq_search/test.parquet", "run_nq_eval.sh data/nq_search/test.parquet (3,610 rows)"),
    "eval.temperature": (0.7, "run_nq_eval.sh TEMPERATURE"),
    "eval.top_p": (0.9, "run_nq_eval.sh TOP_P"),
    "eval.max_turns": (5, "run_nq_eval.sh MAX_TURNS"),
    "eval.max_new_tokens": (1024, "run_nq_eval.sh MAX_NEW_TOKENS"),
    "eval.dtype": ("bfloat16", "run_nq_eval.sh DTYPE"),
    "eval.gpu_memory_utilization": (0.9, "run_nq_eval.sh GPU_MEMORY_UTILIZATION"),
    "eval.limit": (None, "run_nq_eval.sh MAX_SAMPLES empty: every question"),
    # not the paper's (it used the AFM file), but never on NQ test questions
    "collect.dataset": ("downloads/nq_search/train.parquet", "NQ train, as the PPO prompts"),
}


def get(cfg, path: str):
    node = cfg
    for key in path.split("."):
        node = getattr(node, key)
    return node


@pytest.mark.parametrize("path", sorted(PAPER_VALUES))
def test_config_value_is_the_papers(path):
    cfg = load_config(PAPER)
    want, where = PAPER_VALUES[path]
    assert get(cfg, path) == want, f"{path}: the paper's value is {want!r} ({where})"


def test_protocol_parts_follow_the_paper():
    cfg = load_config(PAPER)
    assert (cfg.eval_loop, cfg.metric_set, cfg.sft_layout) == ("paper", "paper", "paper")
    assert cfg.eval.groups["rl"].model.endswith("SearchR1-nq_hotpotqa_train-qwen2.5-3b-it-em-ppo")


def test_values_reach_verl():
    cfg = load_config(PAPER)
    o = dict(x.split("=", 1) for x in ppo_stage.hydra_overrides(cfg, "models/x", Path("runs/x/ppo")))
    assert o["actor_rollout_ref.actor.optim.lr_warmup_steps_ratio"] == "0.285"
    assert o["critic.optim.lr_warmup_steps_ratio"] == "0.015"
    assert o["actor_rollout_ref.actor.entropy_coeff"] == "0.001"
    assert o["actor_rollout_ref.rollout.top_p"] == "0.95"
    assert o["trainer.n_gpus_per_node"] == "2" and o["trainer.total_training_steps"] == "1005"
    assert o["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"] == "8" and o["critic.ppo_micro_batch_size_per_gpu"] == "8"
    assert o["actor_rollout_ref.rollout.gpu_memory_utilization"] == "0.4"
    assert ppo_stage.plan(cfg).merge_step == 600
    # sap's own defaults stay as they were
    d = dict(x.split("=", 1) for x in ppo_stage.hydra_overrides(load_config(None), "models/x", Path("runs/x/ppo")))
    assert (d["actor_rollout_ref.actor.entropy_coeff"], d["actor_rollout_ref.actor.optim.lr_warmup_steps_ratio"]) == ("0.0", "0.0")


def test_values_reach_llamafactory(tmp_path):
    cfg = load_config(PAPER, [f"run_root={tmp_path}"])
    args = sft_stage.train_args(cfg, tmp_path / "m", sft_stage.SFTPaths.for_config(cfg))
    assert (args["lr_scheduler_type"], args["warmup_ratio"], args["cutoff_len"]) == ("linear", 0.0, 2048)
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * cfg.sft.nproc_per_node == 8


def test_merge_step_picks_that_checkpoint(tmp_path):
    the_plan = ppo_stage.plan(load_config(PAPER, [f"run_root={tmp_path}"]))
    for step in (500, 600, 700):
        (the_plan.checkpoints / f"global_step_{step}").mkdir(parents=True)
    (the_plan.checkpoints / "latest_checkpointed_iteration.txt").write_text("700")
    assert ppo_stage.checkpoint_to_merge(the_plan) == the_plan.checkpoints / "global_step_600"
    other = ppo_stage.plan(load_config(PAPER, [f"run_root={tmp_path}", "ppo.merge_step=800"]))  # 650 is refused by the config
    with pytest.raises(ppo_stage.PPOStageError, match=r"ppo\.merge_step=800: no checkpoint"):
        ppo_stage.checkpoint_to_merge(other)
    last = ppo_stage.plan(load_config(PAPER, [f"run_root={tmp_path}", "ppo.merge_step=null"]))
    assert ppo_stage.checkpoint_to_merge(last) == the_plan.checkpoints / "global_step_700"


def test_config_show_has_the_papers_data_and_settings():
    out = CliRunner().invoke(app, ["config", "show", "--config", str(PAPER)]).output
    for text in (
        "protocol: paper",
        "dataset: downloads/nq_search/test.parquet",
        "train_data: downloads/nq_search/train.parquet",
        "actor_warmup_ratio: 0.285",
        "critic_warmup_ratio: 0.015",
        "entropy_coeff: 0.001",
        "top_p: 0.95",
    ):
        assert text in out, text
