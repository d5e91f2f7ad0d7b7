"""The chat-template check of train-sft: LLaMA-Factory's rendering (in .venv-sft, through its
own code) against the tokenizer's chat template as eval and VeRL use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap.models.template_check import TemplateMismatch, check_chat_template, template_arg
from sap.rules.prompts import build_prompt
from sap.stages.prepare_sft import DATA_FILE, DATASET_INFO_FILE, DATASET_NAME, dataset_info

REPO = Path(__file__).resolve().parents[1]


def sft_python() -> Path:
    python = REPO / ".venv-sft" / "bin" / "python"
    if not python.is_file():
        pytest.fail("the SFT environment .venv-sft is missing: `make setup-sft` (make test creates it)")
    return python


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sft-data")
    record = {"instruction": build_prompt("who wrote hamlet"), "input": "", "output": "<answer> William Shakespeare </answer>"}
    (data / DATA_FILE).write_text(json.dumps([record]))
    (data / DATASET_INFO_FILE).write_text(json.dumps(dataset_info()))
    return data


def test_auto_leaves_the_template_to_the_tokenizer():
    assert template_arg("auto") == {}
    assert template_arg("smollm2") == {"template": "smollm2"}


@pytest.mark.sft_env
@pytest.mark.slow
def test_matched_pair_is_accepted(tiny_model, prepared):
    # the tiny model's ChatML template adds Qwen's default system prompt, like LLaMA-Factory's qwen
    result = check_chat_template(sft_python(), tiny_model, prepared, DATASET_NAME, {"template": "qwen"})
    assert result.matches and result.sft.ids == result.eval.ids
    assert "You are Qwen" in result.eval.text and "who wrote hamlet" in result.user_content
    derived = check_chat_template(sft_python(), tiny_model, prepared, DATASET_NAME, {})  # model.chat_template: auto
    assert derived.sft.ids == result.sft.ids


@pytest.mark.sft_env
@pytest.mark.slow
def test_mismatched_pair_is_refused_naming_both_renderings(tiny_model, prepared):
    with pytest.raises(TemplateMismatch) as err:
        check_chat_template(sft_python(), tiny_model, prepared, DATASET_NAME, {"template": "smollm2"})
    message = str(err.value)
    assert "'smollm2'" in message
    assert "named SmolLM, trained by Hugging Face." in message  # LLaMA-Factory's rendering
    assert "You are Qwen, created by Alibaba Cloud" in message  # the tokenizer's rendering
    assert "model.chat_template=auto" in message
