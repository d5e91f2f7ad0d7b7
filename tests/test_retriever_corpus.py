from __future__ import annotations

import gzip
import json

import pytest

from sap_retriever.corpus import CorpusError, PassageStore, convert_oracle, read_oracle, read_passages, write_store


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_both_layouts(tmp_path):
    f = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "contents": '"Paris"\nParis is the capital.'}),
            "",
            json.dumps({"id": 7, "title": "Lyon", "text": "Lyon is a city."}),
        ],
    )
    got = list(read_passages(f))
    assert [(p.id, p.contents) for p in got] == [("a", '"Paris"\nParis is the capital.'), ("7", '"Lyon"\nLyon is a city.')]
    assert got[1].title == '"Lyon"'


def test_reads_searchr1_example_corpus(data_dir):
    got = list(read_passages(data_dir / "examples" / "searchr1_example_corpus.jsonl"))
    assert len(got) == 10
    assert got[0].contents.startswith('"Evan Morris"\n')


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"c\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"c\.jsonl:2: expected a JSON object"),
        ('{"id": "1"}', r"c\.jsonl:2: missing field 'contents'"),
        ('{"id": "1", "contents": 5}', r"c\.jsonl:2: field 'contents' must be a string"),
        ('{"id": "1", "title": "t", "text": null}', r"c\.jsonl:2: fields 'title' and 'text' must be strings"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    f = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "0", "contents": "ok"}), line])
    with pytest.raises(CorpusError, match=message):
        list(read_passages(f))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        list(read_passages(tmp_path / "nope.jsonl"))


def test_store_round_trip_with_unicode_and_empty_text(tmp_path):
    from sap_retriever.corpus import Passage

    passages = [Passage(str(i), f'"Tïtle {i}"\ntext — {"é" * i}') for i in range(5)] + [Passage("empty", "")]
    assert write_store(passages, tmp_path / "store") == 6
    store = PassageStore(tmp_path / "store")
    assert len(store) == 6
    assert [store[i] for i in range(6)] == passages
    assert store.get_many([5, 0]) == [passages[5], passages[0]]
    with pytest.raises(IndexError):
        store[6]


def test_incomplete_store_is_refused(tmp_path):
    from sap_retriever.corpus import Passage

    write_store([Passage("0", "x")], tmp_path / "store")
    (tmp_path / "store" / "store.json").unlink()
    with pytest.raises(CorpusError, match=r"store\.json missing"):
        PassageStore(tmp_path / "store")


def test_convert_oracle(tmp_path, data_dir):
    src = data_dir / "corpus" / "nq-open-oracle.jsonl.gz"
    out = tmp_path / "corpus.jsonl"
    n = convert_oracle(src, out)
    questions = read_oracle(src)
    assert len(questions) == 2655
    golds = {q.gold_contents for q in questions}
    assert n == len(golds)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(n)]
    assert {r["contents"] for r in rows} == golds
    with gzip.open(src, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert rows[0]["contents"] == f'"{first["ctxs"][0]["title"]}"\n{first["ctxs"][0]["text"]}'
