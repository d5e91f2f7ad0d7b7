"""Running VeRL's PPO trainer and reading what it writes (the same on CPU and GPU).

:func:`train` starts ``python -m verl.trainer.main_ppo`` in the RL environment, its whole output
in ``ppo/train.log``, and while it runs turns VeRL's files into sap's outputs:

- ``ppo/metrics.jsonl`` — one row per step: every metric VeRL logs (its ``file`` logger writes
  ``ppo/verl_metrics.jsonl``; ``critic/score/mean`` is the reward, ``actor/pg_loss``,
  ``critic/vf_loss``, ``critic/advantages/*``, ``actor/reward_kl_penalty``, ``response_length/*``)
  plus ``sap/*``: per-trajectory means computed from that step's rollouts with the reward
  function VeRL calls (:func:`sap.rl.reward.compute_score`): ``sap/em``, ``sap/searches``,
  ``sap/turns``, ``sap/retrieval_failures`` (searches answered with an empty ``<information>``
  block), ``sap/answered``, ``sap/valid_format``. With ``tracking.backend: tensorboard`` the
  ``sap/*`` values are written to ``ppo/tensorboard`` too (VeRL writes its own there);
- ``ppo/rollouts/step_N.jsonl`` — every trajectory of step N: question, gold answers, response,
  reward and the ``sap/*`` values (from VeRL's dump in ``ppo/rollouts/verl/N.jsonl``);
- a progress bar: steps and the running mean reward.

A rerun resumes from the last checkpoint (VeRL's ``resume_mode=auto``); rows of steps after it
are dropped from ``metrics.jsonl`` first, which keeps one row per step (also after a Ctrl-C).
Ctrl-C stops the trainer, Ray and every process they started (:func:`sap.envs.run`'s policy,
SIGINT first so VeRL shuts Ray down). A run that prints nothing for ``ppo.stall_timeout_s``, or
that Ray cannot schedule, is stopped with an error instead of hanging. Afterwards the last checkpoint is merged into
``ppo/merged/`` (``verl.model_merger``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap import envs
from sap.rules.atomic import JsonlAppender, atomic_write_text, read_jsonl
from sap.stages import train_ppo as stage

#: Ray's message for a resource request it cannot satisfy (a hang if it persists).
UNSCHEDULABLE = re.compile(r"cannot be scheduled right now|resource request cannot be scheduled|Total available GPUs .* less than")
UNSCHEDULABLE_GRACE_S = 90.0
#: Ray's own 30 s limit for its raylet to register (``ray/_private/node.py``, not configurable):
#: on an overloaded machine it can pass before anything was trained; the launch is tried again.
RAY_STARTUP_FAILED = re.compile(r"node timed out during startup")
RAY_START_ATTEMPTS = 3


@dataclass
class PPORunResult:
    """What a finished ``sap train-ppo`` run produced."""

    steps: int
    """The last step trained (the step of the merged checkpoint)."""
    resumed_from: int
    merged: Path
    metrics: Path
    seconds_per_step: float | None
    """Mean of VeRL's ``timing_s/step`` over the steps this launch trained."""
    last: dict[str, float] = field(default_factory=dict)


# --- per-step outputs -------------------------------------------------------------------------


def _question(prompt: str) -> str:
    """The question of a decoded Search-R1 prompt (the text after its last ``Question:``)."""
    if "Question:" not in prompt:
        return prompt.strip()
    return prompt.rsplit("Question:", 1)[1].strip().splitlines()[0].strip()


def _empty_information_blocks(response: str) -> int:
    return len(re.findall(r"<information>\s*</information>", response))


def trajectory_row(step: int, dumped: dict[str, Any]) -> dict[str, Any]:
    """One readable row of ``step_N.jsonl`` from a row of VeRL's rollout dump."""
    from sap.rl.reward import compute_score, gold_answers
    from sap.rules.prompts import INVALID_ACTION_MESSAGE
    from sap.rules.tags import extract_answer

    response = dumped.get("output", "")
    gts = dumped.get("gts")
    golds = gold_answers(gts) if gts is not None else []
    # what the agent loop inserted, read back from the text: each block or message follows a turn
    invalid = response.count(INVALID_ACTION_MESSAGE.strip())
    inserted = len(re.findall(r"<information>", response)) + invalid
    scores = compute_score("nq", response, golds, {"sap_invalid_actions": invalid, "sap_turns": inserted + 1})
    return {
        "step": step,
        "uid": dumped.get("uid"),
        "question": _question(dumped.get("input", "")),
        "golden_answers": golds,
        "response": response,
        "answer": extract_answer(response),
        "reward": dumped.get("score"),
        "em": scores["em"],
        "searches": scores["searches"],
        "turns": scores["turns"],
        "retrieval_failures": float(_empty_information_blocks(response)),
        "answered": scores["answered"],
        "valid_format": scores["valid_format"],
    }


