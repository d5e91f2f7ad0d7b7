"""sap's outputs of a PPO run, from the files VeRL writes (its ``file`` logger's lines and its
rollout dump, in the formats of verl 0.9.1): metrics.jsonl, rollouts/step_N.jsonl, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap.rules.prompts import INVALID_ACTION_MESSAGE, build_prompt, information_block
from sap.stages import ppo_run


def _verl_step(ppo: Path, step: int, responses: list[str], reward: float) -> None:
    """What VeRL writes for one step: a ``file`` logger line and the rollout dump."""
    with (ppo / "verl_metrics.jsonl").open("a") as f:
        data = {"critic/score/mean": reward, "actor/pg_loss": -0.01 * step, "critic/vf_loss": 0.5 / step, "timing_s/step": 10.0 + step}
        f.write(json.dumps({"step": step, "data": data}) + "\n")
    dump = ppo / "rollouts" / "verl" / f"{step}.jsonl"
    dump.parent.mkdir(parents=True, exist_ok=True)
    prompt = "system\nYou are a helpful assistant.\nuser\n" + build_prompt("who wrote hamlet") + "\nassistant\n"
    dump.write_text(
        "".join(
            json.dumps(
                {"input": prompt, "output": r, "gts": {"target": ["Shakespeare"]}, "score": reward, "step": step, "uid": f"u{i}_0_0"}
            )
            + "\n"
            for i, r in enumerate(responses)
        )
    )


SEARCHED = (
    "<search> hamlet author </search>" + information_block('Doc 1(Title: "Hamlet") by Shakespeare') + "<answer> Shakespeare </answer>"
)
FAILED = "<search> x </search>" + information_block("") + "<answer> Marlowe </answer>"
INVALID = "blah" + INVALID_ACTION_MESSAGE + "<answer> Shakespeare </answer>"


def test_steps_become_metrics_rows_and_readable_rollouts(tmp_path: Path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    writer = ppo_run.StepWriter(ppo, resumed_from=0)
    _verl_step(ppo, 1, [SEARCHED, FAILED, INVALID], 2 / 3)
    (rows,) = [writer.poll()]
    assert [r["step"] for r in rows] == [1]
    row = json.loads((ppo / "metrics.jsonl").read_text())
    assert row["critic/score/mean"] == 2 / 3 and row["actor/pg_loss"] == -0.01
    assert row["sap/em"] == 2 / 3 and row["sap/searches"] == 2 / 3 and row["sap/retrieval_failures"] == 1 / 3
    assert row["sap/turns"] == 2.0  # each trajectory: one inserted block or message, then the answer
    traj = [json.loads(line) for line in (ppo / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert traj[0]["question"] == "who wrote hamlet?" and traj[0]["golden_answers"] == ["Shakespeare"]
    assert traj[0]["answer"] == "Shakespeare" and "<information>" in traj[0]["response"] and traj[1]["retrieval_failures"] == 1.0
    assert writer.poll() == []  # nothing new


def test_a_step_waits_for_its_rollouts_and_a_resume_drops_later_steps(tmp_path: Path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    writer = ppo_run.StepWriter(ppo, resumed_from=0)
    _verl_step(ppo, 1, [SEARCHED], 1.0)
    (ppo / "rollouts" / "verl" / "1.jsonl").unlink()
    assert writer.poll() == []  # the dump is written after the metrics line
    assert [r["step"] for r in writer.poll(final=True)] == [1]  # at the end: without it
    _verl_step(ppo, 2, [SEARCHED], 1.0)
    writer.poll()
    assert [json.loads(x)["step"] for x in (ppo / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    ppo_run.StepWriter(ppo, resumed_from=1)  # a rerun resuming from checkpoint 1 trains step 2 again
    assert [json.loads(x)["step"] for x in (ppo / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (ppo / "verl_metrics.jsonl").exists()


def test_a_ctrl_c_while_a_step_is_written_leaves_one_row_per_step(tmp_path: Path, monkeypatch):
    """Seen once in CI: the Ctrl-C landed in the slow part of writing step 1 (TensorBoard's first
    import), after its row was appended; the final poll in the ``finally`` wrote step 1 again."""
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    writer = ppo_run.StepWriter(ppo, resumed_from=0)
    _verl_step(ppo, 1, [SEARCHED], 1.0)

    def interrupted(step, values):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_tensorboard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.poll()
    monkeypatch.undo()
    assert writer.poll(final=True) == []
    writer.close()
    assert [json.loads(x)["step"] for x in (ppo / "metrics.jsonl").read_text().splitlines()] == [1]
    # and a file that has a step twice anyway (a Ctrl-C between the write and its count) is mended
    with (ppo / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 1, "late": True}) + "\n")
    ppo_run.StepWriter(ppo, resumed_from=1)
    rows = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "late" not in rows[0]


def test_report_section_shows_steps_and_the_reward_curve(tmp_path: Path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    assert ppo_run.report_section(tmp_path) == ""
    writer = ppo_run.StepWriter(ppo, resumed_from=0)
    for step in (1, 2, 3):
        _verl_step(ppo, step, [SEARCHED, FAILED], 0.5)
    writer.poll()
    (ppo / "summary.json").write_text(json.dumps({"device": "cpu", "steps": 3}))
    text = ppo_run.report_section(tmp_path)
    assert "3 PPO step(s) on cpu" in text and "nobody should expect EM to rise" in text
    assert "| 3 | 0.500 | 0.500 | 1.00 |" in text and "Mean time per step: 12.0 s" in text
    assert (ppo / "reward.png").stat().st_size > 1000
