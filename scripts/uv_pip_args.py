#!/usr/bin/env python3
"""Print the `uv pip install` options that reach the package indexes pip is configured for.

uv does not read pip's configuration, so the Makefile asks this script for it: pip's
index-url, extra-index-url and find-links (from `pip config list` and the PIP_* variables,
the latter winning, as in pip), plus `--index-strategy unsafe-best-match` (pip's rule: the
best version from any index, e.g. a CPU torch wheel in a local folder next to PyPI's) and
`--native-tls` (the system's certificates, as pip's `cert` usually points at them).

    uv pip install $(python3 scripts/uv_pip_args.py) -r requirements.txt
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

KEYS = ("index-url", "extra-index-url", "find-links")


def parse_pip_config(listing: str, environ: dict[str, str]) -> dict[str, list[str]]:
    """Values of KEYS in `pip config list` output (any scope), then in the PIP_* variables."""
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        key = name.rpartition(".")[2]
        if sep and key in KEYS:
            found[key] = shlex.split(value)[0].split() if value.strip() else []
    for key in KEYS:
        env = environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            found[key] = env.split()
    return found


def pip_config() -> dict[str, list[str]]:
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    return parse_pip_config(listing, dict(os.environ))


def uv_args(config: dict[str, list[str]]) -> list[str]:
    args: list[str] = []
    for url in config.get("index-url", [])[:1]:
        args += ["--index-url", url]
    for url in config.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for place in config.get("find-links", []):
        args += ["--find-links", place]
    return [*args, "--index-strategy", "unsafe-best-match", "--native-tls"]


if __name__ == "__main__":
    print(shlex.join(uv_args(pip_config())))