SAP_KEYS = ("em", "searches", "turns", "retrieval_failures", "answered", "valid_format")


def step_outputs(step: int, verl_dump: Path, out: Path) -> dict[str, float]:
    """Write ``step_N.jsonl`` from VeRL's dump of step N; return the ``sap/*`` means."""
    rows = [trajectory_row(step, r) for r in read_jsonl(verl_dump)]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if not rows:
        return {}
    return {f"sap/{k}": sum(float(r[k]) for r in rows) / len(rows) for k in SAP_KEYS}


def _plain(value: Any) -> Any:
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class StepWriter:
    """Follows VeRL's metrics file; for each new step writes ``metrics.jsonl`` and
    ``rollouts/step_N.jsonl`` (and ``sap/*`` scalars to TensorBoard when it is the backend)."""

    def __init__(self, ppo_dir: Path, resumed_from: int, tensorboard: Path | None = None):
        self.ppo_dir = ppo_dir
        self.verl_metrics = ppo_dir / stage.VERL_METRICS_FILE
        self.metrics = ppo_dir / "metrics.jsonl"
        self.rollouts = ppo_dir / "rollouts"
        self.done: set[int] = set()
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._pending: list[dict[str, Any]] = []
        self._tb_dir = tensorboard
        self._tb = None
        _one_row_per_step(self.metrics, resumed_from)
        self.verl_metrics.unlink(missing_ok=True)

    def poll(self, final: bool = False) -> list[dict[str, Any]]:
        """Handle what is new; a step waits for its rollout dump unless ``final``."""
        if self.verl_metrics.is_file():
            with self.verl_metrics.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                if line.strip():
                    self._pending.append(json.loads(line))
        written = []
        waiting = []
        for rec in self._pending:
            step = int(rec["step"])
            dump = self.rollouts / "verl" / f"{step}.jsonl"
            if step in self.done:
                continue
            if not dump.is_file() and not final:
                waiting.append(rec)
                continue
            sap_means = step_outputs(step, dump, self.rollouts / f"step_{step}.jsonl") if dump.is_file() else {}
            row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in rec["data"].items()}, **sap_means}
            with JsonlAppender(self.metrics) as sink:
                sink.write(row)
            self.done.add(step)  # at once: a Ctrl-C in the slow work below must not write this step again
            self.rows.append(row)
            written.append(row)
            self._tensorboard(step, sap_means)
        self._pending = waiting
        return written

    def _tensorboard(self, step: int, values: dict[str, float]) -> None:
        if self._tb_dir is None or not values:
            return
        try:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self._tb_dir), filename_suffix=".sap")
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        except ImportError:
            self._tb_dir = None

    def close(self) -> None:
        try:
            if self._tb is not None:
                self._tb.close()
        finally:
            _one_row_per_step(self.metrics, None)  # one row per step, even if a Ctrl-C split a write from its count


def _one_row_per_step(path: Path, through: int | None) -> None:
    """Keep one row per step (the first) and drop the steps after ``through`` (a resumed run
    trains them again; ``None`` keeps every step)."""
    if not path.is_file():
        return
    rows, seen = [], set()
    for r in read_jsonl(path):
        n = int(r.get("step", 0))
        if (through is None or n <= through) and n not in seen:
            seen.add(n)
            rows.append(r)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --- the child process (through sap.envs) -------------------------------------------------


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="ppo steps", unit="step", dynamic_ncols=True, file=sys.stderr)


