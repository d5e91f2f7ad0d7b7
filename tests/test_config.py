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


def test_every_key_has_help_from_its_docstring():
    """Each leaf key's help is its field docstring (pydantic's use_attribute_docstrings)."""
    from pydantic import BaseModel

    from sap.rules.config import explain

    def leaves(model: type[BaseModel], prefix: str = ""):
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from leaves(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    undocumented = [k for k in leaves(ExperimentConfig) if not explain(k).help]
    assert undocumented == [], undocumented


def test_config_explain_prints_type_default_and_help():
    from typer.testing import CliRunner

    from sap.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["config", "explain", "ppo.rollout_n"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ppo.rollout_n  (int | None)  default: null") and "Samples per question" in r.output
    r = runner.invoke(app, ["config", "explain", "eval"])
    assert r.exit_code == 0 and "EvalConfig" in r.output and "max_turns" in r.output and "temperature" in r.output
    r = runner.invoke(app, ["config", "explain", "ppo.algorithm"])
    assert "'ppo' | 'grpo'" in r.output and 'default: "ppo"' in r.output
    r = runner.invoke(app, ["config", "explain", "eval.tempx"])
    assert r.exit_code == 2 and "unknown key 'eval.tempx'" in r.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.algorithm=grpo", "ppo.rollout_n=1"], r"ppo\.algorithm=grpo needs ppo\.rollout_n >= 2 \(got 1\)"),
        (["ppo.ppo_mini_batch_size=64"], r"ppo\.ppo_mini_batch_size=64 is larger than ppo\.train_batch_size=32"),
        (["ppo.response_budget=100"], r"ppo\.response_budget=100 is below ppo\.max_response_length=500"),
        (["eval.max_new_tokens=8192"], r"eval\.max_new_tokens=8192 leaves no room for the prompt in eval\.max_model_len=8192"),
        (["eval.min_turn_tokens=2000"], r"eval\.min_turn_tokens=2000 is above eval\.max_new_tokens=1024"),
        (["sft.nnodes=2", "sft.node_rank=2"], r"sft\.node_rank=2 must be below sft\.nnodes=2"),
        (["ppo.merge_step=650", "ppo.save_freq=100"], r"ppo\.merge_step=650 is never saved"),
        (["ppo.merge_step=700", "ppo.total_training_steps=600"], r"ppo\.merge_step=700 is never saved"),
    ],
)
def test_cross_field_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_cross_field_checks_accept_what_is_possible():
    cfg = load_config(None, ["ppo.algorithm=grpo", "ppo.rollout_n=2", "ppo.ppo_mini_batch_size=8", "sft.nnodes=2", "sft.node_rank=1"])
    assert cfg.ppo.samples_per_prompt == 2
    assert load_config(None, ["ppo.algorithm=grpo"]).ppo.samples_per_prompt == 5  # the default for grpo


def test_flags_go_through_the_same_loading():
    """A command's flags are dotted keys applied after --set, with the same key and type checks."""
    cfg = load_config(None, ["eval.limit=3"], {"eval.limit": 5, "eval.dataset": Path("/x/q.jsonl"), "eval.seed": None})
    assert (cfg.eval.limit, cfg.eval.dataset, cfg.eval.seed) == (5, "/x/q.jsonl", 0)
    with pytest.raises(ConfigError, match=r"eval\.limit='zero'.*\n  eval\.limit: Input should be a valid integer"):
        load_config(None, [], {"eval.limit": "zero"})
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.lmit'"):
        load_config(None, [], {"eval.lmit": 5})
