"""The retrieval server: Search-R1's ``POST /retrieve`` and a ``GET /health``, on FastAPI.

Concurrent requests are micro-batched: a single worker takes every request waiting (up to
``max_batch`` queries, waiting at most ``max_wait_ms`` for more once it has one), runs one
encoder call and one index search in a worker thread, and hands each request its slice. While
one batch computes, the event loop keeps accepting requests, which form the next batch.

Every bad input is a 4xx JSON error ``{"error": kind, "detail": message}`` and the server
stays up; a full queue answers 503 with ``Retry-After`` (the client retries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sap.rules.config import RetrieverServeConfig
from sap_retriever.index import Results, Searcher

log = logging.getLogger("sap_retriever")


def rss_mb() -> float:
    """Resident memory of this process in MiB (peak where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Overloaded(RuntimeError):
    pass


@dataclass
class _Job:
    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects concurrent requests into one ``searcher.search`` call."""

    def __init__(self, searcher: Searcher, max_batch: int, max_wait_ms: float, max_queue: int, workers: int = 1):
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.workers = workers
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="search")
        self.batches = 0
        self.batched_queries = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"micro-batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Overloaded("server is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, queries: list[str], topk: int) -> Results:
        job = _Job(queries, topk, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"too many requests waiting (max_queue={self.queue.maxsize})") from None
        return await job.future

    def _drain(self, batch: list[_Job], n: int) -> int:
        while n < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            batch.append(job)
            n += len(job.queries)
        return n

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            batch = [job]
            n = self._drain(batch, len(job.queries))
            if n < self.max_batch and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
                n = self._drain(batch, n)
            queries = [q for j in batch for q in j.queries]
            topk = max(j.topk for j in batch)
            try:
                results = await loop.run_in_executor(self.executor, self.searcher.search, queries, topk)
            except Exception as e:  # the request fails, the server stays up
                log.exception("search failed for a batch of %d queries", len(queries))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches += 1
            self.batched_queries += len(queries)
            start = 0
            for j in batch:
                part = results[start : start + len(j.queries)]
                start += len(j.queries)
                if not j.future.done():  # the client may have gone away
                    j.future.set_result([row[: j.topk] for row in part])


class BadRequest(Exception):
    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


def parse_request(body: bytes, content_type: str, cfg: RetrieverServeConfig, default_topk: int) -> tuple[list[str], int, bool]:
    """Validate a ``/retrieve`` body -> (queries, topk, return_scores); raises :class:`BadRequest`."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise BadRequest(415, "unsupported_media_type", f"Content-Type must be application/json, got {content_type or 'none'!r}")
    if len(body) > cfg.max_body_bytes:
        raise BadRequest(413, "body_too_large", f"request body is {len(body)} bytes; the limit is {cfg.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, "malformed_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            422, "invalid_request", f'body must be a JSON object {{"queries": [...], "topk": N}}, got {type(payload).__name__}'
        )
    if "queries" not in payload:
        raise BadRequest(422, "invalid_request", "field 'queries' is required (a list of strings)")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise BadRequest(422, "invalid_queries", f"'queries' must be a list of strings, got {type(queries).__name__}")
    if not queries:
        raise BadRequest(422, "invalid_queries", "'queries' is empty")
    if len(queries) > cfg.max_queries:
        raise BadRequest(413, "too_many_queries", f"{len(queries)} queries in one request; the limit is {cfg.max_queries}")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(422, "invalid_queries", f"queries[{i}] must be a string, got {type(q).__name__}")
        if not q.strip():
            raise BadRequest(422, "invalid_queries", f"queries[{i}] is empty")
        if len(q) > cfg.max_query_chars:
            raise BadRequest(413, "query_too_long", f"queries[{i}] has {len(q)} characters; the limit is {cfg.max_query_chars}")
    topk = payload.get("topk")
    if topk is None:
        topk = default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise BadRequest(422, "invalid_topk", f"'topk' must be an integer, got {json.dumps(topk)}")
    if not 1 <= topk <= cfg.max_topk:
        raise BadRequest(422, "invalid_topk", f"'topk' must be between 1 and {cfg.max_topk}, got {topk}")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise BadRequest(422, "invalid_return_scores", f"'return_scores' must be true or false, got {json.dumps(return_scores)}")
    return queries, topk, return_scores


def render(results: Results, return_scores: bool) -> bytes:
    if return_scores:
        body = [[{"document": {"id": p.id, "contents": p.contents}, "score": s} for p, s in row] for row in results]
    else:
        body = [[{"id": p.id, "contents": p.contents} for p, _ in row] for row in results]
    return json.dumps({"result": body}, ensure_ascii=False).encode("utf-8")


def create_app(
    searcher: Searcher, cfg: RetrieverServeConfig | None = None, default_topk: int = 3, startup_s: float | None = None
) -> FastAPI:
    cfg = cfg or RetrieverServeConfig()
    state: dict[str, Any] = {"requests": 0, "queries": 0, "errors": 0, "started": time.time()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = MicroBatcher(searcher, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, workers=max(1, cfg.workers))
        batcher.start()
        app.state.batcher = batcher
        state["started"] = time.time()
        log.info(
            "ready: %s index (%s, %d passages)%s, rss %.0f MiB",
            searcher.backend,
            searcher.index_type,
            searcher.n_docs,
            f", started in {startup_s:.1f}s" if startup_s is not None else "",
            rss_mb(),
        )
        try:
            yield
        finally:
            await batcher.stop()
            log.info("shut down after %d requests (%d queries)", state["requests"], state["queries"])

    app = FastAPI(title="sap retriever", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "invalid_request", str(exc.errors()))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher: MicroBatcher = app.state.batcher
        return {
            "status": "ok",
            **searcher.describe(),
            "uptime_s": round(time.time() - state["started"], 3),
            "startup_s": None if startup_s is None else round(startup_s, 3),
            "requests_served": state["requests"],
            "queries_served": state["queries"],
            "errors": state["errors"],
            "batches": batcher.batches,
            "mean_batch": round(batcher.batched_queries / batcher.batches, 2) if batcher.batches else 0.0,
            "queue_depth": batcher.queue.qsize(),
            "rss_mib": round(rss_mb(), 1),
            "workers": batcher.workers,
            "limits": cfg.model_dump(include={"max_batch", "max_wait_ms", "max_queue", "max_queries", "max_query_chars", "max_topk"}),
        }

    @app.post("/retrieve")
    async def retrieve(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            state["errors"] += 1
            return _error(413, "body_too_large", f"request body is {declared} bytes; the limit is {cfg.max_body_bytes}")
        body = await request.body()
        try:
            queries, topk, return_scores = parse_request(body, request.headers.get("content-type", ""), cfg, default_topk)
        except BadRequest as e:
            state["errors"] += 1
            return _error(e.status, e.kind, e.detail)
        try:
            results = await app.state.batcher.submit(queries, topk)
        except Overloaded as e:
            state["errors"] += 1
            return _error(503, "overloaded", str(e), headers={"Retry-After": "1"})
        except Exception as e:
            state["errors"] += 1
            return _error(500, "search_failed", f"{type(e).__name__}: {e}")
        state["requests"] += 1
        state["queries"] += len(queries)
        return Response(render(results, return_scores), media_type="application/json")

    return app


def resolve_parallelism(cfg: RetrieverServeConfig) -> RetrieverServeConfig:
    """Fill ``workers`` and ``threads`` when they are 0 (auto). On CPU in eager mode, several
    batches each on one core beat one batch on all cores: intra-op threads spin at barriers and
    stall whenever a core is busy with anything else (the HTTP loop, other processes). A
    compiled encoder (few, large native kernels) does better with one batch on all cores."""
    gpu = cfg.gpu
    if not gpu:
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # A compiled encoder spends its time in native kernels that use several threads well.
    workers = cfg.workers or (1 if gpu or cfg.compile else min(cores, 4))
    threads = cfg.threads or max(1, cores // workers)
    return cfg.model_copy(update={"workers": workers, "threads": threads})


def configure_threads(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def serve(
    index_dir: str | os.PathLike[str],
    cfg: RetrieverServeConfig | None = None,
    index_type: str | None = None,
    default_topk: int = 3,
    log_level: str = "info",
) -> None:
    """Load the index and serve until SIGTERM/SIGINT (uvicorn finishes in-flight requests,
    then the batcher stops)."""
    import uvicorn

    t0 = time.perf_counter()
    cfg = resolve_parallelism(cfg or RetrieverServeConfig())
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_threads(cfg.threads)
    from sap_retriever.index import load_searcher

    searcher = load_searcher(Path(index_dir), index_type=index_type, gpu=cfg.gpu, threads=cfg.threads, compile=cfg.compile)
    startup = time.perf_counter() - t0
    log.info("loaded %s in %.2fs, rss %.0f MiB; %d worker(s) x %d thread(s)", index_dir, startup, rss_mb(), cfg.workers, cfg.threads)
    app = create_app(searcher, cfg, default_topk, startup_s=startup)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        backlog=4096,
    )
    uvicorn.Server(config).run()
