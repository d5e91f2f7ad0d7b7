"""Log metrics to the configured tracker (``tracking.backend``: none, wandb, tensorboard).

Lazily imported and offline by default; a missing tracker package is a warning, not a failure
(the metrics are in the run directory either way).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from sap.rules.config import ExperimentConfig


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_metrics(cfg: ExperimentConfig, name: str, metrics: Mapping[str, Any], step: int = 0) -> str | None:
    """Log the numeric entries of ``metrics`` under ``name/``; returns where they went."""
    backend = cfg.tracking.backend
    values = _scalars(metrics)
    if backend == "none" or not values:
        return None
    log_dir = cfg.run_dir / "tracking"
    try:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            path = log_dir / "tensorboard" / name.replace("/", "_")
            with SummaryWriter(log_dir=str(path)) as w:
                for k, v in values.items():
                    w.add_scalar(f"{name}/{k}", v, step)
            return str(path)
        if backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.tracking.mode)
            run = wandb.init(project=cfg.tracking.project, name=f"{cfg.experiment}-{name.replace('/', '-')}", dir=str(log_dir), reinit=True)
            run.log({f"{name}/{k}": v for k, v in values.items()}, step=step)
            run.finish()
            return str(log_dir)
    except ImportError as e:
        print(f"warning: tracking.backend={backend} but {e.name or e} is not installed; metrics only in {cfg.run_dir}", file=sys.stderr)
    return None
