"""Every check that can fail before LLaMA-Factory starts: the model on disk, the dataset's shape,
the SFT environment (:mod:`sap.envs`) and what the config asks of it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sap import envs
from sap.models.template_check import ensure_same_prompt
from sap.rules.config import ExperimentConfig
from sap.stages.prepare_sft import DATA_FILE
from sap.stages.sft.paths import SETUP_TARGET, SFTError, SFTPaths

SFTEnvironment = envs.Environment
"""What the SFT environment holds (:class:`sap.envs.Environment`)."""


def resolve_model(path: str) -> Path:
    """The base model on local disk: a folder with ``config.json``, or a hub id already in the
    Hugging Face cache (these machines cannot download)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SFTError(f"model.path {path!r}: folder has no config.json (not a Hugging Face model folder)")
        return p.resolve()
    snapshot = _hub_cache_snapshot(path)
    if snapshot is not None:
        return snapshot
    if not _looks_like_hub_id(path):
        raise SFTError(f"model.path {path!r}: no such folder (set model.path to a local Hugging Face model folder)")
    raise SFTError(
        f"model.path {path!r}: no such folder, and not in the Hugging Face cache ({hub_cache_dir()}). "
        "Nothing is downloaded at run time: fetch the model on a machine with internet "
        f"(e.g. `hf download {path} --local-dir models/{Path(path).name}`) and set model.path to that folder"
    )


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and parts[0] not in ("models", "runs")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    if not _looks_like_hub_id(repo_id):
        return None
    parts = repo_id.split("/")
    snapshots = hub_cache_dir() / f"models--{parts[0]}--{parts[1]}" / "snapshots"
    found = sorted((s for s in snapshots.glob("*") if (s / "config.json").is_file()), key=lambda s: s.stat().st_mtime)
    return found[-1] if found else None


def check_dataset(data_dir: Path) -> int:
    """Validate prepare-sft's output; returns the number of samples."""
    data = data_dir / DATA_FILE
    if not data.is_file():
        raise SFTError(f"{data}: SFT data not found; run `sap prepare-sft` first (it writes {DATA_FILE} into runs/<experiment>/sft/data)")
    try:
        records = json.loads(data.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SFTError(f"{data}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(records, list):
        raise SFTError(f"{data}: expected a JSON list of Alpaca records, got {type(records).__name__}")
    if not records:
        raise SFTError(f"{data}: the dataset is empty (0 samples); check prepare_sft_report.json for what was rejected")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise SFTError(f"{data}: record {i}: expected an object with instruction/input/output, got {type(r).__name__}")
        for col in ("instruction", "input", "output"):
            if not isinstance(r.get(col), str):
                what = "missing" if col not in r else f"not a string ({type(r[col]).__name__})"
                raise SFTError(f"{data}: record {i}: column {col!r} {what}; expected Alpaca columns instruction, input, output")
        if not r["output"].strip():
            raise SFTError(f"{data}: record {i}: column 'output' is empty")
    return len(records)


def probe_environment(configured: str) -> SFTEnvironment:
    """The SFT environment (``environments.sft_python``) probed by :mod:`sap.envs`; it must hold
    LLaMA-Factory and its ``llamafactory-cli``."""
    env = envs.probe(envs.resolve_python(configured, "sft"))
    if not env.has("llamafactory") or not env.tool("llamafactory-cli").is_file():
        raise SFTError(f"SFT environment {env.python} has no LLaMA-Factory; create it with `{SETUP_TARGET}`")
    return env


def check_environment(cfg: ExperimentConfig, env: SFTEnvironment) -> None:
    """What the config asks of the environment: the tracker installed, a GPU for fp16."""
    for backend in ("tensorboard", "wandb"):
        if cfg.tracking.backend == backend and not env.has(backend):
            raise SFTError(
                f"tracking.backend={backend} but {backend} is not installed in {env.prefix}: `{env.tool('pip')} install {backend}`"
            )
    if cfg.sft.precision == "fp16" and env.cuda_devices == 0:
        raise SFTError(
            "sft.precision=fp16 needs a GPU and torch in the SFT environment sees none; "
            "on CPU use --set sft.precision=fp32 (or bf16 where the CPU supports it)"
        )


@dataclass(frozen=True)
class Checked:
    """What the checks found: the model folder, the sample count, the environment."""

    model: Path
    n_samples: int
    env: SFTEnvironment


def run_checks(cfg: ExperimentConfig, paths: SFTPaths) -> Checked:
    """The ``checks`` step of ``sap train-sft``: everything that can fail before training, in
    order. A new pre-training check is one more call here."""
    model = resolve_model(cfg.model.path)
    n_samples = check_dataset(paths.data_dir)
    env = probe_environment(cfg.environments.sft_python)
    check_environment(cfg, env)
    ensure_same_prompt(cfg, model, paths.data_dir, env.python)
    return Checked(model, n_samples, env)
