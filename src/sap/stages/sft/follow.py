"""Following a training run through LLaMA-Factory's own ``trainer_log.jsonl``: steps, losses,
LLaMA-Factory's time estimate, and a progress bar fed from them."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_trainer_log(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """New complete lines of LLaMA-Factory's ``trainer_log.jsonl`` from byte ``offset``;
    returns them and the offset after the last complete line."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    rows = []
    for line in chunk[: end + 1].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end + 1


@dataclass
class TrainProgress:
    """Steps and losses seen in ``trainer_log.jsonl`` during this run."""

    total_steps: int | None = None
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    remaining: str | None = None
    """LLaMA-Factory's own estimate of the time left (``remaining_time``, H:MM:SS)."""

    def update(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            if r.get("remaining_time"):
                self.remaining = str(r["remaining_time"])
            if r.get("total_steps"):
                self.total_steps = int(r["total_steps"])
            if r.get("current_steps") is not None:
                self.step = max(self.step, int(r["current_steps"]))
            if r.get("loss") is not None and r.get("current_steps") is not None:
                self.losses.append((int(r["current_steps"]), float(r["loss"])))


class Follower:
    """Reads new ``trainer_log.jsonl`` lines into a :class:`TrainProgress` and a progress bar;
    called by :func:`sap.envs.run` while LLaMA-Factory trains."""

    def __init__(self, log_file: Path, offset: int = 0, progress: bool = True):
        self.log_file = log_file
        self.offset = offset
        self.state = TrainProgress()
        self.bar = progress_bar(progress)

    def __call__(self) -> None:
        rows, self.offset = read_trainer_log(self.log_file, self.offset)
        if not rows:
            return
        state = self.state
        state.update(rows)
        if self.bar is not None:
            if state.total_steps and self.bar.total != state.total_steps:
                self.bar.total = state.total_steps
            self.bar.n = state.step
            post = {}
            if state.losses:
                post["loss"] = f"{state.losses[-1][1]:.4f}"
            if state.remaining:
                post["eta"] = state.remaining
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # The ETA is LLaMA-Factory's own (in the postfix): tqdm's would count model loading as training.
    fmt = "{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    size = shutil.get_terminal_size((100, 20))  # a terminal that reports 0x0 (e.g. a bare pty) gets 100x20
    return tqdm(total=None, desc="train-sft", unit="step", ncols=size.columns, nrows=size.lines, file=sys.stderr, bar_format=fmt)
