"""``sap train-ppo``: Search-R1-style multi-turn PPO on VeRL 0.9.1 (the paper's stage 3).

The stage runs in sap's core environment and drives VeRL in the RL environment
(``environments.rl_python``) as subprocesses:

1. :func:`build_dataset` writes ``ppo/data/{train,val}.parquet`` in Search-R1's parquet layout
   (``prompt`` = the shared Search-R1 chat, ``reward_model.ground_truth.target`` = gold
   answers, ``agent_name`` = the sap agent loop);
2. :func:`write_agent_loop_config` writes ``ppo/agent_loop.yaml`` (agent loop class, retriever,
   turn and token limits);
3. :func:`hydra_overrides` turns the experiment config into VeRL Hydra overrides (PPO/GAE with
   a critic, or GRPO; full fine-tuning or LoRA; GPUs and nodes; tracking);
4. :func:`compose_and_validate` runs :mod:`sap.rl.compose` in the RL environment: VeRL's own
   Hydra config + ``validate_config`` + loading the reward function and the agent loop;
5. :func:`launch` starts ``python -m verl.trainer.main_ppo`` (logs in ``ppo/train.log``) and
   :func:`merge_last_checkpoint` turns the last actor checkpoint into ``ppo/merged/``.

:func:`train_ppo` is the whole stage. Every child runs through :mod:`sap.envs` (one rule for
the interpreter, one policy for logs, timeouts and Ctrl-C).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sap import envs
from sap.rules.atomic import atomic_path, atomic_write_text
from sap.rules.config import ExperimentConfig
from sap.rules.errors import RunFailed, SapError
from sap.rules.prompts import chat_messages, normalize_question
from sap.rules.questions import Question, QuestionFileError, QuestionFileNotFound, read_questions
from sap.stages import ppo_preflight
from sap.stages.ppo_preflight import CRITIC_ADAPTER_DIR, planned_saves

AGENT_NAME = "sap_search"
AGENT_LOOP_TARGET = "sap.rl.agent_loop.SearchAgentLoop"
REWARD_MODULE = "pkg://sap.rl.reward"
DATA_SOURCE = "nq"


class PPOStageError(SapError, RuntimeError):
    """Bad input or environment for ``sap train-ppo``; the message says what to fix."""


class PPORunFailed(RunFailed, PPOStageError):
    """VeRL's trainer ran and failed, hung, or could not be scheduled (exit 1)."""


# --- data -----------------------------------------------------------------------------------


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """:func:`sap.rules.questions.read_questions` (NQ-open JSONL or a Search-R1 parquet), with
    its errors as :class:`PPOStageError`."""
    try:
        return read_questions(path, limit)
    except QuestionFileNotFound:
        raise PPOStageError(f"{path}: question file not found (set ppo.train_data / ppo.val_data)") from None
    except QuestionFileError as e:
        raise PPOStageError(str(e)) from None


def verl_records(questions: Sequence[Question], split: str, template: str) -> list[dict[str, Any]]:
    """Rows in Search-R1's parquet layout plus ``agent_name`` (which VeRL agent loop plays them)."""
    return [
        {
            "id": f"{split}_{i}",
            "question": normalize_question(q.question),
            "golden_answers": list(q.golden_answers),
            "data_source": DATA_SOURCE,
            "prompt": chat_messages(q.question, template),
            "ability": "fact-reasoning",
            "reward_model": {"ground_truth": {"target": list(q.golden_answers)}, "style": "rule"},
            "extra_info": {"index": i, "split": split, "source_id": q.source_id},
            "agent_name": AGENT_NAME,
        }
        for i, q in enumerate(questions)
    ]


