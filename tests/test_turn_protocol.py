"""The turn protocol in the eval loop: the scripted policy of ``tests/turn_script.py`` played by
``SearchAgent`` (scripted engine, real tokenizer, real retriever on 127.0.0.1) gives exactly the
hand-written transcript; ``tests/rl/test_turn_protocol.py`` checks the VeRL agent loop against
the same transcript. Also the protocol's own rules, one by one."""

from __future__ import annotations

import pytest

from sap.agent import protocol
from sap.agent.engines.scripted import ScriptedEngine
from sap.agent.loop import AgentSettings, Question, SearchAgent, prompt_ids
from sap.agent.retrieval import RetrieverClient, docs_text
from sap.rules.prompts import INVALID_ACTION_MESSAGE
from sap.rules.tags import TurnAction

from . import turn_script as script


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


class Policy:
    def __init__(self):
        self.calls = 0

    def __call__(self, context: str) -> str:
        self.calls += 1
        return script.TURNS[self.calls - 1]


def test_eval_loop_plays_the_scripted_policy_exactly(tokenizer, retriever_url):
    client = RetrieverClient(retriever_url, topk=3, timeout_s=10, max_retries=1)
    engine = ScriptedEngine(tokenizer, Policy(), max_model_len=8192)
    agent = SearchAgent(engine, client, AgentSettings(max_turns=script.MAX_TURNS, max_new_tokens=64))
    [ep] = agent.run_all([Question("0", script.QUESTION, [script.ANSWER])])
    docs = {q: docs_text(client.search([q])[0]) for q in script.QUERIES}
    assert "Röntgen" in docs[script.QUERIES[0]]  # the retriever found the gold passage
    text, ids, mask = script.expected(tokenizer, docs)
    assert ep.context_ids[: len(ep.prompt_ids)] == prompt_ids(tokenizer, script.QUESTION)
    assert ep.context_ids[len(ep.prompt_ids) :] == ids
    assert ep.mask == mask
    assert ep.response == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert [t.action for t in ep.turns] == ["search", "search", "invalid", "answer"]
    assert ep.stop_reason == "answer" and ep.prediction == script.ANSWER


# --- the protocol's rules ------------------------------------------------------------------------


def test_stop_rules():
    answer, search, invalid = TurnAction("answer", "x"), TurnAction("search", "q"), TurnAction("invalid", "")
    assert protocol.stop_reason(answer, 1, 2) == "answer"
    assert protocol.stop_reason(search, 2, 2) is None and protocol.stop_reason(invalid, 2, 2) is None
    assert protocol.stop_reason(search, 3, 2) == "max_turns"  # the answer turn: its search is not run
    assert protocol.max_generations(2) == 3 and protocol.max_generations(2, "paper") == 2


def test_read_turn_skips_special_tokens(tokenizer):
    ids = [*tokenizer.encode("<answer> Paris </answer>", add_special_tokens=False), tokenizer.eos_token_id]
    assert protocol.read_turn(tokenizer, ids) == "<answer> Paris </answer>"
    assert protocol.turn_ids(ids, frozenset({tokenizer.eos_token_id})) == ids[:-1]


def test_observation_cut_keeps_the_tags_or_the_head(tokenizer):
    docs = "Doc 1(Title: A) " + "word " * 200
    search = TurnAction("search", "q")
    whole = protocol.observation(tokenizer, search, docs, room=10_000)
    assert whole.text == f"\n\n<information>{docs.strip()}</information>\n\n" and not whole.cut
    cut = protocol.observation(tokenizer, search, docs, room=10_000, max_obs_tokens=40)
    assert len(cut.ids) == 40 and cut.cut
    assert cut.text.startswith("\n\n<information>Doc 1(Title: A) word") and cut.text.endswith("</information>\n\n")
    assert protocol.observation(tokenizer, search, docs, room=40).ids == cut.ids  # room and cap cut alike
    head = protocol.observation(tokenizer, search, docs, room=10_000, max_obs_tokens=40, cut="head")
    assert head.ids == whole.ids[:40] and "</information>" not in head.text  # the paper's rollout
    assert protocol.observation(tokenizer, search, docs, room=3) is None  # not even the tags fit
    invalid = protocol.observation(tokenizer, TurnAction("invalid", ""), "", room=10_000, max_obs_tokens=5)
    assert invalid.text == INVALID_ACTION_MESSAGE  # the cap is for information blocks only
    n = len(invalid.ids)
    assert protocol.observation(tokenizer, TurnAction("invalid", ""), "", room=n - 1) is None


def test_paper_rules():
    assert protocol.paper_query("<search> a </search>") == "a"
    assert protocol.paper_query("<search> a <search> b </search>") == "a <search> b"
    assert protocol.paper_query("<search>  </search>") is None and protocol.paper_query("no tags") is None
    assert protocol.paper_answer("x <answer> a </answer> <answer> b </answer>") == "a"
    assert protocol.paper_answer(" just text ") == "just text" and protocol.paper_answer("") == ""
    assert protocol.paper_output("<search> q </search>\n\n", "</search>") == "<search> q </search>"
