"""The GPU stack's facts and the node checks that need no Python packages (standard library only).

``make setup-gpu`` runs ``python3 scripts/check_gpu_node.py`` (this module) before installing
anything; ``sap doctor`` reports the same checks. The pins themselves live in
``constraints/gpu.txt`` (a test checks that the facts below agree with them):

- torch 2.11.0 and vLLM 0.24.0 from PyPI are CUDA 13.0 builds (``libcudart.so.13``), so the
  NVIDIA driver must be >= 580.65.06 (CUDA 13.0 GA's minimum on Linux x86_64; ``nvidia-smi``
  shows "CUDA Version: 13.0" or higher). An older driver fails at ``import torch``/vLLM start.
- flash-attn 2.8.3 has only a source release on PyPI; the prebuilt wheel for CUDA 13.0 + torch
  2.11 comes from github.com/mjun0812/flash-attention-prebuild-wheels (release v0.9.4), the
  source VeRL's own install guide routes its fsdp extra to. Built for CPython 3.11 and 3.12.
- Some wheels (llguidance, a vLLM dependency) need glibc >= 2.31.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

TORCH = "2.11.0"
VLLM = "0.24.0"
CUDA = "13.0"
MIN_DRIVER = "580.65.06"
"""CUDA 13.0 GA's minimum Linux driver (NVIDIA's CUDA toolkit release notes)."""
FLASH_ATTN = "2.8.3"
FLASH_ATTN_RELEASE = "https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/v0.9.4"
FLASH_ATTN_PYTHONS = ("cp311", "cp312")
"""CPython versions the prebuilt flash-attn wheel is published for (this pin set: 3.11)."""
MIN_GLIBC = (2, 31)


def python_tag(version: tuple[int, int] | None = None) -> str:
    major, minor = version or sys.version_info[:2]
    return f"cp{major}{minor}"


def flash_attn_wheel_url(tag: str | None = None) -> str:
    """The prebuilt flash-attn wheel for the CUDA and torch pins and this (or ``tag``'s) CPython."""
    tag = tag or python_tag()
    cuda = CUDA.replace(".", "")
    torch_minor = ".".join(TORCH.split(".")[:2])
    return f"{FLASH_ATTN_RELEASE}/flash_attn-{FLASH_ATTN}+cu{cuda}torch{torch_minor}-{tag}-{tag}-linux_x86_64.whl"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.strip().split(".") if p.isdigit())


@dataclass
class GpuInfo:
    driver: str
    cuda: str | None
    """The highest CUDA version the driver supports ("CUDA Version" in nvidia-smi's header)."""
    gpus: list[str] = field(default_factory=list)
    """``name, memory`` of each GPU."""


Runner = Callable[[list[str]], str]


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def nvidia_smi(run: Runner = _run) -> GpuInfo | None:
    """Driver, CUDA and GPUs from ``nvidia-smi``; None where there is no nvidia-smi (no NVIDIA driver)."""
    if run is _run and shutil.which("nvidia-smi") is None:
        return None
    try:
        rows = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        header = run(["nvidia-smi"])
    except (OSError, subprocess.SubprocessError):
        return None
    gpus, drivers = [], []
    for line in rows.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append(f"{parts[0]}, {parts[1]}")
            drivers.append(parts[2])
    cuda = None
    marker = "CUDA Version:"
    if marker in header:
        cuda = header.split(marker, 1)[1].split()[0].strip(" |")
    return GpuInfo(drivers[0] if drivers else "unknown", cuda, gpus)


@dataclass
class NodeCheck:
    name: str
    ok: bool | None
    """True, False, or None (cannot be checked here)."""
    detail: str


def check_node(info: GpuInfo | None, python: tuple[int, int] | None = None, glibc: str | None = None) -> list[NodeCheck]:
    """Driver, CUDA, Python and glibc against the GPU pins."""
    out = []
    if info is None:
        out.append(NodeCheck("NVIDIA driver", None, "no nvidia-smi here: not a GPU node (CPU machines: make setup-rl)"))
    else:
        ok = _version(info.driver) >= _version(MIN_DRIVER)
        out.append(
            NodeCheck(
                "NVIDIA driver",
                ok,
                f"{info.driver} (CUDA {info.cuda or '?'}); the GPU pins (torch {TORCH}, vLLM {VLLM}: CUDA {CUDA}) need >= {MIN_DRIVER}"
                + ("" if ok else ": ask for a newer driver (or a node that has one); the CUDA 13 wheels fail at import"),
            )
        )
        out.append(NodeCheck("GPUs", bool(info.gpus), "; ".join(info.gpus) or "nvidia-smi lists none"))
    tag = python_tag(python)
    out.append(
        NodeCheck(
            "Python",
            tag in FLASH_ATTN_PYTHONS,
            f"{tag}; the prebuilt flash-attn wheel exists for {', '.join(FLASH_ATTN_PYTHONS)}"
            + ("" if tag in FLASH_ATTN_PYTHONS else ": make setup-gpu PYTHON=python3.11 (or see docs/gpu-node.md to build flash-attn)"),
        )
    )
    libc = glibc if glibc is not None else (platform.libc_ver()[1] if platform.system() == "Linux" else "")
    if libc:
        ok = _version(libc)[:2] >= MIN_GLIBC
        out.append(NodeCheck("glibc", ok, f"{libc}; some GPU wheels (llguidance) need >= {'.'.join(map(str, MIN_GLIBC))}"))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Check this node for the GPU stack (driver, Python, glibc) before installing it.")
    ap.add_argument("--flash-attn-url", action="store_true", help="print the flash-attn wheel URL for this Python and exit")
    args = ap.parse_args(argv)
    if args.flash_attn_url:
        print(flash_attn_wheel_url())
        return 0
    checks = check_node(nvidia_smi())
    for c in checks:
        print(f"{'ok' if c.ok else 'unknown' if c.ok is None else 'FAIL':<8} {c.name}: {c.detail}")
    if any(c.ok is not True for c in checks if c.name in ("NVIDIA driver", "GPUs")) or any(c.ok is False for c in checks):
        print("setup-gpu: this node cannot run the GPU stack (see above; docs/gpu-node.md)", file=sys.stderr)
        return 2
    return 0
