"""A rollout server whose tiny random model acts like a search agent on cue (tests only).

:class:`ScriptedHFServer` is :class:`sap.rl.hf_server.HFGenerationServer` with ``script``: for a
prompt whose text contains a key, each call of one trajectory (same ``request_id``) forces the
next scripted turn text token by token through a logits processor, followed by EOS; the server
still applies ``max_tokens`` and ``stop`` itself, and log-probs stay the model's own (raw
logits, before the forcing). ``extra_fields`` are added to every response, with
``server_turn`` (the number of calls so far).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from sap.rl.hf_server import HFGenerationServer


class ForceTokens(LogitsProcessor):
    """Only ``forced[i]`` may follow the ``i``-th generated token; free generation after them."""

    def __init__(self, forced: list[int], prompt_len: int):
        self.forced, self.prompt_len = forced, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.forced):
            out = torch.full_like(scores, float("-inf"))
            out[:, self.forced[step]] = 0.0
            return out
        return scores


class ScriptedHFServer(HFGenerationServer):
    def __init__(self, model_dir: str, script: dict[str, list[str]] | None = None, extra_fields: dict[str, Any] | None = None):
        super().__init__(model_dir)
        self.script = script or {}
        self.extra_fields = dict(extra_fields or {})
        self._turn: dict[str, int] = defaultdict(int)

    def _forced(self, request_id: str, prompt_ids: list[int]) -> list[int] | None:
        prompt_text = self.tokenizer.decode(prompt_ids)
        for key, turns in self.script.items():
            if key in prompt_text:
                i = self._turn[request_id]
                self._turn[request_id] += 1
                if i < len(turns):
                    return [*self.tokenizer.encode(turns[i], add_special_tokens=False), self.tokenizer.eos_token_id]
        return None

    def adjust_generate_kwargs(self, request_id: str, prompt_ids: list[int], kwargs: dict[str, Any]) -> dict[str, Any]:
        forced = self._forced(request_id, prompt_ids)
        if forced is None:
            return kwargs
        kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
        return {**kwargs, "do_sample": False, "logits_processor": LogitsProcessorList([ForceTokens(forced, len(prompt_ids))])}

    def response_extra_fields(self) -> dict[str, Any]:
        return {**self.extra_fields, "server_turn": len(self.calls)}
