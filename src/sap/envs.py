"""The one boundary to the framework environments.

LLaMA-Factory (``.venv-sft``) and VeRL (``.venv-rl``) pin versions that conflict with each
other and with the core environment, so sap never imports them: it runs them as child
processes with their environment's interpreter. Everything about that crossing lives here:

- :func:`resolve_python`: one rule for ``environments.sft_python`` / ``environments.rl_python``:
  an absolute path as is; a relative one against the sap checkout first, then the working
  directory (so ``sap`` works from any folder);
- :func:`probe`: runs ``python -m sap.envs_probe`` in the environment (a real import of sap,
  not a code string): Python and package versions, torch's CUDA build and the GPUs it sees;
  the one GPU detection of sap (:func:`gpu_count`);
- :func:`run`: every child process with one policy: output into a log file (optionally teed
  to the terminal), the child in its own session so Ctrl-C or SIGTERM stops its whole process
  group and every process below it (SIGTERM, then SIGKILL after a grace period; optionally
  SIGINT first so it can shut down what it started), a timeout that raises
  :class:`ChildTimedOut` naming the command and the log (:class:`ChildStalled` when it prints
  nothing for too long), and a non-zero exit that raises
  :class:`~sap.rules.errors.RunFailed` naming the log, with its last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap.rules.errors import RunFailed, SapError

SRC_DIR = Path(__file__).resolve().parents[1]
"""``src/``: put first on the children's PYTHONPATH, so they run this very sap."""
CHECKOUT = SRC_DIR.parent
"""The sap checkout (the folder holding ``src/``, ``configs/``, ``.venv-*``)."""

ROLES: dict[str, tuple[str, str, str]] = {
    "sft": ("environments.sft_python", "make setup-sft", "LLaMA-Factory 0.9.5"),
    "rl": ("environments.rl_python", "make setup-rl (CPU) or make setup-gpu (GPU node)", "VeRL 0.9.1"),
}
"""role -> (config key, how to create it, what it holds)."""

GRACE_S = 10.0
"""Seconds a stopped child gets between SIGTERM and SIGKILL."""


class EnvironmentMissing(SapError):
    """A framework environment that is not there or does not run; says how to create it."""


class ChildTimedOut(RunFailed):
    """A child process ran past its timeout (it and its process group were stopped)."""


class ChildStalled(RunFailed):
    """A child process printed nothing for ``stall_timeout_s`` (stopped as hung)."""


# --- interpreters ---------------------------------------------------------------------------


