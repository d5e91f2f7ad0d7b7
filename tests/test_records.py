"""sap.rules.records: one reader for JSONL and JSON-list files, errors naming file and line."""

from __future__ import annotations

import gzip

import pytest

from sap.rules.errors import SapError
from sap.rules.records import Where, iter_jsonl, read_records


class BadFile(SapError, ValueError):
    pass


def test_jsonl_records_carry_their_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n\n{"x": 2}\n', encoding="utf-8")
    rows = read_records(f, BadFile)
    assert [(str(w), r["x"]) for w, r in rows] == [(f"{f}:1", 1), (f"{f}:3", 2)]
    assert rows[1][0].as_dict() == {"file": str(f), "line": 3}


def test_a_bad_line_is_named_with_the_callers_error(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(BadFile, match=r"a\.jsonl:2: not valid JSON: Expecting property name"):
        read_records(f, BadFile)
    with pytest.raises(BadFile, match=r"missing\.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl", BadFile)


def test_layouts(tmp_path):
    lst = tmp_path / "l.json"
    lst.write_text('[{"x": 1},\n {"x": 2}]', encoding="utf-8")
    assert [str(w) for w, _ in read_records(lst, BadFile)] == [f"{lst}[0]", f"{lst}[1]"]  # auto: a list
    assert read_records(lst, BadFile, layout="suffix")[1] == (Where(str(lst), index=1), {"x": 2})
    obj = tmp_path / "o.json"
    obj.write_text('{"x": 1}', encoding="utf-8")
    assert read_records(obj, BadFile)[0][1] == {"x": 1}  # auto: not a list, so JSONL
    with pytest.raises(BadFile, match=r"o\.json: want a list"):
        read_records(obj, BadFile, layout="suffix", list_hint="want a list")
    broken = tmp_path / "b.json"
    broken.write_text('[{"x": 1},\n {"x": ]', encoding="utf-8")
    with pytest.raises(BadFile, match=r"b\.json:2: not valid JSON"):
        read_records(broken, BadFile, layout="json")


def test_gzipped_jsonl_streams(tmp_path):
    f = tmp_path / "c.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as out:
        out.write('{"id": "0"}\n{"id": "1"}\n')
    it = iter_jsonl(f, BadFile)
    assert next(it) == (Where(str(f), line=1), {"id": "0"})
    assert [r["id"] for _, r in it] == ["1"]
