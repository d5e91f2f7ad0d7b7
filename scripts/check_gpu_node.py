#!/usr/bin/env python3
"""Check this node for sap's GPU stack before `make setup-gpu` installs it: NVIDIA driver against
the CUDA 13.0 pins (>= 580.65.06), GPUs, Python (the prebuilt flash-attn wheel's), glibc.
Standard library only (runs before any environment exists).

    python3 scripts/check_gpu_node.py                 # exit 2 when the node cannot run the stack
    python3 scripts/check_gpu_node.py --flash-attn-url
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sap.gpu_node import main

if __name__ == "__main__":
    sys.exit(main())
