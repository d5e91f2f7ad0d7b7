"""sap.rules.atomic: files and folders appear whole or not at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sap.rules.atomic import atomic_path, atomic_write_json, read_jsonl


def test_file_is_renamed_into_place_and_the_suffix_kept(tmp_path):
    target = tmp_path / "sub" / "plot.png"
    with atomic_path(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".png") and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]


def test_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "data.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.parquet"]


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(tmp_path / "x"):
        pass
    assert not (tmp_path / "x").exists()


def test_folder_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "merged"
    (target / "old-only").mkdir(parents=True)
    (target / "config.json").write_text("old")
    with atomic_path(target) as tmp:
        (tmp / "deep").mkdir(parents=True)
        (tmp / "config.json").write_text("new")
        (tmp / "deep" / "w.bin").write_bytes(b"\0" * 10)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["config.json", "deep", "deep/w.bin"]
    assert (target / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_stale_temporary_from_a_killed_writer_is_cleared(tmp_path):
    target = tmp_path / "index"
    code = (
        "import os, sys; from sap.rules.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'part').write_text('x'); os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    stale = tmp_path / ".index.tmp"
    assert stale.is_dir() and not target.exists()
    with atomic_path(target) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "done").write_text("y")
    assert [p.name for p in target.iterdir()] == ["done"] and not stale.exists()


def test_json_and_jsonl(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n{"a": 2')
    assert list(read_jsonl(tmp_path / "p.jsonl")) == [{"a": 1}]
