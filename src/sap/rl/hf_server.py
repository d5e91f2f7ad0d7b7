"""A CPU rollout server: VeRL's server-manager ``generate`` interface (token ids in,
:class:`verl.workers.rollout.replica.TokenOutput` out) over an in-process HF transformers model.

It stands in for vLLM's GPU engine where none can run (CPU machines: the tests and
``sap train-ppo --rollouts``); on GPU nodes VeRL's own vLLM servers are used.

It honours what vLLM honours in VeRL's sampling params: ``max_tokens``, ``stop`` strings
(``include_stop_str_in_output``: the token that completes a stop string is the last one
returned), EOS, ``temperature`` (0 = greedy) and ``logprobs``. Log-probs are the model's own
(raw logits, before any forcing).

Every call is recorded in ``calls``. Two hooks let a subclass change one call without copying
the generation code: :meth:`HFGenerationServer.adjust_generate_kwargs` (the tests force scripted
turns through a logits processor) and :meth:`HFGenerationServer.response_extra_fields`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.workers.rollout.replica import TokenOutput


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    token_ids: list[int]
    log_probs: list[float]


class HFGenerationServer:
    def __init__(self, model_dir: str):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def adjust_generate_kwargs(self, request_id: str, prompt_ids: list[int], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` for one call (hook; unchanged here)."""
        return kwargs

    def response_extra_fields(self) -> dict[str, Any]:
        """``extra_fields`` of each :class:`TokenOutput` (hook; none here)."""
        return {}

    def _generate(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> TokenOutput:
        with self._lock:
            inputs = torch.tensor([prompt_ids])
            temperature = float(params.get("temperature", 1.0) or 0.0)
            kwargs: dict[str, Any] = {
                "max_new_tokens": int(params["max_tokens"]),
                "do_sample": temperature > 0,
                "output_logits": True,
                "return_dict_in_generate": True,
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.tokenizer.eos_token_id,
            }
            if kwargs["do_sample"]:
                kwargs.update(temperature=temperature, top_p=float(params.get("top_p", 1.0)), top_k=0)
            if params.get("stop"):
                kwargs.update(stop_strings=list(params["stop"]), tokenizer=self.tokenizer)
            kwargs = self.adjust_generate_kwargs(request_id, list(prompt_ids), kwargs)
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
            extra_fields=self.response_extra_fields(),
        )

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
        return await asyncio.get_running_loop().run_in_executor(None, self._generate, request_id, list(prompt_ids), dict(sampling_params))
