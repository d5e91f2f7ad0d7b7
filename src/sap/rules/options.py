"""The rule every command follows for its options (sap's and the retriever's).

A command's config is the ``--config`` YAML, then the ``--set key=value`` overrides, then the
command's own flags, each of which *is* a dotted config key (``sap eval --limit 5`` is
``eval.limit=5``): :func:`opt` declares such a flag with that key's docstring as its help, and
:func:`load` applies the flags through the same loading as everything else
(:func:`sap.rules.config.load_config`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sap.rules.config import ExperimentConfig, explain, load_config

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (configs/...). Default: the paper's settings.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key, repeatable: --set eval.temperature=0")]


def opt(key: str, *names: str, help: str | None = None, **kw: Any) -> Any:
    """An option that is the config key ``key``; its help is that key's docstring (or ``help``)."""
    text = (help or explain(key).help).replace("``", "")
    return typer.Option(*names, help=f"{text} (config key {key})", **kw)


def load(config: Path | None, set_: list[str] | None, flags: dict[str, Any] | None = None) -> ExperimentConfig:
    """Every command's config: the file, then ``--set``, then the command's flags (``{dotted key:
    value}``, None = not given)."""
    return load_config(config, set_ or [], flags)


def tty() -> bool:
    """Progress bars only on a terminal."""
    return sys.stderr.isatty()
