"""Whether the GPU stack works in this environment: ``python -m sap.rl.gpu_probe`` (RL environment).

Imports torch, vLLM and flash-attn, and runs one flash-attn kernel on the first GPU (a wheel
built for another torch/CUDA imports but fails here, or fails to import with an undefined
symbol). Prints one JSON line; exit 0 when everything works, 1 when something does not, 3 when
there is no CUDA GPU (nothing to check).
"""

from __future__ import annotations

import json
import sys


def probe() -> dict:
    out: dict = {"torch": None, "cuda": None, "gpus": 0, "vllm": None, "flash_attn": None, "errors": {}}
    try:
        import torch

        out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
        out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # every failure is a finding
        out["errors"]["torch"] = f"{type(e).__name__}: {e}"
        return out
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except Exception as e:
        out["errors"]["vllm"] = f"{type(e).__name__}: {e}"
    try:
        import flash_attn
        from flash_attn import flash_attn_func

        out["flash_attn"] = flash_attn.__version__
        if out["gpus"]:
            q = torch.randn(1, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
            o = flash_attn_func(q, q, q, causal=True)
            torch.cuda.synchronize()
            out["flash_attn_kernel"] = bool(torch.isfinite(o).all().item())
    except Exception as e:
        out["errors"]["flash_attn"] = f"{type(e).__name__}: {e}"
    return out


def main() -> int:
    result = probe()
    print(json.dumps(result))
    if result["errors"]:
        return 1
    return 0 if result["gpus"] else 3


if __name__ == "__main__":
    sys.exit(main())
