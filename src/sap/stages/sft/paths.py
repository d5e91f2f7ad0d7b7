"""The files of one SFT run under ``runs/<experiment>/sft/`` and the stage's error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sap.rules.config import ExperimentConfig
from sap.rules.errors import SapError

TRAIN_YAML = "llamafactory_train.yaml"
EXPORT_YAML = "llamafactory_export.yaml"
TRAIN_LOG = "train.log"
EXPORT_LOG = "export.log"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
SUMMARY_FILE = "summary.json"
RUN_FILE = "sap_run.json"
"""Written into the adapter folder: the fingerprint of the run that owns it."""
TRAINER_LOG = "trainer_log.jsonl"
"""LLaMA-Factory's own per-step log in its output_dir."""
SETUP_TARGET = "make setup-sft"


class SFTError(SapError, RuntimeError):
    """Raised before or during training with a message meant for the user."""


@dataclass(frozen=True)
class SFTPaths:
    sft_dir: Path
    data_dir: Path

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, data_dir: str | Path | None = None) -> SFTPaths:
        sft_dir = (cfg.run_dir / "sft").resolve()
        return cls(sft_dir, Path(data_dir).resolve() if data_dir else sft_dir / "data")

    @property
    def adapter(self) -> Path:
        return self.sft_dir / ADAPTER_DIR

    @property
    def merged(self) -> Path:
        return self.sft_dir / MERGED_DIR

    @property
    def train_yaml(self) -> Path:
        return self.sft_dir / TRAIN_YAML

    @property
    def export_yaml(self) -> Path:
        return self.sft_dir / EXPORT_YAML

    @property
    def summary(self) -> Path:
        return self.sft_dir / SUMMARY_FILE
