"""The GPU stack of ``make setup-gpu`` on a CPU machine: the pins in constraints/gpu.txt resolve
together for Linux x86_64 with a wheel for every package (uv against the configured indexes; no
CUDA needed), the flash-attn wheel URL matches the torch/CUDA/Python pins, and the node check
reads nvidia-smi and refuses an old driver."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sap import gpu_node

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints" / "gpu.txt"
UV = Path(sys.executable).parent / "uv"
PURE_PYTHON_SDISTS = {"antlr4-python3-runtime", "rouge-score"}
"""Packages with no wheel on PyPI at their pinned version: pure Python, built in seconds by uv."""


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_facts_agree_with_the_pins():
    p = pins()
    assert p["torch"] == gpu_node.TORCH and p["vllm"] == gpu_node.VLLM and p["flash-attn"] == gpu_node.FLASH_ATTN
    assert p["verl"] == "0.9.1"
    # the CUDA runtime torch's wheel pulls is the CUDA the driver minimum is for
    assert ".".join(p["nvidia-cuda-runtime"].split(".")[:2]) == gpu_node.CUDA
    url = gpu_node.flash_attn_wheel_url("cp311")
    name = url.rsplit("/", 1)[1]
    assert re.fullmatch(r"flash_attn-2\.8\.3\+cu130torch2\.11-cp311-cp311-linux_x86_64\.whl", name), name
    assert url.startswith("https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/")


@pytest.mark.slow
def test_gpu_pins_resolve_with_a_wheel_for_every_package(tmp_path: Path):
    """~30 s when uv's cache is warm; needs only the package index."""
    if not UV.exists():
        pytest.skip("uv is not installed in this environment (make install)")
    index_args = subprocess.run([sys.executable, str(REPO / "scripts" / "uv_pip_args.py")], capture_output=True, text=True, check=True)
    args = [a for a in index_args.stdout.split() if a != "--native-tls"]
    # the local CPU torch wheel (find-links) is this machine's, not the GPU node's
    args = [a for i, a in enumerate(args) if a != "--find-links" and (i == 0 or args[i - 1] != "--find-links")]
    out = tmp_path / "pylock.toml"
    cmd = [str(UV), "pip", "compile", str(REPO / "constraints" / "gpu.in"), "-c", str(CONSTRAINTS)]
    cmd += ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_31"]
    cmd += [
        "--excludes",
        str(REPO / "constraints" / "gpu-excludes.txt"),
        "--no-emit-package",
        "sap",
        "--format",
        "pylock.toml",
        "-o",
        str(out),
    ]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "UV_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lock = tomllib.loads(out.read_text())["packages"]
    resolved = {pkg["name"]: pkg["version"] for pkg in lock}
    p = pins()
    # every pin is what the resolver picks, and the resolution adds nothing unpinned
    assert {k: v for k, v in resolved.items()} == {k: v for k, v in p.items() if k != "flash-attn"}
    # uv lists the wheels compatible with the target platform: every package has one
    no_wheel = {pkg["name"] for pkg in lock if not pkg.get("wheels")}
    assert no_wheel <= PURE_PYTHON_SDISTS, no_wheel
    for pkg in lock:
        for wheel in pkg.get("wheels", []):
            name = wheel.get("name") or wheel["url"].rsplit("/", 1)[1]
            assert re.search(r"(none-any|manylinux[^-]*x86_64|linux_x86_64)", name), name
    torch_wheels = [w.get("name") or w["url"].rsplit("/", 1)[1] for w in next(p for p in lock if p["name"] == "torch")["wheels"]]
    assert any("cp311-cp311-manylinux" in w for w in torch_wheels)


def smi(driver: str, cuda: str):
    rows = f"NVIDIA H100 80GB HBM3, 81559 MiB, {driver}\nNVIDIA H100 80GB HBM3, 81559 MiB, {driver}\n"
    header = f"| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |\n"

    def run(cmd: list[str]) -> str:
        assert cmd[0] == "nvidia-smi"
        return rows if any(c.startswith("--query-gpu=") for c in cmd) else header

    return run


def test_node_check_reads_nvidia_smi_and_names_the_minimum_driver():
    info = gpu_node.nvidia_smi(smi("580.95.05", "13.0"))
    assert info.driver == "580.95.05" and info.cuda == "13.0" and len(info.gpus) == 2
    checks = {c.name: c for c in gpu_node.check_node(info, (3, 11), "2.35")}
    assert checks["NVIDIA driver"].ok and checks["GPUs"].ok and checks["Python"].ok and checks["glibc"].ok
    old = {c.name: c for c in gpu_node.check_node(gpu_node.nvidia_smi(smi("550.54.15", "12.4")), (3, 11), "2.35")}
    assert old["NVIDIA driver"].ok is False and "580.65.06" in old["NVIDIA driver"].detail
    other = {c.name: c for c in gpu_node.check_node(None, (3, 10), "2.28")}
    assert other["NVIDIA driver"].ok is None and other["Python"].ok is False and other["glibc"].ok is False


def test_check_gpu_node_script_refuses_a_machine_without_a_driver(tmp_path: Path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi on PATH
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_gpu_node.py")], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2 and "no nvidia-smi" in done.stdout and "cannot run the GPU stack" in done.stderr
