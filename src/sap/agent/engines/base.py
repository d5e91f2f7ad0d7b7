"""The generation-engine interface the search agent talks to.

An engine turns token-id contexts into one generated turn each. It works on token ids, not
text, so the agent keeps every context exactly as the model saw it (prompt from the chat
template, generated tokens, tokenised observations) and can count and mask tokens.

Every engine applies the same post-processing (:func:`finish_generation`): the turn ends at
the first stop string (inclusive, so the ``</search>``/``</answer>`` stays in the context), at
an end-of-sequence token (dropped from the ids, counted as generated), or at the token cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from sap.agent.protocol import eos_ids  # re-exported: the engines' end-of-turn ids

__all__ = ["Engine", "FinishReason", "Generation", "SamplingParams", "StopMatcher", "eos_ids"]

FinishReason = Literal["stop", "eos", "length", "error"]
"""``error``: the engine could not generate this turn (a remote teacher kept failing); the
agent ends the episode with ``stop_reason="engine_error"``."""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one turn."""

    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    """Stop strings; the turn ends right after the first one (kept in the output)."""
    seed: int | None = None
    """Per-request seed, where the engine supports one (vLLM); else the engine's own seed."""


@dataclass(frozen=True)
class Generation:
    """One generated turn."""

    token_ids: list[int]
    """The kept tokens: up to and including the stop string, without the end-of-sequence token."""
    text: str
    """``token_ids`` decoded."""
    finish_reason: FinishReason
    num_generated: int
    """Tokens the engine produced (what it cost), including an end-of-sequence token and any
    tokens after a stop string that were cut off."""
    stop: str | None = None
    """The stop string that ended the turn (``finish_reason == "stop"``)."""
    prompt_tokens: int | None = None
    """Prompt tokens the engine was charged for (a remote endpoint's usage); None: the context length."""
    error: str | None = None
    """Why the turn failed (``finish_reason == "error"``)."""


@runtime_checkable
class Engine(Protocol):
    """What the agent needs from a generation engine."""

    tokenizer: object
    """The model's HF tokenizer (chat template, encode/decode)."""
    max_model_len: int
    """Context length limit: prompt + everything generated and appended."""

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        """One turn for each prompt (token ids), batched; ``params[i]`` applies to ``prompts[i]``."""
        ...

    def close(self) -> None: ...


@dataclass
class StopMatcher:
    """Finds where a turn ends in a list of generated token ids (shared by all engines)."""

    tokenizer: object
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    def finish(self, ids: Sequence[int], stop: Sequence[str], capped: bool) -> Generation:
        """Cut raw generated ``ids`` at the first end-of-sequence token or the first stop string
        (keeping the token that completes it), whichever comes first. ``capped`` says whether
        the engine stopped because it hit the token cap."""
        ids = list(ids)
        n = len(ids)
        eos_at = next((i for i, t in enumerate(ids) if t in self.eos_token_ids), None)
        body = ids if eos_at is None else ids[:eos_at]
        if stop:
            text = self.decode(body)
            hits = [(text.find(s), s) for s in stop if s in text]
            if hits:
                pos, s = min(hits)
                end = pos + len(s)
                # the shortest prefix of tokens whose text covers the stop string
                keep = _shortest_prefix(body, end, self.decode)
                kept = body[:keep]
                return Generation(kept, self.decode(kept), "stop", n, s)
        if eos_at is not None:
            return Generation(body, self.decode(body), "eos", n)
        return Generation(body, self.decode(body), "length" if capped else "eos", n)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]


def _shortest_prefix(ids: list[int], n_chars: int, decode) -> int:
    """Smallest k with len(decode(ids[:k])) >= n_chars (binary search; decode is monotone in
    length for byte-level BPE except at split multi-byte characters, which only delays k)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo
