"""Compose and validate the full VeRL PPO config, the way ``verl.trainer.main_ppo`` does.

Run in the RL environment by ``sap train-ppo`` (also for ``--dry-run``)::

    python -m sap.rl.compose --overrides overrides.json --out verl_config.yaml

It composes VeRL's own ``ppo_trainer`` Hydra config with the overrides, runs VeRL's
``validate_config`` (batch sizes against GPUs, micro batches, critic, LoRA rank, ...), then
checks what VeRL would only find at run time: the reward function loads from its path and the
agent-loop file names an importable agent loop class for the default agent. Exit 0 and the
resolved config in ``--out``, or exit 1 with VeRL's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compose(overrides: list[str]):
    """The VeRL PPO config composed from VeRL's Hydra files and ``overrides``."""
    import verl.trainer.main_ppo as main_ppo
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = str(Path(main_ppo.__file__).parent / "config")
    GlobalHydra.instance().clear()
    # hydra.* overrides steer the launcher only; compose() rejects them
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=plain)


#: vLLM's largest LoRA rank (``vllm.config.lora.MaxLoRARanks``, VeRL's fallback list).
MAX_VLLM_LORA_RANK = 512


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True


def validate(config) -> list[str]:
    """VeRL's own checks plus sap's load checks; returns notes about what was checked."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    use_critic = need_critic(config)
    use_ref = need_reference_policy(config)
    notes = [f"critic: {use_critic}", f"reference policy: {use_ref}", f"adv_estimator: {config.algorithm.adv_estimator}"]
    checked = config
    lora_rank = int(config.actor_rollout_ref.model.get("lora_rank", 0) or 0)
    if lora_rank > 0 and config.actor_rollout_ref.rollout.name == "vllm" and not _installed("vllm"):
        # VeRL checks the LoRA rank against vLLM's allowed ranks by importing its vLLM rollout,
        # which needs vllm (GPU nodes only). Here: the same limit, then VeRL's other checks.
        if lora_rank > MAX_VLLM_LORA_RANK:
            raise ValueError(f"lora_rank must be less than or equal to {MAX_VLLM_LORA_RANK}, but got {lora_rank}")
        checked = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        checked.actor_rollout_ref.rollout.name = "vllm-not-installed"
        notes.append(f"lora_rank {lora_rank} <= {MAX_VLLM_LORA_RANK} (vllm not installed here: VeRL's vLLM LoRA check skipped)")
    validate_config(config=checked, use_reference_policy=use_ref, use_critic=use_critic)

    if get_custom_reward_fn(config) is None:
        raise ValueError("reward.custom_reward_function.path is not set")
    notes.append(f"reward function: {config.reward.custom_reward_function.path}:{config.reward.custom_reward_function.name}")

    agent = config.actor_rollout_ref.rollout.agent
    path = agent.agent_loop_config_path
    if not path or not Path(path).is_file():
        raise ValueError(f"agent loop config not found: {path}")
    entries = {e["name"]: e for e in OmegaConf.load(path)}
    if agent.default_agent_loop not in entries:
        raise ValueError(f"{path}: no agent loop named {agent.default_agent_loop!r} (found {sorted(entries)})")
    get_class(entries[agent.default_agent_loop]["_target_"])
    notes.append(f"agent loop: {agent.default_agent_loop} -> {entries[agent.default_agent_loop]['_target_']}")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sap.rl.compose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--overrides", required=True, help="JSON list of Hydra overrides")
    ap.add_argument("--out", required=True, help="where to write the resolved config (YAML)")
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    from sap.rules.atomic import atomic_write_text

    overrides = json.loads(Path(args.overrides).read_text(encoding="utf-8"))
    try:
        config = compose(overrides)
        notes = validate(config)
    except Exception as e:  # VeRL raises AssertionError/ValueError/hydra errors: report them all
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    atomic_write_text(args.out, OmegaConf.to_yaml(config))
    print("VeRL config valid (" + "; ".join(notes) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
