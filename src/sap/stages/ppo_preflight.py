"""The ``sap train-ppo`` preflight: what VeRL 0.9.1 would only find out on a GPU node, checked first.

``sap train-ppo`` (``--dry-run`` too) runs :func:`apply` right after it writes the data and
before anything loads a model. Every check reads the VeRL settings that the run will use
(:func:`sap.stages.train_ppo.verl_settings`, ``ppo.verl`` included), so a pass-through
override is checked like a typed key:

- **batches** -- each role splits its rows over the data-parallel ranks, ``(batch x rollout.n)
  / (GPUs / sequence parallel)``, and asserts that its micro-batch divides them
  (``verl/workers/engine/utils.py`` ``prepare_micro_batches``, ``make_iterator`` in
  ``verl/utils/tensordict_utils.py``). VeRL's own ``validate_config`` does not check this:
  the run would die at the first old-log-prob step, after validation has run. Checked for the
  rollout's old log-probs, the reference log-probs, the critic's values, and the actor's and
  critic's mini-batch updates; plus the agent-loop workers, which split ``batch x n`` rows
  with no padding;
- **steps** -- VeRL stops at ``trainer.total_epochs`` (default 30) even before
  ``total_training_steps``: ``total_epochs`` is set from the training file's rows
  (``rows // train_batch_size`` steps per epoch, VeRL drops the last partial batch); a save
  must happen for sap to merge;
- **data** -- a warning when the training file is sap's embedded demo file, or when the
  validation set is the evaluation set;
- **tracking** -- wandb online needs a login (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``
  or a ``~/.netrc`` entry for the W&B host), else wandb fails after the models are loaded;
- **checkpoints** -- disk for the checkpoints kept at once (weights + optimizer states of actor
  and critic, from the model's safetensors headers) against free disk in the checkpoint folder;
- **LoRA** -- the critic's value head trains (VeRL wraps the critic as a ``CAUSAL_LM`` PEFT
  model with no ``modules_to_save``: the head, ``score``, trains only when LoRA targets it),
  and the actor's learning rate is not a full fine-tuning rate.

Machine-dependent checks (login, disk) are errors for a launch and warnings for ``--dry-run``
(which runs anywhere); the configuration checks are errors for both.

Imports only :mod:`sap.rules` and the standard library.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from sap.rules.config import FULL_FT_ACTOR_LR, LORA_ACTOR_LR, ExperimentConfig
from sap.rules.errors import SapError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_TRAIN_FILES = ("data/nq/train.jsonl",)
"""sap's embedded demo questions (600 NQ-open dev questions, data/README.md): fine for the demo only."""
VERL_DEFAULT_TOTAL_EPOCHS = 30
CRITIC_ADAPTER_DIR = "critic_lora_init"
"""Under ``ppo/``: the LoRA critic's initial adapter, written at launch (:mod:`sap.rl.critic_adapter`)."""
VALUE_HEAD_NAMES = ("score", "classifier")
"""The value head of ``AutoModelForTokenClassification`` (Qwen2/Llama/Mistral: ``score``)."""

# VeRL setting -> the sap key that sets it (for the "fix" part of a message)
SAP_KEYS = {
    "data.train_batch_size": "ppo.train_batch_size",
    "actor_rollout_ref.rollout.n": "ppo.rollout_n",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "ppo.ppo_mini_batch_size",
    "critic.ppo_mini_batch_size": "ppo.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "critic.ppo_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "critic.forward_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "trainer.n_gpus_per_node": "ppo.n_gpus_per_node",
    "trainer.nnodes": "ppo.nnodes",
    "actor_rollout_ref.rollout.agent.num_workers": "ppo.agent_workers",
    "trainer.total_training_steps": "ppo.total_training_steps",
    "trainer.save_freq": "ppo.save_freq",
    "trainer.max_actor_ckpt_to_keep": "ppo.keep_checkpoints",
    "trainer.max_critic_ckpt_to_keep": "ppo.keep_checkpoints",
    "actor_rollout_ref.actor.optim.lr": "ppo.actor_lr",
    "critic.model.target_modules": "ppo.verl",
}


class PreflightFailed(SapError, RuntimeError):
    """The run would fail or misbehave on the GPU node; the message lists each problem and its fix."""


@dataclass
class Finding:
    level: Literal["error", "warning", "info"]
    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass
