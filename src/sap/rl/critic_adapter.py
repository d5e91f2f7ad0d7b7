"""The initial LoRA adapter of a LoRA critic, so that VeRL 0.9.1 can build it and its value head trains.

Run in the RL environment by ``sap train-ppo`` before a launch with ``ppo.lora_rank`` > 0 and a
critic (``critic.model.lora_adapter_path`` points here)::

    python -m sap.rl.critic_adapter --model MODEL --rank 8 --alpha 32 --out ppo/critic_lora_init

Why: VeRL builds the critic as ``AutoModelForTokenClassification`` with one label (the LM head
gives way to a randomly initialised ``score`` layer) and, for LoRA, wraps it with PEFT
``task_type=CAUSAL_LM`` and no ``modules_to_save``
(``FSDPEngineWithLMHead._build_lora_module``). With peft 0.21 that fails at start-up
(``PeftModelForCausalLM`` reads ``prepare_inputs_for_generation``, which a token-classification
model does not have); and if it built, the head would train only as a LoRA target. Given
``lora_adapter_path``, VeRL instead loads the adapter with ``PeftModel.from_pretrained(...,
is_trainable=True)``, which takes the adapter's own task type: a ``TOKEN_CLS`` adapter gives
``PeftModelForTokenClassification``, whose ``modules_to_save`` holds the whole ``score`` layer
(trainable), with LoRA on every other linear layer. The adapter written here is PEFT's fresh
initialisation (``lora_B`` = 0: the critic starts as the base model plus a new head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VALUE_HEAD = "score"


def write_critic_adapter(model: str, out: Path, rank: int, alpha: int) -> list[str]:
    """Write a TOKEN_CLS LoRA adapter for ``model``'s value model to ``out``; returns the
    trainable parameter names of the value head."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(model)
    config.num_labels = 1  # as VeRL's critic loader
    config.classifier_dropout = 0.0
    base = AutoModelForTokenClassification.from_pretrained(model, config=config, torch_dtype=torch.bfloat16)
    lora = LoraConfig(
        task_type=TaskType.TOKEN_CLS,  # modules_to_save: the value head, fully trainable
        r=rank,
        lora_alpha=alpha,
        target_modules="all-linear",
        exclude_modules=[VALUE_HEAD],  # the head is saved whole, not LoRA-adapted
        bias="none",
    )
    peft_model = get_peft_model(base, lora)
    head = [n for n, p in peft_model.named_parameters() if p.requires_grad and f".{VALUE_HEAD}." in n]
    if not head:
        raise RuntimeError(f"{model}: the value model has no trainable '{VALUE_HEAD}' layer after PEFT wrapping")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    peft_model.save_pretrained(str(tmp))
    tmp.replace(out)
    return head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sap.rl.critic_adapter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rank", required=True, type=int)
    ap.add_argument("--alpha", required=True, type=int)
    args = ap.parse_args(argv)
    head = write_critic_adapter(args.model, args.out, args.rank, args.alpha)
    print(json.dumps({"adapter": str(args.out), "trainable_head": head}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
