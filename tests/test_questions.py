"""The one question-file reader (``sap.rules.questions``) that ``sap eval`` and ``sap train-ppo``
share: JSONL and Search-R1 parquet, ids, ``limit``, and errors naming file, line/row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sap.rules.questions import Question, QuestionFileError, QuestionFileNotFound, read_questions
from sap.stages import evaluate, train_ppo


def write_jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_fields_ids_blank_lines_and_limit(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl",
        '{"question": "who?", "answer": ["A", "B"]}',
        "",
        '{"question": "what?", "golden_answers": "C", "answer": ["ignored"], "id": "nq_7"}',
        '{"question": "when?", "answers": ["1999"], "idx": 3}',
        '{"question": "where?", "golden_answers": {"target": ["D"]}}',
    )
    qs = read_questions(path)
    assert [q.id for q in qs] == ["0", "1", "2", "3"]  # position; blank lines do not count
    assert [q.golden_answers for q in qs] == [["A", "B"], ["C"], ["1999"], ["D"]]
    assert [q.source_id for q in qs] == ["0", "nq_7", "3", "3"]
    assert qs[1].meta == {"source_id": "nq_7"} and qs[0].meta == {}
    assert read_questions(path, limit=2) == qs[:2]
    assert read_questions(path, limit=100) == qs
    assert read_questions(path, limit=0) == []


def test_limit_stops_reading_before_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", '{"question": "q", "answer": "a"}', "{not json")
    assert len(read_questions(path, limit=1)) == 1
    with pytest.raises(QuestionFileError, match=r"q\.jsonl:2: not valid JSON"):
        read_questions(path)


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", '{"query": "q?", "gold": ["x"]}')
    assert read_questions(path, question_field="query", answer_fields=["gold"]) == [Question("0", "q?", ["x"])]
    with pytest.raises(QuestionFileError, match=r"q\.jsonl:1: missing field 'question'"):
        read_questions(path)
    write_jsonl(path, '{"query": "q?", "answer": ["x"]}')
    with pytest.raises(QuestionFileError, match=r"q\.jsonl:1: missing field 'gold'$"):
        read_questions(path, question_field="query", answer_fields=["gold"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON: Expecting property name"),
        ('["q", "a"]', r"bad\.jsonl:2: record is not a JSON object"),
        ('{"answer": ["x"]}', r"bad\.jsonl:2: missing field 'question'$"),
        ('{"question": null, "answer": ["x"]}', r"bad\.jsonl:2: missing field 'question'$"),
        ('{"question": "  ", "answer": ["x"]}', r"bad\.jsonl:2: field 'question' must be a non-empty string"),
        ('{"question": 5, "answer": ["x"]}', r"bad\.jsonl:2: field 'question' must be a non-empty string, got '5'"),
        ('{"question": "q"}', r"bad\.jsonl:2: missing field 'answer' \(or 'answers', 'golden_answers', 'ground_truth'\)$"),
        ('{"question": "q", "answer": null}', r"bad\.jsonl:2: missing field 'answer'"),
        ('{"question": "q", "answer": []}', r"bad\.jsonl:2: field 'answer' must be a string or a non-empty list of strings"),
        ('{"question": "q", "golden_answers": [1]}', r"bad\.jsonl:2: field 'golden_answers' must be a string or a non-empty list"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", '{"question": "ok", "answer": ["a"]}', line)
    with pytest.raises(QuestionFileError, match=message):
        read_questions(bad)
    # the stages raise their own error types with the same message
    with pytest.raises(evaluate.EvalError, match=message):
        evaluate.load_questions(bad)
    with pytest.raises(train_ppo.PPOStageError, match=message):
        train_ppo.load_questions(bad)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QuestionFileNotFound, match=r"none\.jsonl: dataset not found"):
        read_questions(tmp_path / "none.jsonl")
    with pytest.raises(evaluate.EvalError, match=r"none\.jsonl: dataset not found"):
        evaluate.load_questions(tmp_path / "none.jsonl")
    with pytest.raises(train_ppo.PPOStageError, match=r"none\.jsonl: question file not found \(set ppo\.train_data / ppo\.val_data\)"):
        train_ppo.load_questions(tmp_path / "none.jsonl")
    empty = write_jsonl(tmp_path / "empty.jsonl", "", "  ")
    with pytest.raises(QuestionFileError, match=r"empty\.jsonl: no questions"):
        read_questions(empty)
    with pytest.raises(train_ppo.PPOStageError, match=r"empty\.jsonl: no questions"):
        train_ppo.load_questions(empty)


def test_parquet_rows_ids_and_limit(tmp_path):
    path = tmp_path / "q.parquet"
    pd.DataFrame(
        {
            "id": ["train_0", "train_1", "train_2"],
            "question": ["a?", "b?", "c?"],
            "golden_answers": [["x"], ["y", "z"], ["w"]],
        }
    ).to_parquet(path)
    qs = read_questions(path)
    assert [(q.id, q.source_id, q.question, q.golden_answers) for q in qs] == [
        ("0", "train_0", "a?", ["x"]),
        ("1", "train_1", "b?", ["y", "z"]),
        ("2", "train_2", "c?", ["w"]),
    ]
    assert all(type(a) is str for q in qs for a in q.golden_answers)  # not numpy strings
    assert read_questions(path, limit=2) == qs[:2]


def test_searchr1_parquet(data_dir):
    qs = read_questions(data_dir / "nq" / "searchr1_nq_search_test.parquet", limit=3)
    assert [q.id for q in qs] == ["0", "1", "2"] and qs[0].source_id == "test_0"
    assert qs[0].golden_answers == ["Wilhelm Conrad Röntgen"]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"query": ["a"], "golden_answers": [["x"]]}, r"q\.parquet: no column 'question' \(columns: query, golden_answers\)"),
        (
            {"question": ["a"], "gold": [["x"]]},
            r"q\.parquet: no column 'answer' \(or 'answers', 'golden_answers', 'ground_truth'\) \(columns: question, gold\)",
        ),
        ({"question": ["a", None], "golden_answers": [["x"], ["y"]]}, r"q\.parquet: row 1: missing field 'question'"),
        ({"question": ["a", ""], "golden_answers": [["x"], ["y"]]}, r"q\.parquet: row 1: field 'question' must be a non-empty string"),
        ({"question": ["a", "b"], "golden_answers": [["x"], None]}, r"q\.parquet: row 1: missing field 'answer'"),
        ({"question": ["a", "b"], "golden_answers": [["x"], []]}, r"q\.parquet: row 1: field 'golden_answers' must be .* non-empty list"),
        ({"question": ["a", "b"], "answer": [1.0, float("nan")]}, r"q\.parquet: row 0: field 'answer' must be a string"),
    ],
)
def test_parquet_errors_name_file_row_and_field(tmp_path, frame, message):
    path = tmp_path / "q.parquet"
    pd.DataFrame(frame).to_parquet(path)
    with pytest.raises(QuestionFileError, match=message):
        read_questions(path)
    with pytest.raises(train_ppo.PPOStageError, match=message):
        train_ppo.load_questions(path)


def test_one_question_type_everywhere():
    from sap.agent.loop import Question as AgentQuestion

    assert AgentQuestion is Question is evaluate.Question is train_ppo.Question


@pytest.mark.parametrize(
    ("fields", "gold"),
    [
        ({"golden_answers": ["paris", "b"], "answer": "x"}, ["paris", "b"]),  # the first field present wins
        ({"golden_answers": None, "answers": ("paris",)}, ["paris"]),  # a null field is absent
        ({"ground_truth": {"target": ["paris"]}}, ["paris"]),  # Search-R1's reward_model.ground_truth
        ({"answer": "paris"}, ["paris"]),
        ({"answer": []}, "must be a string or a non-empty list of strings"),
        ({"answers": ["paris", 2]}, "must be a string or a non-empty list of strings"),
    ],
)
def test_one_gold_answer_rule_for_questions_predictions_trajectories_and_reward(tmp_path, fields, gold):
    """The question reader, ``sap score``, prepare-sft's trajectory reader and the PPO reward read
    gold answers by the same rule: the same answers, or the same error."""
    from sap.rl.reward import compute_score
    from sap.stages.score import PredictionsError, load_predictions
    from sap.stages.trajectory_io import BadRecord, Where, record_to_episode

    record = {"question": "q", "prediction": "paris", "trajectory": "<answer> paris </answer>", **fields}
    path = write_jsonl(tmp_path / "r.jsonl", json.dumps(record))
    readers = [
        (lambda: read_questions(path)[0].golden_answers, QuestionFileError),
        (lambda: load_predictions(path)[0][1], PredictionsError),
        (lambda: list(record_to_episode(record, Where(str(path), 1)).golden_answers), BadRecord),
    ]
    for read, error in readers:
        if isinstance(gold, list):
            assert read() == gold
        else:
            with pytest.raises(error, match=gold):
                read()
    value = next(v for k, v in fields.items() if v is not None)
    if isinstance(gold, list):
        assert compute_score("nq", "<answer> Paris </answer>", value)["em"] == 1.0
    else:
        with pytest.raises(QuestionFileError, match=gold):
            compute_score("nq", "<answer> Paris </answer>", value)
