"""The turn protocol of a search episode: how a generated turn is read and classified, what the
environment appends after it (and how that is cut), and when the episode stops.

One implementation, called by both loops that play episodes: the eval loop
(:mod:`sap.agent.loop`, batched, any engine) and the VeRL agent loop (:mod:`sap.rl.agent_loop`,
one trajectory on VeRL's rollout server). It imports only :mod:`sap.rules`, so the VeRL plugin
can use it inside ``.venv-rl``.

Two named rule sets (``protocol`` / ``eval.loop`` in the config):

``sap`` (Search-R1's rollout rules, used for PPO and by default for eval)
    - a turn is read from its token ids without special tokens (:func:`read_turn`) and
      classified by its first complete ``<search>``/``<answer>`` block (:func:`classify`);
    - an answer ends the episode; after ``max_turns`` search rounds one more turn is generated
      for the answer and nothing is appended after it (:func:`stop_reason`);
    - otherwise the environment appends ``information_block(docs)`` after a search and the
      invalid-action message after anything else (:func:`observation`). An information block
      longer than its limit keeps its tags and loses the end of the passages; one that cannot
      fit even so, or an invalid-action message that does not fit, ends the episode.

``paper`` (the paper's ``infer.py``, for eval only; see ``docs/eval.md``)
    - a turn is a search when its last ``<search>`` block has a non-empty query
      (:func:`paper_query`); any other turn ends the episode and is the output;
    - ``max_turns`` counts generations; running out of them scores the empty string;
    - the next context is ``context + "\\n\\n" + output + "<information>" + docs +
      "</information>\\n\\n"`` (:func:`sap.rules.prompts.paper_context`);
    - the prediction is the first ``<answer>`` of the output turn, or the whole turn stripped
      (:func:`paper_answer`).
    The paper's PPO rollout cuts an observation to its first ``max_obs_length`` tokens, losing
    the closing tag: :func:`observation` with ``cut="head"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sap.rules.prompts import INVALID_ACTION_MESSAGE, information_block
from sap.rules.tags import STOP_STRINGS, TurnAction, parse_action

LoopRules = Literal["sap", "paper"]
ObservationCut = Literal["tags", "head"]

__all__ = [
    "STOP_STRINGS",
    "Observation",
    "classify",
    "eos_ids",
    "max_generations",
    "observation",
    "paper_answer",
    "paper_query",
    "read_turn",
    "stop_reason",
    "turn_ids",
]


# --- reading a turn -----------------------------------------------------------------------


def read_turn(tokenizer, ids: Sequence[int]) -> str:
    """The text of one generated turn, as both loops read it: its token ids decoded without
    special tokens (what vLLM returns by default and what Search-R1's rollout decodes)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def eos_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """End-of-sequence ids of a model: the tokenizer's and the generation config's (Qwen's
    instruct models end a turn with ``<|im_end|>`` and also stop at ``<|endoftext|>``)."""
    found: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(gen_eos, int):
        found.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        found.update(int(t) for t in gen_eos)
    return frozenset(found)


def turn_ids(ids: Sequence[int], eos: frozenset[int]) -> list[int]:
    """A generated turn's ids as the next turn continues from them: without the
    end-of-sequence id that ended it (the eval engines return them so; VeRL's rollout server
    returns that id, which the agent loop removes when an observation follows). Search-R1's
    rollout, which re-tokenises the decoded turn, drops it too."""
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] in eos else ids


def classify(text: str) -> TurnAction:
    """sap rules: the first complete ``<search>`` or ``<answer>`` block decides; neither makes
    the turn invalid (:func:`sap.rules.tags.parse_action`)."""
    return parse_action(text)


# --- stopping -----------------------------------------------------------------------------


def max_generations(max_turns: int, rules: LoopRules = "sap") -> int:
    """Most turns generated in one episode: ``max_turns`` search rounds plus the answer turn
    (sap), or ``max_turns`` generations (paper)."""
    return max_turns + 1 if rules == "sap" else max_turns


def stop_reason(action: TurnAction, generated: int, max_turns: int) -> str | None:
    """sap rules, after the ``generated``-th turn (1-based) was classified as ``action``:
    ``"answer"`` or ``"max_turns"`` ends the episode; None means an observation follows."""
    if action.kind == "answer":
        return "answer"
    if generated >= max_generations(max_turns, "sap"):
        return "max_turns"
    return None


# --- observations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the environment appends after a turn (mask 0 in both loops)."""

    ids: list[int]
    text: str
    """``ids`` decoded (equal to the block's text when it was not cut)."""
    cut: bool = False
    """The information block was longer than its limit and was cut."""


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def observation(
    tokenizer, action: TurnAction, docs: str, room: int, max_obs_tokens: int | None = None, cut: ObservationCut = "tags"
) -> Observation | None:
    """The observation after a turn that did not end the episode: ``information_block(docs)``
    after a search, the invalid-action message after anything else.

    ``room`` is what the observation may take so that the next turn still has its minimum
    (the context left in eval, the response budget left in PPO); an information block is also
    held to ``max_obs_tokens``. A longer block is cut: ``"tags"`` (sap) keeps ``<information>``
    and ``</information>`` and cuts the passages' token ids; ``"head"`` (the paper's PPO
    rollout) keeps its first ids, so the closing tag is lost. None when nothing fits (the
    episode ends): the tags alone, or the whole invalid-action message, exceed the room."""
    if action.kind != "search":
        ids = _encode(tokenizer, INVALID_ACTION_MESSAGE)
        return Observation(ids, INVALID_ACTION_MESSAGE) if len(ids) <= room else None
    limit = room if max_obs_tokens is None else min(room, max_obs_tokens)
    text = information_block(docs)
    ids = _encode(tokenizer, text)
    if len(ids) <= limit:
        return Observation(ids, text)
    if cut == "head":
        if limit < 1:
            return None
        ids = ids[:limit]
    else:
        head, tail = information_block("\x00").split("\x00")
        head_ids, tail_ids = _encode(tokenizer, head), _encode(tokenizer, tail)
        room = limit - len(head_ids) - len(tail_ids)
        if room < 0:
            return None
        ids = head_ids + _encode(tokenizer, docs.strip())[:room] + tail_ids
    return Observation(ids, tokenizer.decode(ids, skip_special_tokens=False), cut=True)


# --- the paper's rules (infer.py) -----------------------------------------------------------

_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def paper_output(text: str, stop: str | None) -> str:
    """The turn as ``infer.py`` sees it: vLLM's text, which ends right after the stop string
    that ended the turn (the token that completed it may carry more characters)."""
    if stop and stop in text:
        return text[: text.index(stop) + len(stop)]
    return text


def paper_query(output: str) -> str | None:
    """The query of a turn under the paper's rules: the last ``<search>`` block, stripped; None
    (the turn is not a search and ends the episode) when there is none or it is empty."""
    found = _SEARCH_RE.findall(output or "")
    return (found[-1].strip() or None) if found else None


def paper_answer(output: str) -> str:
    """The paper's prediction from its output turn: the first ``<answer>`` block, stripped, or
    the whole turn stripped when it has none (``""`` for no output)."""
    if not output:
        return ""
    m = _ANSWER_RE.search(output)
    return m.group(1).strip() if m else output.strip()
