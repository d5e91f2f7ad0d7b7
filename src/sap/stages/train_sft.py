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
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sap.rules.atomic import atomic_path, atomic_write_json, atomic_write_text
from sap.rules.config import ExperimentConfig
from sap.rules.errors import SapError
from sap.stages.prepare_sft import DATA_FILE, DATASET_INFO_FILE, DATASET_NAME, dataset_info

TRAIN_YAML = "llamafactory_train.yaml"
EXPORT_YAML = "llamafactory_export.yaml"
TRAIN_LOG = "train.log"
EXPORT_LOG = "export.log"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
SUMMARY_FILE = "summary.json"
RUN_FILE = "sap_run.json"
"""Written into the adapter folder: the fingerprint of the run that owns it."""
TRAINER_LOG = "trainer_log.jsonl"
"""LLaMA-Factory's own per-step log in its output_dir."""
SETUP_TARGET = "make setup-sft"

# Keys sap sets from its own config; a pass-through may not move them.
RESERVED_KEYS = {
    "model_name_or_path": "model.path",
    "output_dir": "the run directory (runs/<experiment>/sft/adapter)",
    "dataset_dir": "--data",
    "do_train": "sap train-sft",
    "resume_from_checkpoint": "--resume",
    "overwrite_output_dir": "--overwrite",
}
# Keys that do not change what is trained: left out of the fingerprint.
_NOT_FINGERPRINTED = {
    "output_dir",
    "dataset_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "report_to",
    "run_name",
    "logging_steps",
}
_PRECISION_KEYS = {"fp16": {"fp16": True, "bf16": False}, "bf16": {"fp16": False, "bf16": True}, "fp32": {"fp16": False, "bf16": False}}
_REPORT_TO = {"none": "none", "wandb": "wandb", "tensorboard": "tensorboard"}


class SFTError(SapError, RuntimeError):
    """Raised before or during training with a message meant for the user."""


@dataclass(frozen=True)
class SFTPaths:
    sft_dir: Path
    data_dir: Path

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, data_dir: str | Path | None = None) -> SFTPaths:
        sft_dir = (cfg.run_dir / "sft").resolve()
        return cls(sft_dir, Path(data_dir).resolve() if data_dir else sft_dir / "data")

    @property
    def adapter(self) -> Path:
        return self.sft_dir / ADAPTER_DIR

    @property
    def merged(self) -> Path:
        return self.sft_dir / MERGED_DIR

    @property
    def train_yaml(self) -> Path:
        return self.sft_dir / TRAIN_YAML

    @property
    def export_yaml(self) -> Path:
        return self.sft_dir / EXPORT_YAML

    @property
    def summary(self) -> Path:
        return self.sft_dir / SUMMARY_FILE


# --- checks before training -------------------------------------------------------------------


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


@dataclass(frozen=True)
class SFTEnvironment:
    python: Path
    versions: dict[str, str | None]
    cuda_devices: int | None = None

    @property
    def bin_dir(self) -> Path:
        return self.python.parent

    @property
    def cli(self) -> Path:
        return self.bin_dir / "llamafactory-cli"


_PROBE = (
    "import json\nfrom importlib import metadata\nout = {}\n"
    "for n in ('llamafactory', 'torch', 'transformers', 'peft', 'trl', 'tensorboard', 'wandb', 'deepspeed'):\n"
    "    try:\n        out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n        out[n] = None\n"
    "try:\n    import torch\n    out['cuda_devices'] = torch.cuda.device_count()\nexcept Exception:\n    out['cuda_devices'] = None\n"
    "print(json.dumps(out))\n"
)


def resolve_python(configured: str) -> Path:
    """``environments.sft_python``: as given, else relative to the sap checkout."""
    p = Path(configured).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(__file__).resolve().parents[3] / p]
    for c in candidates:
        if c.is_file():
            return Path(os.path.abspath(c))  # keep the venv's symlink: resolving it would leave the venv
    raise SFTError(
        f"SFT environment not found: environments.sft_python = {configured!r} does not exist. "
        f"Create it with `{SETUP_TARGET}` (LLaMA-Factory 0.9.5 in .venv-sft), or point environments.sft_python at one"
    )


