"""One scripted policy and its expected transcript, written by hand, played by both loops that
use the turn protocol (:mod:`sap.agent.protocol`): the eval loop in ``tests/test_turn_protocol.py``
(core environment) and the VeRL agent loop in ``tests/rl/test_turn_protocol.py`` (``.venv-rl``).
Both tests compare their loop's tokens, text and loss mask with :func:`expected`, so the two
loops agree with each other through this one transcript. Imports only sap.rules."""

from __future__ import annotations

from collections.abc import Mapping

from sap.rules.prompts import INVALID_ACTION_MESSAGE

QUESTION = "who got the first nobel prize in physics"
"""An NQ-open question whose gold passage is in the oracle corpus both tests' retrievers serve."""
QUERIES = ("first nobel prize in physics", "Wilhelm Conrad Röntgen")
TURNS = (
    f"<think> I need to search. </think> <search> {QUERIES[0]} </search>",
    f"<search> {QUERIES[1]} </search>",
    "I am not sure what to do next.",
    "<think> Doc 1 names him. </think> <answer> Wilhelm Conrad Röntgen </answer>",
)
"""think + search, search, an invalid turn (ends with the end-of-sequence token), answer."""
MAX_TURNS = 3
"""Three rounds (search, search, invalid) and the answer turn."""
ANSWER = "Wilhelm Conrad Röntgen"


def transcript(docs: Mapping[str, str]) -> list[tuple[str, int]]:
    """The response as (text, mask) segments: model turns 1, observations 0. ``docs[query]`` is
    the retriever's ``Doc i(Title: ...) ...`` lines for that query."""

    def information(query: str) -> str:
        return "\n\n<information>" + docs[query].strip() + "</information>\n\n"

    return [
        (TURNS[0], 1),
        (information(QUERIES[0]), 0),
        (TURNS[1], 1),
        (information(QUERIES[1]), 0),
        (TURNS[2], 1),
        (INVALID_ACTION_MESSAGE, 0),
        (TURNS[3], 1),
    ]


def expected(tokenizer, docs: Mapping[str, str]) -> tuple[str, list[int], list[int]]:
    """(text, token ids, mask) of the response: each segment tokenised on its own, as the loops
    append them (a model turn is the tokens the model produced, an observation is encoded)."""
    segments = transcript(docs)
    ids: list[int] = []
    mask: list[int] = []
    for text, m in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [m] * len(piece)
    return "".join(t for t, _ in segments), ids, mask
