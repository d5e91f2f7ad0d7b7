"""``protocol: paper``: sap's eval loop against the paper's ``infer.py`` loop, replayed.

``reference_episode`` below re-implements the loop of the paper's published ``infer.py``
(``run_reasoning_with_search`` + ``extract_answer``, with vLLM's stop-string behaviour and its
refusal of an over-long prompt) from its definition, independently of sap's code. Each case
plays one scripted model through the reference and through sap's ``SearchAgent`` with
``loop="paper"``, both against the real retrieval server on 127.0.0.1, and compares every
context the model was shown, the output turn and the prediction. The cases cover each
difference listed in issue 14 ("Evaluation loop").
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import httpx
import pytest

from sap.agent.engines.scripted import ScriptedEngine
from sap.agent.loop import AgentSettings, Question, SearchAgent
from sap.agent.retrieval import RetrieverClient
from sap.rules.config import load_config
from sap.rules.prompts import INVALID_ACTION_MESSAGE
from sap.stages.evaluate import agent_settings

# --- the paper's loop, from its published definition -----------------------------------------

PAPER_PROMPT = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query </search> "
    "and it will return the top searched results between <information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside <answer> and </answer>, "
    "without detailed illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
PAPER_STOPS = [
    f"{pre}</{tag}>{post}"
    for tag in ("search", "answer")
    for pre, post in (("", ""), (" ", ""), ("", "\n"), (" ", "\n"), ("", "\n\n"), (" ", "\n\n"))
]


class Refused(Exception):
    """vLLM refuses a prompt longer than the model's context."""


def vllm_generate(tokenizer, prompt: str, model, max_tokens: int, max_model_len: int) -> str:
    """What ``llm.generate(prompt)`` returns as ``outputs[0].outputs[0].text`` when the model
    would write ``model(prompt)`` and then EOS: the text prompt is tokenised with the tokenizer's
    defaults, tokens come one by one (detokenised without special tokens) until EOS, the cap or
    the context end, and the text is cut right after the first stop string completed."""
    n_prompt = len(tokenizer.encode(prompt))
    if n_prompt >= max_model_len:
        raise Refused(n_prompt)
    ids = [*tokenizer.encode(model(prompt), add_special_tokens=False), tokenizer.eos_token_id]
    out: list[int] = []
    for t in ids[: min(max_tokens, max_model_len - n_prompt)]:
        if t == tokenizer.eos_token_id:
            break
        out.append(t)
        text = tokenizer.decode(out, skip_special_tokens=True)
        for s in PAPER_STOPS:
            if s in text:
                return text[: text.index(s) + len(s)]
    return tokenizer.decode(out, skip_special_tokens=True)


def paper_search(url: str, query: str) -> str:
    r = httpx.post(f"{url}/retrieve", json={"queries": [query], "topk": 3, "return_scores": True}, timeout=60)
    r.raise_for_status()
    result = r.json().get("result", [])
    if not result:
        return ""
    lines = []
    for i, item in enumerate(result[0]):
        title, _, body = item["document"]["contents"].partition("\n")
        lines.append(f"Doc {i + 1}(Title: {title}) {body.strip()}")
    return "\n".join(lines)


def paper_extract(text: str) -> str:
    if not text:
        return ""
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return m.group(1).strip() if m else text.strip()


@dataclass
class Reference:
    output: str
    prediction: str


def reference_episode(tokenizer, question: str, model, url: str, max_turns: int, max_new_tokens: int, max_model_len: int) -> Reference:
    q = question.strip()
    if q and q[-1] != "?":
        q += "?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PAPER_PROMPT.format(question=q)}], add_generation_prompt=True, tokenize=False
    )
    try:
        for _ in range(max_turns):
            output = vllm_generate(tokenizer, prompt, model, max_new_tokens, max_model_len)
            if not output:
                break
            found = re.findall(r"<search>(.*?)</search>", output, re.DOTALL)
            query = found[-1].strip() if found else None
            if query:
                prompt += f"\n\n{output}<information>{paper_search(url, query)}</information>\n\n"
                continue
            return Reference(output, paper_extract(output))
        raise RuntimeError("max turns")
    except Exception:  # the script scores any failure as the empty output
        return Reference("", "")


