"""The sap agent loop run by VeRL's own agent-loop machinery, checked token by token.

VeRL's ``AgentLoopWorker`` (the class VeRL runs as a Ray actor) loads ``ppo/agent_loop.yaml``,
reads the parquet through ``RLHFDataset`` and plays each row with the sap agent loop against
the real retrieval server (BM25, 127.0.0.1) and a rollout server implementing VeRL's
``generate`` interface over the tiny HF model (``sap.rl.hf_server``), some turns scripted
(``tests/rl/scripted_server.py``).
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sap.agent import protocol
from sap.agent.retrieval import RetrieverClient, docs_text
from sap.rules.prompts import INVALID_ACTION_MESSAGE, information_block
from sap.rules.tags import STOP_STRINGS
from sap.stages import train_ppo as stage

from .conftest import QUESTIONS, small_config
from .scripted_server import ScriptedHFServer

pytestmark = [pytest.mark.rl_env, pytest.mark.slow]

NOBEL, DEADPOOL, READING, DRAGON = (q["question"] for q in QUESTIONS)


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    mask: list[int]
    logprobs: list[float]
    fields: dict[str, Any]
    calls: list  # the rollout server calls of this trajectory, in order


def rollouts(cfg, server: ScriptedHFServer):
    """Write data + agent-loop config as ``sap train-ppo`` does, compose VeRL's config, and run
    one batch through VeRL's AgentLoopWorker. Returns (samples by question, VeRL config, output)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.protocol import DataProto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    from sap.rl.compose import compose

    ppo_dir = cfg.run_dir / "ppo"
    stage.build_dataset(cfg, ppo_dir / "data")
    stage.write_agent_loop_config(cfg, ppo_dir / "agent_loop.yaml")
    config = compose(stage.plan(cfg, "base").overrides)
    worker = AgentLoopWorker(config, server)
    dataset = RLHFDataset(
        data_files=[str(ppo_dir / "data" / "train.parquet")], tokenizer=worker.tokenizer, config=config.data, processor=None
    )
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(dataset))]))
    out = asyncio.run(worker.generate_sequences(batch))

    by_request: dict[str, list] = defaultdict(list)
    for call in server.calls:
        by_request[call.request_id].append(call)
    samples: dict[str, Sample] = {}
    width = out.batch["responses"].shape[1]
    for i in range(len(out)):
        attn = out.batch["attention_mask"][i]
        prompt = out.batch["prompts"][i][attn[:-width].bool()].tolist()
        n = int(attn[-width:].sum())
        calls = next(c for c in by_request.values() if c[0].prompt_ids == prompt)
        fields = {k: out.non_tensor_batch[k][i] for k in out.non_tensor_batch}
        samples[str(fields["question"]).rstrip("?")] = Sample(
            prompt,
            out.batch["responses"][i][:n].tolist(),
            out.batch["response_mask"][i][:n].tolist(),
            out.batch["rollout_log_probs"][i][:n].tolist(),
            fields,
            calls,
        )
    assert len(samples) == len(QUESTIONS)
    return samples, config, out


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal mask values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def check_invariants(s: Sample, tokenizer, cfg) -> None:
    """What every trajectory must satisfy, scripted or not."""
    from transformers import GenerationConfig

    p = cfg.ppo
    eos = protocol.eos_ids(tokenizer, GenerationConfig.from_pretrained(cfg.model.path))
    assert len(s.response_ids) == len(s.mask) <= p.total_response_length
    assert s.mask and s.mask[-1] == 1, "a trajectory never ends on observation tokens"
    assert 1 <= len(s.calls) <= p.max_turns + 1
    generated = 0
    pos = 0
    for value, start, end in runs(s.mask):
        if value == 1:
            call = s.calls[generated]
            # the generated tokens are exactly the server's, never re-tokenised (an end-of-
            # sequence token is removed when an observation follows, as in eval)
            last = end == len(s.mask)
            kept = call.token_ids if last else protocol.turn_ids(call.token_ids, eos)
            assert s.response_ids[start:end] == kept
            assert call.prompt_ids == s.prompt_ids + s.response_ids[:start]
            assert call.sampling_params["stop"] == list(STOP_STRINGS)
            assert call.sampling_params["max_tokens"] == min(p.max_response_length, p.total_response_length - start)
            assert len(call.token_ids) <= call.sampling_params["max_tokens"]
            for lp, server_lp in zip(s.logprobs[start:end], call.log_probs[: len(kept)], strict=True):
                assert math.isclose(lp, server_lp, rel_tol=1e-5, abs_tol=1e-5)
            generated += 1
        else:
            obs = tokenizer.decode(s.response_ids[start:end])
            assert obs == INVALID_ACTION_MESSAGE or (obs.startswith("\n\n<information>") and obs.endswith("</information>\n\n"))
            assert all(lp == 0.0 for lp in s.logprobs[start:end])
        pos = end
    assert pos == len(s.response_ids) and generated == len(s.calls)
    assert s.fields["sap_turns"] == len(s.calls)


