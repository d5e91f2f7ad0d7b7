from __future__ import annotations

from pathlib import Path

import pytest

from sap.rules.config import ConfigError, ExperimentConfig, dump_config, load_config

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "nq_qwen2.5-3b.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_validates_and_is_headed_by_its_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    head = path.read_text().splitlines()[:6]
    assert any(line.startswith("#") and ("sap " in line or "make " in line or "scripts/" in line) for line in head), head


def test_paper_config_holds_the_papers_settings():
    cfg = load_config(REPO / "configs/paper/nq_qwen2.5-3b.yaml")
    assert cfg.model.path == "downloads/models/Qwen2.5-3B-Instruct"  # Qwen/Qwen2.5-3B-Instruct, by sap data download
    assert (cfg.sft.learning_rate, cfg.sft.num_train_epochs, cfg.sft.per_device_train_batch_size, cfg.sft.gradient_accumulation_steps) == (
        1e-4,
        1,
        2,
        4,
    )
    assert cfg.sft.lora.target == "all" and cfg.sft.precision == "fp16"
    p = cfg.ppo
    assert (p.total_training_steps, p.train_batch_size, p.ppo_mini_batch_size, p.ppo_micro_batch_size_per_gpu) == (1005, 32, 32, 8)
    assert p.merge_step == 600  # a 1,005-step schedule, evaluated at step 600 (tests/test_paper_config.py)
    assert (p.actor_lr, p.critic_lr, p.kl_coef, p.max_turns, p.max_prompt_length, p.max_response_length) == (
        1e-6,
        1e-5,
        0.001,
        2,
        4096,
        500,
    )
    e = cfg.eval
    assert (e.temperature, e.top_p, e.max_turns, e.max_new_tokens, cfg.retriever.topk) == (0.7, 0.9, 5, 1024, 3)
    assert set(e.groups) == {"baseline", "sft", "rl", "sft_rl"}


def test_unknown_key_is_named_with_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\nsft:\n  lora:\n    rnak: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "sft.lora.rnak: unknown key" in str(e.value)


def test_wrong_type_is_named_with_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match=r"eval\.temperature"):
        load_config(bad)


def test_overrides(tmp_path):
    cfg = load_config(None, ["eval.temperature=0", "ppo.algorithm=grpo", "sft.prepare.reject_phrases=[I remember]"])
    assert cfg.eval.temperature == 0 and cfg.ppo.algorithm == "grpo"
    assert cfg.sft.prepare.reject_phrases == ["I remember"]
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.tempx'"):
        load_config(None, ["eval.tempx=1"])
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(None, ["eval.temperature"])
    with pytest.raises(ConfigError, match=r"ppo\.algorithm"):
        load_config(None, ["ppo.algorithm=sac"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/paper/nq_qwen2.5-3b.yaml", ["eval.limit=10"])
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert cfg.expand(cfg.eval.groups["sft"].model) == "runs/nq_qwen2.5-3b/sft/merged"


def test_protocol_selects_the_eval_loop_unless_overridden():
    assert load_config(None).protocol == "sap" and load_config(None).eval_loop == "sap"
    assert load_config(None, ["protocol=paper"]).eval_loop == "paper"
    assert load_config(None, ["protocol=paper", "eval.loop=sap"]).eval_loop == "sap"
    assert load_config(None, ["eval.loop=paper"]).eval_loop == "paper"
    with pytest.raises(ConfigError, match=r"protocol"):
        load_config(None, ["protocol=squad"])
