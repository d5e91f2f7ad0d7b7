"""Chat-template consistency between SFT and eval/rollouts.

SFT formats each sample with a LLaMA-Factory template (``model.chat_template``); eval and VeRL
render the prompt with the tokenizer's own chat template (``sap.agent.loop.prompt_ids``: one user
turn, generation prompt added). When the two differ, the model is trained on one prompt and tested
on another (e.g. the ``qwen`` template adds Qwen's system prompt to a SmolLM2 model).

:func:`check_chat_template` renders one prepared sample both ways and compares the prompt tokens:

- LLaMA-Factory's side runs in the SFT environment (``.venv-sft``), through LLaMA-Factory's own
  code: its tokenizer loader, ``get_template_and_fix_tokenizer``, the Alpaca converter with the
  dataset's column mapping, and ``encode_multiturn`` as its supervised processor calls it;
- the eval side runs here, with the tokenizer's ``apply_chat_template`` as eval and VeRL call it.

It raises :class:`TemplateMismatch` naming both renderings when the tokens differ.
``python -m sap.models.template_check`` is the SFT-environment half (it imports LLaMA-Factory,
the standard library and ``sap.rules`` there).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap.rules.errors import SapError
from sap.rules.records import read_records

AUTO = "auto"
#: LLaMA-Factory arguments that change how a sample is templated (passed to the SFT-side half).
TEMPLATE_KEYS = ("template", "default_system", "tool_format", "enable_thinking", "trust_remote_code")


class TemplateMismatch(SapError):
    """SFT's template and the tokenizer's chat template render different prompt tokens."""


def template_arg(chat_template: str) -> dict[str, str]:
    """The LLaMA-Factory ``template`` argument for ``model.chat_template``: ``auto`` leaves it out,
    and LLaMA-Factory then derives the template from the tokenizer's chat template."""
    return {} if chat_template == AUTO else {"template": chat_template}


@dataclass(frozen=True)
class Rendering:
    ids: list[int]
    text: str


@dataclass(frozen=True)
class TemplateCheck:
    """Both renderings of one sample's prompt; ``template`` is LLaMA-Factory's name for it."""

    template: str
    sample: int
    user_content: str
    sft: Rendering
    eval: Rendering

    @property
    def matches(self) -> bool:
        return self.sft.ids == self.eval.ids


# --- the SFT-environment half ---------------------------------------------------------------


def render_llamafactory(
    model: str, dataset_dir: str, dataset: str, args: dict[str, Any], index: int = 0, dataset_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run inside the LLaMA-Factory environment: the prompt ids of sample ``index`` exactly as
    LLaMA-Factory's supervised preprocessing builds them. ``dataset_info`` (the entry train-sft
    writes) is used instead of the folder's ``dataset_info.json`` when given."""
    if dataset_info is not None:
        with tempfile.TemporaryDirectory(prefix="sap-template-check.") as tmp:
            for entry in dataset_info.values():
                src = Path(dataset_dir).resolve() / entry["file_name"]
                (Path(tmp) / entry["file_name"]).symlink_to(src)
            (Path(tmp) / "dataset_info.json").write_text(json.dumps(dataset_info))
            return render_llamafactory(model, tmp, dataset, args, index)
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    model_args = ModelArguments(model_name_or_path=model, trust_remote_code=bool(args.get("trust_remote_code", False)))
    data_kwargs = {k: args[k] for k in ("template", "default_system", "tool_format", "enable_thinking") if k in args}
    data_args = DataArguments(dataset=dataset, dataset_dir=dataset_dir, **data_kwargs)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    attr = get_dataset_list([dataset], dataset_dir)[0]
    data_file = Path(dataset_dir) / attr.dataset_name
    records = [r for _, r in read_records(data_file, ValueError)]
    if not records:
        raise SystemExit(f"{data_file}: no samples")
    example = records[min(index, len(records) - 1)]
    for col in ("system", "tools", "images", "videos", "audios", "history", "kto_tag", "chosen", "rejected"):
        if getattr(attr, col, None) and getattr(attr, col) not in example:
            example[getattr(attr, col)] = None
    converted = get_dataset_converter(attr.formatting, attr, data_args)(example)
    prompt, response = converted["_prompt"], converted["_response"]
    pairs = template.encode_multiturn(tokenizer, prompt + response, converted["_system"] or None, converted["_tools"] or None)
    prompt_ids = pairs[0][0]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return {
        "template": args.get("template") or "(derived from the tokenizer)",
        "ids": [int(i) for i in prompt_ids],
        "text": tokenizer.decode(prompt_ids, skip_special_tokens=False),
        "user_content": users[-1] if users else "",
        "turns": len(pairs),
    }


# --- the eval side and the comparison ------------------------------------------------------


def render_eval(model: str | Path, user_content: str) -> Rendering:
    """The prompt as ``sap eval`` and the VeRL agent loop build it: the tokenizer's chat template
    over one user turn, generation prompt added (``sap.agent.loop.prompt_ids``)."""
    from transformers import AutoTokenizer

    from sap.agent.loop import chat_ids, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if not tokenizer.chat_template:
        raise TemplateMismatch(
            f"{model}: the tokenizer has no chat template; eval and VeRL need one (tokenizer_config.json or chat_template.jinja)"
        )
    # prompt_ids builds the user turn from a question; the sample carries its user text already
    ids = chat_ids(tokenizer, [{"role": "user", "content": user_content}]) if user_content else prompt_ids(tokenizer, "")
    return Rendering(ids, tokenizer.decode(ids, skip_special_tokens=False))


