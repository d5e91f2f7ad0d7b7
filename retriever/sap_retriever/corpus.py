"""Passage corpora: readers for the two JSONL layouts, the oracle converter, and a columnar
store that serves any row without scanning Python objects.

Input layouts (one JSON object per line, optionally gzipped):

- Search-R1: ``{"id": "0", "contents": "\\"Title\\"\\ntext"}``
- split: ``{"id": "0", "title": "Title", "text": "text"}`` (``contents`` is built as Search-R1's)

The store is four files: ``contents.bin`` and ``ids.bin`` (UTF-8, concatenated) with
``contents.offsets.npy`` and ``ids.offsets.npy`` (int64, n+1 entries). Opening it memory-maps
them, so 21M passages open in milliseconds and a lookup is two slices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap.rules.atomic import atomic_path, atomic_write_json
from sap.rules.errors import SapError
from sap.rules.records import iter_jsonl


class CorpusError(SapError, ValueError):
    """A corpus file that cannot be read; the message names file, line and field."""


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str

    @property
    def title(self) -> str:
        return self.contents.partition("\n")[0]


def contents_of(title: str, text: str) -> str:
    """Search-R1's ``contents``: the quoted title on the first line, then the text."""
    return f'"{title}"\n{text}'


def read_passages(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[Passage]:
    """Passages of a JSONL corpus in either layout. Raises :class:`CorpusError` naming the
    file, line and field of the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    if limit == 0:
        return
    for n, (where, rec) in enumerate(iter_jsonl(path, CorpusError), start=1):
        if not isinstance(rec, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        pid = rec.get("id", rec.get("_id"))
        if pid is None:
            pid = str(n - 1)
        if "contents" in rec:
            contents = rec["contents"]
            if not isinstance(contents, str):
                raise CorpusError(f"{where}: field 'contents' must be a string")
        elif "text" in rec:
            title, text = rec.get("title", ""), rec["text"]
            if not isinstance(text, str) or not isinstance(title, str):
                raise CorpusError(f"{where}: fields 'title' and 'text' must be strings")
            contents = contents_of(title, text)
        else:
            raise CorpusError(f"{where}: missing field 'contents' (or 'title' and 'text')")
        yield Passage(str(pid), contents)
        if limit is not None and n >= limit:
            return


# --- the oracle corpus ---------------------------------------------------------------------


@dataclass(frozen=True)
class OracleQuestion:
    question: str
    answers: list[str]
    gold_contents: str


def read_oracle(path: str | os.PathLike[str]) -> list[OracleQuestion]:
    """NQ-open oracle records (``question``, ``answers``, ``ctxs[0]`` = the gold passage)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: oracle file not found")
    out = []
    for where, rec in iter_jsonl(path, CorpusError):
        try:
            ctx = rec["ctxs"][0]
            out.append(OracleQuestion(rec["question"], list(rec["answers"]), contents_of(ctx["title"], ctx["text"])))
        except (KeyError, IndexError, TypeError) as e:
            raise CorpusError(f"{where}: not an oracle record with question, answers and ctxs[0].title/text ({e!r})") from None
    return out


def convert_oracle(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the gold passages of the oracle file as a Search-R1 corpus (ids ``0..n-1``,
    identical passages kept once). Returns the number of passages written."""
    seen: set[str] = set()
    n = 0
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for q in read_oracle(src):
            if q.gold_contents in seen:
                continue
            seen.add(q.gold_contents)
            f.write(json.dumps({"id": str(n), "contents": q.gold_contents}, ensure_ascii=False) + "\n")
            n += 1
    return n


# --- the columnar store --------------------------------------------------------------------


class _BlobWriter:
    def __init__(self, path: Path):
        self.path = path
        self._f = path.open("wb")
        self._offsets: list[np.ndarray] = []
        self._chunk: list[int] = [0]
        self._pos = 0

    def add(self, text: str) -> None:
        b = text.encode("utf-8")
        self._f.write(b)
        self._pos += len(b)
        self._chunk.append(self._pos)
        if len(self._chunk) >= 1 << 16:
            self._offsets.append(np.asarray(self._chunk[:-1], dtype=np.int64))
            self._chunk = self._chunk[-1:]

    def close(self) -> np.ndarray:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return np.concatenate([*self._offsets, np.asarray(self._chunk, dtype=np.int64)])


def write_store(passages: Iterable[Passage], out_dir: str | os.PathLike[str], source: str = "", progress: bool = False) -> int:
    """Write the columnar store into ``out_dir``; ``store.json`` is written last, so a store
    without it is incomplete and is rebuilt. Returns the number of passages."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "store.json").unlink(missing_ok=True)
    contents = _BlobWriter(out_dir / "contents.bin")
    ids = _BlobWriter(out_dir / "ids.bin")
    it = passages
    if progress:
        from tqdm import tqdm

        it = tqdm(passages, desc="corpus", unit=" passages")
    n = 0
    for p in it:
        contents.add(p.contents)
        ids.add(p.id)
        n += 1
    for name, blob in (("contents.offsets.npy", contents), ("ids.offsets.npy", ids)):
        with atomic_path(out_dir / name) as tmp, tmp.open("wb") as f:
            np.save(f, blob.close())
    atomic_write_json(out_dir / "store.json", {"n": n, "source": source})
    return n


class PassageStore:
    """Read-only, memory-mapped passages: ``store[i]`` -> :class:`Passage`."""

    def __init__(self, store_dir: str | os.PathLike[str]):
        d = Path(store_dir)
        if not (d / "store.json").is_file():
            raise CorpusError(f"{d}: no complete passage store (store.json missing); rebuild the index")
        self.dir = d
        self._contents = _mmap(d / "contents.bin")
        self._ids = _mmap(d / "ids.bin")
        self._c_off = np.load(d / "contents.offsets.npy", mmap_mode="r")
        self._i_off = np.load(d / "ids.offsets.npy", mmap_mode="r")
        self.n = len(self._c_off) - 1

    def __len__(self) -> int:
        return self.n

    def contents(self, i: int) -> str:
        return bytes(self._contents[self._c_off[i] : self._c_off[i + 1]]).decode("utf-8")

    def id(self, i: int) -> str:
        return bytes(self._ids[self._i_off[i] : self._i_off[i + 1]]).decode("utf-8")

    def __getitem__(self, i: int) -> Passage:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return Passage(self.id(i), self.contents(i))

    def get_many(self, rows: Sequence[int]) -> list[Passage]:
        return [self[int(i)] for i in rows]

    def iter_contents(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        for i in range(start, self.n if stop is None else min(stop, self.n)):
            yield self.contents(i)


def _mmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")
