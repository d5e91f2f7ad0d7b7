"""The turn protocol in the VeRL agent loop: the scripted policy of ``tests/turn_script.py``
played by VeRL's ``AgentLoopWorker`` with sap's agent loop (the harness of
``test_agent_loop.py``: real retriever on 127.0.0.1, the tiny model's rollout server forcing the
scripted turns) gives exactly the hand-written transcript, the one the eval loop gives in
``tests/test_turn_protocol.py``: same tokens, same text, same loss mask."""

from __future__ import annotations

from pathlib import Path

import pytest

from sap.agent.loop import prompt_ids
from sap.agent.retrieval import RetrieverClient, docs_text

from .. import turn_script as script
from .conftest import small_config
from .scripted_server import ScriptedHFServer
from .test_agent_loop import check_invariants, rollouts

pytestmark = [pytest.mark.rl_env, pytest.mark.slow]


def test_agent_loop_plays_the_scripted_policy_exactly(tmp_path: Path, tiny_model: Path, core_retriever_url: str):
    cfg = small_config(
        tmp_path,
        tiny_model,
        core_retriever_url,
        f"ppo.max_turns={script.MAX_TURNS}",
        "ppo.max_response_length=64",
        "ppo.max_obs_length=3000",
        "ppo.response_budget=8000",
    )
    server = ScriptedHFServer(str(tiny_model), script={script.QUESTION: list(script.TURNS)})
    samples, _, _ = rollouts(cfg, server)
    tok = server.tokenizer
    s = samples[script.QUESTION]
    check_invariants(s, tok, cfg)
    client = RetrieverClient(core_retriever_url, topk=cfg.retriever.topk)
    docs = {q: docs_text(client.search([q])[0]) for q in script.QUERIES}
    assert "Röntgen" in docs[script.QUERIES[0]]
    text, ids, mask = script.expected(tok, docs)
    assert s.prompt_ids == prompt_ids(tok, script.QUESTION)
    assert s.response_ids == ids
    assert s.mask == mask
    assert tok.decode(s.response_ids, skip_special_tokens=True) == text
    f = s.fields
    assert (f["sap_turns"], f["sap_searches"], f["sap_invalid_actions"], f["sap_answered"]) == (4, 2, 1, True)
    assert list(f["sap_queries"]) == list(script.QUERIES)
