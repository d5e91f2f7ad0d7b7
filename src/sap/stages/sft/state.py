"""Run state of the adapter folder: the fingerprint of the run that owns it, and what to do
with it (start fresh, resume from the last checkpoint, or refuse)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sap.stages.sft.paths import RUN_FILE, SFTError, SFTPaths

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


def fingerprint(args: dict[str, Any], data_file: Path) -> dict[str, Any]:
    """What identifies a run: the training arguments that change the result, and the data's hash."""
    with data_file.open("rb") as f:
        data_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return {"args": {k: v for k, v in sorted(args.items()) if k not in _NOT_FINGERPRINTED}, "data_sha256": data_sha256}


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