def probe_environment(configured: str) -> SFTEnvironment:
    python = resolve_python(configured)
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True).stdout
        versions = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        raise SFTError(f"SFT environment {python} does not run ({e}); recreate it with `{SETUP_TARGET}`") from None
    cuda = versions.pop("cuda_devices", None)
    env = SFTEnvironment(python, versions, cuda)
    if not versions.get("llamafactory") or not env.cli.is_file():
        raise SFTError(f"SFT environment {python} has no LLaMA-Factory; create it with `{SETUP_TARGET}`")
    return env


# --- the LLaMA-Factory arguments --------------------------------------------------------------


def deepspeed_config(stage: int, offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed ZeRO config whose batch and precision values are left to the HF Trainer ("auto")."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage >= 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=5e8, reduce_scatter=True, reduce_bucket_size=5e8)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto", sub_group_size=1e9)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


_DEEPSPEED_PRESETS = {"z0": (0, False), "z2": (2, False), "z2_offload": (2, True), "z3": (3, False), "z3_offload": (3, True)}


def resolve_deepspeed(value: str | None, sft_dir: Path) -> Path | None:
    """``sft.deepspeed``: a preset name (z0, z2, z2_offload, z3, z3_offload), written to
    ``sft/deepspeed.json``, or the path of a DeepSpeed JSON file."""
    if not value:
        return None
    if value in _DEEPSPEED_PRESETS:
        path = sft_dir / "deepspeed.json"
        atomic_write_json(path, deepspeed_config(*_DEEPSPEED_PRESETS[value]))
        return path
    p = Path(value).expanduser()
    if not p.is_file():
        raise SFTError(f"sft.deepspeed {value!r}: no such file, and not one of {', '.join(_DEEPSPEED_PRESETS)}")
    return p.resolve()


def train_args(cfg: ExperimentConfig, model: Path, paths: SFTPaths, deepspeed: Path | None = None) -> dict[str, Any]:
    """The LLaMA-Factory training arguments: the paper's recipe from ``cfg.sft``, then the
    ``sft.llamafactory`` pass-through on top."""
    s = cfg.sft
    args: dict[str, Any] = {
        "model_name_or_path": str(model),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": s.lora.rank,
        "lora_alpha": s.lora.alpha,
        "lora_dropout": s.lora.dropout,
        "lora_target": s.lora.target,
        "dataset": DATASET_NAME,
        "dataset_dir": str(paths.data_dir),
        "template": cfg.model.chat_template,
        "cutoff_len": s.cutoff_len,
        "overwrite_cache": True,
        "output_dir": str(paths.adapter),
        "logging_steps": s.logging_steps,
        "save_steps": s.save_steps,
        "plot_loss": False,
        "per_device_train_batch_size": s.per_device_train_batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "learning_rate": s.learning_rate,
        "num_train_epochs": s.num_train_epochs,
        "lr_scheduler_type": s.lr_scheduler_type,
        "warmup_ratio": s.warmup_ratio,
        **_PRECISION_KEYS[s.precision],
        "seed": cfg.seed,
        "report_to": _REPORT_TO[cfg.tracking.backend],
        "run_name": f"{cfg.experiment}-sft",
    }
    if s.max_steps is not None:
        args["max_steps"] = s.max_steps
    if deepspeed is not None:
        args["deepspeed"] = str(deepspeed)
    for key, value in s.llamafactory.items():
        if key in RESERVED_KEYS:
            raise SFTError(f"sft.llamafactory.{key}: set by sap, cannot be passed through (use {RESERVED_KEYS[key]})")
        args[key] = value
    return args


def export_args(train: dict[str, Any], paths: SFTPaths, out_dir: Path) -> dict[str, Any]:
    """``llamafactory-cli export`` arguments: the base model plus the adapter, merged on CPU."""
    lora = train.get("finetuning_type", "lora") == "lora"
    args: dict[str, Any] = {
        "model_name_or_path": train["model_name_or_path"] if lora else str(paths.adapter),
        "template": train["template"],
        "finetuning_type": train.get("finetuning_type", "lora"),
        "trust_remote_code": train.get("trust_remote_code", False),
        "export_dir": str(out_dir),
        "export_size": 5,
        "export_device": "cpu",
        "export_legacy_format": False,
    }
    if lora:
        args["adapter_name_or_path"] = str(paths.adapter)
    return args


