"""A scripted OpenAI-compatible chat endpoint for the collect tests (a hosted teacher API cannot
run here): FastAPI serving ``GET /v1/models`` and ``POST /v1/chat/completions`` with uvicorn on
127.0.0.1, answering like the real API (``stop`` strings cut and removed, ``finish_reason``,
``usage``), with replies chosen by a per-question behaviour:

- ``good``: searches the question, then answers the first gold answer;
- ``wrong``: searches, then answers "nobody in particular";
- ``nosearch``: "I remember ..." and answers at once;
- ``guess_first``: writes an ``<answer>`` tag in its thinking before searching, then answers;
- ``phrase``: searches, then "I remember" in its reasoning, then the gold answer;
- ``invalid``: a first turn with neither a search nor an answer, then like ``good``;
- ``error500``: HTTP 500 every time; ``slow``: sleeps past the client's timeout every time;
- ``flaky``: HTTP 503 on the first try of every turn, then like ``good``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MODEL = "teacher-test"


@dataclass
class Script:
    behaviours: dict[str, str] = field(default_factory=dict)
    """question text (as in the prompt, with its ``?``) -> behaviour"""
    golds: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Sleep before every answer (to kill a run midway)."""
    slow_s: float = 3.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)
    healthy: bool = False
    """Every behaviour acts as ``good`` (an outage that ended)."""


def reply(script: Script, question: str, turn: int) -> str | int | None:
    """The teacher's text for ``turn`` (0-based), an HTTP status to fail with, or None to hang."""
    b = "good" if script.healthy else script.behaviours.get(question, "good")
    gold = script.golds.get(question, "unknown")
    q = question.rstrip("?")
    if b == "error500":
        return 500
    if b == "slow":
        return None
    if b == "invalid":
        if turn == 0:
            return "<think>Hmm, let me think about this without any tags.</think>"
        turn -= 1
    if b == "nosearch":
        return f"<think>I remember this one.</think>\n<answer> {gold} </answer>"
    if b == "guess_first" and turn == 0:
        return f"<think>I could write <answer> now but I check first.</think>\n<search> {q} </search>\n<information>made up</information>"
    if turn == 0:
        return f"<think>I need to look this up.</think>\n<search> {q} </search>\n<information>made up by the model</information>"
    if b == "wrong":
        return "<think>The passages do not say.</think>\n<answer> nobody in particular </answer>"
    if b == "phrase":
        return f"<think>I remember that it is {gold}.</think>\n<answer> {gold} </answer>"
    return f"<think>The passages say it is {gold}.</think>\n<answer> {gold} </answer> trailing words"


def make_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.get("/health")  # a retriever that says it is healthy and then fails every search
    async def health():
        return {"status": "ok"}

    @app.post("/retrieve")
    async def retrieve():
        return JSONResponse({"detail": "index not loaded"}, status_code=503)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        script.requests.append(body)
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": f"model {body.get('model')} not found"}}, status_code=404)
        msgs = body["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        question = re.search(r"Question: (.*)\n?$", user).group(1).strip()
        turn = sum(1 for m in msgs if m["role"] == "assistant")
        script.attempts[(question, turn)] += 1
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        behaviour = "good" if script.healthy else script.behaviours.get(question, "good")
        if behaviour == "flaky" and script.attempts[(question, turn)] == 1:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        text = reply(script, question, turn)
        if text is None:
            await asyncio.sleep(script.slow_s)
            return JSONResponse({"error": {"message": "too late"}}, status_code=500)
        if isinstance(text, int):
            return JSONResponse({"error": {"message": "internal error"}}, status_code=text)
        finish = "stop"
        cut = [(text.find(s), s) for s in body.get("stop") or [] if s in text]
        if cut:
            text = text[: min(cut)[0]]  # like OpenAI: the stop string is not returned
        words = len(text.split())
        if words > body["max_tokens"]:
            text, finish = " ".join(text.split()[: body["max_tokens"]]), "length"
        prompt_tokens = sum(len(m["content"].split()) for m in msgs)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": words, "total_tokens": prompt_tokens + words},
        }

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(script: Script) -> Iterator[str]:
    """Serve ``script`` on 127.0.0.1 in a thread; yields the API root (``.../v1``)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(script), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake teacher endpoint did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