# --- the cases ---------------------------------------------------------------------------------

Q = "who wrote the declaration of independence"


class Script:
    """A scripted model: the i-th call writes ``turns[i]`` (the last one repeats); records the
    context text of every call."""

    def __init__(self, turns: list[str]):
        self.turns, self.seen = turns, []

    def __call__(self, context: str) -> str:
        self.seen.append(context)
        return self.turns[min(len(self.seen) - 1, len(self.turns) - 1)]


@dataclass
class Case:
    name: str
    turns: list[str]
    expect: str
    """The paper's prediction (written by hand: checks the reference too)."""
    max_turns: int = 5
    max_new_tokens: int = 256
    max_model_len: int = 4096
    dead_retriever: bool = False
    prefix: bool = False
    """``expect`` is a prefix of the prediction (a turn cut by the token cap)."""


SEARCH = f"<think> I need to look it up. </think> <search> {Q} </search>"
CASES = [
    Case("answer at once", ["<think> I know it. </think> <answer> Thomas Jefferson </answer>"], "Thomas Jefferson"),
    Case("search then answer", [SEARCH, "<think> Doc 1 says so. </think> <answer> Thomas Jefferson </answer>"], "Thomas Jefferson"),
    # a turn with no search ends the episode and is the output (sap appends the invalid-action message)
    Case(
        "no tag at all ends the episode",
        ["I think it was Thomas Jefferson.", "<answer> never asked </answer>"],
        "I think it was Thomas Jefferson.",
    ),
    Case("think only ends the episode", ["<think> hmm </think>", "<answer> never asked </answer>"], "<think> hmm </think>"),
    Case("no answer after a search: the whole last turn", [SEARCH, "It was Jefferson, I believe."], "It was Jefferson, I believe."),
    # the first <answer> of the last turn, falling back to the whole turn
    Case(
        "answer cut by the token cap: the whole turn",
        ["<answer> Thomas Jefferson and many many other words"],
        "<answer> Th",
        max_new_tokens=4,
        prefix=True,
    ),
    Case("text around the answer is dropped", ["So the answer is <answer> Thomas Jefferson </answer> I am sure"], "Thomas Jefferson"),
    Case("whitespace-only turn scores empty", ["   "], ""),
    # max_turns counts generations; running out of them scores the empty string
    Case("always searching runs out of turns", [SEARCH], "", max_turns=3),
    Case("max_turns=2: search then answer fits", [SEARCH, "<answer> Thomas Jefferson </answer>"], "Thomas Jefferson", max_turns=2),
    Case("max_turns=1: a search is the last generation", [SEARCH, "<answer> Thomas Jefferson </answer>"], "", max_turns=1),
    Case(
        "two searches then answer with max_turns=3",
        [SEARCH, f"<search> {Q} author </search>", "<answer> Jefferson </answer>"],
        "Jefferson",
        max_turns=3,
    ),
    # empty output, empty query and retrieval errors end the episode
    Case("empty output scores empty", [SEARCH, ""], ""),
    Case(
        "empty query ends the episode with the turn",
        ["<think> hmm </think> <search>   </search>"],
        "<think> hmm </think> <search>   </search>",
    ),
    Case("retrieval error scores empty", [SEARCH, "<answer> Thomas Jefferson </answer>"], "", dead_retriever=True),
    # the observation: "\n\n" + output + "<information>" + docs + "</information>\n\n"; the turn
    # ends right after the stop string, whatever the model wrote after it
    Case(
        "text after the stop string is dropped",
        [SEARCH + "\n\n and more", "<answer> Thomas Jefferson </answer>\n\nbye"],
        "Thomas Jefferson",
    ),
    Case(
        "the last <search> of a turn is the query",
        [f"<search> {Q} <search> declaration author </search>", "<answer> Jefferson </answer>"],
        "Jefferson",
    ),
    Case("a turn ends at its first closing tag", [f"<answer> Adams </answer> <search> {Q} </search>"], "Adams"),
    # a context the model cannot take any more: vLLM refuses it, the script scores ""
    Case("context overflow scores empty", [SEARCH, "<answer> Thomas Jefferson </answer>"], "", max_model_len=260),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_both(tokenizer, url: str, case: Case):
    ref_model, sap_model = Script(case.turns), Script(case.turns)
    ref = reference_episode(tokenizer, Q, ref_model, url, case.max_turns, case.max_new_tokens, case.max_model_len)
    engine = ScriptedEngine(tokenizer, sap_model, max_model_len=case.max_model_len)
    client = RetrieverClient(url, topk=3, timeout_s=10, max_retries=0)
    settings = AgentSettings(max_turns=case.max_turns, max_new_tokens=case.max_new_tokens, loop="paper")
    [ep] = SearchAgent(engine, client, settings).run_all([Question("0", Q, ["Thomas Jefferson"])])
    return ref, ref_model, ep, sap_model


def test_there_are_enough_cases():
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sap_paper_loop_equals_the_papers(tokenizer, retriever_url, case: Case):
    url = _dead_url() if case.dead_retriever else retriever_url
    ref, ref_model, ep, sap_model = run_both(tokenizer, url, case)
    # the reference does what the case says
    assert ref.prediction.startswith(case.expect) if case.prefix else ref.prediction == case.expect
    assert ep.prediction == ref.prediction
    assert ep.output == ref.output
    # the model was shown the same contexts, turn by turn (sap re-tokenises the text as vLLM does)
    assert sap_model.seen == ref_model.seen
    assert len(ep.turns) == len(ref_model.seen)
    assert ep.record()["prediction"] == ref.prediction


def test_paper_context_has_the_blank_line_before_the_turn(tokenizer, retriever_url):
    case = CASES[1]
    _, _, ep, sap_model = run_both(tokenizer, retriever_url, case)
    second = sap_model.seen[1]
    assert second.startswith(sap_model.seen[0] + "\n\n" + SEARCH + "<information>Doc 1(Title: ")
    assert second.endswith("</information>\n\n") and "\nDoc 3(Title: " in second
    assert ep.response == second[len(sap_model.seen[0]) :] + ep.output
    assert ep.record()["actions"] == ["search", "answer"] and ep.stop_reason == "answer"


def test_stop_reasons_say_why_the_paper_loop_ended(tokenizer, retriever_url):
    reasons = {}
    for case in CASES:
        _, _, ep, _ = run_both(tokenizer, _dead_url() if case.dead_retriever else retriever_url, case)
        reasons[case.name] = ep.stop_reason
    assert reasons["always searching runs out of turns"] == "max_turns"
    assert reasons["empty output scores empty"] == "empty_output"
    assert reasons["retrieval error scores empty"] == "retrieval_error"
    assert reasons["context overflow scores empty"] == "context_full"
    assert reasons["no tag at all ends the episode"] == "no_search"
    assert reasons["search then answer"] == "answer"


def test_the_sap_loop_differs_where_the_issue_says(tokenizer, retriever_url):
    """The same scripted model under ``sap``: an invalid turn gets the message and the episode
    goes on; max_turns counts search rounds plus the answer turn."""
    engine = ScriptedEngine(tokenizer, Script(["I think it was Thomas Jefferson.", "<answer> Jefferson </answer>"]))
    [ep] = SearchAgent(engine, RetrieverClient(retriever_url), AgentSettings(loop="sap")).run_all([Question("0", Q, [])])
    assert ep.record()["actions"] == ["invalid", "answer"] and INVALID_ACTION_MESSAGE in ep.response
    assert ep.prediction == "Jefferson"
    engine = ScriptedEngine(tokenizer, Script([SEARCH]))
    [ep] = SearchAgent(engine, RetrieverClient(retriever_url), AgentSettings(max_turns=3)).run_all([Question("0", Q, [])])
    assert len(ep.turns) == 4 and ep.prediction == ""


def test_protocol_paper_selects_the_paper_loop_in_eval():
    assert agent_settings(load_config(None, ["protocol=paper"])).loop == "paper"
    assert agent_settings(load_config(None)).loop == "sap"
    assert agent_settings(load_config(None, ["protocol=paper", "eval.loop=sap"])).loop == "sap"
