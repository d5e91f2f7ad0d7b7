"""The retriever client every searching stage uses (eval, PPO rollouts, teacher collection).

Speaks Search-R1's protocol: ``POST {url}/retrieve`` with ``{"queries", "topk",
"return_scores"}`` answers ``{"result": [[{"document": {"id", "contents"}, "score"}, ...]]}``.
Transient failures (connection refused, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff; after the last try a :class:`RetrievalError` says what failed. An empty
result is never passed off as a search.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sap.rules.config import RetrieverConfig
from sap.rules.errors import SapError
from sap.rules.prompts import format_docs

_DEFAULTS = RetrieverConfig()
"""The one place the client's defaults come from (``retriever`` in the experiment config)."""


class RetrievalError(SapError, RuntimeError):
    """The retriever could not answer (after retries), or answered something unusable."""


@dataclass(frozen=True)
class Hit:
    id: str
    contents: str
    score: float | None = None

    def as_doc(self) -> dict[str, Any]:
        return {"id": self.id, "contents": self.contents}


def docs_text(hits: Sequence[Hit]) -> str:
    """The ``Doc {i}(Title: ...) ...`` lines for one query's hits."""
    return format_docs([h.as_doc() for h in hits])


_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    pass


class RetrieverClient:
    def __init__(
        self,
        url: str = _DEFAULTS.url,
        topk: int = _DEFAULTS.topk,
        timeout_s: float = _DEFAULTS.timeout_s,
        max_retries: int = _DEFAULTS.max_retries,
        backoff_s: float = _DEFAULTS.backoff_s,
    ):
        self.base_url = url.rstrip("/").removesuffix("/retrieve")
        self.topk = topk
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    @classmethod
    def from_config(cls, cfg: Any) -> RetrieverClient:
        """From a :class:`sap.rules.config.RetrieverConfig`."""
        return cls(cfg.url, cfg.topk, cfg.timeout_s, cfg.max_retries, cfg.backoff_s)

    # -- protocol -------------------------------------------------------------------------

    def _payload(self, queries: Sequence[str], topk: int | None) -> dict[str, Any]:
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not one string")
        return {"queries": list(queries), "topk": topk or self.topk, "return_scores": True}

    def _parse(self, response: httpx.Response, n_queries: int) -> list[list[Hit]]:
        if response.status_code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise RetrievalError(f"retriever at {self.base_url} rejected the request: HTTP {response.status_code}: {response.text[:500]}")
        try:
            result = response.json()["result"]
        except (ValueError, KeyError, TypeError) as e:
            raise RetrievalError(f"retriever at {self.base_url} answered without a 'result' list: {e!r}") from None
        if not isinstance(result, list) or len(result) != n_queries:
            raise RetrievalError(
                f"retriever at {self.base_url} answered {len(result) if isinstance(result, list) else 'no'} result lists for {n_queries} queries"
            )
        hits: list[list[Hit]] = []
        for per_query in result:
            row = []
            for item in per_query:
                doc = item.get("document", item) if isinstance(item, dict) else None
                if not isinstance(doc, dict) or "contents" not in doc:
                    raise RetrievalError(f"retriever at {self.base_url} answered a hit without document contents: {str(item)[:200]}")
                row.append(Hit(str(doc.get("id", "")), str(doc["contents"]), item.get("score") if isinstance(item, dict) else None))
            hits.append(row)
        return hits

    def _give_up(self, attempts: int, last: Exception) -> RetrievalError:
        return RetrievalError(f"retriever at {self.base_url}/retrieve failed after {attempts} attempt(s): {last}")

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt)

    # -- sync -----------------------------------------------------------------------------

    def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[Hit]]:
        payload = self._payload(queries, topk)
        if not payload["queries"]:
            return []
        last: Exception | None = None
        with httpx.Client(timeout=self.timeout_s) as client:
            for attempt in range(self.max_retries + 1):
                try:
                    return self._parse(client.post(f"{self.base_url}/retrieve", json=payload), len(payload["queries"]))
                except (httpx.TransportError, _Retryable) as e:
                    last = e
                    if attempt < self.max_retries:
                        time.sleep(self._delay(attempt))
        raise self._give_up(self.max_retries + 1, last)  # type: ignore[arg-type]

    def health(self) -> dict[str, Any]:
        try:
            r = httpx.get(f"{self.base_url}/health", timeout=min(self.timeout_s, 5.0))
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RetrievalError(f"retriever at {self.base_url} is not answering /health: {e}") from None

    # -- async ----------------------------------------------------------------------------

    async def asearch(self, queries: Sequence[str], topk: int | None = None, client: httpx.AsyncClient | None = None) -> list[list[Hit]]:
        payload = self._payload(queries, topk)
        if not payload["queries"]:
            return []
        own = client is None
        client = client or httpx.AsyncClient(timeout=self.timeout_s)
        last: Exception | None = None
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    response = await client.post(f"{self.base_url}/retrieve", json=payload)
                    return self._parse(response, len(payload["queries"]))
                except (httpx.TransportError, _Retryable) as e:
                    last = e
                    if attempt < self.max_retries:
                        await asyncio.sleep(self._delay(attempt))
        finally:
            if own:
                await client.aclose()
        raise self._give_up(self.max_retries + 1, last)  # type: ignore[arg-type]


