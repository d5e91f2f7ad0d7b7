"""Question files: one reader for every stage that takes questions and gold answers.

Two layouts are read:

- JSONL, one object per line: ``question`` and gold answers in ``golden_answers``, ``answer``,
  ``answers`` or ``ground_truth`` (NQ-open, FlashRAG, R1-Searcher files); blank lines
  are skipped;
- a Search-R1 parquet (``question``, ``golden_answers``, ...), any ``.parquet`` file.

A question's ``id`` is its 0-based position in the file (blank lines not counted): eval
predictions are keyed by it, so it must not depend on what the records contain. The record's
own ``id`` (or ``idx``), when it has one, is kept as ``meta["source_id"]``.

Gold answers follow one rule wherever a record carries them (question files, predictions files,
teacher trajectories, the PPO reward's ground truth): :func:`find_gold_answers` takes the first of
:data:`ANSWER_FIELDS` that is present and not null, and :func:`gold_answers` reads its value: a
string, a non-empty list of strings (or a numpy array of them, as parquet gives), or Search-R1's
``{"target": [...]}``. Anything else, the empty list included, is an error naming the field.

Errors are :class:`QuestionFileError`, and name the file and the line (JSONL) or row (parquet)
and the field. Stages re-raise them as their own error types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap.rules.errors import SapError
from sap.rules.records import iter_jsonl

QUESTION_FIELD = "question"
ANSWER_FIELDS: tuple[str, ...] = ("golden_answers", "answer", "answers", "ground_truth")
"""Where gold answers are looked for, in this order (the first present and not null wins)."""


@dataclass
class Question:
    id: str
    question: str
    golden_answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def source_id(self) -> str:
        """The record's own id when the file gave one, else :attr:`id`."""
        return str(self.meta.get("source_id", self.id))


class QuestionFileError(SapError, ValueError):
    """A question file that cannot be read; the message names the file, line or row, and field."""


class QuestionFileNotFound(QuestionFileError):
    """The question file does not exist."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fields(names: Sequence[str]) -> str:
    """``'answer' (or 'answers', 'golden_answers')``: the accepted names, alphabetically."""
    first, *rest = sorted(names)
    return repr(first) + (f" (or {', '.join(map(repr, rest))})" if rest else "")


def gold_answers(value: Any, where: str = "", key: str = "golden_answers", error: type[Exception] = QuestionFileError) -> list[str]:
    """The gold answers of one field's value: a string, a non-empty list (tuple, numpy array) of
    strings, or ``{"target": ...}`` holding one. Otherwise raises ``error`` with a message that
    starts with ``where`` and names ``key``."""
    if isinstance(value, dict) and "target" in value:  # reward_model.ground_truth layout
        value = value["target"]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    prefix = f"{where}: " if where else ""
    raise error(f"{prefix}field {key!r} must be a string or a non-empty list of strings, got {str(value)[:80]!r}")


def find_gold_answers(
    record: dict[str, Any], where: str = "", fields: Sequence[str] = ANSWER_FIELDS, error: type[Exception] = QuestionFileError
) -> list[str] | None:
    """The gold answers of a record: the first of ``fields`` present and not null, read by
    :func:`gold_answers`; None when the record has none of them."""
    for key in fields:
        if not _missing(record.get(key)):
            return gold_answers(record[key], where, key, error)
    return None


def parse_record(
    record: Any, where: str, index: int, question_field: str = QUESTION_FIELD, answer_fields: Sequence[str] = ANSWER_FIELDS
) -> Question:
    """One record (a JSON object or a parquet row as a dict) as the question at ``index``;
    ``where`` (``path:line`` or ``path: row i``) starts every error message."""
    if not isinstance(record, dict):
        raise QuestionFileError(f"{where}: record is not a JSON object")
    q = record.get(question_field)
    if _missing(q):
        raise QuestionFileError(f"{where}: missing field {question_field!r}")
    if not isinstance(q, str) or not q.strip():
        raise QuestionFileError(f"{where}: field {question_field!r} must be a non-empty string, got {str(q)[:80]!r}")
    gold = find_gold_answers(record, where, answer_fields)
    if gold is None:
        raise QuestionFileError(f"{where}: missing field {_fields(answer_fields)}")
    meta = {}
    for key in ("id", "idx"):
        if not _missing(record.get(key)):
            meta["source_id"] = str(record[key])
            break
    return Question(id=str(index), question=q, golden_answers=gold, meta=meta)


def read_questions(
    path: str | Path,
    limit: int | None = None,
    *,
    question_field: str = QUESTION_FIELD,
    answer_fields: Sequence[str] = ANSWER_FIELDS,
) -> list[Question]:
    """The first ``limit`` questions (all when None) of a JSONL or Search-R1 parquet file.
    A file without any question is an error; so is a malformed record among the first
    ``limit`` (records after them are not read)."""
    path = Path(path)
    if not path.is_file():
        raise QuestionFileNotFound(f"{path}: dataset not found")
    answer_fields = tuple(answer_fields)
    if not answer_fields:
        raise QuestionFileError(f"{path}: no answer fields to read gold answers from")
    out: list[Question] = []
    if path.suffix == ".parquet":
        import pandas as pd

        df = pd.read_parquet(path)
        columns = ", ".join(map(str, df.columns))
        if question_field not in df.columns:
            raise QuestionFileError(f"{path}: no column {question_field!r} (columns: {columns})")
        if not any(key in df.columns for key in answer_fields):
            raise QuestionFileError(f"{path}: no column {_fields(answer_fields)} (columns: {columns})")
        if limit is not None:
            df = df.iloc[:limit]
        for i, rec in enumerate(df.to_dict("records")):
            out.append(parse_record(rec, f"{path}: row {i}", i, question_field, answer_fields))
    elif limit != 0:
        # stop at the limit before reading the next line: records after it are not parsed
        for where, rec in iter_jsonl(path, QuestionFileError):
            out.append(parse_record(rec, str(where), len(out), question_field, answer_fields))
            if limit is not None and len(out) >= limit:
                break
    if not out and limit != 0:
        raise QuestionFileError(f"{path}: no questions")
    return out


__all__ = [
    "ANSWER_FIELDS",
    "QUESTION_FIELD",
    "Question",
    "QuestionFileError",
    "QuestionFileNotFound",
    "find_gold_answers",
    "gold_answers",
    "parse_record",
    "read_questions",
]
