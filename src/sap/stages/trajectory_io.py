"""Read teacher trajectories in the shapes users actually have, each tagged with where it
came from (file and line or index) so that every rejection can be reported precisely.

Accepted record shapes (JSON list, JSONL, or text files of raw rollouts):

- Alpaca: ``instruction`` (system prompt), ``input`` (``Question: ...``), ``output`` (the
  whole tagged trajectory);
- QA: ``question``, gold answers in ``golden_answers``/``answer``/``answers``, and the
  trajectory in ``trajectory``/``output``/``response``/``text``;
- chat: ``messages`` (``role``/``content``) or ShareGPT ``conversations`` (``from``/``value``);
- raw rollouts that still carry ChatML markers (``<|im_start|>assistant`` ...), as a
  record field or as a ``.txt`` file holding one or more rollouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap.rules.errors import SapError
from sap.rules.questions import find_gold_answers
from sap.rules.records import Where
from sap.rules.tags import INFORMATION


@dataclass(frozen=True)
class Episode:
    """One teacher trajectory with what is known about its question."""

    where: Where
    trajectory: str
    question: str | None
    golden_answers: tuple[str, ...]
    prompt: str | None  # the record's own prompt text, when it has one


class BadRecord(SapError, ValueError):
    """A record that cannot be read as an episode; the message is the reason."""


@dataclass(frozen=True)
class ReadItem:
    where: Where
    episode: Episode | None
    error: str | None


_QUESTION_RE = re.compile(r"Question:\s*(.+?)\s*$", re.DOTALL)
_CHATML_RE = re.compile(r"<\|im_start\|>(\w+)\n?(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.DOTALL)
_TRAJECTORY_KEYS = ("trajectory", "output", "response", "text")


def question_from_prompt(prompt: str) -> str | None:
    """The question of a prompt that ends with ``Question: ...`` (Search-R1 style)."""
    idx = prompt.rfind("Question:")
    if idx < 0:
        return None
    m = _QUESTION_RE.match(prompt[idx:])
    return m.group(1).strip() if m else None


def _golds(record: dict[str, Any]) -> tuple[str, ...]:
    """The record's gold answers (the rule of :mod:`sap.rules.questions`); () when it has none."""
    return tuple(find_gold_answers(record, error=BadRecord) or ())


def split_chatml(text: str) -> list[dict[str, str]]:
    """ChatML text -> messages. The last assistant turn may be unterminated."""
    return [{"role": m.group(1), "content": m.group(2).strip("\n")} for m in _CHATML_RE.finditer(text)]


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "observation": "tool", "function": "tool"}


