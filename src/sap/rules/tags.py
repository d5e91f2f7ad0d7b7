"""The tag grammar of a search trajectory: one place, shared by every stage.

A trajectory is the model's side of a search episode, written with four tags::

    <think> ... </think>  <search> query </search>  <information> docs </information>
    ... <think> ... </think>  <answer> final answer </answer>

``parse`` turns text into a list of :class:`Step` (plus the problems it met), ``validate``
checks the episode rules, ``split_actions`` cuts a valid trajectory into model actions (each
action ends at a ``</search>`` or at the ``</answer>``), ``render`` writes steps back, and
``parse_action`` / ``extract_answer`` read one generated turn the way eval and RL do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

THINK = "think"
SEARCH = "search"
INFORMATION = "information"
ANSWER = "answer"
TEXT = "text"  # untagged text between tags (Search-R1 models write some)
TAGS: tuple[str, ...] = (THINK, SEARCH, INFORMATION, ANSWER)

#: Stop strings for generation: a model action ends when it closes a search or an answer.
STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")

_TAG_RE = re.compile(r"<(/?)([A-Za-z_][\w\-]*)\s*>")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)


@dataclass(frozen=True)
class Step:
    """One tagged span (or a run of untagged text) of a trajectory."""

    kind: str
    content: str


@dataclass(frozen=True)
class Problem:
    """Something wrong with a trajectory. ``fatal`` problems reject it."""

    reason: str
    fatal: bool = True


@dataclass
class Parsed:
    steps: list[Step] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)


def _canonical(name: str, aliases: Mapping[str, str]) -> str | None:
    name = name.lower()
    if name in TAGS:
        return name
    target = aliases.get(name)
    return target if target in TAGS else None


def parse(text: str, aliases: Mapping[str, str] | None = None) -> Parsed:
    """Split ``text`` into steps. Unknown ``<tags>`` stay as text.

    ``aliases`` maps extra tag names to the four canonical ones (``plan`` -> ``think``).
    A closing tag with no opening one, right after untagged text, turns that text into the
    tag's step (Search-R1 rollouts often drop the opening ``<think>``); this is reported as
    a non-fatal problem.
    """
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}
    out = Parsed()
    open_kind: str | None = None
    open_at = 0
    pos = 0

    def add_text(chunk: str) -> None:
        if chunk.strip():
            out.steps.append(Step(TEXT, chunk.strip()))

    for m in _TAG_RE.finditer(text):
        kind = _canonical(m.group(2), aliases)
        if kind is None:
            continue
        closing = m.group(1) == "/"
        if open_kind is None:
            if not closing:
                add_text(text[pos : m.start()])
                open_kind, open_at = kind, m.end()
            else:
                chunk = text[pos : m.start()].strip()
                if chunk:
                    out.steps.append(Step(kind, chunk))
                    out.problems.append(Problem(f"</{kind}> without <{kind}>: text before it taken as {kind}", fatal=False))
                else:
                    out.problems.append(Problem(f"</{kind}> without <{kind}>"))
            pos = m.end()
        elif closing and kind == open_kind:
            out.steps.append(Step(kind, text[open_at : m.start()].strip()))
            open_kind = None
            pos = m.end()
        elif closing:
            out.problems.append(Problem(f"</{kind}> closes <{open_kind}>"))
            return out
        else:
            out.problems.append(Problem(f"<{kind}> opened inside <{open_kind}>"))
            return out
    if open_kind is not None:
        out.problems.append(Problem(f"<{open_kind}> is never closed"))
        return out
    add_text(text[pos:])
    return out


def validate(steps: Sequence[Step]) -> list[Problem]:
    """The episode rules: information only right after a search, every search answered by
    information, non-empty queries and answer, exactly one answer and nothing tagged after it."""
    problems: list[Problem] = []
    tagged = [s for s in steps if s.kind != TEXT]
    if not tagged:
        return [Problem("no tags")]
    answers = [i for i, s in enumerate(tagged) if s.kind == ANSWER]
    if not answers:
        problems.append(Problem("no final <answer>"))
    elif len(answers) > 1:
        problems.append(Problem(f"{len(answers)} <answer> blocks; expected one final answer"))
    elif answers[0] != len(tagged) - 1:
        problems.append(Problem(f"<{tagged[answers[0] + 1].kind}> after the final <answer>"))
    elif not tagged[answers[0]].content:
        problems.append(Problem("empty <answer>"))
    for i, s in enumerate(tagged):
        if s.kind == SEARCH:
            if not s.content:
                problems.append(Problem(f"empty <search> (search {_count(tagged, SEARCH, i)})"))
            if i + 1 >= len(tagged) or tagged[i + 1].kind != INFORMATION:
                problems.append(Problem(f"<search> {s.content[:40]!r} has no <information> after it"))
        elif s.kind == INFORMATION and (i == 0 or tagged[i - 1].kind != SEARCH):
            problems.append(Problem("<information> not preceded by a <search>"))
    return problems


def _count(tagged: Sequence[Step], kind: str, upto: int) -> int:
    return sum(1 for s in tagged[: upto + 1] if s.kind == kind)


@dataclass(frozen=True)
class Action:
    """One model action (what the model generates before an observation) and the
    observation that followed it (``None`` for the final action)."""

    steps: tuple[Step, ...]
    information: str | None


def split_actions(steps: Sequence[Step]) -> list[Action]:
    """Cut a validated trajectory at each ``<information>``: N searches give N+1 actions."""
    actions: list[Action] = []
    current: list[Step] = []
    for s in steps:
        if s.kind == INFORMATION:
            actions.append(Action(tuple(current), s.content))
            current = []
        else:
            current.append(s)
    if current:
        actions.append(Action(tuple(current), None))
    return actions


def render_step(step: Step) -> str:
    if step.kind == TEXT:
        return step.content
    return f"<{step.kind}> {step.content} </{step.kind}>"


def render_action(action: Action) -> str:
    """The text the model must produce for one action: its steps joined by a space."""
    return " ".join(render_step(s) for s in action.steps)


def render_history(actions: Sequence[Action]) -> str:
    """Past actions with their observations, concatenated (the paper's step-wise history)."""
    parts: list[str] = []
    for a in actions:
        parts.extend(render_step(s) for s in a.steps)
        if a.information is not None:
            parts.append(render_step(Step(INFORMATION, a.information)))
    return "".join(parts)


def render(steps: Sequence[Step]) -> str:
    """Write steps back as one trajectory string (parse(render(steps)).steps == steps)."""
    return " ".join(render_step(s) for s in steps)


# --- reading generated turns (eval, RL, reward) -------------------------------------------


def without_invalid_messages(response: str) -> str:
    """``response`` without the invalid-action messages the environment inserted (they quote
    ``<search> and </search>`` and ``<answer> and </answer>``, which are not the model's)."""
    from sap.rules.prompts import INVALID_ACTION_MESSAGE

    return response.replace(INVALID_ACTION_MESSAGE, "\n")


def extract_answer(response: str) -> str:
    """The text of the last ``<answer>`` of a model *response* (never pass the prompt: the
    Search-R1 prompt itself contains ``<answer> Beijing </answer>``). Empty if none. The
    invalid-action message the environment inserts (it quotes ``<answer> and </answer>``) is
    not the model's answer and is skipped."""
    found = _ANSWER_RE.findall(without_invalid_messages(response))
    return found[-1].strip() if found else ""


#: AFM (Chain-of-Agents) tags -> Search-R1 tags, as the paper's ``afm_mhqa_search.py`` maps them.
AFM_TAGS: dict[str, str] = {"plan": THINK, "reflection": THINK, "wiki_search": SEARCH, "observation": INFORMATION}
_AFM_TAG_RE = re.compile(r"</?(?:plan|reflection|wiki_search|observation)>")
_ADJACENT_THINKS_RE = re.compile(r"</think>\s*<think>")


def has_afm_tags(text: str) -> bool:
    return bool(_AFM_TAG_RE.search(text or ""))


def afm_to_searchr1(text: str) -> str:
    """The paper's AFM mapping: each AFM tag literally replaced by its Search-R1 tag, then every
    ``</think>``, whitespace, ``<think>`` replaced by one newline (adjacent thinks merged)."""
    if not text:
        return ""
    for afm, tag in AFM_TAGS.items():
        text = text.replace(f"<{afm}>", f"<{tag}>").replace(f"</{afm}>", f"</{tag}>")
    return _ADJACENT_THINKS_RE.sub("\n", text)


def extract_answer_paper(text: str) -> str:
    """The paper's answer extraction (``compute_metrics.py``/``infer.py``): the text of the
    *first* ``<answer>`` of ``text`` (its last turn), stripped; with no ``<answer>``, the whole
    text stripped; ``""`` for an empty or missing text."""
    if not text:
        return ""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else text.strip()


def extract_queries(response: str) -> list[str]:
    return [q.strip() for q in _SEARCH_RE.findall(response)]


def cut_at_stop(turn: str) -> tuple[str, str | None]:
    """A turn generated without stop strings, cut right after the first ``</search>`` or
    ``</answer>`` (what a stop string would have done); returns (text, stop string or None)."""
    hits = [(turn.find(s), s) for s in STOP_STRINGS if s in turn]
    if not hits:
        return turn, None
    pos, stop = min(hits)
    return turn[: pos + len(stop)], stop


def unclosed_stop(turn: str) -> str | None:
    """The stop string an API removed from a turn it stopped: the closing tag of a
    ``<search>``/``<answer>`` left open at the end of ``turn`` (None if none is open)."""
    best: tuple[int, str] | None = None
    for stop in STOP_STRINGS:
        opening = stop.replace("/", "", 1)
        at = turn.rfind(opening)
        if at >= 0 and turn.rfind(stop) < at and (best is None or at > best[0]):
            best = (at, stop)
    return best[1] if best else None


@dataclass(frozen=True)
class TurnAction:
    kind: str  # "search", "answer" or "invalid"
    content: str


def parse_action(turn: str) -> TurnAction:
    """Classify one generated turn the way Search-R1's rollout does: the first complete
    ``<search>`` or ``<answer>`` block decides; neither makes the turn invalid."""
    m = re.search(r"<(search|answer)>(.*?)</\1>", turn, re.DOTALL)
    if m is None:
        return TurnAction("invalid", "")
    return TurnAction(m.group(1), m.group(2).strip())