def train(python: str, the_plan: stage.PPOPlan, total_steps: int, stall_timeout_s: float, tensorboard: bool = False) -> PPORunResult:
    """Run VeRL's trainer to ``total_steps`` (resuming from the last checkpoint), then merge the
    last checkpoint into ``ppo/merged``. Raises :class:`sap.stages.train_ppo.PPOStageError`."""
    ppo_dir = the_plan.ppo_dir
    log_path = ppo_dir / "train.log"
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        ckpt = stage.last_checkpoint(the_plan.checkpoints)
        resumed_from = int(ckpt.name.rsplit("_", 1)[1]) if ckpt else 0
        writer = StepWriter(ppo_dir, resumed_from, ppo_dir / "tensorboard" if tensorboard else None)
        if resumed_from >= total_steps:
            break
        try:
            stage.ensure_critic_adapter(python, the_plan, log_path)
            _run_trainer(python, the_plan, log_path, writer, total_steps, resumed_from, stall_timeout_s)
            break
        except stage.PPORunFailed as e:
            if attempt == RAY_START_ATTEMPTS or not RAY_STARTUP_FAILED.search(str(e)):
                raise
            print(
                f"Ray did not start in time (a busy machine: Ray waits 30 s for its raylet); trying again ({attempt + 1}/{RAY_START_ATTEMPTS})",
                file=sys.stderr,
            )
    ckpt = stage.checkpoint_to_merge(the_plan)
    if ckpt is None:
        raise stage.PPOStageError(f"training saved no checkpoint under {the_plan.checkpoints} (see ppo.save_freq and {log_path})")
    merged = stage.merge_last_checkpoint(python, the_plan, log_path)
    step = int(ckpt.name.rsplit("_", 1)[1])
    times = [float(r["timing_s/step"]) for r in writer.rows if "timing_s/step" in r]
    last = {k: v for k, v in (writer.rows[-1] if writer.rows else {}).items() if isinstance(v, int | float)}
    atomic_write_text(
        ppo_dir / "summary.json",
        json.dumps(
            {"device": the_plan.device, "steps": step, "resumed_from": resumed_from, "seconds_per_step": times, "merged": str(merged)},
            indent=2,
        )
        + "\n",
    )
    return PPORunResult(step, resumed_from, merged, writer.metrics, sum(times) / len(times) if times else None, last)


def _run_trainer(
    python: str,
    the_plan: stage.PPOPlan,
    log_path: Path,
    writer: StepWriter,
    total_steps: int,
    resumed_from: int,
    stall_timeout_s: float,
) -> None:
    """VeRL's trainer under :func:`sap.envs.run`: SIGINT first on Ctrl-C (VeRL shuts Ray down),
    then its process group and every process below it; stopped as hung after
    ``stall_timeout_s`` of silence, or when Ray cannot schedule its actors."""
    unschedulable: list[float] = []
    bar = _progress(total_steps, resumed_from)
    rewards: list[float] = []

    def on_line(line: str) -> None:
        if UNSCHEDULABLE.search(line):
            unschedulable.append(time.monotonic())

    def poll() -> None:
        _advance(bar, writer.poll(), rewards)
        if unschedulable and unschedulable[-1] - unschedulable[0] > UNSCHEDULABLE_GRACE_S:
            raise stage.PPORunFailed(
                f"Ray cannot schedule VeRL's actors (not enough Ray CPUs/GPUs for {UNSCHEDULABLE_GRACE_S:.0f} s): stopped "
                f"instead of hanging. On CPU each TransferQueue storage unit and worker needs a Ray CPU: keep "
                f"transfer_queue.backend.SimpleStorage.num_data_storage_units small or raise +ray_kwargs.ray_init.num_cpus "
                f"(ppo.verl). See {log_path}."
            )

    try:
        done = envs.run(
            the_plan.command(python),
            log=log_path,
            env=envs.child_env(python, {"HYDRA_FULL_ERROR": "1", **the_plan.env}),
            poll=poll,
            interval_s=1.0,
            on_line=on_line,
            stall_timeout_s=stall_timeout_s,
            interrupt_first=True,
            grace_s=20.0,
            keep_stdout=False,
            check=False,
            what="VeRL training",
        )
    except envs.ChildStalled:
        raise stage.PPORunFailed(
            f"VeRL printed nothing for {stall_timeout_s:g} s (ppo.stall_timeout_s): stopped as hung. "
            f"Last lines in {log_path}; raise ppo.stall_timeout_s if steps are just slow."
        ) from None
    except KeyboardInterrupt:
        print("\ninterrupted: VeRL, Ray and their processes were stopped", file=sys.stderr)
        raise
    finally:
        _advance(bar, writer.poll(final=True), rewards)
        bar.close()
        writer.close()
    if done.returncode != 0:
        raise stage.PPORunFailed(f"VeRL training failed (exit {done.returncode}); last lines of {log_path}:\n{done.tail(30)}")