class Preflight:
    """What the preflight found, and the VeRL settings it decided (``trainer.total_epochs``)."""

    findings: list[Finding] = field(default_factory=list)
    decided: dict[str, Any] = field(default_factory=dict)

    def add(self, level: Literal["error", "warning", "info"], check: str, message: str) -> None:
        self.findings.append(Finding(level, check, message))

    def of(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    @property
    def errors(self) -> list[Finding]:
        return self.of("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.of("warning")


class _Plan(Protocol):
    model_path: str
    settings: dict[str, Any]

    @property
    def checkpoints(self) -> Path: ...


# --- reading settings --------------------------------------------------------------------


class Settings:
    """VeRL settings as the run will see them: ``ppo.verl`` keys may carry Hydra's ``+``/``++``."""

    def __init__(self, settings: Mapping[str, Any], verl_passthrough: Mapping[str, Any] = ()) -> None:
        self.values = {k.lstrip("+~"): v for k, v in settings.items()}
        self.passthrough = {k.lstrip("+~") for k in verl_passthrough}

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key, default)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def int(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, default)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise PreflightFailed(f"{self.name(key)}: expected an integer, got {value!r}") from None

    def fix_key(self, key: str) -> str:
        """The key to change: ``ppo.x``, or ``ppo.verl['key']`` for a pass-through setting."""
        if key in self.passthrough or key not in SAP_KEYS or SAP_KEYS[key] == "ppo.verl":
            return f"ppo.verl['{key}']"
        return SAP_KEYS[key]

    def name(self, key: str) -> str:
        """How the user sets ``key``: ``ppo.x`` (VeRL ``key``), or ``ppo.verl`` ``key``."""
        if key in self.passthrough or key not in SAP_KEYS or SAP_KEYS[key] == "ppo.verl":
            return f"ppo.verl['{key}']"
        return f"{SAP_KEYS[key]} ({key})"


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(min(n, at_most), 0, -1) if n % d == 0]


# --- checks ------------------------------------------------------------------------------