def write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    """Atomic parquet write (temporary name, then rename)."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame.from_records(records).to_parquet(tmp, index=False)


def build_dataset(cfg: ExperimentConfig, out_dir: Path) -> dict[str, int]:
    """Write ``train.parquet`` and ``val.parquet`` under ``out_dir``; returns row counts."""
    counts = {}
    for split, src, limit in (("train", cfg.ppo.train_data, cfg.ppo.train_limit), ("val", cfg.ppo.val_data, cfg.ppo.val_limit)):
        questions = load_questions(cfg.expand(src), limit)
        write_parquet(verl_records(questions, split, cfg.prompt_template), out_dir / f"{split}.parquet")
        counts[split] = len(questions)
    if counts["train"] < cfg.ppo.train_batch_size:
        raise PPOStageError(
            f"{cfg.ppo.train_data}: {counts['train']} training questions, fewer than ppo.train_batch_size={cfg.ppo.train_batch_size}"
        )
    return counts


# --- VeRL configuration ---------------------------------------------------------------------


def agent_loop_config(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    r = cfg.retriever
    return [
        {
            "name": AGENT_NAME,
            "_target_": AGENT_LOOP_TARGET,
            "retriever": {"url": r.url, "topk": r.topk, "timeout_s": r.timeout_s, "max_retries": r.max_retries, "backoff_s": r.backoff_s},
            "max_turns": cfg.ppo.max_turns,
            "max_turn_tokens": cfg.ppo.max_response_length,
            "max_obs_tokens": cfg.ppo.max_obs_length,
            "obs_cut": cfg.ppo_obs_cut,
        }
    ]


def write_agent_loop_config(cfg: ExperimentConfig, path: Path) -> None:
    header = "# VeRL agent-loop registry for sap (written by `sap train-ppo`; edit the experiment config instead).\n"
    atomic_write_text(path, header + yaml.safe_dump(agent_loop_config(cfg), sort_keys=False))


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./" for c in text) and text not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


TRACKING_LOGGERS = {"none": ["console"], "wandb": ["console", "wandb"], "tensorboard": ["console", "tensorboard"]}
#: VeRL's ``file`` logger writes every step's metrics here (truncated by each launch); sap appends
#: them to ``ppo/metrics.jsonl`` (:mod:`sap.stages.ppo_run`).
VERL_METRICS_FILE = "verl_metrics.jsonl"


@dataclass
class PPOPlan:
    """Everything ``sap train-ppo`` decided, before anything runs."""

    run_dir: Path
    model_path: str
    settings: dict[str, Any]
    """VeRL Hydra settings, ``key.path -> value`` (:func:`verl_settings`, then the preflight's)."""
    env: dict[str, str] = field(default_factory=dict)
    merge_step: int | None = None
    """``ppo.merge_step``: the checkpoint to merge (None: the last)."""
    device: str = "cuda"

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={hydra_value(v)}" for k, v in self.settings.items()]

    @property
    def ppo_dir(self) -> Path:
        return self.run_dir / "ppo"

    @property
    def checkpoints(self) -> Path:
        return self.ppo_dir / "checkpoints"

    def command(self, rl_python: str) -> list[str]:
        return [rl_python, "-m", "verl.trainer.main_ppo", *self.overrides]


def resolve_model(cfg: ExperimentConfig, init: str) -> str:
    """``sft``: runs/<experiment>/sft/merged; ``base``: model.path."""
    return str(cfg.run_dir / "sft" / "merged") if init == "sft" else cfg.expand(cfg.model.path)


def _abs(path: Path) -> str:
    return str(path.resolve())


def hydra_overrides(cfg: ExperimentConfig, model_path: str, ppo_dir: Path, device: str = "cuda") -> list[str]:
    """Every VeRL Hydra override that the experiment config decides; on ``device="cpu"`` also
    :func:`sap.rl.cpu.cpu_overrides` (``ppo.verl`` last)."""
    return [f"{k}={hydra_value(v)}" for k, v in verl_settings(cfg, model_path, ppo_dir, device).items()]


def kept_checkpoints(cfg: ExperimentConfig) -> int | None:
    """``ppo.keep_checkpoints``, raised so that VeRL's rotation keeps ``ppo.merge_step``'s checkpoint."""
    p = cfg.ppo
    if p.keep_checkpoints is None or p.merge_step is None:
        return p.keep_checkpoints
    return max(p.keep_checkpoints, planned_saves(p.total_training_steps, p.save_freq, p.merge_step - 1))


def verl_settings(cfg: ExperimentConfig, model_path: str, ppo_dir: Path, device: str = "cuda") -> dict[str, Any]:
    """The VeRL settings :func:`hydra_overrides` writes, ``key.path -> value``."""
    p = cfg.ppo
    model = _abs(Path(model_path)) if Path(model_path).exists() else model_path
    grpo = p.algorithm == "grpo"
    o: dict[str, Any] = {
        # data: the parquet written by build_dataset, prompts kept as chats for the agent loop
        "data.train_files": _abs(ppo_dir / "data" / "train.parquet"),
        "data.val_files": _abs(ppo_dir / "data" / "val.parquet"),
        "data.prompt_key": "prompt",
        "data.train_batch_size": p.train_batch_size,
        "data.max_prompt_length": p.max_prompt_length,
        "data.max_response_length": p.total_response_length,
        "data.return_raw_chat": True,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.seed": cfg.seed,
        # policy
        "actor_rollout_ref.model.path": model,
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True,
        "actor_rollout_ref.model.lora_rank": p.lora_rank,
        "actor_rollout_ref.actor.optim.lr": p.policy_lr,
        "actor_rollout_ref.actor.ppo_mini_batch_size": p.ppo_mini_batch_size,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": p.ppo_micro_batch_size_per_gpu,
        "actor_rollout_ref.actor.use_kl_loss": grpo,
        "actor_rollout_ref.actor.kl_loss_coef": p.kl_coef,
        "actor_rollout_ref.actor.entropy_coeff": p.entropy_coeff,
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": p.actor_warmup_ratio,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": p.ppo_micro_batch_size_per_gpu,
        # rollout: the sap agent loop on an async rollout server
        "actor_rollout_ref.rollout.name": p.rollout_engine,
        "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.n": p.samples_per_prompt,
        "actor_rollout_ref.rollout.temperature": p.temperature,
        "actor_rollout_ref.rollout.top_p": p.top_p,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": p.tensor_parallel_size,
        "actor_rollout_ref.rollout.gpu_memory_utilization": p.gpu_memory_utilization,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": p.ppo_micro_batch_size_per_gpu,
        "actor_rollout_ref.rollout.agent.num_workers": p.agent_workers,
        "actor_rollout_ref.rollout.agent.default_agent_loop": AGENT_NAME,
        "actor_rollout_ref.rollout.agent.agent_loop_config_path": _abs(ppo_dir / "agent_loop.yaml"),
        # algorithm
        "algorithm.adv_estimator": "grpo" if grpo else "gae",
        "algorithm.use_kl_in_reward": not grpo,
        "algorithm.kl_ctrl.kl_coef": p.kl_coef,
        # reward: sap's function, its options as reward_kwargs
        "reward.custom_reward_function.path": REWARD_MODULE,
        "reward.custom_reward_function.name": "compute_score",
        "+reward.custom_reward_function.reward_kwargs.reward": p.reward,
        "+reward.custom_reward_function.reward_kwargs.structure_format_score": p.structure_format_score,
        "+reward.custom_reward_function.reward_kwargs.final_format_score": p.final_format_score,
        "+reward.custom_reward_function.reward_kwargs.retrieval_score": p.retrieval_score,
        # trainer
        "trainer.logger": [*TRACKING_LOGGERS[cfg.tracking.backend], "file"],
        "trainer.project_name": cfg.tracking.project,
        "trainer.experiment_name": cfg.experiment,
        "trainer.n_gpus_per_node": p.n_gpus_per_node,
        "trainer.nnodes": p.nnodes,
        "trainer.total_training_steps": p.total_training_steps,
        "trainer.save_freq": p.save_freq,
        "trainer.max_actor_ckpt_to_keep": kept_checkpoints(cfg),
        "trainer.max_critic_ckpt_to_keep": kept_checkpoints(cfg),
        "trainer.test_freq": p.test_freq,
        "trainer.default_local_dir": _abs(ppo_dir / "checkpoints"),
        # per-sample logs: every rollout and validation trajectory with its reward metrics (JSONL per step)
        "trainer.rollout_data_dir": _abs(ppo_dir / "rollouts" / "verl"),
        "trainer.validation_data_dir": _abs(ppo_dir / "validation"),
        "trainer.resume_mode": "auto",
        "hydra.run.dir": _abs(ppo_dir / "hydra"),
    }
    if p.lora_rank > 0:
        o["actor_rollout_ref.model.lora_alpha"] = p.lora_alpha
        o["actor_rollout_ref.model.target_modules"] = "all-linear"
    if grpo:
        o["critic.enable"] = False
    else:
        o["critic.enable"] = True
        o["critic.optim.lr"] = p.critic_lr
        o["critic.optim.lr_warmup_steps_ratio"] = p.critic_warmup_ratio
        o["critic.model.path"] = model
        o["critic.model.use_remove_padding"] = True
        o["critic.model.enable_gradient_checkpointing"] = True
        o["critic.ppo_micro_batch_size_per_gpu"] = p.ppo_micro_batch_size_per_gpu
        if p.lora_rank > 0:
            o["critic.model.lora_rank"] = p.lora_rank
            o["critic.model.lora_alpha"] = p.lora_alpha
            # VeRL's own LoRA wrapping of the value model fails (and would freeze its head):
            # start from sap's TOKEN_CLS adapter, value head in modules_to_save (sap.rl.critic_adapter)
            o["critic.model.lora_adapter_path"] = _abs(ppo_dir / CRITIC_ADAPTER_DIR)
    if device == "cpu":
        from sap.rl.cpu import cpu_overrides

        o.update(cpu_overrides(p.n_gpus_per_node * p.nnodes, p.agent_workers))
    o.update(p.verl)
    if device == "cpu":
        from sap.rl.cpu import check_ray_capacity

        try:
            check_ray_capacity(o, p.n_gpus_per_node * p.nnodes, p.agent_workers)
        except ValueError as e:
            raise PPOStageError(str(e)) from None
    return o


def tracking_env(cfg: ExperimentConfig, ppo_dir: Path) -> dict[str, str]:
    env = {"VERL_FILE_LOGGER_PATH": _abs(ppo_dir / VERL_METRICS_FILE)}
    if cfg.tracking.backend == "tensorboard":
        env["TENSORBOARD_DIR"] = _abs(ppo_dir / "tensorboard")
    if cfg.tracking.backend == "wandb":
        env["WANDB_MODE"] = cfg.tracking.mode
        env["WANDB_DIR"] = _abs(ppo_dir)
    return env


def plan(cfg: ExperimentConfig, init: str | None = None, device: str = "cuda") -> PPOPlan:
    """The run's overrides and environment; ``device="cpu"``: sap's CPU mode (:mod:`sap.rl.cpu`)."""
    run_dir = cfg.run_dir
    model_path = resolve_model(cfg, init or cfg.ppo.init)
    ppo_dir = run_dir / "ppo"
    env = tracking_env(cfg, ppo_dir)
    if device == "cpu":
        from sap.rl.cpu import cpu_env

        env.update(cpu_env(ppo_dir / "rollout_weights.jsonl"))
    return PPOPlan(run_dir, model_path, verl_settings(cfg, model_path, ppo_dir, device), env, cfg.ppo.merge_step, device)


# --- the stage ------------------------------------------------------------------------------


@dataclass
class PPOResult:
    """What ``sap train-ppo`` did: data, the validated VeRL config and command, and the outcome."""

    ppo_dir: Path
    counts: dict[str, int]
    validation: str
    command: str
    dry_run: bool
    device: str = "cuda"
    rollouts: dict[str, Any] | None = None
    run: Any = None
    """The training run (:class:`sap.stages.ppo_run.PPORunResult`) when not a dry run."""

    @property
    def rollouts_file(self) -> Path:
        return self.ppo_dir / "cpu_rollouts.jsonl"

    def describe(self) -> str:
        lines = [self.validation]
        if self.rollouts is not None:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in self.rollouts.items() if k in ("score", "valid_format", "searches", "turns"))
            lines.append(f"rollouts: {self.rollouts['n']} trajectories ({shown}) -> {self.rollouts_file}")
        if self.dry_run:
            lines.append(f"dry run: VeRL config valid -> {self.ppo_dir / 'verl_config.yaml'}; command ({self.ppo_dir / 'command.txt'}):")
            return "\n".join([*lines, self.command])
        r = self.run
        return "\n".join(
            [
                *lines,
                f"{r.steps} step(s) on {self.device}, {r.seconds_per_step or 0:.1f} s/step; metrics -> {r.metrics}; merged policy -> {r.merged}",
            ]
        )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_retriever(cfg: ExperimentConfig, required: bool, echo: Callable[[str], None] = _stderr) -> None:
    """The retriever's ``/health``: an error when the run needs it, else a warning."""
    from sap.agent.retrieval import RetrievalError, require_healthy

    try:
        require_healthy(cfg.retriever)  # before a model is loaded; the message says how to start one
    except RetrievalError as e:
        if required:
            raise
        echo(f"warning: {e} (ignored by --dry-run)")


