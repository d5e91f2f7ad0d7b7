"""``sap train-sft``: LoRA SFT with LLaMA-Factory, then one merged HF checkpoint.

LLaMA-Factory lives in its own environment (``.venv-sft``, ``make setup-sft``); this module
never imports it. It checks everything it can before training (model on disk, dataset shape,
environment, output directory), writes the YAML files LLaMA-Factory reads, runs
``llamafactory-cli train`` and ``llamafactory-cli export`` with that environment's executables,
and follows training through LLaMA-Factory's own ``trainer_log.jsonl``.

Files, under ``runs/<experiment>/sft/``::

    data/                       prepare-sft's output (+ dataset_info.json)
    llamafactory_train.yaml     what ``llamafactory-cli train`` ran
    llamafactory_export.yaml    what ``llamafactory-cli export`` ran
    train.log  export.log       their stdout and stderr
    adapter/                    LoRA adapter, checkpoints, trainer_log.jsonl, sap_run.json
    merged/                     the merged model with tokenizer and chat template
    summary.json                steps, first and final loss, wall time, paths
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sap import envs
from sap.rules.atomic import atomic_path, atomic_write_json, atomic_write_text
from sap.rules.config import ExperimentConfig
from sap.stages.prepare_sft import DATA_FILE, DATASET_INFO_FILE, dataset_info
from sap.stages.sft.checks import SFTEnvironment, check_dataset, probe_environment, resolve_model, run_checks
from sap.stages.sft.follow import Follower, TrainProgress, read_trainer_log
from sap.stages.sft.paths import (
    ADAPTER_DIR,
    EXPORT_LOG,
    EXPORT_YAML,
    MERGED_DIR,
    RUN_FILE,
    SUMMARY_FILE,
    TRAIN_LOG,
    TRAIN_YAML,
    TRAINER_LOG,
    SFTError,
    SFTPaths,
)
from sap.stages.sft.render import deepspeed_config, export_args, resolve_deepspeed, train_args
from sap.stages.sft.state import fingerprint, last_checkpoint, plan_output_dir

__all__ = [  # the stage's pieces, importable from here (they live in sap.stages.sft.*)
    "ADAPTER_DIR",
    "EXPORT_YAML",
    "MERGED_DIR",
    "RUN_FILE",
    "SUMMARY_FILE",
    "TRAINER_LOG",
    "TRAIN_YAML",
    "SFTEnvironment",
    "SFTError",
    "SFTPaths",
    "SFTResult",
    "TrainProgress",
    "check_dataset",
    "deepspeed_config",
    "export_args",
    "fingerprint",
    "last_checkpoint",
    "plan_output_dir",
    "probe_environment",
    "read_trainer_log",
    "resolve_deepspeed",
    "resolve_model",
    "subprocess_env",
    "train_args",
    "train_sft",
]


def subprocess_env(cfg: ExperimentConfig, env: SFTEnvironment, paths: SFTPaths) -> dict[str, str]:
    """The child's environment (:func:`sap.envs.child_env`: the SFT venv first on PATH, for
    torchrun), plus tracking and launcher variables from the config. A launcher variable the user
    exported (NNODES, MASTER_ADDR, …) stays unless the config sets that key; wandb variables the
    user exported always stay."""
    out = envs.child_env(env.python)
    if cfg.tracking.backend == "wandb":
        out.setdefault("WANDB_MODE", cfg.tracking.mode)
        out.setdefault("WANDB_PROJECT", cfg.tracking.project)
        out.setdefault("WANDB_DIR", str(paths.sft_dir))
    s = cfg.sft
    launch = {
        "NNODES": s.nnodes if s.nnodes > 1 else None,
        "NODE_RANK": s.node_rank if s.node_rank > 0 else None,
        "NPROC_PER_NODE": s.nproc_per_node,
        "MASTER_ADDR": s.master_addr,
        "MASTER_PORT": s.master_port,
    }
    for key, value in launch.items():
        if value is not None:
            out[key] = str(value)
    if s.force_torchrun or s.nnodes > 1 or (s.nproc_per_node or 1) > 1:
        out["FORCE_TORCHRUN"] = "1"
    return out


@dataclass
class SFTResult:
    summary: dict[str, Any]
    paths: SFTPaths

    def describe(self) -> str:
        s = self.summary
        if s["first_loss"] is not None:
            loss = f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
        else:
            loss = f"train loss {s['train_loss']:.4f}" if s["train_loss"] is not None else "no loss logged"
        lines = [f"{s['steps']} steps, {loss}, {s['wall_time_s']:.0f}s", f"adapter: {s['paths']['adapter']}"]
        if s["merged"]:
            lines.append(f"merged:  {s['paths']['merged']}")
        return "\n".join([*lines, f"summary: {self.paths.summary}"])


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def train_sft(
    cfg: ExperimentConfig,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    merge: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = _stderr,
) -> SFTResult:
    """Check, train, merge, summarise. Raises :class:`SFTError` with a user-facing message."""
    from sap.rules.rundir import record_run

    if resume and overwrite:
        raise SFTError("--resume and --overwrite contradict each other; pick one")
    record_run(cfg, "train-sft")
    paths = SFTPaths.for_config(cfg, data_dir)
    # 1. checks: every one that can fail before training (sap.stages.sft.checks.run_checks)
    checked = run_checks(cfg, paths)
    env = checked.env
    deepspeed = resolve_deepspeed(cfg.sft.deepspeed, paths.sft_dir)
    if deepspeed is not None and not env.has("deepspeed"):
        raise SFTError(f"sft.deepspeed is set but deepspeed is not installed in {env.prefix}: `{env.tool('pip')} install deepspeed`")
    args = train_args(cfg, checked.model, paths, deepspeed)
    fp = fingerprint(args, paths.data_dir / DATA_FILE)
    resume_from = plan_output_dir(paths, fp, resume, overwrite)

    # 2. files LLaMA-Factory reads
    atomic_write_json(paths.data_dir / DATASET_INFO_FILE, dataset_info())
    if resume_from is not None:
        args.update(resume_from_checkpoint=str(resume_from), overwrite_output_dir=False)
        echo(f"resuming from {resume_from}")
    else:
        if paths.adapter.exists():
            shutil.rmtree(paths.adapter)
        args["overwrite_output_dir"] = True
    paths.adapter.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.adapter / RUN_FILE, fp)
    atomic_write_text(paths.train_yaml, yaml.safe_dump(args, sort_keys=False, allow_unicode=True))
    child_env = subprocess_env(cfg, env, paths)

    # 3. train (supervised by sap.envs), following trainer_log.jsonl
    train_log = paths.sft_dir / TRAIN_LOG
    used = samples_used(args, checked.n_samples)
    of = f"{used} of the {checked.n_samples} samples (sft.llamafactory.max_samples)" if used < checked.n_samples else f"{used} samples"
    echo(f"training LoRA on {of} with LLaMA-Factory {env.versions['llamafactory']} (log: {train_log})")
    log_file = paths.adapter / TRAINER_LOG
    follower = Follower(log_file, log_file.stat().st_size if resume_from is not None and log_file.is_file() else 0, progress)
    try:
        done = envs.run(
            [env.tool("llamafactory-cli"), "train", paths.train_yaml],
            log=train_log,
            env=child_env,
            poll=follower,
            keep_stdout=False,
            what="llamafactory-cli train",
        )
    finally:
        follower.close()

    # 4. merge
    merged_dir: Path | None = None
    merge_wall = 0.0
    if merge:
        echo(f"merging the adapter into {paths.merged} (log: {paths.sft_dir / EXPORT_LOG})")
        t0 = time.time()
        merged_dir = merge_adapter(args, paths, env, child_env)
        merge_wall = time.time() - t0

    summary = build_summary(cfg, args, paths, env, follower.state, checked.n_samples, resume_from, merged_dir, done.wall_s, merge_wall)
    atomic_write_json(paths.summary, summary)
    return SFTResult(summary, paths)


def merge_adapter(train: dict[str, Any], paths: SFTPaths, env: SFTEnvironment, child_env: dict[str, str]) -> Path:
    """``llamafactory-cli export`` into a temporary folder beside ``merged/``, then swap it in:
    a crash never leaves half a model under ``merged/``."""
    with atomic_path(paths.merged) as tmp:
        args = export_args(train, paths, tmp)
        atomic_write_text(paths.export_yaml, yaml.safe_dump({**args, "export_dir": str(paths.merged)}, sort_keys=False))
        tmp_yaml = paths.sft_dir / f".tmp-{EXPORT_YAML}"  # LLaMA-Factory reads a file by its .yaml suffix
        atomic_write_text(tmp_yaml, yaml.safe_dump(args, sort_keys=False))
        try:
            done = envs.run(
                [env.tool("llamafactory-cli"), "export", tmp_yaml],
                log=paths.sft_dir / EXPORT_LOG,
                env=child_env,
                keep_stdout=False,
                check=False,
                what="llamafactory-cli export",
            )
        finally:
            tmp_yaml.unlink(missing_ok=True)
        if done.returncode != 0:
            raise SFTError(
                f"llamafactory-cli export failed (exit {done.returncode}); the adapter is kept in {paths.adapter}. "
                f"Last lines of {paths.sft_dir / EXPORT_LOG}:\n{done.tail(30)}"
            )
        missing = [n for n in ("config.json", "tokenizer_config.json") if not (tmp / n).is_file()]
        if missing:
            raise SFTError(f"llamafactory-cli export wrote no {', '.join(missing)} into {tmp}; see {paths.sft_dir / EXPORT_LOG}")
    return paths.merged


def samples_used(args: dict[str, Any], n_samples: int) -> int:
    """How many of the dataset's ``n_samples`` LLaMA-Factory trains on (its ``max_samples``)."""
    return min(n_samples, int(args["max_samples"])) if args.get("max_samples") else n_samples