def check_batches(s: Settings, out: Preflight) -> None:
    """Rows per GPU of every batch against every micro-batch (VeRL asserts divisibility at run time)."""
    n_gpus = (s.int("trainer.n_gpus_per_node", 1) or 1) * (s.int("trainer.nnodes", 1) or 1)
    batch = s.int("data.train_batch_size")
    n = s.int("actor_rollout_ref.rollout.n", 1) or 1
    rows = batch * n
    workers = s.int("actor_rollout_ref.rollout.agent.num_workers", 8) or 1
    if rows % workers:
        out.add(
            "error",
            "batches",
            f"{s.name('data.train_batch_size')}={batch} x rollout.n {n} = {rows} rollouts do not split over "
            f"{s.name('actor_rollout_ref.rollout.agent.num_workers')}={workers} (VeRL chunks them with no padding). "
            f"Fix: a worker count that divides {rows} ({', '.join(map(str, _divisors(rows, workers)))}).",
        )
    if s.get("actor_rollout_ref.actor.use_dynamic_bsz", False) is True:
        out.add("info", "batches", "actor.use_dynamic_bsz: micro-batches are token-based; micro-batch sizes not checked")
        return
    use_critic = _critic_enabled(s)
    use_ref = _ref_enabled(s)
    actor_sp = _sp(
        s, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size"
    )
    ref_sp = _sp(
        s,
        "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
        "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size",
        actor_sp,
    )
    critic_sp = _sp(s, "critic.fsdp.ulysses_sequence_parallel_size", "critic.ulysses_sequence_parallel_size")
    actor_mini = s.int("actor_rollout_ref.actor.ppo_mini_batch_size")
    critic_mini = s.int("critic.ppo_mini_batch_size", actor_mini)
    actor_micro_key = "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"
    critic_micro_key = "critic.ppo_micro_batch_size_per_gpu"
    critic_fwd_key = "critic.forward_micro_batch_size_per_gpu" if s.has("critic.forward_micro_batch_size_per_gpu") else critic_micro_key

    # (role, whose rows, rows split over how many GPUs, micro-batch key, batch key the rows come from)
    roles: list[tuple[str, int, int, str, str]] = [
        (
            "rollout old log-probs (actor forward)",
            batch,
            actor_sp,
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
            "data.train_batch_size",
        ),
        ("actor update (one mini-batch)", actor_mini, actor_sp, actor_micro_key, "actor_rollout_ref.actor.ppo_mini_batch_size"),
    ]
    if use_ref:
        roles.append(
            ("reference log-probs", batch, ref_sp, "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", "data.train_batch_size")
        )
    if use_critic:
        roles.append(("critic values (critic forward)", batch, critic_sp, critic_fwd_key, "data.train_batch_size"))
        roles.append(("critic update (one mini-batch)", critic_mini, critic_sp, critic_micro_key, "critic.ppo_mini_batch_size"))

    problems: list[str] = []
    fixes: dict[str, set[int]] = {}
    for role, role_batch, sp, micro_key, batch_key in roles:
        if n_gpus % sp:
            problems.append(f"{role}: {n_gpus} GPUs do not split into sequence-parallel groups of {sp}")
            continue
        dp = n_gpus // sp
        total = role_batch * n
        formula = f"{s.name(batch_key)}={role_batch} x rollout.n {n} / ({n_gpus} GPUs / sequence parallel {sp})"
        if total % dp:
            problems.append(f"{role}: {formula} is not a whole number of rows per GPU")
            continue
        per_gpu = total // dp
        micro = s.int(micro_key)
        if micro is None:
            problems.append(f"{role}: {s.name(micro_key)} is not set (VeRL asserts it is)")
            continue
        if per_gpu % micro:
            problems.append(f"{role}: {formula} = {per_gpu} rows per GPU, not divisible by {s.name(micro_key)}={micro}")
            fixes.setdefault(s.fix_key(micro_key), set()).add(per_gpu)
    if batch is not None and actor_mini and (batch % actor_mini):
        problems.append(
            f"actor update: {s.name('data.train_batch_size')}={batch} is not a multiple of "
            f"{s.name('actor_rollout_ref.actor.ppo_mini_batch_size')}={actor_mini} (VeRL's make_iterator asserts it)"
        )
    if use_critic and batch is not None and critic_mini and (batch % critic_mini):
        problems.append(
            f"critic update: {s.name('data.train_batch_size')}={batch} is not a multiple of {s.name('critic.ppo_mini_batch_size')}={critic_mini}"
        )
    if not problems:
        out.add("info", "batches", f"every micro-batch divides its rows per GPU ({n_gpus} GPUs, {len(roles)} roles)")
        return
    hints = []
    for key, per_gpu_rows in fixes.items():
        common = math.gcd(*per_gpu_rows)
        hints.append(f"set {key} to a divisor of {common} ({', '.join(map(str, _divisors(common, 64)))})")
    hints.append(
        f"or change the GPU count ({s.name('trainer.n_gpus_per_node')}) or the batch sizes so that each GPU's share is a multiple of the micro-batch"
    )
    out.add(
        "error",
        "batches",
        "VeRL would stop at its first training step (AssertionError 'data size must be divisible by ... micro_batch_size_per_gpu'):\n    "
        + "\n    ".join(problems)
        + "\n  Fix: "
        + "; ".join(hints)
        + ".",
    )


def _sp(s: Settings, key: str, engine_key: str, default: int = 1) -> int:
    top = s.int(key, 1) or 1
    return top if top > 1 else (s.int(engine_key, default) or default)


def _critic_enabled(s: Settings) -> bool:
    enabled = s.get("critic.enable")
    if enabled is not None:
        return bool(enabled)
    return s.get("algorithm.adv_estimator", "gae") == "gae"


def _ref_enabled(s: Settings) -> bool:
    return bool(s.get("algorithm.use_kl_in_reward", False)) or bool(s.get("actor_rollout_ref.actor.use_kl_loss", False))