def train_ppo(cfg: ExperimentConfig, *, dry_run: bool = False, rollouts: int = 0, echo: Callable[[str], None] = _stderr) -> PPOResult:
    """The whole stage: data, agent-loop file, VeRL config validated by VeRL, ``command.txt``;
    then either CPU rollouts (``dry_run`` with ``rollouts``) or VeRL's trainer on the resolved
    device and the merge (:func:`sap.stages.ppo_run.train`)."""
    from sap.rules.rundir import record_run

    if rollouts and not dry_run:
        raise PPOStageError("--rollouts runs on CPU next to --dry-run; a real launch rolls out with vLLM inside VeRL's trainer")
    check_retriever(cfg, required=not dry_run or rollouts > 0, echo=echo)
    ppo_dir = record_run(cfg, "train-ppo") / "ppo"
    counts = build_dataset(cfg, ppo_dir / "data")
    echo(f"data: {counts['train']} train / {counts['val']} val questions -> {ppo_dir / 'data'}")
    write_agent_loop_config(cfg, ppo_dir / "agent_loop.yaml")
    python = str(envs.python_for(cfg, "rl"))
    the_plan = plan(cfg, device=resolve_device(cfg, python, dry_run))
    ppo_preflight.apply(cfg, the_plan, counts["train"], launch=not dry_run, warn=echo)
    if not Path(the_plan.model_path).exists():
        if cfg.ppo.init == "sft" and not dry_run:
            raise PPOStageError(f"merged SFT model not found: {the_plan.model_path} (run `sap train-sft` first, or use --init base)")
        echo(f"warning: initial model {the_plan.model_path} is not a local folder")
    report = compose_and_validate(python, the_plan.overrides, ppo_dir / "verl_config.yaml")
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in the_plan.env.items())
    command = (env_prefix + " " if env_prefix else "") + shlex.join(the_plan.command(python))
    atomic_write_text(ppo_dir / "command.txt", command + "\n")
    result = PPOResult(ppo_dir, counts, report, command, dry_run, the_plan.device)
    if dry_run:
        if rollouts:
            echo(f"playing {rollouts} training question(s) with the sap agent loop in VeRL's agent-loop worker (CPU) ...")
            overrides_file = (ppo_dir / "verl_config.yaml").with_suffix(".overrides.json")
            result.rollouts = cpu_rollouts(python, overrides_file, rollouts, result.rollouts_file)
        return result
    from sap.stages.ppo_run import train

    echo(f"training on {the_plan.device} (log: {ppo_dir / 'train.log'}) ...")
    p = cfg.ppo
    result.run = train(python, the_plan, p.total_training_steps, p.stall_timeout_s, cfg.tracking.backend == "tensorboard")
    return result


