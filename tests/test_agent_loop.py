"""The search loop, exactly: a scripted engine (real tokenizer, real stop/cap behaviour)
against the real retriever server on 127.0.0.1."""

from __future__ import annotations

import re

import pytest

from sap.agent.engines.scripted import ScriptedEngine
from sap.agent.loop import AgentSettings, Question, SearchAgent, prompt_ids
from sap.agent.retrieval import RetrieverClient
from sap.rules.prompts import INVALID_ACTION_MESSAGE, build_prompt
from sap.rules.tags import STOP_STRINGS, extract_queries

QUESTIONS = [
    ("who wrote the declaration of independence", ["Thomas Jefferson"]),
    ("when did the eiffel tower open", ["1889"]),
    ("what is the capital of france", ["Paris"]),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def client(retriever_url) -> RetrieverClient:
    return RetrieverClient(retriever_url, topk=3, timeout_s=10, max_retries=1, backoff_s=0.05)


def qs(n: int = 3) -> list[Question]:
    return [Question(str(i), QUESTIONS[i % 3][0], QUESTIONS[i % 3][1]) for i in range(n)]


def question_of(context: str) -> str:
    return re.search(r"Question: (.*?)\?\n", context).group(1)


def search_then_answer(context: str) -> str:
    """Searches the question once, then answers; writes past the stop string like a model
    that does not know it should stop."""
    q = question_of(context)
    if "</information>\n\n" not in context:  # no observation yet (the prompt mentions the tag)
        return f"<think> I need to look it up. </think> <search> {q} </search> and then I keep talking"
    answer = dict(QUESTIONS)[q][0]
    return f"<think> found it </think> <answer> {answer} </answer> more words after the answer"


def agent(tokenizer, client, respond, **settings) -> tuple[SearchAgent, ScriptedEngine]:
    max_model_len = settings.pop("max_model_len", 4096)
    engine = ScriptedEngine(tokenizer, respond, max_model_len=max_model_len)
    return SearchAgent(engine, client, AgentSettings(**{"max_new_tokens": 256, **settings})), engine


def test_search_then_answer_is_exact(tokenizer, client):
    a, _ = agent(tokenizer, client, search_then_answer)
    [ep] = a.run_all(qs(1))
    rec = ep.record()
    q = QUESTIONS[0][0]
    assert rec["prediction"] == "Thomas Jefferson"
    assert rec["queries"] == [q] and rec["searches"] == 1 and rec["turns"] == 2
    assert rec["actions"] == ["search", "answer"] and rec["stop_reason"] == "answer" and rec["valid_format"]
    # turns end at the stop string: what the model wrote after it never enters the context
    assert "keep talking" not in rec["response"] and "after the answer" not in rec["response"]
    first, rest = rec["response"].split("</search>", 1)
    assert first.endswith(f"<search> {q} ")
    assert rest.startswith("\n\n<information>Doc 1(Title: ") and "Doc 3(Title: " in rest
    assert "</information>\n\n<think> found it </think> <answer> Thomas Jefferson </answer>" in rest
    # the context is the chat-template prompt followed by exactly the response tokens
    assert ep.context_ids[: len(ep.prompt_ids)] == prompt_ids(tokenizer, q)
    assert tokenizer.decode(ep.context_ids[len(ep.prompt_ids) :]) == rec["response"]
    assert build_prompt(q) in tokenizer.decode(ep.prompt_ids)
    # mask: 1 on generated tokens, 0 on the observation
    gen_ids = [t for t, m in zip(ep.context_ids[len(ep.prompt_ids) :], ep.mask, strict=True) if m == 1]
    obs_ids = [t for t, m in zip(ep.context_ids[len(ep.prompt_ids) :], ep.mask, strict=True) if m == 0]
    assert tokenizer.decode(gen_ids) == ep.turns[0].text + ep.turns[1].text
    assert tokenizer.decode(obs_ids) == ep.turns[0].observation
    # generated tokens = the kept tokens of each turn (a real engine stops at the stop string)
    assert rec["tokens_generated"] == sum(ep.mask) == rec["response_tokens"] - len(obs_ids)


def test_invalid_turn_gets_the_searchr1_message(tokenizer, client):
    def respond(context: str) -> str:
        if INVALID_ACTION_MESSAGE not in context:
            return "I think the answer is Paris."
        return "<answer> Paris </answer>"

    a, _ = agent(tokenizer, client, respond)
    [ep] = a.run_all(qs(1))
    rec = ep.record()
    assert rec["actions"] == ["invalid", "answer"]
    assert rec["response"] == "I think the answer is Paris." + INVALID_ACTION_MESSAGE + "<answer> Paris </answer>"
    assert rec["prediction"] == "Paris" and not rec["valid_format"] and rec["searches"] == 0
    assert ep.turns[0].finish_reason == "eos"  # the EOS token is counted but not kept
    assert ep.turns[0].tokens == len(tokenizer.encode("I think the answer is Paris.")) + 1


def test_max_turns_stops_a_model_that_always_searches(tokenizer, client):
    a, _ = agent(tokenizer, client, lambda c: f"<search> {question_of(c)} again </search>", max_turns=3)
    [ep] = a.run_all(qs(1))
    rec = ep.record()
    # 3 search rounds, then one last turn for the answer, whose search is not run
    assert rec["turns"] == 4 and rec["stop_reason"] == "max_turns"
    assert rec["response"].count("<information>") == 3 and len(extract_queries(rec["response"])) == 4
    assert rec["searches"] == 3
    # the prompt's own example answer ("Beijing") is never taken as the prediction
    assert rec["prediction"] == "" and "Beijing" in tokenizer.decode(ep.prompt_ids)


def test_turn_token_cap(tokenizer, client):
    a, _ = agent(tokenizer, client, lambda c: "word " * 500, max_new_tokens=20, max_turns=1)
    [ep] = a.run_all(qs(1))
    assert [t.tokens for t in ep.turns] == [20, 20]
    assert [t.finish_reason for t in ep.turns] == ["length", "length"]
    assert ep.record()["tokens_generated"] == 40


def test_batching_one_engine_call_and_one_retriever_call_per_step(tokenizer, client, monkeypatch):
    batches: list[int] = []
    real_search = client.search

    def counting_search(queries, topk=None):
        batches.append(len(queries))
        return real_search(queries, topk)

    monkeypatch.setattr(client, "search", counting_search)
    a, engine = agent(tokenizer, client, search_then_answer, max_in_flight=4)
    eps = a.run_all(qs(10))
    assert [ep.question.id for ep in eps] == [str(i) for i in range(10)]
    assert all(ep.record()["prediction"] == QUESTIONS[i % 3][1][0] for i, ep in enumerate(eps))
    # at most 4 in flight; finished questions are replaced at once (continuous batching)
    assert max(engine.calls) == 4 and sum(engine.calls) == 20
    assert len(engine.calls) == a.generate_calls == 6  # 10 questions x 2 turns / 4 wide, rounded up + refill
    assert sum(batches) == 10 and len(batches) == a.retrieve_calls and max(batches) == 4


def test_context_full_keeps_the_prompt_and_cuts_the_observation(tokenizer, client):
    q = qs(1)
    n_prompt = len(prompt_ids(tokenizer, q[0].question))
    a, _ = agent(tokenizer, client, search_then_answer, max_model_len=n_prompt + 100, max_new_tokens=60, min_turn_tokens=30)
    [ep] = a.run_all(q)
    assert ep.context_ids[:n_prompt] == prompt_ids(tokenizer, q[0].question)
    assert len(ep.context_ids) <= n_prompt + 100
    assert ep.observations_cut == 1
    # the passages are cut, the tags kept (the same cut as the PPO agent loop's)
    obs = ep.turns[0].observation
    assert obs.startswith("\n\n<information>Doc 1(Title: ") and obs.endswith("</information>\n\n")
    assert len(tokenizer.encode(obs, add_special_tokens=False)) == 100 - ep.turns[0].tokens - 30
    # the answer turn still had room
    assert ep.stop_reason == "answer" and ep.prediction == "Thomas Jefferson"


def test_prompt_longer_than_the_context_is_not_truncated(tokenizer, client):
    a, engine = agent(tokenizer, client, search_then_answer, max_model_len=32)
    [ep] = a.run_all(qs(1))
    assert ep.stop_reason == "prompt_too_long" and ep.prediction == "" and ep.turns == []
    assert engine.calls == []


def test_without_stop_strings_the_context_is_the_same_but_costs_more(tokenizer, client):
    def chatty(context: str) -> str:
        return search_then_answer(context) + " blah" * 100

    with_stop, _ = agent(tokenizer, client, chatty)
    no_stop, _ = agent(tokenizer, client, chatty, use_stop_strings=False)
    [a] = with_stop.run_all(qs(1))
    [b] = no_stop.run_all(qs(1))
    assert a.response == b.response and a.context_ids == b.context_ids
    assert b.tokens_generated > 3 * a.tokens_generated


def test_retrieval_failure_is_recorded_and_the_episode_goes_on(tokenizer):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = RetrieverClient(f"http://127.0.0.1:{port}", max_retries=0, timeout_s=2)
    a, _ = agent(tokenizer, down, search_then_answer)
    [ep] = a.run_all(qs(1))
    rec = ep.record()
    assert rec["retrieval_failures"] == 1 and rec["searches"] == 1
    assert "<information></information>" in rec["response"]
    assert rec["prediction"] == "Thomas Jefferson"


def test_stop_strings_are_the_shared_ones():
    assert AgentSettings().use_stop_strings and STOP_STRINGS == ("</search>", "</answer>")
