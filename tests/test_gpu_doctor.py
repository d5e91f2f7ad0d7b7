"""``sap doctor``'s GPU-node checks (sap.stages.gpu_doctor) on this CPU machine: what they cannot
check is said plainly (``unknown``), and the config's train-ppo preflight is reported line by line."""

from __future__ import annotations

import os
from pathlib import Path

from sap.rules.config import load_config
from sap.stages import doctor, gpu_doctor
from sap.stages.doctor import Findings


def lines(fn, cfg) -> list[doctor.Check]:
    return list(fn(Findings(cfg)))


def test_gpu_checks_are_part_of_sap_doctor():
    assert all(fn in doctor.CHECKS for fn in gpu_doctor.GPU_CHECKS)


def test_without_a_gpu_the_driver_and_stack_are_unknown_not_failed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    cfg = load_config(None, [f"run_root={tmp_path}"])
    [driver] = lines(gpu_doctor.check_driver, cfg)
    assert driver.status == "unknown" and "no nvidia-smi" in driver.detail
    assert lines(gpu_doctor.check_gpu_stack, cfg) == []  # no RL environment with a GPU: check_rl says it
    [disk] = lines(gpu_doctor.check_disk, cfg)
    assert disk.status == "ok" and "GB free" in disk.detail


def test_tracking_login(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    [c] = lines(gpu_doctor.check_tracking, load_config(None, ["tracking.backend=wandb", "tracking.mode=online"]))
    assert c.status == "fail" and "wandb login" in c.detail
    [c] = lines(gpu_doctor.check_tracking, load_config(None, ["tracking.backend=wandb", "tracking.mode=offline"]))
    assert c.status == "ok"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    [c] = lines(gpu_doctor.check_tracking, load_config(None, ["tracking.backend=wandb", "tracking.mode=online"]))
    assert c.status == "ok" and "WANDB_API_KEY" in c.detail
    assert os.environ["WANDB_API_KEY"]


def test_the_config_preflight_is_reported(tmp_path: Path):
    bad = load_config(None, [f"run_root={tmp_path}", "ppo.n_gpus_per_node=8", "ppo.device=cuda"])  # micro-batch 8, 4 rows per GPU
    checks = lines(gpu_doctor.check_ppo_preflight, bad)
    [fail] = [c for c in checks if c.status == "fail"]
    assert "batches" in fail.name and "ppo.ppo_micro_batch_size_per_gpu" in fail.detail
    good = load_config(None, [f"run_root={tmp_path}", "ppo.n_gpus_per_node=8", "ppo.ppo_micro_batch_size_per_gpu=4", "ppo.device=cuda"])
    checks = lines(gpu_doctor.check_ppo_preflight, good)
    assert checks and not [c for c in checks if c.status == "fail"]
    assert any("warning: " in c.detail and "demo file" in c.detail for c in checks)
    missing = load_config(None, [f"run_root={tmp_path}", f"ppo.train_data={tmp_path / 'none.jsonl'}"])
    [c] = lines(gpu_doctor.check_ppo_preflight, missing)
    assert c.status == "unknown" and "question file not found" in c.detail
