"""Fixtures for the tests that run inside the RL environment (``.venv-rl``, marker ``rl_env``).

``make test`` runs these with ``.venv-rl/bin/python -m pytest -m rl_env``. The retriever
(BM25 over the oracle passages in data/corpus/) is built and served by the *core* environment's
interpreter (``.venv/bin/python -m sap retriever ...``) through ``sap_retriever.launch``,
which uses only the standard library and so imports here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sap.rules.config import ExperimentConfig, load_config

try:
    import verl  # noqa: F401
except ImportError:
    # The core run (`pytest -m "not rl_env"`) deselects these tests anyway; without VeRL their
    # modules cannot even be imported. `make test` runs them in .venv-rl (`pytest -m rl_env tests/rl`).
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def core_retriever_url(tmp_path_factory) -> Iterator[str]:
    """A real retrieval server on 127.0.0.1 (BM25, oracle passages), run by the core venv."""
    from sap_retriever.launch import RetrieverServer, build_oracle_index, default_python

    python = default_python()
    index = build_oracle_index(tmp_path_factory.mktemp("rl-index") / "oracle-bm25", backend="bm25", python=python)
    with RetrieverServer(index, python=python, startup_timeout_s=120) as url:
        yield url


#: NQ-open dev questions whose gold passage is in the oracle corpus (the BM25 index above).
QUESTIONS = [
    {"question": "who got the first nobel prize in physics", "answer": ["Wilhelm Conrad Röntgen"]},
    {"question": "when is the next deadpool movie being released", "answer": ["May 18, 2018"]},
    {"question": "who is the owner of reading football club", "answer": ["Xiu Li Dai", "Dai Xiuli", "Dai Yongge", "Yongge Dai"]},
    {"question": "how many episodes are there in dragon ball z", "answer": ["291 episodes", "291"]},
]


def write_questions(path: Path, rows: list[dict[str, Any]] = QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def small_sets(tmp_path: Path, model: Path, retriever_url: str, *overrides: str) -> list[str]:
    """``--set`` values of an experiment sized for CPU tests (1 GPU, tiny batches and token
    budgets; the QUESTIONS written to ``tmp_path``; runs under ``tmp_path/runs/rl-test``)."""
    questions = write_questions(tmp_path / "questions.jsonl")
    return [
        f"run_root={tmp_path / 'runs'}",
        "experiment=rl-test",
        f"model.path={model}",
        f"retriever.url={retriever_url}",
        f"ppo.train_data={questions}",
        f"ppo.val_data={questions}",
        "ppo.train_batch_size=4",
        "ppo.ppo_mini_batch_size=4",
        "ppo.ppo_micro_batch_size_per_gpu=2",
        "ppo.n_gpus_per_node=1",
        "ppo.max_prompt_length=512",
        "ppo.agent_workers=1",  # the preflight: 4 rollouts must split over the agent workers
        *overrides,
    ]


def set_args(sets: list[str]) -> list[str]:
    """``--set K=V`` for each value, for a ``sap`` command line."""
    return [a for s in sets for a in ("--set", s)]


def small_config(tmp_path: Path, model: Path, retriever_url: str, *overrides: str) -> ExperimentConfig:
    """The experiment of :func:`small_sets`, loaded."""
    return load_config(None, small_sets(tmp_path, model, retriever_url, *overrides))


@pytest.fixture(scope="session")
def searching_model(tmp_path_factory, tiny_model: Path) -> Path:
    """The tiny model taught, by a few real optimizer steps, to open each of the QUESTIONS with
    ``<search> question </search>`` (a random model never searches, so PPO would never see an
    ``<information>`` block). Trained like SFT: loss on the response tokens only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sap.rules.prompts import chat_messages

    out = tmp_path_factory.mktemp("searching-qwen2")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    rows = []
    for q in QUESTIONS:
        prompt = tok.apply_chat_template(chat_messages(q["question"], "searchr1"), add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(f"<search> {q['question']} </search>", add_special_tokens=False)["input_ids"]
        rows.append((torch.tensor([p_ids + r_ids]), torch.tensor([[-100] * len(p_ids) + r_ids])))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: more threads only spin against each other on a busy machine
    try:
        for _ in range(200):
            loss = sum(model(input_ids=x, labels=y).loss for x, y in rows) / len(rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.03:
                break
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1, f"the tiny model did not learn to search (loss {loss.item():.3f})"
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
