"""A CPU rollout server: VeRL's server-manager ``generate`` interface (token ids in,
:class:`verl.workers.rollout.replica.TokenOutput` out) over an in-process HF transformers model.

It stands in for vLLM's GPU engine where none can run (CPU machines: the tests and
``sap train-ppo --rollouts``); on GPU nodes VeRL's own vLLM servers are used.

It honours what vLLM honours in VeRL's sampling params: ``max_tokens``, ``stop`` strings
(``include_stop_str_in_output``: the token that completes a stop string is the last one
returned), EOS, ``temperature`` (0 = greedy) and ``logprobs``. Log-probs are the model's own
(raw logits, before any forcing).

``script`` (tests) makes the tiny random model act like a search agent: for a prompt whose text
contains a key, each call of one trajectory (same ``request_id``) forces the next scripted turn
text token by token through a logits processor, followed by EOS; the server still applies
``max_tokens`` and ``stop`` itself. Every call is recorded in ``calls``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from verl.workers.rollout.replica import TokenOutput


class _Force(LogitsProcessor):
    def __init__(self, forced: list[int], prompt_len: int):
        self.forced, self.prompt_len = forced, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.forced):
            out = torch.full_like(scores, float("-inf"))
            out[:, self.forced[step]] = 0.0
            return out
        return scores


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    token_ids: list[int]
    log_probs: list[float]


class HFGenerationServer:
    def __init__(self, model_dir: str, script: dict[str, list[str]] | None = None, extra_fields: dict[str, Any] | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.script = script or {}
        self.extra_fields = dict(extra_fields or {})
        self.calls: list[Call] = []
        self._turn: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def _forced(self, request_id: str, prompt_text: str) -> list[int] | None:
        for key, turns in self.script.items():
            if key in prompt_text:
                i = self._turn[request_id]
                self._turn[request_id] += 1
                if i < len(turns):
                    return [*self.tokenizer.encode(turns[i], add_special_tokens=False), self.tokenizer.eos_token_id]
        return None

    def _generate(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> TokenOutput:
        with self._lock:
            forced = self._forced(request_id, self.tokenizer.decode(prompt_ids))
            inputs = torch.tensor([prompt_ids])
            temperature = float(params.get("temperature", 1.0) or 0.0)
            kwargs: dict[str, Any] = {
                "max_new_tokens": int(params["max_tokens"]),
                "do_sample": temperature > 0 and forced is None,
                "output_logits": True,
                "return_dict_in_generate": True,
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.tokenizer.eos_token_id,
            }
            if kwargs["do_sample"]:
                kwargs.update(temperature=temperature, top_p=float(params.get("top_p", 1.0)), top_k=0)
            if params.get("stop"):
                kwargs.update(stop_strings=list(params["stop"]), tokenizer=self.tokenizer)
            if forced is not None:
                kwargs["logits_processor"] = LogitsProcessorList([_Force(forced, len(prompt_ids))])
            with torch.no_grad():
                out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
            new = out.sequences[0, len(prompt_ids) :].tolist()
            logprobs = [torch.log_softmax(out.logits[i][0].float(), -1)[t].item() for i, t in enumerate(new)]
            self.calls.append(Call(request_id, list(prompt_ids), dict(params), new, logprobs))
        return TokenOutput(
            token_ids=new,
            log_probs=logprobs if params.get("logprobs") else None,
            stop_reason="completed",
            num_preempted=0,
            extra_fields={**self.extra_fields, "server_turn": len(self.calls)},
        )

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
        return await asyncio.get_running_loop().run_in_executor(None, self._generate, request_id, list(prompt_ids), dict(sampling_params))