def check_merge_step(s: Settings, merge_step: int | None, out: Preflight) -> None:
    """``ppo.merge_step`` is a step VeRL saves, and its checkpoint survives VeRL's rotation."""
    if merge_step is None:
        return
    steps = s.int("trainer.total_training_steps") or 0
    save_freq = s.int("trainer.save_freq", -1) or -1
    if merge_step > steps or (merge_step != steps and (save_freq <= 0 or merge_step % save_freq)):
        out.add(
            "error",
            "steps",
            f"ppo.merge_step={merge_step} is not a step VeRL saves ({s.name('trainer.save_freq')}={save_freq}, last step {steps}): "
            "the run would end with nothing to merge. Fix: a multiple of ppo.save_freq, at most ppo.total_training_steps.",
        )
        return
    after = planned_saves(steps, save_freq, merge_step - 1)  # merge_step's save and every later one
    for key in ("trainer.max_actor_ckpt_to_keep", "trainer.max_critic_ckpt_to_keep"):
        keep = s.int(key)
        if keep is not None and keep < after:
            out.add(
                "error",
                "steps",
                f"{s.name(key)}={keep}: VeRL keeps only the newest {keep} checkpoints, and {after - 1} more saves follow step "
                f"{merge_step}, so ppo.merge_step={merge_step}'s checkpoint would be deleted before sap merges it. "
                f"Fix: keep at least {after} (sap raises ppo.keep_checkpoints to that by itself), or null.",
            )


def check_steps(s: Settings, train_rows: int, out: Preflight) -> None:
    """``total_training_steps`` reachable within ``total_epochs``; sets ``trainer.total_epochs``."""
    batch = s.int("data.train_batch_size") or 1
    steps = s.int("trainer.total_training_steps")
    per_epoch = train_rows // batch  # VeRL's train dataloader drops the last partial batch
    if per_epoch < 1:
        out.add("error", "steps", f"{train_rows} training rows make no batch of {s.name('data.train_batch_size')}={batch}")
        return
    if steps is None:
        epochs = s.int("trainer.total_epochs", VERL_DEFAULT_TOTAL_EPOCHS)
        out.add("info", "steps", f"{epochs} epochs x {per_epoch} steps = {epochs * per_epoch} steps (trainer.total_training_steps unset)")
        return
    needed = math.ceil(steps / per_epoch)
    if s.has("trainer.total_epochs"):
        epochs = s.int("trainer.total_epochs") or 0
        if epochs < needed:
            out.add(
                "error",
                "steps",
                f"{s.name('trainer.total_training_steps')}={steps} needs {needed} epochs of {train_rows} rows // batch {batch} = "
                f"{per_epoch} steps, but ppo.verl sets trainer.total_epochs={epochs}: VeRL would stop at step {epochs * per_epoch} "
                f"with no final save or validation. Fix: trainer.total_epochs >= {needed}, fewer steps, or more training rows.",
            )
            return
    else:
        out.decided["trainer.total_epochs"] = needed
    if needed > 1:
        out.add(
            "info",
            "steps",
            f"{steps} steps at {per_epoch} steps per epoch ({train_rows} rows // batch {batch}): "
            f"trainer.total_epochs={out.decided.get('trainer.total_epochs', s.get('trainer.total_epochs'))}",
        )
    save_freq = s.int("trainer.save_freq", -1)
    if save_freq is not None and save_freq <= 0:
        out.add(
            "error",
            "steps",
            f"{s.name('trainer.save_freq')}={save_freq} saves no checkpoint, and sap merges the last one into ppo/merged. "
            "Fix: a positive ppo.save_freq (VeRL also saves at the last step).",
        )


