"""An OpenAI-compatible chat endpoint as an engine: ``vllm serve`` on a GPU node, or a hosted API.

The agent loop works on token ids; a chat endpoint takes messages and never shows its
tokenizer. :class:`MessageTokenizer` bridges the two: its ids are the characters of the text,
each tagged with who wrote it (the prompt's messages, the teacher, the environment). From a
context the engine rebuilds the conversation so far:

- the prompt: the Search-R1 user message (after ``teacher.system_prompt`` when set), exactly
  what the student sees;
- each teacher turn: an ``assistant`` message;
- each observation (the ``<information>`` block, or the invalid-action message): a ``user``
  message (``observation_role: user``, the default: every chat API accepts it), or appended to
  the assistant's message for an endpoint that continues it (``observation_role: assistant``).

Stop strings ``</search>``/``</answer>`` are sent (``send_stop``); the API removes the one it
stopped at, and the engine puts it back (from vLLM's ``stop_reason``, else from the tag left
open). Whatever the API did, the turn is cut at the first ``</search>``/``</answer>``.

Requests run concurrently (at most ``max_concurrency``), each with a timeout, retried with
exponential backoff after timeouts, connection errors, HTTP 408/409/425/429 and 5xx. A turn
that still fails comes back as ``finish_reason="error"`` and the agent ends that episode as
failed (never dropped). HTTP 401/403/404 stop the run: they are setup errors (key, URL, model).

Token counts come from the API's ``usage``: ``num_generated`` is the completion tokens and
``prompt_tokens`` the prompt tokens of each call (what a hosted API bills).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sap.agent.engines.base import Generation, SamplingParams
from sap.rules.errors import SapError
from sap.rules.tags import STOP_STRINGS, cut_at_stop, unclosed_stop

_PLANE = 0x110000  # one id range per author, each as wide as Unicode
ENVIRONMENT, TEACHER, PROMPT = 0, 1, 2
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FATAL_STATUS = {401, 403, 404}
NO_LIMIT = 1 << 40
"""The endpoint enforces its own context limit; the agent never cuts for it."""


class TeacherError(SapError):
    """The teacher endpoint cannot be used at all (unreachable, bad key, unknown model)."""


class MessageTokenizer:
    """Ids are characters (code points) offset by the author's range: ``encode`` (what the
    agent appends: observations) gives environment ids, the engine's turns are teacher ids,
    ``apply_chat_template`` gives prompt ids holding the messages as JSON. ``decode`` gives the
    text back whatever the author."""

    eos_token_id = None
    pad_token_id = None

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i % _PLANE) for i in ids)

    def teacher_ids(self, text: str) -> list[int]:
        return [ord(c) + TEACHER * _PLANE for c in text]

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, tokenize: bool = True, **_):
        msgs = [dict(m) for m in messages]
        if self.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        text = json.dumps(msgs, ensure_ascii=False)
        return [ord(c) + PROMPT * _PLANE for c in text] if tokenize else text

    def messages(self, ids: Sequence[int], observation_role: str = "user") -> list[dict[str, str]]:
        """The conversation a context holds (see the module docstring)."""
        runs: list[tuple[int, list[int]]] = []
        for i in ids:
            author = i // _PLANE
            if runs and runs[-1][0] == author:
                runs[-1][1].append(i)
            else:
                runs.append((author, [i]))
        msgs: list[dict[str, str]] = []
        for author, run in runs:
            text = self.decode(run)
            if author == PROMPT:
                msgs.extend(json.loads(text))
                continue
            role = "assistant" if author == TEACHER else observation_role
            if role == "user":
                text = text.strip()
            if msgs and msgs[-1]["role"] == role:
                sep = "" if role == "assistant" else "\n"
                msgs[-1] = {"role": role, "content": msgs[-1]["content"] + sep + text}
            else:
                msgs.append({"role": role, "content": text})
        return msgs


@dataclass
class Usage:
    """What the endpoint was asked and charged, over this engine's life."""

    requests: int = 0
    retries: int = 0
    failed_turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class OpenAIChatEngine:
    """An :class:`~sap.agent.engines.base.Engine` over ``POST {base_url}/chat/completions``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        send_stop: bool = True,
        send_seed: bool = True,
        system_prompt: str | None = None,
        observation_role: str = "user",
        extra_body: Mapping[str, Any] | None = None,
    ):
        self.base_url = base_url.rstrip("/").removesuffix("/chat/completions")
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.send_stop = send_stop
        self.send_seed = send_seed
        self.observation_role = observation_role
        self.extra_body = dict(extra_body or {})
        self.tokenizer = MessageTokenizer(system_prompt)
        self.max_model_len = NO_LIMIT
        self.usage = Usage()
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_config(cls, t: Any) -> OpenAIChatEngine:
        """From a :class:`sap.rules.config.TeacherConfig`; reads the key from ``t.api_key_env``."""
        api_key = None
        if t.api_key_env:
            api_key = os.environ.get(t.api_key_env)
            if not api_key:
                raise TeacherError(
                    f"collect.teacher.api_key_env is {t.api_key_env!r} but that environment variable is not set: "
                    f"export {t.api_key_env}=... (or set collect.teacher.api_key_env=null for an endpoint without a key)"
                )
        return cls(
            t.base_url,
            t.model,
            api_key=api_key,
            max_concurrency=t.max_concurrency,
            timeout_s=t.timeout_s,
            max_retries=t.max_retries,
            backoff_s=t.backoff_s,
            send_stop=t.send_stop,
            send_seed=t.send_seed,
            system_prompt=t.system_prompt,
            observation_role=t.observation_role,
            extra_body=t.extra_body,
        )

    # -- setup ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def check(self) -> list[str]:
        """``GET {base_url}/models`` before a run: raises :class:`TeacherError` when the endpoint
        is unreachable, refuses the key, or does not serve ``model``; returns the served models
        (empty when the API has no model list)."""
        url = f"{self.base_url}/models"
        try:
            r = httpx.get(url, headers=self._headers(), timeout=min(self.timeout_s, 10.0))
        except httpx.HTTPError as e:
            raise TeacherError(
                f"teacher endpoint {self.base_url} is not answering ({e!r}); start it (e.g. vllm serve MODEL --port 8001) "
                "or set collect.teacher.base_url"
            ) from None
        if r.status_code in (401, 403):
            raise TeacherError(f"teacher endpoint {url}: HTTP {r.status_code} (check the key in collect.teacher.api_key_env)")
        if r.status_code != 200:
            return []
        try:
            served = [str(m["id"]) for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        if served and self.model not in served:
            raise TeacherError(
                f"teacher endpoint {self.base_url} does not serve {self.model!r} (collect.teacher.model); it serves: {', '.join(served)}"
            )
        return served

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return self._loop.run_until_complete(self._generate_all(prompts, params))

    async def _generate_all(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self._headers())
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(ids: Sequence[int], p: SamplingParams) -> Generation:
            async with gate:
                return await self._one(ids, p)

        return list(await asyncio.gather(*(one(ids, p) for ids, p in zip(prompts, params, strict=True))))

    def request_body(self, ids: Sequence[int], p: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.tokenizer.messages(ids, self.observation_role),
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "n": 1,
        }
        if p.temperature > 0:
            body["top_p"] = p.top_p
        if self.send_stop and p.stop:
            body["stop"] = list(p.stop)
        if self.send_seed and p.seed is not None:
            body["seed"] = p.seed
        body.update(self.extra_body)
        return body

    async def _one(self, ids: Sequence[int], p: SamplingParams) -> Generation:
        assert self._client is not None
        body = self.request_body(ids, p)
        url = f"{self.base_url}/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.usage.retries += 1
            self.usage.requests += 1
            delay = self.backoff_s * (2**attempt)
            try:
                r = await self._client.post(url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s:g}s"
            except httpx.TransportError as e:
                last = f"connection failed: {e!r}"
            else:
                if r.status_code == 200:
                    try:
                        return self._generation(r.json(), p)
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        last = f"unreadable answer ({e!r}): {r.text[:200]}"
                elif r.status_code in _FATAL_STATUS:
                    raise TeacherError(
                        f"teacher endpoint {url} refused the request: HTTP {r.status_code}: {r.text[:300]} "
                        "(check collect.teacher.base_url, model and api_key_env)"
                    )
                elif r.status_code in _RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    delay = max(delay, _retry_after(r))
                else:  # 400/422: this request cannot succeed (e.g. the context is too long)
                    self.usage.failed_turns += 1
                    return _failed(f"HTTP {r.status_code}: {r.text[:300]}")
            if attempt < self.max_retries:
                await asyncio.sleep(delay * (1 + 0.1 * random.random()))
        self.usage.failed_turns += 1
        return _failed(f"{self.max_retries + 1} attempt(s) failed, last: {last}")

    def _generation(self, data: Mapping[str, Any], p: SamplingParams) -> Generation:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        reason = choice.get("finish_reason")
        stop: str | None = None
        if reason == "stop" and p.stop:
            vllm_stop = choice.get("stop_reason")  # vLLM says which stop string matched
            stop = vllm_stop if isinstance(vllm_stop, str) and vllm_stop in p.stop else unclosed_stop(text)
            if stop and not text.endswith(stop):
                text += stop
        text, cut = cut_at_stop(text) if p.stop else (text, None)
        stop = cut or None
        usage = data.get("usage") or {}
        completion = int(usage["completion_tokens"]) if usage.get("completion_tokens") is not None else -(-len(text) // 4)
        prompt = int(usage.get("prompt_tokens") or 0)  # an API without usage: no cost known
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        finish = "stop" if stop else ("length" if reason == "length" else "eos")
        return Generation(self.tokenizer.teacher_ids(text), text, finish, completion, stop, prompt_tokens=prompt)

    def close(self) -> None:
        """Cancel requests still in flight (after Ctrl-C), close the connections and the loop."""
        if self._loop.is_closed():
            return
        try:
            for _ in range(3):  # bounded: each round cancels what is left
                pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                try:
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                except (KeyboardInterrupt, SystemExit):
                    # A Ctrl-C that landed inside a request's own code (not in the wait for the
                    # network) is re-raised by the task awaiting it; the caller is already handling
                    # that interruption, and its outputs are still to be written.
                    continue
            if self._client is not None:
                self._loop.run_until_complete(self._client.aclose())
        finally:
            self._client = None
            self._loop.close()


def _failed(error: str) -> Generation:
    return Generation([], "", "error", 0, error=error)


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(60.0, float(r.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


__all__ = ["STOP_STRINGS", "MessageTokenizer", "OpenAIChatEngine", "TeacherError", "Usage"]