# --- children in the RL environment (through sap.envs) -----------------------------------------


def ensure_critic_adapter(python: str, the_plan: PPOPlan, log_path: Path, timeout_s: float = 1800) -> Path | None:
    """Write the LoRA critic's initial adapter (:mod:`sap.rl.critic_adapter`, in the RL
    environment) when the plan uses sap's and it is not there yet; returns its folder."""
    adapter = the_plan.settings.get("critic.model.lora_adapter_path")
    if (
        not adapter
        or Path(adapter) != (the_plan.ppo_dir / CRITIC_ADAPTER_DIR).resolve()
        or (Path(adapter) / "adapter_config.json").is_file()
    ):
        return Path(adapter) if adapter else None
    cmd = [python, "-m", "sap.rl.critic_adapter", "--model", the_plan.model_path, "--out", adapter]
    cmd += ["--rank", str(the_plan.settings["critic.model.lora_rank"]), "--alpha", str(the_plan.settings["critic.model.lora_alpha"])]
    done = envs.run(
        cmd, log=log_path, env=envs.child_env(python), timeout_s=timeout_s, check=False, what="the LoRA critic's initial adapter"
    )
    if done.returncode != 0:
        raise PPOStageError(f"writing the LoRA critic's initial adapter failed (log: {done.log}):\n{done.tail(25)}")
    return Path(adapter)