def fingerprint(args: dict[str, Any], data_file: Path) -> dict[str, Any]:
    """What identifies a run: the training arguments that change the result, and the data's hash."""
    h = hashlib.sha256()
    with data_file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"args": {k: v for k, v in sorted(args.items()) if k not in _NOT_FINGERPRINTED}, "data_sha256": h.hexdigest()}


def last_checkpoint(adapter_dir: Path) -> Path | None:
    ckpts = [p for p in adapter_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    if old.get("data_sha256") != new["data_sha256"]:
        diffs.append("the training data")
    oa, na = old.get("args", {}), new["args"]
    diffs += [f"{k} ({oa.get(k)!r} -> {na.get(k)!r})" for k in sorted(set(oa) | set(na)) if oa.get(k) != na.get(k)]
    return diffs


def plan_output_dir(paths: SFTPaths, fp: dict[str, Any], resume: bool, overwrite: bool) -> Path | None:
    """Decide what to do with an existing adapter folder. Returns the checkpoint to resume
    from (``None`` = start fresh). Raises before training when the folder holds another run."""
    adapter = paths.adapter
    if not adapter.exists() or not any(adapter.iterdir()):
        if resume:
            raise SFTError(f"--resume: {adapter} holds no run to resume; run without --resume")
        return None
    if overwrite:
        return None
    run_file = adapter / RUN_FILE
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        old = None
    if old is None:
        raise SFTError(f"output directory {adapter} holds files that are not from a sap run; move them away or pass --overwrite")
    diffs = _fingerprint_diff(old, fp)
    if diffs:
        raise SFTError(
            f"output directory {adapter} holds a different run (it differs in: {', '.join(diffs)}); "
            "use another experiment name, or pass --overwrite to replace it"
        )
    if resume:
        ckpt = last_checkpoint(adapter)
        if ckpt is None:
            raise SFTError(f"--resume: {adapter} has no checkpoint-* folder to resume from (lower sft.save_steps to keep some)")
        return ckpt
    raise SFTError(f"output directory {adapter} already holds this run; pass --resume to continue it or --overwrite to train again")


# --- running LLaMA-Factory --------------------------------------------------------------------


def subprocess_env(cfg: ExperimentConfig, env: SFTEnvironment, paths: SFTPaths) -> dict[str, str]:
    """The child's environment: the SFT venv first on PATH (torchrun), tracking and launcher
    variables from the config. A launcher variable the user exported (NNODES, MASTER_ADDR, …)
    stays unless the config sets that key; wandb variables the user exported always stay."""
    out = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "__PYVENV_LAUNCHER__")}
    out["PATH"] = str(env.bin_dir) + os.pathsep + out.get("PATH", "")
    out["VIRTUAL_ENV"] = str(env.bin_dir.parent)
    out["PYTHONUNBUFFERED"] = "1"
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


