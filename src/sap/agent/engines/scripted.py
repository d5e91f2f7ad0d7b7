"""A scripted engine: exact, instant turns from a function of the context, for tests and dry runs.

``respond(context_text) -> str`` returns what the "model" would write next; the engine
tokenises it with the real tokenizer and then behaves like a real engine: it appends the
end-of-sequence token, honours the token cap and the stop strings, and reports what it
generated. The agent cannot tell it from vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sap.agent.engines.base import Generation, SamplingParams, StopMatcher, eos_ids


class ScriptedEngine:
    def __init__(self, tokenizer, respond: Callable[[str], str], max_model_len: int = 4096, append_eos: bool = True):
        self.tokenizer = tokenizer
        self.respond = respond
        self.max_model_len = max_model_len
        self.append_eos = append_eos
        self.calls: list[int] = []
        """Batch size of each ``generate`` call (tests check batching with it)."""
        self._matcher = StopMatcher(tokenizer, eos_ids(tokenizer))

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        self.calls.append(len(prompts))
        out = []
        for ids, p in zip(prompts, params, strict=True):
            text = self.respond(self.tokenizer.decode(list(ids), skip_special_tokens=False))
            gen = self.tokenizer.encode(text, add_special_tokens=False)
            if self.append_eos and self.tokenizer.eos_token_id is not None:
                gen.append(self.tokenizer.eos_token_id)
            # a real engine stops as soon as a stop string is complete: emulate it token by
            # token so the cost (num_generated) is what vLLM would report
            produced = _produce(gen, p, self._matcher)
            out.append(self._matcher.finish(produced, p.stop, capped=len(produced) >= p.max_new_tokens))
        return out

    def close(self) -> None:
        pass


def _produce(gen: list[int], p: SamplingParams, matcher: StopMatcher) -> list[int]:
    produced: list[int] = []
    for t in gen[: p.max_new_tokens]:
        produced.append(t)
        if t in matcher.eos_token_ids:
            break
        if p.stop and any(s in matcher.decode(produced[-64:]) for s in p.stop):
            break
    return produced