def rl_python(cfg: ExperimentConfig) -> str:
    """``environments.rl_python`` by :func:`sap.envs.resolve_python`'s rule."""
    return str(envs.python_for(cfg, "rl"))


def compose_and_validate(python: str, overrides: list[str], resolved_out: Path, timeout_s: float = 600) -> str:
    """Compose the full VeRL config with VeRL's Hydra files and run VeRL's validation (in the RL
    environment). Writes the resolved config to ``resolved_out``; returns the checker's report."""
    args_file = resolved_out.with_suffix(".overrides.json")
    atomic_write_text(args_file, json.dumps(overrides, indent=1))
    done = envs.run(
        [python, "-m", "sap.rl.compose", "--overrides", str(args_file), "--out", str(resolved_out)],
        log=resolved_out.with_name("validate.log"),
        env=envs.child_env(python, {"HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}),  # reads the model's config, never the network
        timeout_s=timeout_s,
        check=False,
        what="VeRL config validation",
    )
    if done.returncode != 0:
        raise PPOStageError(f"VeRL rejected the configuration (log: {done.log}):\n{done.tail(25)}")
    return done.stdout.strip()


def cpu_rollouts(python: str, overrides_file: Path, n: int, out: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """Play ``n`` training questions with the sap agent loop through VeRL's agent-loop worker
    and an in-process HF model (:mod:`sap.rl.cpu_rollouts`, in the RL environment) against the
    configured retriever. Writes one JSON line per trajectory to ``out``; returns mean metrics."""
    done = envs.run(
        [python, "-m", "sap.rl.cpu_rollouts", "--overrides", str(overrides_file), "--n", str(n), "--out", str(out)],
        log=out.with_name("cpu_rollouts.log"),
        env=envs.child_env(python, {"HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}),
        timeout_s=timeout_s,
        what="CPU rollouts",
    )
    return done.result()


def resolve_device(cfg: ExperimentConfig, python: str, dry_run: bool = False) -> str:
    """``ppo.device``; ``auto``: ``cuda`` when the RL environment sees a CUDA GPU
    (:func:`sap.envs.gpu_count`), else ``cpu`` (a dry run keeps composing the GPU configuration)."""
    if cfg.ppo.device != "auto":
        return cfg.ppo.device
    if dry_run:
        return "cuda"
    return "cuda" if envs.gpu_count(python) else "cpu"


def last_checkpoint(checkpoints: Path) -> Path | None:
    """``global_step_N`` named by VeRL's ``latest_checkpointed_iteration.txt`` (else the highest N)."""
    marker = checkpoints / "latest_checkpointed_iteration.txt"
    if marker.is_file():
        step = marker.read_text().strip()
        if (checkpoints / f"global_step_{step}").is_dir():
            return checkpoints / f"global_step_{step}"
    steps = sorted((int(p.name.rsplit("_", 1)[1]), p) for p in checkpoints.glob("global_step_*") if p.name.rsplit("_", 1)[1].isdigit())
    return steps[-1][1] if steps else None


def merge_command(python: str, checkpoint: Path, target: Path) -> list[str]:
    return [
        python,
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(checkpoint / "actor"),
        "--target_dir",
        str(target),
    ]


def checkpoint_to_merge(the_plan: PPOPlan) -> Path | None:
    """``global_step_<ppo.merge_step>`` when it is set (an error if it was not saved), else the last."""
    if the_plan.merge_step is None:
        return last_checkpoint(the_plan.checkpoints)
    ckpt = the_plan.checkpoints / f"global_step_{the_plan.merge_step}"
    if not ckpt.is_dir():
        raise PPOStageError(f"ppo.merge_step={the_plan.merge_step}: no checkpoint {ckpt} (one is saved every ppo.save_freq steps)")
    return ckpt


def merge_last_checkpoint(python: str, the_plan: PPOPlan, log_path: Path) -> Path:
    ckpt = checkpoint_to_merge(the_plan)
    if ckpt is None:
        raise PPOStageError(f"no checkpoint under {the_plan.checkpoints} to merge (did training save one? see ppo.save_freq)")
    target = the_plan.ppo_dir / "merged"
    envs.run(merge_command(python, ckpt, target), log=log_path, env=envs.child_env(python), keep_stdout=False, what=f"merging {ckpt}")
    return target
