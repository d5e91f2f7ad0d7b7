"""Build a tiny Qwen2-architecture policy locally (nothing downloaded).

The model has random weights and a byte-level BPE tokenizer trained with ``tokenizers`` on
the given texts, wrapped as a real ``Qwen2Tokenizer`` with the ChatML special tokens and a
ChatML chat template that, like Qwen2.5-Instruct's, adds the default system prompt when the
chat has none. LLaMA-Factory's ``qwen`` template, vLLM and VeRL therefore treat it like the
real model. Used by the tests (session fixtures) and by the demo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    """head_dim = hidden_size / heads = 32: vLLM's CPU attention needs a head_dim of 32 or more."""
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    seed: int = 0
    embedding_std: float | None = None
    """Std of the (tied) embedding init (None: the HF default, 0.02). With 0.02 a 64-wide model's
    logits stay within about +-1 after the final RMSNorm, a near-uniform softmax that LoRA can
    barely sharpen; the demo's model uses 0.2 so that its LoRA SFT visibly learns."""


def protocol_texts(questions: Iterable[str], passages: Iterable[tuple[str, str]], answers: Iterable[str]) -> list[str]:
    """Text for the tiny tokenizer: Search-R1 prompts, tagged steps, observation blocks and
    answers, so that the protocol's strings get compact tokens. ``passages`` are (title, text)."""
    from sap.rules.prompts import INVALID_ACTION_MESSAGE, build_prompt, information_block

    texts = [INVALID_ACTION_MESSAGE, "<think> </think> <search> </search> <information> </information> <answer> </answer>"]
    for q in questions:
        texts.append(build_prompt(q))
        texts.append(f"<think> I need to search. </think> <search> {q} </search>")
    texts += [information_block(f'Doc 1(Title: "{title}") {text}') for title, text in passages]
    texts += [f"<answer> {a} </answer>" for a in answers]
    return texts


def oracle_texts(oracle: str | Path, n: int = 400) -> list[str]:
    """:func:`protocol_texts` of the first ``n`` questions of the NQ-open oracle file
    (``data/corpus/nq-open-oracle.jsonl.gz``: question, gold passage, answers)."""
    import gzip
    import json

    with gzip.open(oracle, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return protocol_texts(
        [r["question"] for r in rows], [(r["ctxs"][0]["title"], r["ctxs"][0]["text"]) for r in rows], [r["answers"][0] for r in rows]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``, as a ``Qwen2Tokenizer`` with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=ENDOFTEXT, eos_token=IM_END, pad_token=ENDOFTEXT)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def build_tiny_qwen2(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny Qwen2 causal LM + tokenizer to ``out_dir`` (HF layout) and return it."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tok = train_tokenizer(texts, spec.vocab_size)
    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    if spec.embedding_std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=spec.embedding_std)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=config.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