def resolve_python(configured: str, role: str = "rl") -> Path:
    """The interpreter of a framework environment, by the one rule: an absolute path as is,
    a relative one against the sap checkout, then the working directory."""
    key, make, holds = ROLES[role]
    p = Path(configured).expanduser()
    candidates = [p] if p.is_absolute() else [CHECKOUT / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return Path(os.path.abspath(c))  # keep the venv's symlink: resolving it would leave the venv
    looked = " or ".join(str(c) for c in candidates)
    raise EnvironmentMissing(
        f"{role.upper()} environment not found: {key} = {configured!r} (looked for {looked}). "
        f"Create it with `{make}` ({holds}), or point {key} at its python"
    )


def python_for(cfg, role: str) -> Path:
    """``cfg.environments.<role>_python`` resolved by :func:`resolve_python`."""
    return resolve_python(getattr(cfg.environments, f"{role}_python"), role)


# --- probing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """What :func:`probe` found in one environment."""

    python: Path
    versions: dict[str, str | None] = field(default_factory=dict)
    cuda_devices: int | None = None
    """CUDA devices torch sees there (0: none; None: torch missing or broken)."""
    torch_cuda: str | None = None
    """The CUDA version torch was built for (None: a CPU build)."""
    gpu_names: tuple[str, ...] = ()
    python_version: str | None = None
    torch_error: str | None = None

    @property
    def bin_dir(self) -> Path:
        return self.python.parent

    @property
    def prefix(self) -> Path:
        return self.bin_dir.parent

    def tool(self, name: str) -> Path:
        """An executable of this environment (``llamafactory-cli``, ``torchrun``, ...)."""
        return self.bin_dir / name

    def has(self, package: str) -> bool:
        return bool(self.versions.get(package))


def probe(python: str | Path, timeout_s: float = 180) -> Environment:
    """Run ``python -m sap.envs_probe`` in that interpreter; raises :class:`EnvironmentMissing`
    when it does not run."""
    python = Path(python)
    try:
        done = run([str(python), "-m", "sap.envs_probe"], timeout_s=timeout_s, check=False, what="environment probe")
        info = done.result()
    except (SapError, OSError) as e:
        raise EnvironmentMissing(f"the environment of {python} does not run sap's probe ({e}); recreate it") from None
    if done.returncode != 0:
        raise EnvironmentMissing(f"the environment of {python} does not run sap's probe (exit {done.returncode}):\n{done.tail(10)}")
    return Environment(
        python=python,
        versions=info["versions"],
        cuda_devices=info["cuda_devices"],
        torch_cuda=info["torch_cuda"],
        gpu_names=tuple(info["gpu_names"]),
        python_version=info["python_version"],
        torch_error=info["torch_error"],
    )


def gpu_count(python: str | Path | None = None) -> int:
    """CUDA devices torch sees in that environment (default: this one); 0 when none or no torch."""
    return probe(python or sys.executable).cuda_devices or 0


# --- child processes ------------------------------------------------------------------------


def child_env(python: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this sap's ``src/`` first on PYTHONPATH, the interpreter's
    ``bin/`` first on PATH (its torchrun, ray, ...), unbuffered output, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "__PYVENV_LAUNCHER__")}
    env["PYTHONPATH"] = str(SRC_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if python is not None:
        bin_dir = Path(python).parent
        env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Completed:
    """A finished child: exit code, its stdout lines (when kept), the log and the last lines."""

    command: list[str]
    returncode: int
    stdout: str = ""
    log: Path | None = None
    last_lines: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.last_lines[-n:])

    def result(self) -> dict[str, Any]:
        """The JSON object on the child's last stdout line: how sap's ``python -m …`` helpers
        (probes, the template check, CPU rollouts) answer. Raises :class:`RunFailed` naming the
        command and its last lines when there is none."""
        lines = self.stdout.strip().splitlines()
        try:
            value = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            value = None
        if not isinstance(value, dict):
            raise RunFailed(f"{shlex.join(map(str, self.command))} printed no JSON result (exit {self.returncode}):\n{self.tail(10)}")
        return value


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (Linux ``/proc``), also those that left its process
    group (Ray starts its daemons in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_group(proc: subprocess.Popen, grace_s: float = GRACE_S, interrupt_first: bool = False) -> None:
    """Stop the child, its process group and every process below it: with ``interrupt_first``,
    SIGINT to the child and up to ``grace_s`` for it to shut down what it started (VeRL stops
    Ray); then SIGTERM to all of them, and SIGKILL to what is left ``grace_s`` later."""
    pgid = proc.pid  # start_new_session: the child leads its own group, under its own id
    tree = set(descendants(proc.pid)) if proc.poll() is None else set()
    if interrupt_first and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            tree |= set(descendants(proc.pid))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid) and not any(_alive(p) for p in tree):
                return
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every ``finally`` runs and children are stopped."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    cmd: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    tee: bool = False,
    keep_stdout: bool = True,
    poll: Callable[[], None] | None = None,
    interval_s: float = 0.5,
    on_line: Callable[[str], None] | None = None,
    stall_timeout_s: float | None = None,
    interrupt_first: bool = False,
    check: bool = True,
    what: str | None = None,
    cwd: str | Path | None = None,
    grace_s: float = GRACE_S,
) -> Completed:
    """Run ``cmd`` to the end under sap's one policy (see the module docstring).

    Output (stdout and stderr, line by line) is appended to ``log`` (after a ``$ command``
    line), passed to ``on_line`` and, with ``tee``, copied to this terminal; stdout is kept in
    the result unless ``keep_stdout`` is False. ``poll`` is called every ``interval_s`` while
    the child runs; an exception it raises stops the child like Ctrl-C does. No output for
    ``stall_timeout_s`` raises :class:`ChildStalled`; ``interrupt_first``: the child gets SIGINT
    (and ``grace_s``) before the others are terminated (:func:`stop_group`). ``check``: a
    non-zero exit raises :class:`RunFailed`. ``env`` defaults to :func:`child_env`.
    """
    cmd = [str(c) for c in cmd]
    what = what or Path(cmd[0]).name
    shown = shlex.join(cmd)
    out_lines: list[str] = []
    last: deque[str] = deque(maxlen=200)
    last_output = [time.monotonic()]
    lock = threading.Lock()
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = log.open("a", encoding="utf-8", errors="replace")
        log_file.write(f"$ {shown}\n")
        log_file.flush()

    def pump(stream, is_stdout: bool) -> None:
        for line in iter(stream.readline, ""):
            with lock:
                last_output[0] = time.monotonic()
                if on_line is not None:
                    on_line(line)
                if is_stdout and keep_stdout:
                    out_lines.append(line)
                last.append(line.rstrip("\n"))
                if log_file is not None:
                    log_file.write(line)
                    log_file.flush()
                if tee:
                    (sys.stdout if is_stdout else sys.stderr).write(line)
                    (sys.stdout if is_stdout else sys.stderr).flush()
        stream.close()

    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=dict(env) if env is not None else child_env(),
            cwd=cwd,
            start_new_session=True,  # its own process group: stopped as a whole, never by our terminal alone
        )
    except OSError as e:
        if log_file is not None:
            log_file.close()
        raise RunFailed(f"{what}: cannot start {shown}: {e}") from None
    readers = [threading.Thread(target=pump, args=(s, s is proc.stdout), daemon=True) for s in (proc.stdout, proc.stderr)]
    for t in readers:
        t.start()
    timed_out = stalled = False
    try:
        with _sigterm_as_interrupt():
            while proc.poll() is None:
                if poll is not None:
                    poll()
                now = time.monotonic()
                if timeout_s is not None and now - started > timeout_s:
                    timed_out = True
                    break
                if stall_timeout_s is not None and now - last_output[0] > stall_timeout_s:
                    stalled = True
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=interval_s)
    except BaseException:
        stop_group(proc, grace_s, interrupt_first)
        raise
    finally:
        if timed_out or stalled or proc.poll() is not None:
            stop_group(proc, grace_s if proc.poll() is None else 1.0, interrupt_first)  # also what the child left behind
        for t in readers:
            t.join(timeout=5)
        if log_file is not None:
            log_file.close()
    if poll is not None:
        poll()
    done = Completed(cmd, proc.returncode, "".join(out_lines), log, list(last), time.monotonic() - started)
    where = f"see {log}" if log is not None else "output below"
    if stalled:
        raise ChildStalled(f"{what} printed nothing for {stall_timeout_s:g}s and was stopped as hung ({where}): {shown}\n{done.tail(20)}")
    if timed_out:
        raise ChildTimedOut(f"{what} ran past its {timeout_s:.0f}s timeout and was stopped ({where}): {shown}\n{done.tail(20)}")
    if check and done.returncode != 0:
        raise RunFailed(f"{what} failed (exit {done.returncode}); {where}, last lines:\n{done.tail(30)}")
    return done