# --- run guards: a search stage stops early rather than produce meaningless numbers -----------


class RetrieverUnavailable(RetrievalError):
    """The retriever does not answer ``/health`` before a stage starts."""


def require_healthy(cfg: Any, client: RetrieverClient | None = None) -> dict[str, Any]:
    """Check that the retriever of ``cfg`` (a :class:`sap.rules.config.RetrieverConfig`)
    answers ``GET /health`` (one request, at most 5 s), before a stage loads a model. Returns the
    health JSON; raises :class:`RetrieverUnavailable` saying how to start one."""
    client = client or RetrieverClient.from_config(cfg)
    try:
        return client.health()
    except RetrievalError as e:
        raise RetrieverUnavailable(
            f"{e}. Nothing is searched without it, so the run was not started. Start one with "
            f"`sap retriever serve --index INDEX_DIR --port {_port(client.base_url)}` (build INDEX_DIR with `sap retriever index`; "
            "`bash scripts/pipeline.sh CONFIG` starts and stops one itself), or point retriever.url at a running one "
            "(--set retriever.url=http://HOST:PORT)."
        ) from None


def _port(url: str) -> str:
    tail = url.rsplit(":", 1)[-1].split("/", 1)[0]
    return tail if tail.isdigit() else "8000"


class SearchFailureGuard:
    """Counts a run's searches and failed searches (a search that failed after its retries got
    an empty ``<information>`` block). :meth:`check` raises :class:`sap.rules.errors.RunFailed`
    once the failed share passes ``max_failure_rate`` (``retriever.max_failure_rate``). The share
    is taken over at least ``min_searches`` searches, so one failure among the first few does not
    stop a run while a dead retriever stops it within a few searches."""

    def __init__(self, max_failure_rate: float, min_searches: int = 100):
        self.max_failure_rate = max_failure_rate
        self.min_searches = min_searches
        self.searches = 0
        self.failures = 0

    def add(self, searches: int, failures: int) -> None:
        self.searches += searches
        self.failures += failures

    @property
    def exceeded(self) -> bool:
        return self.failures > self.max_failure_rate * max(self.searches, self.min_searches)

    def summary(self) -> str:
        share = self.failures / self.searches if self.searches else 0.0
        return f"{self.failures} of {self.searches} searches failed ({share:.1%}; retriever.max_failure_rate={self.max_failure_rate:g})"

    def check(self, url: str, kept: str) -> None:
        """Raise :class:`RunFailed` when :attr:`exceeded`; ``kept`` says what is kept for a resume."""
        if self.exceeded:
            from sap.rules.errors import RunFailed

            raise RunFailed(
                f"stopped: {self.summary()} against the retriever at {url}. Numbers over failed searches mean nothing. "
                f"{kept} Check the retriever (its log, `curl {url}/health`), then rerun the same command to resume."
            )
