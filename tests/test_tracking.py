from __future__ import annotations

from sap.rules.config import load_config
from sap.tracking import log_metrics


def test_eval_metrics_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"run_root={tmp_path}", "experiment=t", "tracking.backend=tensorboard"])
    where = log_metrics(cfg, "eval/sft", {"em": 0.25, "n": 8, "stop_reasons": {"answer": 8}, "model": "m"})
    acc = EventAccumulator(where)
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/sft/em", "eval/sft/n"]
    assert acc.Scalars("eval/sft/em")[0].value == 0.25


def test_no_tracker_logs_nothing(tmp_path):
    cfg = load_config(None, [f"run_root={tmp_path}", "experiment=t"])
    assert log_metrics(cfg, "eval/sft", {"em": 0.25}) is None
    assert not (tmp_path / "t").exists()
