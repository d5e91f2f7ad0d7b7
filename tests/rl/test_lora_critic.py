"""The LoRA critic: VeRL 0.9.1 builds it, and its value head trains.

VeRL's critic (``FSDPEngineWithValueHead``) loads ``AutoModelForTokenClassification`` with one
label (``verl.utils.model.load_valuehead_model``: the LM head gives way to a randomly initialised
``score`` layer) and, with ``lora_rank`` > 0, wraps it in ``FSDPEngineWithLMHead._build_lora_module``:
PEFT ``task_type=CAUSAL_LM``, no ``modules_to_save``. These tests call VeRL's own
``_build_lora_module`` with the critic's ``HFModelConfig`` as ``sap train-ppo`` composes it, on the
tiny model, and list the trainable parameters:

- VeRL's own wrapping fails (``AttributeError: prepare_inputs_for_generation``), and the preflight
  refuses that configuration;
- sap's: an initial TOKEN_CLS adapter (``sap.rl.critic_adapter``, written by
  ``ensure_critic_adapter`` as at launch) that VeRL loads through ``lora_adapter_path``: the whole
  head trains (``modules_to_save``), LoRA on the other linear layers, the base frozen; a
  forward/backward pass reaches the head.

Only the attention implementation differs from VeRL's loader (``sdpa``: flash-attn needs CUDA),
which changes no parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sap.stages import ppo_preflight as pf
from sap.stages import train_ppo as stage

from .conftest import small_config

pytestmark = [pytest.mark.rl_env]


def value_model(cfg, plan):
    """VeRL's LoRA critic for this plan: the value model as VeRL loads it, then VeRL's own PEFT wrapping."""
    import torch
    from transformers import AutoModelForTokenClassification
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from sap.rl.compose import compose

    model_config = omega_conf_to_dataclass(compose(plan.overrides).critic.model)  # VeRL's HFModelConfig
    hf_config = model_config.hf_config
    # as FSDPEngineWithLMHead._build_module does for model_type "value_model"
    hf_config.num_labels = 1
    hf_config.classifier_dropout = 0.0
    module = AutoModelForTokenClassification.from_pretrained(
        model_config.local_path, torch_dtype=torch.float32, config=hf_config, attn_implementation="sdpa"
    )
    assert hasattr(module, "score") and module.score.out_features == 1
    return FSDPEngineWithLMHead._build_lora_module(SimpleNamespace(model_config=model_config), module)


def preflight(cfg, plan, tmp_path: Path) -> pf.Preflight:
    return pf.preflight(cfg, plan.settings, 4, model_path=plan.model_path, checkpoints=tmp_path / "ckpt", launch=False)


def test_verl_own_lora_critic_fails_and_the_preflight_refuses_it(tmp_path: Path, tiny_model: Path):
    cfg = small_config(tmp_path, tiny_model, "http://127.0.0.1:9", "ppo.lora_rank=8", "ppo.verl={critic.model.lora_adapter_path: null}")
    plan = stage.plan(cfg, "base")
    with pytest.raises(AttributeError, match="prepare_inputs_for_generation"):
        value_model(cfg, plan)
    [err] = [f for f in preflight(cfg, plan, tmp_path).errors if f.check == "lora"]
    assert "prepare_inputs_for_generation" in err.message


def test_sap_lora_critic_trains_its_value_head(tmp_path: Path, tiny_model: Path):
    import torch

    cfg = small_config(tmp_path, tiny_model, "http://127.0.0.1:9", "ppo.lora_rank=8", "ppo.lora_alpha=16")
    plan = stage.plan(cfg, "base")
    assert not preflight(cfg, plan, tmp_path).errors  # adapter not written yet: written at launch
    adapter = stage.ensure_critic_adapter(sys.executable, plan, tmp_path / "train.log")
    assert adapter == (plan.ppo_dir / "critic_lora_init").resolve() and (adapter / "adapter_config.json").is_file()
    assert not preflight(cfg, plan, tmp_path).errors  # and the written one passes the adapter check

    peft_model = value_model(cfg, plan)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if ".score." in n]
    assert sorted(head) == ["base_model.model.score.modules_to_save.default.bias", "base_model.model.score.modules_to_save.default.weight"]
    assert all("lora_" in n for n in trainable if n not in head) and len(trainable) > len(head)  # LoRA elsewhere, base frozen
    assert peft_model.peft_config["default"].r == 8
    ids = torch.randint(0, 100, (2, 12))
    # the keyword arguments VeRL's critic forward passes
    out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(12).expand(2, 12), use_cache=False)
    assert out.logits.shape == (2, 12, 1)
    out.logits.sum().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if n in head}
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
