"""HF transformers ``generate``: the CPU fallback for small models (batched, left-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from sap.agent.engines.base import Generation, SamplingParams, StopMatcher, eos_ids


class HFEngine:
    def __init__(self, model_path: str, max_model_len: int = 8192, dtype: str = "auto", seed: int = 0, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(max_model_len, int(limit))
        self.seed = seed
        self._eos = eos_ids(self.tokenizer, self.model.generation_config)
        self._matcher = StopMatcher(self.tokenizer, self._eos)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        out: list[Generation | None] = [None] * len(prompts)
        # one generate call per distinct sampling setting (in the agent they are all equal)
        key = lambda i: (params[i].temperature, params[i].top_p, params[i].stop)  # noqa: E731
        for _, group in groupby(sorted(range(len(prompts)), key=key), key=key):
            idx = list(group)
            for i, g in zip(idx, self._generate([prompts[i] for i in idx], [params[i] for i in idx]), strict=True):
                out[i] = g
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[Sequence[int]], params: list[SamplingParams]) -> list[Generation]:
        torch = self._torch
        p0 = params[0]
        cap = max(p.max_new_tokens for p in params)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        torch.manual_seed(p0.seed if p0.seed is not None else self.seed)
        sampling = {"do_sample": True, "temperature": p0.temperature, "top_p": p0.top_p} if p0.temperature > 0 else {"do_sample": False}
        extra = {"stop_strings": list(p0.stop), "tokenizer": self.tokenizer} if p0.stop else {}
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=cap,
                eos_token_id=sorted(self._eos) or None,
                pad_token_id=pad,
                **sampling,
                **extra,
            )
        new = seqs[:, width:].tolist()
        gens = []
        for row, p in zip(new, params, strict=True):
            row = row[: p.max_new_tokens]
            # a finished row is padded with the pad id (an EOS id for Qwen): keep up to its first EOS
            first_eos = next((i for i, t in enumerate(row) if t in self._eos or t == pad), None)
            raw = row if first_eos is None else row[: first_eos + 1]
            g = self._matcher.finish(raw, p.stop, capped=first_eos is None and len(row) >= p.max_new_tokens)
            produced = len(g.token_ids) if g.finish_reason == "stop" and p.stop else len(raw)
            gens.append(Generation(g.token_ids, g.text, g.finish_reason, produced, g.stop))
        return gens

    def close(self) -> None:
        self.model = None