def check_data(cfg: ExperimentConfig, out: Preflight) -> None:
    """Warn about the demo training file and about validating on the evaluation set."""
    train = Path(cfg.expand(cfg.ppo.train_data))
    demo = [REPO_ROOT / f for f in DEMO_TRAIN_FILES]
    if any(_same_file(train, d) for d in demo):
        out.add(
            "warning",
            "data",
            f"ppo.train_data={cfg.ppo.train_data} is sap's embedded demo file (600 NQ-open dev questions, data/README.md), "
            "not a training set: fine for the demo, not for the paper. Fix: point ppo.train_data at NQ train "
            "(e.g. Search-R1's nq train parquet).",
        )
    val = Path(cfg.expand(cfg.ppo.val_data))
    if _same_file(val, Path(cfg.expand(cfg.eval.dataset))):
        out.add(
            "warning",
            "data",
            f"ppo.val_data={cfg.ppo.val_data} is the evaluation set (eval.dataset): PPO's validation scores "
            "(and any checkpoint chosen by them) have seen the test questions. Search-R1 does the same; for a clean "
            "selection point ppo.val_data at a held-out dev split.",
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def wandb_login(environ: Mapping[str, str], home: Path) -> str | None:
    """Where wandb would find credentials (the order of ``wandb.sdk.lib.wbauth``), or None."""
    if environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    token_file = environ.get("WANDB_IDENTITY_TOKEN_FILE")
    if token_file and Path(token_file).expanduser().is_file():
        return f"WANDB_IDENTITY_TOKEN_FILE ({token_file})"
    path = Path(environ["NETRC"]).expanduser() if environ.get("NETRC") else home / ".netrc"
    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    if creds and creds[2]:
        return f"{path} (machine {host})"
    return None


def check_tracking(cfg: ExperimentConfig, launch: bool, environ: Mapping[str, str], home: Path, out: Preflight) -> None:
    """wandb online needs a login before any model loads."""
    t = cfg.tracking
    if t.backend != "wandb" or t.mode != "online":
        return
    found = wandb_login(environ, home)
    if found:
        out.add("info", "tracking", f"wandb online: credentials from {found}")
        return
    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    netrc_path = environ.get("NETRC") or str(home / ".netrc")
    out.add(
        "error" if launch else "warning",
        "tracking",
        f"tracking.backend=wandb with tracking.mode=online, but no W&B login: WANDB_API_KEY is unset and {netrc_path} "
        f"has no entry for {host}. VeRL's logger would fail after the models are loaded. Fix: `wandb login` "
        "(or export WANDB_API_KEY=...), or tracking.mode=offline (upload later with `wandb sync`)"
        + ("" if launch else "; a launch refuses this"),
    )


# --- checkpoints -------------------------------------------------------------------------


def safetensors_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape from the safetensors headers of a local model folder (no torch)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def find_model_dir(model_path: str, environ: Mapping[str, str], home: Path) -> Path | None:
    """A local folder, or the newest snapshot of a hub id in the Hugging Face cache."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local
    if model_path.count("/") != 1:
        return None
    hub = Path(environ.get("HF_HUB_CACHE") or Path(environ.get("HF_HOME") or home / ".cache" / "huggingface") / "hub")
    snapshots = sorted((hub / ("models--" + model_path.replace("/", "--")) / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


@dataclass
class ModelSize:
    params: int
    lora_params: int
    """LoRA parameters at the configured rank on every linear layer (0 when ``lora_rank`` is 0)."""


def model_size(shapes: Mapping[str, list[int]], lora_rank: int, value_head: bool = False) -> ModelSize:
    """Parameters of the causal LM in ``shapes``, or (``value_head``) of the critic VeRL builds from
    it (``AutoModelForTokenClassification``, one label: the LM head gives way to a ``score`` layer);
    LoRA parameters at ``lora_rank`` on every linear layer (PEFT's ``all-linear``)."""
    shapes = dict(shapes)
    if value_head:
        shapes.pop("lm_head.weight", None)
        hidden = next((shape[-1] for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), 0)
        shapes["score.weight"] = [1, hidden]
        shapes["score.bias"] = [1]
    params = sum(math.prod(shape) for shape in shapes.values())
    lora = 0
    if lora_rank > 0:
        for name, shape in shapes.items():
            if len(shape) == 2 and name.endswith(".weight") and "embed" not in name and not name.endswith("lm_head.weight"):
                lora += lora_rank * (shape[0] + shape[1])
    return ModelSize(params, lora)


DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def checkpoint_bytes(size: ModelSize, dtype: str, contents: Any, lora_only: bool) -> int:
    """One FSDP checkpoint of one model (VeRL's FSDPCheckpointManager): the model state dict in
    the training dtype (base + LoRA, or LoRA only), AdamW's two moments per trainable parameter,
    and an HF copy when ``save_contents`` has ``hf_model``."""
    width = DTYPE_BYTES.get(str(dtype).lower(), 4)
    trainable = size.lora_params or size.params
    contents = list(contents) if contents else ["model", "optimizer", "extra"]
    total = 0
    if "model" in contents:
        total += (size.lora_params if (lora_only and size.lora_params) else size.params + size.lora_params) * width
    if "optimizer" in contents:
        total += trainable * 2 * width
    if "hf_model" in contents:
        total += size.params * width
    return total


def planned_saves(total_steps: int, save_freq: int, start_step: int) -> int:
    """How many saves this run makes: every ``save_freq`` steps and the last step."""
    if save_freq <= 0 or total_steps <= start_step:
        return 0
    steps = {s for s in range(start_step + 1, total_steps + 1) if s % save_freq == 0} | {total_steps}
    return len(steps)


def peak_kept(saves: int, keep: int | None) -> int:
    """Checkpoints on disk at once: VeRL deletes the oldest before a save (keep >= 2) or after it (keep 1)."""
    if keep is None or keep <= 0:
        return saves
    return min(saves, max(keep, 2))


def resume_step(checkpoints: Path) -> int:
    marker = checkpoints / "latest_checkpointed_iteration.txt"
    try:
        return int(marker.read_text().strip())
    except (OSError, ValueError):
        return 0


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_checkpoints(
    s: Settings,
    model_path: str,
    checkpoints: Path,
    launch: bool,
    environ: Mapping[str, str],
    home: Path,
    out: Preflight,
    disk_free: Callable[[Path], int] = free_bytes,
) -> None:
    """Disk for the checkpoints kept at once against free disk in the checkpoint folder."""
    steps = s.int("trainer.total_training_steps") or 0
    save_freq = s.int("trainer.save_freq", -1) or -1
    start = resume_step(checkpoints) if s.get("trainer.resume_mode", "auto") != "disable" else 0
    saves = planned_saves(steps, save_freq, start)
    if saves == 0:
        return
    keep_actor = s.int("trainer.max_actor_ckpt_to_keep")
    keep_critic = s.int("trainer.max_critic_ckpt_to_keep")
    model_dir = find_model_dir(model_path, environ, home)
    shapes = safetensors_shapes(model_dir) if model_dir else None
    if shapes is None:
        out.add(
            "warning" if launch else "info",
            "checkpoints",
            f"cannot size the checkpoints: no safetensors for {model_path} here (each save keeps actor and critic weights and "
            "optimizer states: ~12 bytes per parameter each, ~74 GB for a 3B actor + critic)",
        )
        return
    actor = model_size(shapes, s.int("actor_rollout_ref.model.lora_rank", 0) or 0)
    actor_bytes = checkpoint_bytes(
        actor,
        s.get("actor_rollout_ref.actor.fsdp_config.model_dtype", "fp32"),
        s.get("actor_rollout_ref.actor.checkpoint.save_contents"),
        bool(s.get("actor_rollout_ref.actor.checkpoint.save_lora_only", False)),
    )
    need = peak_kept(saves, keep_actor) * actor_bytes
    parts = [f"actor {_gb(actor_bytes)} x {peak_kept(saves, keep_actor)}"]
    if _critic_enabled(s):
        critic = model_size(shapes, s.int("critic.model.lora_rank", 0) or 0, value_head=True)
        critic_bytes = checkpoint_bytes(
            critic,
            s.get("critic.fsdp.model_dtype", "fp32"),
            s.get("critic.checkpoint.save_contents"),
            bool(s.get("critic.checkpoint.save_lora_only", False)),
        )
        need += peak_kept(saves, keep_critic) * critic_bytes
        parts.append(f"critic {_gb(critic_bytes)} x {peak_kept(saves, keep_critic)}")
    free = disk_free(checkpoints)
    existing = [p for p in checkpoints.glob("global_step_*") if p.is_dir()] if checkpoints.is_dir() else []
    summary = (
        f"{saves} saves (every {save_freq} steps and the last; keep {keep_actor if keep_actor else 'all'}): "
        f"{' + '.join(parts)} = {_gb(need)} at most, {_gb(free)} free in {checkpoints}"
    )
    if existing:
        summary += (
            f"; {len(existing)} checkpoint(s) from an earlier run are already there and VeRL only rotates what the "
            "current process saved: delete old global_step_* folders you do not need"
        )
    if need > free:
        out.add(
            "error" if launch else "warning",
            "checkpoints",
            f"not enough disk: {summary}. Fix: free disk, fewer kept checkpoints (ppo.keep_checkpoints), a larger "
            "ppo.save_freq, or run_root on a bigger disk" + ("" if launch else "; a launch refuses this"),
        )
    else:
        out.add("info", "checkpoints", summary)


# --- LoRA ----------------------------------------------------------------------------------


def check_lora(s: Settings, out: Preflight) -> None:
    """A LoRA critic that VeRL can build and whose value head trains; the actor's LoRA learning rate."""
    critic_rank = s.int("critic.model.lora_rank", 0) or 0
    if _critic_enabled(s) and critic_rank > 0:
        adapter = s.get("critic.model.lora_adapter_path")
        if not adapter:
            out.add(
                "error",
                "lora",
                f"LoRA critic (critic.model.lora_rank={critic_rank}) with no initial adapter: VeRL 0.9.1 wraps the value model "
                "(AutoModelForTokenClassification) as a PEFT CAUSAL_LM model, which fails at start-up (AttributeError: "
                "'prepare_inputs_for_generation', peft 0.21) and, where it builds, leaves the value head ('score') trainable "
                "only as a LoRA target. Fix: keep sap's critic.model.lora_adapter_path (ppo/critic_lora_init: a TOKEN_CLS adapter "
                "with the head in modules_to_save, written at launch), or ppo.verl['critic.model.lora_rank']=0 (full critic).",
            )
        else:
            problem = _adapter_problem(Path(str(adapter)))
            if problem:
                out.add("error", "lora", f"critic.model.lora_adapter_path={adapter}: {problem}")
            else:
                out.add("info", "lora", f"LoRA critic from a TOKEN_CLS adapter ({adapter}): the value head ('score') trains whole")
    actor_rank = s.int("actor_rollout_ref.model.lora_rank", 0) or 0
    lr = s.get("actor_rollout_ref.actor.optim.lr")
    if actor_rank > 0 and lr is not None and float(lr) < LORA_ACTOR_LR / 2:
        out.add(
            "warning",
            "lora",
            f"{s.name('actor_rollout_ref.actor.optim.lr')}={float(lr):g} with LoRA (rank {actor_rank}): {FULL_FT_ACTOR_LR:g} is the "
            f"paper's full fine-tuning rate, and LoRA adapters usually need ~10x more (VeRL's LoRA guide). "
            f"Fix: remove ppo.actor_lr (LoRA default {LORA_ACTOR_LR:g}) or set it deliberately.",
        )


def _adapter_problem(adapter: Path) -> str | None:
    """What is wrong with an existing critic adapter (None: fine, or not written yet)."""
    config = adapter / "adapter_config.json"
    if not config.is_file():
        return None if adapter.name == CRITIC_ADAPTER_DIR else "no adapter_config.json there"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable adapter_config.json ({e})"
    saved = data.get("modules_to_save") or []
    if data.get("task_type") != "TOKEN_CLS" or not any(n in VALUE_HEAD_NAMES for n in saved):
        return (
            f"task_type {data.get('task_type')!r}, modules_to_save {saved!r}: the value head would not train as a whole. "
            "Fix: a TOKEN_CLS adapter with 'score' in modules_to_save (delete the folder: sap writes one at launch)"
        )
    return None


# --- entry points -------------------------------------------------------------------------


def preflight(
    cfg: ExperimentConfig,
    settings: Mapping[str, Any],
    train_rows: int,
    *,
    model_path: str,
    checkpoints: Path,
    launch: bool,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    disk_free: Callable[[Path], int] = free_bytes,
) -> Preflight:
    """Every check; nothing raised here (see :func:`apply`)."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    s = Settings(settings, cfg.ppo.verl)
    out = Preflight()
    check_batches(s, out)
    check_steps(s, train_rows, out)
    check_merge_step(s, cfg.ppo.merge_step, out)
    check_data(cfg, out)
    check_tracking(cfg, launch, environ, home, out)
    check_checkpoints(Settings({**s.values, **out.decided}, cfg.ppo.verl), model_path, checkpoints, launch, environ, home, out, disk_free)
    check_lora(s, out)
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def apply(cfg: ExperimentConfig, plan: _Plan, train_rows: int, *, launch: bool, warn: Callable[[str], None] = _stderr) -> Preflight:
    """Run the preflight for ``plan``: raise :class:`PreflightFailed` listing every error, print
    the warnings, and add the settings it decided (``trainer.total_epochs``) to ``plan.settings``."""
    result = preflight(cfg, plan.settings, train_rows, model_path=plan.model_path, checkpoints=plan.checkpoints, launch=launch)
    for w in result.warnings:
        warn(f"warning: preflight {w}")
    if result.errors:
        raise PreflightFailed(
            f"preflight: {len(result.errors)} problem(s) the GPU run would hit (config: {cfg.experiment}):\n"
            + "\n".join(f"- {e}" for e in result.errors)
        )
    plan.settings.update(result.decided)
    return result