def _advance(bar, rows: list[dict[str, Any]], rewards: list[float]) -> None:
    for row in rows:
        reward = row.get("critic/score/mean")
        if isinstance(reward, int | float):
            rewards.append(float(reward))
        postfix = {}
        if rewards:
            postfix["reward"] = f"{rewards[-1]:.3f}"
            postfix["mean"] = f"{sum(rewards) / len(rewards):.3f}"
        for key, name in (("sap/em", "em"), ("sap/searches", "searches"), ("timing_s/step", "s/step")):
            if isinstance(row.get(key), int | float):
                postfix[name] = f"{row[key]:.2f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(max(0, int(row["step"]) - bar.n))


# --- the report's PPO section -------------------------------------------------------------------

REPORT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("critic/score/mean", "reward", "{:.3f}"),
    ("sap/em", "EM (rollouts)", "{:.3f}"),
    ("sap/searches", "searches/traj", "{:.2f}"),
    ("sap/turns", "turns/traj", "{:.2f}"),
    ("sap/retrieval_failures", "failed searches/traj", "{:.2f}"),
    ("actor/pg_loss", "pg loss", "{:.4g}"),
    ("critic/vf_loss", "vf loss", "{:.4g}"),
    ("actor/reward_kl_penalty", "KL", "{:.3g}"),
    ("response_length/mean", "response tokens", "{:.0f}"),
    ("timing_s/step", "s/step", "{:.1f}"),
)


def read_metrics(ppo_dir: Path) -> list[dict[str, Any]]:
    path = ppo_dir / "metrics.jsonl"
    return sorted(read_jsonl(path), key=lambda r: int(r["step"])) if path.is_file() else []


def reward_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Reward (and rollout EM) per PPO step as a line chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sap.rules.atomic import atomic_path

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    for key, label in (("critic/score/mean", "reward (mean per step)"), ("sap/em", "EM of the rollouts")):
        ys = [r.get(key) for r in rows]
        if all(isinstance(y, int | float) for y in ys):
            ax.plot(steps, ys, marker="o", label=label)
    ax.set_xlabel("PPO step")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def report_section(run_dir: Path) -> str:
    """Markdown for ``report.md``: the PPO run's steps (reward, EM, searches, losses, KL, time)
    and its reward curve (``ppo/reward.png``); empty when no PPO run has metrics."""
    ppo_dir = run_dir / "ppo"
    rows = read_metrics(ppo_dir)
    if not rows:
        return ""
    summary: dict[str, Any] = {}
    if (ppo_dir / "summary.json").is_file():
        summary = json.loads((ppo_dir / "summary.json").read_text(encoding="utf-8"))
    device = summary.get("device", "?")
    times = [float(r["timing_s/step"]) for r in rows if isinstance(r.get("timing_s/step"), int | float)]
    lines = [
        "",
        "## PPO (`sap train-ppo`)",
        "",
        f"{len(rows)} PPO step(s) on {device} with VeRL's trainer; the `sft_rl` group is the merged policy of the last step "
        f"(`ppo/merged`). Mean time per step: {sum(times) / len(times):.1f} s (the first step includes warm-up)."
        if times
        else f"{len(rows)} PPO step(s) on {device} with VeRL's trainer.",
    ]
    if device == "cpu" or len(rows) < 20:
        lines += [
            "",
            "A handful of PPO steps on a CPU, with a learning rate meant for hundreds of steps, barely moves the policy: "
            "nobody should expect EM to rise here. These steps show that the whole loop runs (rollouts through the "
            "retriever, reward, advantages, critic and actor updates, weight sync, checkpoints, merge); the paper's "
            "gains come from its full schedule on GPUs.",
        ]
    head = ["step", *(label for _, label, _ in REPORT_COLUMNS)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for r in rows:
        cells = [str(r["step"])] + [fmt.format(r[k]) if isinstance(r.get(k), int | float) else "–" for k, _, fmt in REPORT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    reward_curve(rows, ppo_dir / "reward.png", f"{run_dir.name}: PPO reward per step")
    lines += [
        "",
        "reward = VeRL's `critic/score/mean` (the reward function's score); EM, searches, turns and failed searches "
        "(empty `<information>` blocks) are means over the step's trajectories (`ppo/rollouts/step_N.jsonl`); every "
        "metric of every step is in `ppo/metrics.jsonl`.",
        "",
        "![PPO reward per step](ppo/reward.png)",
        "",
    ]
    return "\n".join(lines)
