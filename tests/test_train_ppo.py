"""``sap train-ppo`` pieces that need no VeRL: question files, the VeRL parquet layout, Hydra
overrides, checkpoints, and the CLI's errors. (VeRL's own checks: tests/rl/.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.rules.config import VERL_OWNED, ConfigError, load_config
from sap.stages import train_ppo as stage


def overrides_dict(cfg) -> dict[str, str]:
    return dict(o.split("=", 1) for o in stage.hydra_overrides(cfg, "models/x", Path("runs/x/ppo")))


def test_load_questions_jsonl_and_parquet(data_dir: Path):
    qs = stage.load_questions(data_dir / "nq" / "NQ-open.efficientqa.dev.1.1.jsonl", limit=5)
    assert len(qs) == 5 and all(q.question and q.golden_answers for q in qs)
    qs = stage.load_questions(data_dir / "nq" / "searchr1_nq_search_test.parquet", limit=3)
    # one id rule with eval: the position; the record's own id is the source id
    assert [q.id for q in qs] == ["0", "1", "2"] and [q.source_id for q in qs] == ["test_0", "test_1", "test_2"]
    assert [r["extra_info"]["source_id"] for r in stage.verl_records(qs, "train", "searchr1")] == ["test_0", "test_1", "test_2"]
    assert qs[0].golden_answers == ["Wilhelm Conrad Röntgen"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"answer": ["x"]}', r"bad\.jsonl:2: missing field 'question'"),
        ('{"question": "q"}', r"bad\.jsonl:2: missing field 'answer'"),
        ('{"question": "q", "answer": []}', r"bad\.jsonl:2: .*non-empty list"),
    ],
)
def test_load_questions_names_file_and_line(tmp_path: Path, line: str, message: str):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "answer": ["a"]}\n' + line + "\n")
    with pytest.raises(stage.PPOStageError, match=message):
        stage.load_questions(bad)
    with pytest.raises(stage.PPOStageError, match=r"missing\.jsonl: question file not found \(set ppo\.train_data / ppo\.val_data\)"):
        stage.load_questions(tmp_path / "missing.jsonl")


def test_records_match_searchr1_parquet_layout(data_dir: Path):
    ref = pd.read_parquet(data_dir / "nq" / "searchr1_nq_search_test.parquet").head(20)
    qs = [stage.Question(r.id, r.question, list(r.golden_answers)) for r in ref.itertuples()]
    records = stage.verl_records(qs, "test", "searchr1")
    for rec, (_, row) in zip(records, ref.iterrows(), strict=True):
        assert rec["prompt"] == [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        assert rec["question"] == row["question"]
        assert rec["reward_model"]["ground_truth"]["target"] == list(row["reward_model"]["ground_truth"]["target"])
        assert rec["data_source"] == row["data_source"] and rec["ability"] == row["ability"]
        assert rec["agent_name"] == "sap_search"
    assert set(ref.columns) <= set(records[0])


def test_build_dataset_writes_parquet(tmp_path: Path, data_dir: Path):
    nq = data_dir / "nq"
    cfg = load_config(
        None, [f"ppo.train_data={nq / 'NQ-open.efficientqa.dev.1.1.jsonl'}", f"ppo.val_data={nq / 'NQ-open.dev.jsonl'}", "ppo.val_limit=10"]
    )
    assert stage.build_dataset(cfg, tmp_path) == {"train": 1800, "val": 10}
    df = pd.read_parquet(tmp_path / "train.parquet")
    assert len(df) == 1800 and df.iloc[0]["prompt"][0]["role"] == "user"
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    cfg = load_config(None, [f"ppo.train_data={nq / 'NQ-open.dev.jsonl'}", f"ppo.val_data={nq / 'NQ-open.dev.jsonl'}", "ppo.train_limit=8"])
    with pytest.raises(stage.PPOStageError, match=r"fewer than ppo\.train_batch_size=32"):
        stage.build_dataset(cfg, tmp_path)


def test_hydra_values_are_quoted_when_needed():
    assert stage.hydra_value(True) == "true" and stage.hydra_value(None) == "null"
    assert stage.hydra_value(1e-6) == "1e-06" and stage.hydra_value(32) == "32"
    assert stage.hydra_value("/a/b_c.parquet") == "/a/b_c.parquet"
    assert stage.hydra_value("pkg://sap.rl.reward") == "'pkg://sap.rl.reward'"
    assert stage.hydra_value("it's") == "'it\\'s'"
    assert stage.hydra_value(["console", "wandb"]) == "[console,wandb]"
    assert stage.hydra_value("true") == "'true'"


def test_overrides_follow_the_experiment_config():
    o = overrides_dict(load_config(None))  # the paper's table 1
    assert o["algorithm.adv_estimator"] == "gae" and o["critic.enable"] == "true"
    assert o["actor_rollout_ref.actor.optim.lr"] == "1e-06" and o["critic.optim.lr"] == "1e-05"
    assert o["algorithm.kl_ctrl.kl_coef"] == "0.001" and o["algorithm.use_kl_in_reward"] == "true"
    assert o["data.train_batch_size"] == "32" and o["actor_rollout_ref.actor.ppo_mini_batch_size"] == "32"
    assert o["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"] == "8" and o["trainer.total_training_steps"] == "600"
    assert o["data.max_prompt_length"] == "4096" and o["data.max_response_length"] == str(3 * 500 + 2 * 500)
    assert o["actor_rollout_ref.model.lora_rank"] == "0" and "actor_rollout_ref.model.lora_alpha" not in o
    assert o["trainer.logger"] == "[console,file]" and o["actor_rollout_ref.rollout.n"] == "1"
    assert o["trainer.rollout_data_dir"].endswith("ppo/rollouts/verl") and o["trainer.validation_data_dir"].endswith("ppo/validation")

    o = overrides_dict(load_config(None, ["ppo.algorithm=grpo", "ppo.lora_rank=32", "tracking.backend=wandb", "ppo.nnodes=2"]))
    assert o["algorithm.adv_estimator"] == "grpo" and o["critic.enable"] == "false" and "critic.optim.lr" not in o
    assert o["actor_rollout_ref.actor.use_kl_loss"] == "true" and o["algorithm.use_kl_in_reward"] == "false"
    assert o["actor_rollout_ref.rollout.n"] == "5" and o["actor_rollout_ref.model.lora_rank"] == "32"
    assert o["trainer.logger"] == "[console,wandb,file]" and o["trainer.nnodes"] == "2"

    cfg = load_config(
        None, ["ppo.verl={trainer.val_before_train: false, +actor_rollout_ref.rollout.max_num_seqs: 64}", "ppo.reward=em_format"]
    )
    o = overrides_dict(cfg)
    assert o["trainer.val_before_train"] == "false" and o["+actor_rollout_ref.rollout.max_num_seqs"] == "64"  # passed through
    assert o["+reward.custom_reward_function.reward_kwargs.reward"] == "em_format"


def test_passthrough_cannot_override_a_typed_key():
    """``ppo.verl`` may not set what a typed key sets: the run would train with one value while
    config.yaml records another. The error names both keys."""
    with pytest.raises(ConfigError, match=r"ppo\.verl\.actor_rollout_ref\.actor\.optim\.lr \(set by ppo\.actor_lr\)"):
        load_config(None, ["ppo.verl={actor_rollout_ref.actor.optim.lr: 0.5}"])
    with pytest.raises(ConfigError, match=r"ppo\.verl\.\+?trainer\.save_freq \(set by ppo\.save_freq\)"):
        load_config(None, ["ppo.verl={+trainer.save_freq: 7}"])


def test_every_owned_verl_key_is_one_sap_writes():
    """The table of keys typed fields own holds no stale entry: each is an override sap writes."""
    written = set(overrides_dict(load_config(None))) | set(overrides_dict(load_config(None, ["ppo.lora_rank=8"])))
    assert set(VERL_OWNED) <= {k.lstrip("+") for k in written}


def test_init_model_and_tracking_env(tmp_path: Path):
    cfg = load_config(None, ["experiment=e", f"run_root={tmp_path}", "tracking.backend=tensorboard"])
    assert stage.resolve_model(cfg, "sft") == str(tmp_path / "e" / "sft" / "merged")
    assert stage.resolve_model(cfg, "base") == "Qwen/Qwen2.5-3B-Instruct"
    p = stage.plan(cfg, "base")
    ppo = (tmp_path / "e" / "ppo").resolve()
    assert p.env == {"TENSORBOARD_DIR": str(ppo / "tensorboard"), "VERL_FILE_LOGGER_PATH": str(ppo / "verl_metrics.jsonl")}
    assert p.device == "cuda" and "trainer.device=cpu" not in p.overrides
    assert p.command("py")[:3] == ["py", "-m", "verl.trainer.main_ppo"]


def test_last_checkpoint(tmp_path: Path):
    assert stage.last_checkpoint(tmp_path) is None
    for n in (5, 10, 40):
        (tmp_path / f"global_step_{n}" / "actor").mkdir(parents=True)
    assert stage.last_checkpoint(tmp_path) == tmp_path / "global_step_40"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert stage.last_checkpoint(tmp_path) == tmp_path / "global_step_10"
    cmd = stage.merge_command("py", tmp_path / "global_step_10", tmp_path / "merged")
    assert cmd[1:5] == ["-m", "verl.model_merger", "merge", "--backend"] and str(tmp_path / "global_step_10" / "actor") in cmd


def test_cli_errors_are_clear(tmp_path: Path, data_dir: Path):
    runner = CliRunner()
    nq = data_dir / "nq" / "NQ-open.efficientqa.dev.1.1.jsonl"
    base = [
        "--set",
        f"run_root={tmp_path}",
        "--set",
        f"ppo.train_data={nq}",
        "--set",
        f"ppo.val_data={nq}",
        "--set",
        "retriever.url=http://127.0.0.1:9",
    ]
    r = runner.invoke(app, ["train-ppo", "--dry-run", "--init", "base", *base, "--set", "environments.rl_python=nowhere/python"])
    assert r.exit_code == 2 and "make setup-rl" in r.output
    r = runner.invoke(app, ["train-ppo", "--init", "sft", *base])  # no retriever: a real run refuses
    assert r.exit_code == 2 and "/health" in r.output
    r = runner.invoke(app, ["train-ppo", "--init", "best", *base])  # the flag is the override ppo.init
    assert r.exit_code == 2 and "ppo.init='best'" in r.output and "'sft' or 'base'" in r.output
    r = runner.invoke(app, ["train-ppo", "--rollouts", "2", *base])
    assert r.exit_code == 2 and "--rollouts runs on CPU next to --dry-run" in r.output
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["commands"][-1]["stage"] == "train-ppo"


def test_cpu_mode_adds_its_overrides_and_environment_only_on_cpu(tmp_path: Path):
    cfg = load_config(None, ["experiment=e", f"run_root={tmp_path}", "ppo.n_gpus_per_node=2", "ppo.verl={critic.strategy: fsdp2, +x.y: 1}"])
    gpu = stage.plan(cfg, "base")
    assert not any(o.startswith(("trainer.device=", "+ray_kwargs")) for o in gpu.overrides)
    assert "VERL_PLATFORM" not in gpu.env and "VERL_USE_EXTERNAL_MODULES" not in gpu.env
    cpu = stage.plan(cfg, "base", device="cpu")
    o = dict(x.split("=", 1) for x in cpu.overrides)
    assert o["trainer.device"] == "cpu" and o["actor_rollout_ref.rollout.name"] == "hf"
    assert o["+ray_kwargs.ray_init.num_gpus"] == "2" and int(o["+ray_kwargs.ray_init.num_cpus"]) >= 16
    assert o["actor_rollout_ref.actor.strategy"] == "fsdp2" and o["transfer_queue.backend.SimpleStorage.num_data_storage_units"] == "1"
    assert o["+critic.model.override_config.attn_implementation"] == "sdpa" and o["trainer.val_before_train"] == "false"
    # batch sizes and steps are the experiment's, as on a GPU; ppo.verl still comes last
    assert o["data.train_batch_size"] == "32" and o["trainer.total_training_steps"] == "600"
    assert cpu.overrides.index("+x.y=1") == len(cpu.overrides) - 1
    assert cpu.env["VERL_PLATFORM"] == "cpu" and cpu.env["VERL_USE_EXTERNAL_MODULES"] == "sap.rl.cpu"


def test_cpu_mode_refuses_ray_resources_that_would_hang(tmp_path: Path):
    cfg = load_config(
        None,
        [
            "experiment=e",
            f"run_root={tmp_path}",
            "ppo.verl={transfer_queue.backend.SimpleStorage.num_data_storage_units: 8, +ray_kwargs.ray_init.num_cpus: 4}",
        ],
    )
    with pytest.raises(stage.PPOStageError, match=r"num_data_storage_units.*|TransferQueue"):
        stage.plan(cfg, "base", device="cpu")
    stage.plan(cfg, "base")  # a GPU plan is not the CPU mode's business


def test_resolve_device(tmp_path: Path):
    cfg = load_config(None, ["ppo.device=cpu"])
    assert stage.resolve_device(cfg, "no-such-python") == "cpu"
    cfg = load_config(None)
    assert stage.resolve_device(cfg, "no-such-python", dry_run=True) == "cuda"  # --dry-run composes the GPU run, as before