def read_trainer_log(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """New complete lines of LLaMA-Factory's ``trainer_log.jsonl`` from byte ``offset``;
    returns them and the offset after the last complete line."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    rows = []
    for line in chunk[: end + 1].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end + 1


@dataclass
class TrainProgress:
    """Steps and losses seen in ``trainer_log.jsonl`` during this run."""

    total_steps: int | None = None
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    remaining: str | None = None
    """LLaMA-Factory's own estimate of the time left (``remaining_time``, H:MM:SS)."""

    def update(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            if r.get("remaining_time"):
                self.remaining = str(r["remaining_time"])
            if r.get("total_steps"):
                self.total_steps = int(r["total_steps"])
            if r.get("current_steps") is not None:
                self.step = max(self.step, int(r["current_steps"]))
            if r.get("loss") is not None and r.get("current_steps") is not None:
                self.losses.append((int(r["current_steps"]), float(r["loss"])))


def run_logged(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str],
    poll: Callable[[], None] | None = None,
    interval_s: float = 1.0,
) -> int:
    """Run ``cmd`` with stdout+stderr into ``log_path``, calling ``poll`` every ``interval_s``
    until it exits. Ctrl-C stops the child too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                if poll:
                    poll()
                time.sleep(interval_s)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if poll:
            poll()
        return proc.returncode


def log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class SFTResult:
    summary: dict[str, Any]
    paths: SFTPaths


def train_sft(
    cfg: ExperimentConfig,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    merge: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> SFTResult:
    """Check, train, merge, summarise. Raises :class:`SFTError` with a user-facing message."""
    if resume and overwrite:
        raise SFTError("--resume and --overwrite contradict each other; pick one")
    paths = SFTPaths.for_config(cfg, data_dir)
    # 1. every check that can fail before training
    model = resolve_model(cfg.model.path)
    n_samples = check_dataset(paths.data_dir)
    env = probe_environment(cfg.environments.sft_python)
    for backend in ("tensorboard", "wandb"):
        if cfg.tracking.backend == backend and not env.versions.get(backend):
            raise SFTError(
                f"tracking.backend={backend} but {backend} is not installed in {env.python.parent.parent}: `{env.bin_dir / 'pip'} install {backend}`"
            )
    if cfg.sft.precision == "fp16" and env.cuda_devices == 0:
        raise SFTError(
            "sft.precision=fp16 needs a GPU and torch in the SFT environment sees none; "
            "on CPU use --set sft.precision=fp32 (or bf16 where the CPU supports it)"
        )
    deepspeed = resolve_deepspeed(cfg.sft.deepspeed, paths.sft_dir)
    if deepspeed is not None and not env.versions.get("deepspeed"):
        raise SFTError(
            f"sft.deepspeed is set but deepspeed is not installed in {env.python.parent.parent}: `{env.bin_dir / 'pip'} install deepspeed`"
        )
    args = train_args(cfg, model, paths, deepspeed)
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

    # 3. train, following trainer_log.jsonl
    echo(f"training LoRA on {n_samples} samples with LLaMA-Factory {env.versions['llamafactory']} (log: {paths.sft_dir / TRAIN_LOG})")
    started = time.time()
    state = TrainProgress()
    log_file = paths.adapter / TRAINER_LOG
    offset = log_file.stat().st_size if resume_from is not None and log_file.is_file() else 0
    bar = _progress_bar(progress)

    def poll() -> None:
        nonlocal offset
        rows, offset = read_trainer_log(log_file, offset)
        if not rows:
            return
        state.update(rows)
        if bar is not None:
            if state.total_steps and bar.total != state.total_steps:
                bar.total = state.total_steps
            bar.n = state.step
            post = {}
            if state.losses:
                post["loss"] = f"{state.losses[-1][1]:.4f}"
            if state.remaining:
                post["eta"] = state.remaining
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    try:
        rc = run_logged([str(env.cli), "train", str(paths.train_yaml)], paths.sft_dir / TRAIN_LOG, child_env, poll)
    finally:
        if bar is not None:
            bar.close()
    train_wall = time.time() - started
    if rc != 0:
        raise SFTError(
            f"llamafactory-cli train failed (exit {rc}); last lines of {paths.sft_dir / TRAIN_LOG}:\n{log_tail(paths.sft_dir / TRAIN_LOG)}"
        )

    # 4. merge
    merged_dir: Path | None = None
    merge_wall = 0.0
    if merge:
        echo(f"merging the adapter into {paths.merged} (log: {paths.sft_dir / EXPORT_LOG})")
        t0 = time.time()
        merged_dir = merge_adapter(args, paths, env, child_env)
        merge_wall = time.time() - t0

    summary = build_summary(cfg, args, paths, env, state, n_samples, resume_from, merged_dir, train_wall, merge_wall)
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
            rc = run_logged([str(env.cli), "export", str(tmp_yaml)], paths.sft_dir / EXPORT_LOG, child_env)
        finally:
            tmp_yaml.unlink(missing_ok=True)
        if rc != 0:
            raise SFTError(
                f"llamafactory-cli export failed (exit {rc}); the adapter is kept in {paths.adapter}. "
                f"Last lines of {paths.sft_dir / EXPORT_LOG}:\n{log_tail(paths.sft_dir / EXPORT_LOG)}"
            )
        missing = [n for n in ("config.json", "tokenizer_config.json") if not (tmp / n).is_file()]
        if missing:
            raise SFTError(f"llamafactory-cli export wrote no {', '.join(missing)} into {tmp}; see {paths.sft_dir / EXPORT_LOG}")
    return paths.merged


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
        "samples": n_samples,
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


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # The ETA is LLaMA-Factory's own (in the postfix): tqdm's would count model loading as training.
    fmt = "{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    size = shutil.get_terminal_size((100, 20))  # a terminal that reports 0x0 (e.g. a bare pty) gets 100x20
    return tqdm(total=None, desc="train-sft", unit="step", ncols=size.columns, nrows=size.lines, file=sys.stderr, bar_format=fmt)
