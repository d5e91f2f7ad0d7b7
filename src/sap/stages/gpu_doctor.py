"""``sap doctor``'s GPU-node checks: driver and CUDA, whether vLLM imports and flash-attn runs,
free disk for the checkpoints, the tracking login, and the ``train-ppo`` preflight for the config.

Appended to :data:`sap.stages.doctor.CHECKS`. On a machine without an NVIDIA GPU they say what
they cannot check (``unknown``) instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sap import envs, gpu_node
from sap.rules.errors import RunFailed, SapError
from sap.stages import ppo_preflight as pf
from sap.stages.doctor import Check, CheckFn, Findings


def check_driver(f: Findings) -> Iterable[Check]:
    """NVIDIA driver and the CUDA it supports against the GPU pins (``nvidia-smi``)."""
    info = gpu_node.nvidia_smi()
    for c in gpu_node.check_node(info):
        if c.name in ("Python", "glibc"):
            continue  # the RL environment's Python is what runs; glibc matters for make setup-gpu
        yield Check(c.name, "unknown" if c.ok is None else "ok" if c.ok else "fail", c.detail)


def check_gpu_stack(f: Findings) -> Iterable[Check]:
    """vLLM imports and a flash-attn kernel runs on the GPU, in the RL environment (GPU nodes only;
    on other machines :func:`sap.stages.doctor.check_rl` already says they cannot be checked)."""
    env = f.environments.get("rl")
    if env is None or not env.cuda_devices:
        return
    done = envs.run(
        [str(env.python), "-m", "sap.rl.gpu_probe"], env=envs.child_env(env.python), timeout_s=600, check=False, what="GPU stack probe"
    )
    try:
        probe = done.result()
    except RunFailed as e:
        yield Check("GPU stack (vLLM, flash-attn)", "fail", str(e))
        return
    errors = probe.get("errors", {})
    yield Check("vLLM imports", "fail" if "vllm" in errors else "ok", errors.get("vllm") or f"vLLM {probe.get('vllm')}")
    kernel = probe.get("flash_attn_kernel")
    detail = errors.get("flash_attn") or f"flash-attn {probe.get('flash_attn')}, a kernel ran on the GPU"
    yield Check("flash-attn works", "ok" if kernel and "flash_attn" not in errors else "fail", detail)


def check_disk(f: Findings) -> Iterable[Check]:
    """Free disk where the checkpoints go (the preflight sizes them for the config)."""
    where = f.cfg.run_dir / "ppo" / "checkpoints"
    free = pf.free_bytes(where)
    yield Check("free disk", "ok", f"{free / 1e9:.0f} GB free for {where} (train-ppo's preflight sizes the checkpoints)")


def check_tracking(f: Findings) -> Iterable[Check]:
    t = f.cfg.tracking
    if t.backend != "wandb":
        yield Check("tracking login", "ok", f"tracking.backend={t.backend}: no login needed")
        return
    import os

    found = pf.wandb_login(os.environ, Path.home())
    if found:
        yield Check("tracking login", "ok", f"wandb ({t.mode}): credentials from {found}")
    elif t.mode == "offline":
        yield Check("tracking login", "ok", "wandb offline: no login needed (upload later with `wandb sync`)")
    else:
        yield Check("tracking login", "fail", "wandb online and no login: `wandb login`, WANDB_API_KEY, or tracking.mode=offline")


def check_ppo_preflight(f: Findings) -> Iterable[Check]:
    """The ``train-ppo`` preflight of the config, as a launch here would run it."""
    from sap.stages import train_ppo as stage

    cfg = f.cfg
    try:
        rows = len(stage.load_questions(cfg.expand(cfg.ppo.train_data), cfg.ppo.train_limit))
    except SapError as e:
        yield Check("train-ppo preflight", "unknown", f"cannot read the training questions: {e}")
        return
    env = f.environments.get("rl")
    gpus = env.cuda_devices if env is not None else 0
    device = cfg.ppo.device if cfg.ppo.device != "auto" else ("cuda" if gpus else "cpu")
    try:
        the_plan = stage.plan(cfg, device=device)
    except SapError as e:
        yield Check("train-ppo preflight", "fail", str(e))
        return
    result = pf.preflight(cfg, the_plan.settings, rows, model_path=the_plan.model_path, checkpoints=the_plan.checkpoints, launch=True)
    for finding in result.findings:
        if finding.check == "tracking":
            continue  # check_tracking's line
        status = "fail" if finding.level == "error" else "ok"
        prefix = "warning: " if finding.level == "warning" else ""
        yield Check(f"train-ppo preflight: {finding.check} ({device})", status, prefix + finding.message)


GPU_CHECKS: list[CheckFn] = [check_driver, check_gpu_stack, check_disk, check_tracking, check_ppo_preflight]