def test_server_extra_fields_merge_across_turns():
    from sap.rl.agent_loop import merge_extra_fields

    fields: dict = {}
    merge_extra_fields(fields, {"global_steps": 3, "min_global_steps": 3, "max_global_steps": 3})
    merge_extra_fields(fields, {"global_steps": 4, "min_global_steps": 4, "max_global_steps": 4, "num_cached_tokens": 9})
    assert fields == {"global_steps": 4, "min_global_steps": 3, "max_global_steps": 4, "num_cached_tokens": 9}


def test_search_then_answer_token_by_token(tmp_path: Path, tiny_model: Path, core_retriever_url: str):
    cfg = small_config(
        tmp_path, tiny_model, core_retriever_url, "ppo.max_response_length=64", "ppo.max_obs_length=3000", "ppo.response_budget=3300"
    )
    script = {
        NOBEL: [
            "<think> I need to search. </think> <search> first nobel prize in physics </search> <answer> not this </answer>",
            "<think> It is in Doc 1. </think> <answer> Wilhelm Conrad Röntgen </answer> nor this",
        ]
    }
    server = ScriptedHFServer(str(tiny_model), script=script, extra_fields={"global_steps": 7})
    samples, config, _ = rollouts(cfg, server)
    tok = server.tokenizer
    for s in samples.values():
        check_invariants(s, tok, cfg)

    s = samples[NOBEL]
    assert [v for v, _, _ in runs(s.mask)] == [1, 0, 1]
    (_, a0, a1), (_, o0, o1), (_, b0, b1) = runs(s.mask)
    first = tok.decode(s.response_ids[a0:a1])
    assert first.rstrip().endswith("</search>") and "not this" not in first  # the server stopped at </search>
    hits = RetrieverClient(core_retriever_url, topk=cfg.retriever.topk).search(["first nobel prize in physics"])[0]
    assert any("Nobel" in h.contents for h in hits)
    expected_obs = tok.encode(information_block(docs_text(hits)), add_special_tokens=False)
    assert s.response_ids[o0:o1] == expected_obs
    second = tok.decode(s.response_ids[b0:b1])
    assert second.rstrip().endswith("</answer>") and "nor this" not in second
    f = s.fields
    assert (f["sap_searches"], f["sap_turns"], f["sap_answered"], f["sap_invalid_actions"], f["sap_retrieval_failures"]) == (
        1,
        2,
        True,
        0,
        0,
    )
    assert list(f["sap_queries"]) == ["first nobel prize in physics"]
    assert f["global_steps"] == 7 and f["server_turn"] >= 2  # the server's extra fields are carried
    assert s.fields["__num_turns__"] == 1 + 2 + 1

    # the reward function as VeRL loads it (path + reward_kwargs from the composed config)
    from verl.trainer.ppo.reward import get_custom_reward_fn

    reward_fn = get_custom_reward_fn(config)
    extra = {k: v for k, v in f.items() if k.startswith("sap_")}
    result = reward_fn(
        data_source="nq",
        solution_str=tok.decode(s.response_ids, skip_special_tokens=True),
        ground_truth=f["reward_model"]["ground_truth"],
        extra_info=extra,
    )
    assert result["score"] == 1.0 and result["valid_format"] == 1.0 and result["searches"] == 1.0