def build_summary(
    cfg: ExperimentConfig,
    args: dict[str, Any],
    paths: SFTPaths,
    env: SFTEnvironment,
    state: TrainProgress,
    n_samples: int,
    resume_from: Path | None,
    merged_dir: Path | None,
    train_wall: float,
    merge_wall: float,
) -> dict[str, Any]:
    # The whole log (a resumed run's too) for first/final loss; the poller saw only this run.
    rows, _ = read_trainer_log(paths.adapter / TRAINER_LOG)
    full = TrainProgress()
    full.update(rows)
    results: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        results = json.loads((paths.adapter / "all_results.json").read_text(encoding="utf-8"))
    losses = full.losses or state.losses
    return {
        "experiment": cfg.experiment,
        "base_model": args["model_name_or_path"],
        "samples": samples_used(args, n_samples),  # what training read
        "samples_in_data": n_samples,
        "steps": full.step or state.step,
        "total_steps": full.total_steps or state.total_steps,
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "train_loss": results.get("train_loss"),
        "losses": [{"step": s, "loss": v} for s, v in losses],
        "wall_time_s": round(train_wall + merge_wall, 2),
        "train_wall_time_s": round(train_wall, 2),
        "merge_wall_time_s": round(merge_wall, 2),
        "resumed_from": str(resume_from) if resume_from else None,
        "merged": merged_dir is not None,
        "paths": {
            "data_dir": str(paths.data_dir),
            "train_yaml": str(paths.train_yaml),
            "adapter": str(paths.adapter),
            "merged": str(merged_dir) if merged_dir else None,
            "train_log": str(paths.sft_dir / TRAIN_LOG),
            "trainer_log": str(paths.adapter / TRAINER_LOG),
        },
        "versions": {k: v for k, v in env.versions.items() if v},
    }