def _from_messages(messages: Any, where: Where, record: dict[str, Any]) -> Episode:
    if not isinstance(messages, list) or not messages:
        raise BadRecord("field 'messages' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"messages[{i}] is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRecord(f"messages[{i}] needs string 'role' and 'content'")
        turns.append((_ROLE_ALIASES.get(role, role), content))
    first_assistant = next((i for i, (r, _) in enumerate(turns) if r == "assistant"), None)
    if first_assistant is None:
        raise BadRecord("no assistant message")
    user_turns = [c for r, c in turns[:first_assistant] if r == "user"]
    prompt = user_turns[-1] if user_turns else None
    parts = []
    for role, content in turns[first_assistant:]:
        if role == "assistant" or f"<{INFORMATION}>" in content:
            parts.append(content)
        else:  # a tool/user observation given without tags
            parts.append(f"<{INFORMATION}>{content}</{INFORMATION}>")
    question = record.get("question") if isinstance(record.get("question"), str) else None
    if question is None and prompt is not None:
        question = question_from_prompt(prompt)
    return Episode(where, "\n".join(parts), question, _golds(record), prompt)


def record_to_episode(record: Any, where: Where) -> Episode:
    """Recognise one record's shape. Raises :class:`BadRecord` with the reason."""
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise BadRecord(f"record is a JSON {type(record).__name__}, expected an object")
    for key in ("messages", "conversations"):
        if key in record:
            return _from_messages(record[key], where, record)
    if "instruction" in record and "output" in record:
        instruction, inp, output = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(x, str) for x in (instruction, inp, output)):
            raise BadRecord("Alpaca fields 'instruction', 'input', 'output' must be strings")
        if "<|im_start|>" in output:
            return _from_messages(split_chatml(output), where, record)
        prompt = f"{instruction}{inp}" if instruction.endswith((" ", "\n")) or not inp else f"{instruction} {inp}"
        question = record.get("question") if isinstance(record.get("question"), str) else None
        question = question or question_from_prompt(inp or instruction) or (inp.strip() or None)
        return Episode(where, output, question, _golds(record), prompt)
    key = next((k for k in _TRAJECTORY_KEYS if k in record), None)
    if key is None:
        raise BadRecord(
            "no trajectory: expected one of 'messages', 'conversations', Alpaca 'instruction'+'output', "
            f"or a {'/'.join(_TRAJECTORY_KEYS)} field"
        )
    text = record[key]
    if not isinstance(text, str):
        raise BadRecord(f"field {key!r} must be a string")
    if "<|im_start|>" in text:
        return _from_messages(split_chatml(text), where, record)
    question = record.get("question")
    if question is not None and not isinstance(question, str):
        raise BadRecord("field 'question' must be a string")
    return Episode(where, text, question, _golds(record), None)


def _items_from_records(records: Iterator[tuple[Where, Any]]) -> Iterator[ReadItem]:
    for where, record in records:
        if isinstance(record, _Unparsable):
            yield ReadItem(where, None, record.reason)
            continue
        try:
            yield ReadItem(where, record_to_episode(record, where), None)
        except BadRecord as e:
            yield ReadItem(where, None, str(e))


def read_episodes(path: str | Path) -> Iterator[ReadItem]:
    """Every record of one input file, each either an :class:`Episode` or an error."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        yield ReadItem(Where(name), None, "file not found")
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix == ".txt" or (suffix not in (".json", ".jsonl") and "<|im_start|>" in text and not text.lstrip().startswith(("{", "["))):
        yield from _items_from_records(_rollouts_in_text(name, text))
        return
    stripped = text.lstrip()
    if suffix == ".json" or (suffix != ".jsonl" and stripped.startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield ReadItem(Where(name, line=e.lineno), None, f"not valid JSON: {e.msg}")
            return
        if isinstance(data, dict):
            data = data.get("data", [data]) if isinstance(data.get("data"), list) else [data]
        if not isinstance(data, list):
            yield ReadItem(Where(name), None, "top level must be a list of records")
            return
        yield from _items_from_records((Where(name, index=i), r) for i, r in enumerate(data))
        return
    yield from _items_from_records(_jsonl_records(name, text))


def _jsonl_records(name: str, text: str) -> Iterator[tuple[Where, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Where(name, line=lineno), json.loads(line)
        except json.JSONDecodeError as e:
            yield Where(name, line=lineno), _Unparsable(f"not valid JSON: {e.msg} (column {e.colno})")


class _Unparsable:
    def __init__(self, reason: str):
        self.reason = reason


def _rollouts_in_text(name: str, text: str) -> Iterator[tuple[Where, Any]]:
    """Split a text file into rollouts, each starting at a ``<|im_start|>system`` (or at the
    first ``<|im_start|>`` when there is no system turn)."""
    starts = [m.start() for m in re.finditer(r"<\|im_start\|>system", text)]
    if not starts:
        first = text.find("<|im_start|>")
        starts = [first] if first >= 0 else []
    if not starts:
        yield Where(name, line=1), _Unparsable("no ChatML rollout (<|im_start|>) in text file")
        return
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        yield Where(name, line=text.count("\n", 0, s) + 1), {"text": text[s:end].strip()}