def test_final_turn_invalid_action_and_observation_cap(tmp_path: Path, tiny_model: Path, core_retriever_url: str):
    cfg = small_config(
        tmp_path,
        tiny_model,
        core_retriever_url,
        "ppo.max_turns=1",
        "ppo.max_response_length=48",
        "ppo.max_obs_length=40",
        "ppo.response_budget=160",
        "ppo.reward=em_format",
    )
    script = {
        NOBEL: ["<search> nobel prize physics </search>", "<search> again </search>", "<answer> never asked </answer>"],
        DEADPOOL: ["I am not sure.", "<answer> May 18, 2018 </answer>"],
    }
    server = ScriptedHFServer(str(tiny_model), script=script)
    samples, config, _ = rollouts(cfg, server)
    tok = server.tokenizer
    for s in samples.values():
        check_invariants(s, tok, cfg)

    # max_turns=1: one search round, then the answer turn: its search is not run, nothing follows it
    s = samples[NOBEL]
    assert [v for v, _, _ in runs(s.mask)] == [1, 0, 1] and len(s.calls) == 2
    (_, _, _), (_, o0, o1), (_, b0, b1) = runs(s.mask)
    assert o1 - o0 == cfg.ppo.max_obs_length and s.fields["sap_obs_truncated"] == 1
    head = tok.encode("\n\n<information>", add_special_tokens=False)
    tail = tok.encode("</information>\n\n", add_special_tokens=False)
    assert s.response_ids[o0 : o0 + len(head)] == head and s.response_ids[o1 - len(tail) : o1] == tail
    assert tok.decode(s.response_ids[b0:b1]).rstrip().endswith("</search>")
    assert (s.fields["sap_searches"], s.fields["sap_answered"]) == (1, False)

    # an invalid turn gets the invalid-action message (mask 0), then the model answers
    s = samples[DEADPOOL]
    (_, _, _), (_, o0, o1), (_, _, _) = runs(s.mask)
    assert s.response_ids[o0:o1] == tok.encode(INVALID_ACTION_MESSAGE, add_special_tokens=False)
    assert (s.fields["sap_invalid_actions"], s.fields["sap_answered"]) == (1, True)
    from verl.trainer.ppo.reward import get_custom_reward_fn

    reward_fn = get_custom_reward_fn(config)  # em_format: right answer, ill-formed trajectory
    extra = {k: v for k, v in s.fields.items() if k.startswith("sap_")}
    result = reward_fn(
        data_source="nq",
        solution_str=tok.decode(s.response_ids, skip_special_tokens=True),
        ground_truth=s.fields["reward_model"]["ground_truth"],
        extra_info=extra,
    )
    assert result["em"] == 1.0 and result["valid_format"] == 0.0 and result["score"] == pytest.approx(0.8)

    # unscripted (random) trajectories hit the per-turn cap and the total budget
    for q in (READING, DRAGON):
        s = samples[q]
        assert len(s.calls[0].token_ids) == cfg.ppo.max_response_length
        assert s.fields["sap_budget_exhausted"] or len(s.calls) == cfg.ppo.max_turns + 1


def test_retrieval_failure_is_counted(tmp_path: Path, tiny_model: Path):
    from sap_retriever.launch import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = small_config(tmp_path, tiny_model, dead, "retriever.max_retries=1", "retriever.backoff_s=0", "ppo.max_response_length=32")
    script = {
        NOBEL: ["<search> nobel </search>", "<answer> Wilhelm Conrad Röntgen </answer>"],
        DEADPOOL: ["<search>  </search>", "<answer> May 18, 2018 </answer>"],  # an empty query is never sent
    }
    server = ScriptedHFServer(str(tiny_model), script=script)
    samples, _, _ = rollouts(cfg, server)
    s = samples[DEADPOOL]
    (_, _, _), (_, o0, o1), (_, _, _) = runs(s.mask)
    assert s.response_ids[o0:o1] == server.tokenizer.encode(information_block(""), add_special_tokens=False)
    assert (s.fields["sap_searches"], s.fields["sap_retrieval_failures"]) == (1, 0)
    s = samples[NOBEL]
    check_invariants(s, server.tokenizer, cfg)
    (_, _, _), (_, o0, o1), (_, _, _) = runs(s.mask)
    assert s.response_ids[o0:o1] == server.tokenizer.encode(information_block(""), add_special_tokens=False)
    assert (s.fields["sap_searches"], s.fields["sap_retrieval_failures"]) == (1, 1)
    from sap.rl.reward import compute_score

    extra = {k: v for k, v in s.fields.items() if k.startswith("sap_")}
    result = compute_score(
        "nq", server.tokenizer.decode(s.response_ids, skip_special_tokens=True), s.fields["reward_model"]["ground_truth"], extra
    )
    assert result["retrieval_failures"] == 1.0 and result["em"] == 1.0
