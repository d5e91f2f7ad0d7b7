"""Reading record files: JSONL, or one JSON list, with errors that name the file and the line.

The readers that stop at the first bad record (questions, predictions, the paper's SFT layout,
the retriever's corpus) go through here, so a bad line reads the same everywhere:
``data/x.jsonl:12: not valid JSON: Expecting value``. Each caller passes its own error class
(a :class:`~sap.rules.errors.SapError`), so the command that failed still names itself.
prepare-sft's trajectory reader (:mod:`sap.stages.trajectory_io`) records a bad line as a
rejection and goes on, so it parses lines itself, with the same :class:`Where`.

Layouts:

* ``"jsonl"``: one JSON value a line; blank lines are skipped.
* ``"json"``: the whole file is one JSON list.
* ``"auto"``: a file whose first non-blank character is ``[`` is a list, anything else JSONL.
* ``"suffix"``: ``.jsonl`` is JSONL, anything else a list (how the paper's scripts decide).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Layout = Literal["jsonl", "json", "auto", "suffix"]


@dataclass(frozen=True)
class Where:
    """Where a record came from: ``file:line`` for JSONL, ``file[index]`` for a JSON list."""

    file: str
    line: int | None = None
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.line is not None:
            d["line"] = self.line
        if self.index is not None:
            d["index"] = self.index
        return d

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file}[{self.index}]"
        return self.file


def open_text(path: str | os.PathLike[str]) -> io.TextIOBase:
    """A text reader for ``path``; ``.gz`` files are decompressed on the fly."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return path.open("r", encoding="utf-8")


def iter_jsonl(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[tuple[Where, Any]]:
    """``(where, value)`` for each non-blank line of a JSONL file (``.gz`` allowed), streamed.

    Raises ``error("FILE: file not found")`` or ``error("FILE:LINE: not valid JSON: MSG")``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            yield Where(str(path), line=lineno), value


def read_records(
    path: str | os.PathLike[str],
    error: type[Exception],
    layout: Layout = "auto",
    list_hint: str = "the file must hold a JSON list of records",
) -> list[tuple[Where, Any]]:
    """Every record of ``path`` with where it stands, in the given ``layout`` (module docstring).

    A JSON-list file whose top level is not a list raises ``error("FILE: " + list_hint)``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    if layout == "suffix":
        layout = "jsonl" if path.suffix.lower() == ".jsonl" else "json"
    if layout == "jsonl":
        return list(iter_jsonl(path, error))
    text = path.read_text(encoding="utf-8")
    if layout == "auto" and not text.lstrip().startswith("["):
        return list(iter_jsonl(path, error))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise error(f"{path}: {list_hint}")
    return [(Where(str(path), index=i), r) for i, r in enumerate(data)]


__all__ = ["Layout", "Where", "iter_jsonl", "open_text", "read_records"]
