"""The LLaMA-Factory arguments sap writes (``llamafactory_train.yaml``, the export YAML and the
DeepSpeed presets), rendered from the experiment config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sap.models.template_check import template_arg
from sap.rules.atomic import atomic_write_json
from sap.rules.config import ExperimentConfig
from sap.stages.prepare_sft import DATASET_NAME
from sap.stages.sft.paths import SFTError, SFTPaths

_PRECISION_KEYS = {"fp16": {"fp16": True, "bf16": False}, "bf16": {"fp16": False, "bf16": True}, "fp32": {"fp16": False, "bf16": False}}
_REPORT_TO = {"none": "none", "wandb": "wandb", "tensorboard": "tensorboard"}


def deepspeed_config(stage: int, offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed ZeRO config whose batch and precision values are left to the HF Trainer ("auto")."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage >= 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=5e8, reduce_scatter=True, reduce_bucket_size=5e8)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto", sub_group_size=1e9)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


_DEEPSPEED_PRESETS = {"z0": (0, False), "z2": (2, False), "z2_offload": (2, True), "z3": (3, False), "z3_offload": (3, True)}


def resolve_deepspeed(value: str | None, sft_dir: Path) -> Path | None:
    """``sft.deepspeed``: a preset name (z0, z2, z2_offload, z3, z3_offload), written to
    ``sft/deepspeed.json``, or the path of a DeepSpeed JSON file."""
    if not value:
        return None
    if value in _DEEPSPEED_PRESETS:
        path = sft_dir / "deepspeed.json"
        atomic_write_json(path, deepspeed_config(*_DEEPSPEED_PRESETS[value]))
        return path
    p = Path(value).expanduser()
    if not p.is_file():
        raise SFTError(f"sft.deepspeed {value!r}: no such file, and not one of {', '.join(_DEEPSPEED_PRESETS)}")
    return p.resolve()


def train_args(cfg: ExperimentConfig, model: Path, paths: SFTPaths, deepspeed: Path | None = None) -> dict[str, Any]:
    """The LLaMA-Factory training arguments: the paper's recipe from ``cfg.sft``, then the
    ``sft.llamafactory`` pass-through (only keys no typed field owns: ``LLAMAFACTORY_OWNED``)."""
    s = cfg.sft
    args: dict[str, Any] = {
        "model_name_or_path": str(model),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": s.lora.rank,
        "lora_alpha": s.lora.alpha,
        "lora_dropout": s.lora.dropout,
        "lora_target": s.lora.target,
        "dataset": DATASET_NAME,
        "dataset_dir": str(paths.data_dir),
        **template_arg(cfg.model.chat_template),
        "cutoff_len": s.cutoff_len,
        "overwrite_cache": True,
        "output_dir": str(paths.adapter),
        "logging_steps": s.logging_steps,
        "save_steps": s.save_steps,
        "plot_loss": False,
        "per_device_train_batch_size": s.per_device_train_batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "learning_rate": s.learning_rate,
        "num_train_epochs": s.num_train_epochs,
        "lr_scheduler_type": s.lr_scheduler_type,
        "warmup_ratio": s.warmup_ratio,
        **_PRECISION_KEYS[s.precision],
        "seed": cfg.seed,
        "report_to": _REPORT_TO[cfg.tracking.backend],
        "run_name": f"{cfg.experiment}-sft",
    }
    if s.max_steps is not None:
        args["max_steps"] = s.max_steps
    if deepspeed is not None:
        args["deepspeed"] = str(deepspeed)
    args.update(s.llamafactory)  # keys the config owns were refused when it was loaded (LLAMAFACTORY_OWNED)
    return args


def export_args(train: dict[str, Any], paths: SFTPaths, out_dir: Path) -> dict[str, Any]:
    """``llamafactory-cli export`` arguments: the base model plus the adapter, merged on CPU."""
    lora = train.get("finetuning_type", "lora") == "lora"
    args: dict[str, Any] = {
        "model_name_or_path": train["model_name_or_path"] if lora else str(paths.adapter),
        **({"template": train["template"]} if "template" in train else {}),
        "finetuning_type": train.get("finetuning_type", "lora"),
        "trust_remote_code": train.get("trust_remote_code", False),
        "export_dir": str(out_dir),
        "export_size": 5,
        "export_device": "cpu",
        "export_legacy_format": False,
    }
    if lora:
        args["adapter_name_or_path"] = str(paths.adapter)
    return args
