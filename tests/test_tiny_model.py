from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_tiny_model_is_a_qwen2_with_chatml(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sap.tiny_model import DEFAULT_SYSTEM

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert tok.decode(tok("<search> who? </search>\n\n<information>").input_ids) == "<search> who? </search>\n\n<information>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)