def check_chat_template(
    sft_python: str | Path,
    model: str | Path,
    dataset_dir: str | Path,
    dataset: str,
    train_args: dict[str, Any],
    *,
    sample: int = 0,
    dataset_info: dict[str, Any] | None = None,
    timeout_s: float = 900,
) -> TemplateCheck:
    """Render prepared sample ``sample`` with LLaMA-Factory (in ``sft_python``, through
    :func:`sap.envs.run`) and with the tokenizer; raise :class:`TemplateMismatch` naming both
    renderings when the prompt tokens differ."""
    from sap import envs
    from sap.rules.errors import RunFailed

    args = {k: train_args[k] for k in TEMPLATE_KEYS if k in train_args}
    request = {"model": str(model), "dataset_dir": str(dataset_dir), "dataset": dataset, "args": args, "index": sample}
    if dataset_info is not None:
        request["dataset_info"] = dataset_info
    with tempfile.TemporaryDirectory(prefix="sap-template-check.") as tmp:
        request_file = Path(tmp) / "request.json"
        request_file.write_text(json.dumps(request))
        try:
            done = envs.run(
                [sft_python, "-m", "sap.models.template_check", request_file],
                env=envs.child_env(sft_python),
                timeout_s=timeout_s,
                what="the chat-template check (LLaMA-Factory side)",
            )
        except RunFailed as e:
            raise TemplateMismatch(
                f"LLaMA-Factory could not render sample {sample} of {dataset_dir} with template {args.get('template', AUTO)!r} "
                f"(model.chat_template): {e}"
            ) from None
    out = done.result()
    sft = Rendering(out["ids"], out["text"])
    evaluated = render_eval(model, out["user_content"])
    result = TemplateCheck(out["template"], sample, out["user_content"], sft, evaluated)
    if not result.matches:
        raise TemplateMismatch(mismatch_message(result, args.get("template", AUTO)))
    return result


def template_args(cfg) -> dict[str, Any]:
    """The LLaMA-Factory arguments of an experiment config that change how samples are templated."""
    passed = {k: v for k, v in cfg.sft.llamafactory.items() if k in TEMPLATE_KEYS}
    return {**template_arg(cfg.model.chat_template), **passed}


def ensure_same_prompt(
    cfg, model: str | Path, data_dir: str | Path, sft_python: str | Path, echo: Callable[[str], None] | None = None
) -> TemplateCheck:
    """train-sft's pre-training check (one call in ``sap.stages.sft.checks.run_checks``):
    :func:`check_chat_template` on the first prepared sample, with the config's template."""
    from sap.stages.prepare_sft import DATASET_NAME, dataset_info

    say = echo or (lambda m: print(m, file=sys.stderr))
    say("checking that SFT and eval render the same prompt (LLaMA-Factory's template vs the tokenizer's chat template)")
    result = check_chat_template(sft_python, model, data_dir, DATASET_NAME, template_args(cfg), dataset_info=dataset_info())
    say(f"chat template ok: {result.template}: sample {result.sample} renders to the same {len(result.sft.ids)} prompt tokens both ways")
    return result


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def mismatch_message(check: TemplateCheck, configured: str, context: int = 400) -> str:
    i = _first_difference(check.sft.ids, check.eval.ids)
    user_at = max(check.sft.text.find(check.user_content[:40]), 0) if check.user_content else len(check.sft.text)
    eval_at = max(check.eval.text.find(check.user_content[:40]), 0) if check.user_content else len(check.eval.text)

    def show(text: str, user_at: int) -> str:
        # the template's frame around the sample's text: what differs is there, not in the question
        head = text[: min(user_at, context)]
        tail = text[user_at + len(check.user_content) :][-context:] if check.user_content and check.user_content in text else ""
        return repr(head + ("<user text>" if check.user_content else "") + tail)

    return (
        f"chat templates differ: SFT would train on a prompt that eval and VeRL never show the model.\n"
        f"  SFT (LLaMA-Factory template {check.template!r}, model.chat_template={configured!r}), {len(check.sft.ids)} tokens:\n"
        f"    {show(check.sft.text, user_at)}\n"
        f"  eval/VeRL (the tokenizer's chat template), {len(check.eval.ids)} tokens:\n"
        f"    {show(check.eval.text, eval_at)}\n"
        f"  first different token at position {i} (sample {check.sample} of the prepared data).\n"
        f"Fix: set model.chat_template=auto (LLaMA-Factory derives the template from the tokenizer), or the LLaMA-Factory "
        f"template made for this model; a differing default system prompt can be set with sft.llamafactory.default_system."
    )


def _main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out = render_llamafactory(
        request["model"], request["dataset_dir"], request["dataset"], request["args"], request.get("index", 0), request.get("dataset_info")
    )
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
