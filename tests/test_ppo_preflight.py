"""The ``sap train-ppo`` preflight (sap.stages.ppo_preflight): what VeRL 0.9.1 would only find
on a GPU node -- micro-batches, steps against epochs, wandb login, checkpoint disk, LoRA critic
-- refused on CPU before anything loads a model. (The LoRA value head against VeRL's own PEFT
wrapping: tests/rl/test_lora_critic.py.)"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.rules.config import load_config
from sap.stages import ppo_preflight as pf
from sap.stages import train_ppo as stage

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "nq_qwen2.5-3b.yaml"
# the paper's table-1 batch (32 questions, mini-batch 32, 600 steps) on sap's defaults
TABLE1 = ["ppo.train_batch_size=32", "ppo.ppo_mini_batch_size=32", "ppo.rollout_n=1", "ppo.total_training_steps=600"]


def run(
    sets: list[str], rows: int = 600, *, config: Path | None = None, launch: bool = False, tmp: Path | None = None, **kw
) -> pf.Preflight:
    cfg = load_config(config, [*(["tracking.mode=offline"] if "environ" not in kw else []), *sets])
    plan = stage.plan(cfg, "base")
    home = kw.pop("home", tmp or Path("/nonexistent"))
    return pf.preflight(
        cfg, plan.settings, rows, model_path=plan.model_path, checkpoints=(tmp or Path("/tmp")) / "ckpt", launch=launch, home=home, **kw
    )


def test_paper_micro_batch_on_8_gpus_is_refused_and_the_fixed_one_accepted():
    bad = run([*TABLE1, "ppo.n_gpus_per_node=8", "ppo.ppo_micro_batch_size_per_gpu=8"])
    [err] = [f for f in bad.errors if f.check == "batches"]
    # 32 rows over 8 GPUs = 4 per GPU, micro-batch 8: every role (old log-prob, ref, critic, both updates)
    assert "ppo.ppo_micro_batch_size_per_gpu" in err.message and "= 4 rows per GPU" in err.message
    for role in ("rollout old log-probs", "actor update", "reference log-probs", "critic values", "critic update"):
        assert role in err.message
    assert "divisor of 4 (4, 2, 1)" in err.message
    for sets in (
        ["ppo.n_gpus_per_node=8", "ppo.ppo_micro_batch_size_per_gpu=4"],
        ["ppo.n_gpus_per_node=2", "ppo.ppo_micro_batch_size_per_gpu=8"],
    ):
        assert not run([*TABLE1, *sets]).errors, sets
    # the paper config as it stands (2 GPUs, micro-batch 8, 1,005 steps merged at 600) passes
    assert not run([], config=PAPER).errors


def test_batches_follow_rollout_n_sequence_parallel_and_passthrough():
    # GRPO: 5 samples per question -> 32*5/8 = 20 rows per GPU; micro 8 does not divide 20, 4 does
    grpo = ["ppo.algorithm=grpo", "ppo.n_gpus_per_node=8", *TABLE1[:2]]
    err = run([*grpo, "ppo.rollout_n=5", "ppo.ppo_micro_batch_size_per_gpu=8"]).errors
    assert err and "= 20 rows per GPU" in err[0].message and "critic" not in err[0].message
    assert not run([*grpo, "ppo.rollout_n=5", "ppo.ppo_micro_batch_size_per_gpu=4"]).errors
    # sequence parallel 2: 8 GPUs form 4 data-parallel groups -> 8 rows each, micro 8 divides
    sp = "ppo.verl={actor_rollout_ref.actor.ulysses_sequence_parallel_size: 2, critic.fsdp.ulysses_sequence_parallel_size: 2}"
    assert not run([*TABLE1, "ppo.n_gpus_per_node=8", "ppo.ppo_micro_batch_size_per_gpu=8", sp]).errors
    # a pass-through micro-batch is named as such
    err = run([*TABLE1, "ppo.n_gpus_per_node=2", "ppo.verl={critic.forward_micro_batch_size_per_gpu: 5}"]).errors
    assert "ppo.verl['critic.forward_micro_batch_size_per_gpu']" in err[0].message
    # the agent-loop workers split batch x n rollouts with no padding
    err = run([*TABLE1, "ppo.n_gpus_per_node=2", "ppo.agent_workers=5"]).errors
    assert "ppo.agent_workers" in err[0].message


def test_step_arithmetic_on_a_small_file():
    small = [
        "ppo.train_batch_size=4",
        "ppo.ppo_mini_batch_size=4",
        "ppo.ppo_micro_batch_size_per_gpu=2",
        "ppo.n_gpus_per_node=1",
        "ppo.agent_workers=2",
    ]
    # 10 rows // 4 = 2 steps per epoch (VeRL drops the last partial batch): 5 steps need 3 epochs
    r = run([*small, "ppo.total_training_steps=5"], rows=10)
    assert r.decided == {"trainer.total_epochs": 3} and not r.errors
    r = run([*small, "ppo.total_training_steps=4"], rows=10)
    assert r.decided == {"trainer.total_epochs": 2}
    r = run([*small, "ppo.total_training_steps=5", "ppo.verl={trainer.total_epochs: 2}"], rows=10)
    [err] = r.errors
    assert "needs 3 epochs" in err.message and "stop at step 4" in err.message and "ppo.total_training_steps" in err.message
    assert not r.decided
    assert not run([*small, "ppo.total_training_steps=5", "ppo.verl={trainer.total_epochs: 3}"], rows=10).errors
    [err] = run([*small, "ppo.save_freq=-1"], rows=10).errors
    assert "ppo.save_freq" in err.message and "merge" in err.message
    # the paper's 600 steps on the 600-row demo file: 18 steps per epoch -> 34 epochs, not VeRL's default 30
    assert run([*TABLE1, "ppo.n_gpus_per_node=2"], rows=600).decided == {"trainer.total_epochs": 34}


def test_merge_step_is_saved_and_kept():
    base = [*TABLE1, "ppo.n_gpus_per_node=2", "ppo.total_training_steps=1005", "ppo.save_freq=100"]
    # the paper's 1,005-step schedule merged at step 600: saves 600, 700, ..., 1000, 1005 -> sap keeps 6
    cfg = load_config(None, [*base, "ppo.merge_step=600"])
    assert stage.verl_settings(cfg, "m", Path("runs/x/ppo"))["trainer.max_actor_ckpt_to_keep"] == 6
    assert not [f for f in run([*base, "ppo.merge_step=600"]).errors if f.check == "steps"]
    # a keep that would delete merge_step's checkpoint (ppo.verl cannot set it: ppo.keep_checkpoints owns it)
    out = pf.Preflight()
    keep2 = pf.Settings({"trainer.total_training_steps": 1005, "trainer.save_freq": 100, "trainer.max_actor_ckpt_to_keep": 2})
    pf.check_merge_step(keep2, 600, out)
    [err] = out.errors
    assert "would be deleted" in err.message and "keep at least 6" in err.message
    assert not run([*base, "ppo.merge_step=1005"]).errors  # the last step is always saved
    assert stage.verl_settings(load_config(None, [*base, "ppo.merge_step=1005"]), "m", Path("x"))["trainer.max_actor_ckpt_to_keep"] == 2


def test_demo_file_and_eval_set_warnings(data_dir: Path):
    w = [f.message for f in run([*TABLE1, "ppo.n_gpus_per_node=2"]).warnings]
    assert any("embedded demo file" in m for m in w) and any("evaluation set" in m for m in w)
    other = data_dir / "nq" / "NQ-open.efficientqa.dev.1.1.jsonl"
    w = [f.message for f in run([*TABLE1, "ppo.n_gpus_per_node=2", f"ppo.train_data={other}", f"ppo.val_data={other}"]).warnings]
    assert not any("embedded demo file" in m or "evaluation set" in m for m in w)


def test_wandb_login_sources(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    assert pf.wandb_login({}, home) is None
    assert pf.wandb_login({"WANDB_API_KEY": "k" * 40}, home) == "WANDB_API_KEY"
    (home / ".netrc").write_text("machine example.org login x password y\n")
    assert pf.wandb_login({}, home) is None
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    os.chmod(home / ".netrc", stat.S_IRUSR | stat.S_IWUSR)
    assert pf.wandb_login({}, home) == f"{home / '.netrc'} (machine api.wandb.ai)"
    assert pf.wandb_login({"WANDB_BASE_URL": "https://wandb.example.org"}, home) is None
    other = tmp_path / "other-netrc"
    other.write_text("machine wandb.example.org login u password p\n")
    os.chmod(other, stat.S_IRUSR | stat.S_IWUSR)
    assert pf.wandb_login({"WANDB_BASE_URL": "https://wandb.example.org", "NETRC": str(other)}, home)


def test_wandb_online_without_login_is_an_error_for_a_launch_and_a_warning_for_a_dry_run(tmp_path: Path):
    sets = [*TABLE1, "ppo.n_gpus_per_node=2", "tracking.backend=wandb", "tracking.mode=online"]
    for launch, level in ((True, "error"), (False, "warning")):
        r = run(sets, launch=launch, tmp=tmp_path, environ={})
        [f] = [f for f in r.findings if f.check == "tracking"]
        assert f.level == level and "wandb login" in f.message and "WANDB_API_KEY" in f.message
    r = run(sets, launch=True, tmp=tmp_path, environ={"WANDB_API_KEY": "k" * 40})
    assert not r.errors


@pytest.fixture
def fake_rl_python(tmp_path: Path) -> tuple[Path, Path]:
    """An 'RL interpreter' that records being run: what runs after the preflight (VeRL's config
    composition, then the trainer that loads models) starts with it."""
    marker = tmp_path / "rl_python_ran"
    exe = tmp_path / "rl_python"
    exe.write_text(f"#!{sys.executable}\nimport pathlib, sys\npathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv))\nsys.exit(1)\n")
    exe.chmod(0o755)
    return exe, marker


def test_train_ppo_refuses_wandb_online_without_login_before_any_model_loads(
    tmp_path: Path, retriever_url: str, fake_rl_python, monkeypatch
):
    exe, marker = fake_rl_python
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    args = ["train-ppo", "--init", "base"]
    for s in (*TABLE1, "ppo.n_gpus_per_node=2", "tracking.backend=wandb", "tracking.mode=online", f"run_root={tmp_path / 'runs'}"):
        args += ["--set", s]
    args += ["--set", f"retriever.url={retriever_url}", "--set", f"environments.rl_python={exe}", "--set", "model.path=nowhere/model"]
    args += ["--set", "ppo.device=cuda"]  # no probe of the RL environment for a GPU
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "preflight" in r.output and "no W&B login" in r.output and "wandb login" in r.output
    assert not marker.exists()  # nothing ran in the RL environment: no config composed, no model loaded
    # with a key the preflight passes, and the run goes on to the RL environment (here: the recorder)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    r = CliRunner().invoke(app, args)
    assert marker.exists() and "sap.rl.compose" in marker.read_text()
    assert "VeRL rejected the configuration" in r.output


def test_checkpoint_disk_from_safetensors(tmp_path: Path, tiny_model: Path):
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    shapes = pf.safetensors_shapes(tiny_model)
    assert pf.model_size(shapes, 0).params == params
    size = pf.model_size(shapes, 0)
    # fp32 weights + two fp32 AdamW moments = 12 bytes per parameter
    assert pf.checkpoint_bytes(size, "fp32", None, False) == 12 * params
    lora = pf.model_size(shapes, 8)
    assert 0 < lora.lora_params < params
    assert pf.checkpoint_bytes(lora, "fp32", None, False) == 4 * (params + lora.lora_params) + 8 * lora.lora_params
    assert pf.checkpoint_bytes(lora, "fp32", ["model", "optimizer"], True) == 12 * lora.lora_params
    # saves at 100, 200, ..., 600 (the last step is one of them); VeRL keeps 2 at once with keep=2,
    # and 2 while the new one is written with keep=1
    assert pf.planned_saves(600, 100, 0) == 6 and pf.planned_saves(650, 100, 0) == 7 and pf.planned_saves(600, 100, 400) == 2
    assert (pf.peak_kept(6, 2), pf.peak_kept(6, 1), pf.peak_kept(6, None), pf.peak_kept(1, 3)) == (2, 2, 6, 1)

    sets = [
        "ppo.n_gpus_per_node=1",
        "ppo.train_batch_size=4",
        "ppo.ppo_mini_batch_size=4",
        "ppo.ppo_micro_batch_size_per_gpu=2",
        "ppo.agent_workers=2",
    ]
    sets += [f"model.path={tiny_model}", "ppo.total_training_steps=10", "ppo.save_freq=2"]
    critic = pf.model_size(shapes, 0, value_head=True)  # the LM head (if untied) replaced by a 1-output value head
    per_save = 12 * params + 12 * critic.params
    r = run(sets, launch=True, tmp=tmp_path)
    [f] = [f for f in r.findings if f.check == "checkpoints"]
    assert f.level == "info" and "5 saves" in f.message and "keep 2" in f.message
    r = run(sets, launch=True, tmp=tmp_path, disk_free=lambda _: per_save)  # room for one, two kept
    [f] = [f for f in r.findings if f.check == "checkpoints"]
    assert f.level == "error" and "not enough disk" in f.message and "ppo.keep_checkpoints" in f.message
    assert not [f for f in run([*sets, "ppo.keep_checkpoints=1"], launch=True, tmp=tmp_path, disk_free=lambda _: 3 * per_save).errors]
    r = run([*sets, "ppo.keep_checkpoints=null"], launch=False, tmp=tmp_path, disk_free=lambda _: 3 * per_save)
    [f] = [f for f in r.findings if f.check == "checkpoints"]
    assert f.level == "warning" and "keep all" in f.message  # 5 saves kept: too many, but a dry run only warns


def test_checkpoints_to_keep_reach_verl():
    s = stage.verl_settings(load_config(None, []), "m", Path("runs/x/ppo"))
    assert s["trainer.max_actor_ckpt_to_keep"] == 2 and s["trainer.max_critic_ckpt_to_keep"] == 2
    s = stage.verl_settings(load_config(None, ["ppo.keep_checkpoints=null"]), "m", Path("runs/x/ppo"))
    assert s["trainer.max_actor_ckpt_to_keep"] is None


def test_lora_critic_and_actor_lr(tmp_path: Path):
    lora = [*TABLE1, "ppo.n_gpus_per_node=2", "ppo.lora_rank=8"]
    r = run(lora)
    assert not r.errors and any(f.check == "lora" and "TOKEN_CLS adapter" in f.message for f in r.findings)
    s = stage.verl_settings(load_config(None, ["ppo.lora_rank=8"]), "m", Path("runs/x/ppo"))
    assert s["critic.model.lora_adapter_path"] == str(Path("runs/x/ppo/critic_lora_init").resolve())
    # VeRL's own LoRA wrapping of the critic (no adapter) fails at start-up: refused
    [err] = run([*lora, "ppo.verl={critic.model.lora_adapter_path: null}"]).errors
    assert err.check == "lora" and "prepare_inputs_for_generation" in err.message and "critic.model.lora_adapter_path" in err.message
    # an adapter that would not train the head whole
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "modules_to_save": None}))
    [err] = run([*lora, f"ppo.verl={{critic.model.lora_adapter_path: {bad}}}"]).errors
    assert "TOKEN_CLS" in err.message and "score" in err.message
    (bad / "adapter_config.json").write_text(json.dumps({"task_type": "TOKEN_CLS", "modules_to_save": ["classifier", "score"]}))
    assert not run([*lora, f"ppo.verl={{critic.model.lora_adapter_path: {bad}}}"]).errors
    assert not run([*lora, "ppo.algorithm=grpo", "ppo.rollout_n=5", "ppo.ppo_micro_batch_size_per_gpu=8"]).errors  # no critic
    # unset, actor_lr is 1e-5 with LoRA; the paper's explicit 1e-6 (a full fine-tuning rate) with LoRA is a warning
    assert not [f for f in r.warnings if f.check == "lora"]
    [w] = [f for f in run([*lora, "ppo.actor_lr=1e-6"]).warnings if f.check == "lora"]
    assert "ppo.actor_lr" in w.message and "1e-06" in w.message
    assert load_config(None, ["ppo.lora_rank=8"]).ppo.policy_lr == 1e-5 and load_config(None, []).ppo.policy_lr == 1e-6


def test_apply_raises_lists_every_error_and_updates_the_plan(tmp_path: Path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    sets = [*TABLE1, "ppo.n_gpus_per_node=8", "ppo.ppo_micro_batch_size_per_gpu=8", "tracking.backend=wandb", "tracking.mode=online"]
    cfg = load_config(None, sets)
    plan = stage.plan(cfg, "base")
    with pytest.raises(pf.PreflightFailed, match=r"2 problem\(s\)[\s\S]*ppo_micro_batch_size_per_gpu[\s\S]*no W&B login"):
        pf.apply(cfg, plan, 600, launch=True, warn=lambda _: None)
    assert "trainer.total_epochs" not in plan.settings
    cfg = load_config(None, [*TABLE1, "ppo.n_gpus_per_node=2", "tracking.mode=offline"])
    plan = stage.plan(cfg, "base")
    warned: list[str] = []
    pf.apply(cfg, plan, 600, launch=True, warn=warned.append)
    assert plan.settings["trainer.total_epochs"] == 34 and "trainer.total_epochs=34" in plan.overrides
    assert any("demo file" in w for w in warned)
    json.dumps(plan.settings)  # still plain data
