"""``sap.envs``: the one boundary to the framework environments. Real child processes (a shell
that starts a grandchild and sleeps), real signals; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap import envs
from sap.cli import app
from sap.rules.errors import RunFailed

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "data" / "nq" / "train.jsonl"

# A child that starts a grandchild, writes both pids, and sleeps (in the foreground, so the
# shell stays the child); killing only the child would leave the grandchild running.
FAMILY = "sleep 300 & echo $! > {pids}.grandchild; echo $$ > {pids}.child; echo started; sleep 300"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def family_pids(base: Path, proc: subprocess.Popen | None = None) -> tuple[int, int]:
    """The pids the family wrote; fails at once (with its output) if ``proc`` exits before that."""
    started = lambda: base.with_suffix(".child").is_file() and base.with_suffix(".grandchild").is_file()  # noqa: E731
    if not wait_for(lambda: started() or (proc is not None and proc.poll() is not None)) or not started():
        output = proc.communicate(timeout=10) if proc is not None and proc.poll() is not None else ""
        raise AssertionError(f"child never started; {output}")
    time.sleep(0.2)  # the files are written; let the shell reach its `sleep`
    return int(base.with_suffix(".child").read_text()), int(base.with_suffix(".grandchild").read_text())


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "retriever"), os.environ.get("PYTHONPATH", "")])}


def test_run_logs_both_streams_and_a_failure_names_the_log(tmp_path: Path):
    log = tmp_path / "logs" / "x.log"
    done = envs.run(["sh", "-c", "echo to-out; echo to-err >&2"], log=log)
    assert done.returncode == 0 and done.stdout == "to-out\n"
    text = log.read_text()
    assert text.startswith("$ sh -c ") and "to-out" in text and "to-err" in text
    with pytest.raises(RunFailed) as e:
        envs.run(["sh", "-c", "echo boom >&2; exit 3"], log=log, what="the thing")
    assert "the thing failed (exit 3)" in str(e.value) and str(log) in str(e.value) and "boom" in str(e.value)
    assert e.value.exit_code == 1
    with pytest.raises(RunFailed, match="cannot start"):
        envs.run([str(tmp_path / "no-such-program")])


def test_timeout_stops_the_child_and_its_grandchildren(tmp_path: Path):
    base = tmp_path / "pids"
    log = tmp_path / "t.log"
    t0 = time.monotonic()
    with pytest.raises(envs.ChildTimedOut) as e:
        envs.run(["sh", "-c", FAMILY.format(pids=base)], log=log, timeout_s=2, grace_s=2, what="sleeper")
    assert time.monotonic() - t0 < 60
    assert "sleeper ran past its 2s timeout" in str(e.value) and str(log) in str(e.value) and "sh -c" in str(e.value)
    child, grandchild = family_pids(base)
    assert wait_for(lambda: not alive(child) and not alive(grandchild), 10), "a process of the family survived the timeout"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_runner_stops_the_child_and_its_grandchildren(tmp_path: Path, sig: signal.Signals):
    """Ctrl-C (SIGINT) or SIGTERM to the process that runs a child: the child's whole process
    group stops, and the runner exits."""
    base = tmp_path / "pids"
    driver = textwrap.dedent(f"""
        import sys
        from sap import envs
        try:
            envs.run(["sh", "-c", {FAMILY.format(pids=base)!r}], log=__import__("pathlib").Path({str(tmp_path / "d.log")!r}), grace_s=2)
        except KeyboardInterrupt:
            print("stopped", flush=True)
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        child, grandchild = family_pids(base)
        assert alive(child) and alive(grandchild)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "stopped" in out
    assert wait_for(lambda: not alive(child) and not alive(grandchild), 10), "a process of the family survived"


def test_ctrl_c_to_sap_stops_its_framework_child(tmp_path: Path):
    """SIGINT to a running ``sap train-ppo --dry-run``: the RL-environment child it started (here a
    stand-in interpreter that starts a grandchild and sleeps) stops with its process group, and
    sap exits 130."""
    base = tmp_path / "pids"
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\n" + FAMILY.format(pids=base) + "\n")
    fake_python.chmod(0o755)
    sets = [
        f"run_root={tmp_path / 'runs'}",
        f"environments.rl_python={fake_python}",
        "retriever.url=http://127.0.0.1:9",
        f"ppo.train_data={QUESTIONS}",
        f"ppo.val_data={QUESTIONS}",
        "ppo.val_limit=4",
        "ppo.train_limit=8",
        "ppo.train_batch_size=4",
        "ppo.ppo_mini_batch_size=4",
        "ppo.ppo_micro_batch_size_per_gpu=1",  # the preflight checks the GPU run's batch arithmetic
        "ppo.agent_workers=1",
    ]
    cmd = [sys.executable, "-m", "sap", "train-ppo", "--dry-run", "--init", "base", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child, grandchild = family_pids(base, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert wait_for(lambda: not alive(child) and not alive(grandchild), 10), "a process of the family survived"


def test_interpreter_rule_relative_to_the_checkout_then_cwd(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own" / "bin" / "python"
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert envs.resolve_python("own/bin/python", "rl") == own  # not in the checkout: the working directory
    assert envs.resolve_python(str(own), "rl") == own  # absolute: as is
    with pytest.raises(envs.EnvironmentMissing) as e:
        envs.resolve_python("nowhere/python", "rl")
    assert "environments.rl_python" in str(e.value) and "make setup-rl" in str(e.value)
    assert str(envs.CHECKOUT / "nowhere/python") in str(e.value)  # the checkout is tried first


def test_probe_runs_the_probe_module_in_the_environment():
    env = envs.probe(sys.executable)
    import torch

    assert env.python == Path(sys.executable) and env.python_version == ".".join(map(str, sys.version_info[:3]))
    assert env.versions["sap"] and env.versions["torch"] == torch.__version__
    assert env.cuda_devices == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert envs.gpu_count() == env.cuda_devices
    with pytest.raises(envs.EnvironmentMissing, match="does not run sap's probe"):
        envs.probe("/bin/false")


def test_doctor_lists_every_environment_and_stage(tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["doctor", "--set", f"environments.sft_python={tmp_path}/none/python"])
    assert r.exit_code == 1, r.output  # a missing environment is a failed check
    assert "core" in r.output and "sft   missing" in r.output and "make setup-sft" in r.output
    assert "fail     train-sft" in r.output and "prepare-sft" in r.output
    gpus = envs.gpu_count()
    if not gpus:
        assert "cannot be checked on a machine without a GPU" in r.output


def test_doctor_runs_every_registered_check(tmp_path: Path):
    from sap.rules.config import load_config
    from sap.stages import doctor as d

    seen = []

    def extra(f: d.Findings):
        seen.append(sorted(f.environments) + sorted(f.missing))
        yield d.Check("extra", "ok", "from an added check")

    report = d.doctor(load_config(None, [f"environments.sft_python={tmp_path}/x", f"environments.rl_python={tmp_path}/y"]), [extra])
    assert seen == [["core", "rl", "sft"]] and report.checks == [d.Check("extra", "ok", "from an added check")]
    assert "extra: from an added check" in d.render(report) and json.dumps(report.findings.missing)


def test_a_childs_json_result_is_its_last_stdout_line():
    done = envs.run([sys.executable, "-c", "print('loading'); print('{\"ok\": 1}')"], timeout_s=60)
    assert done.result() == {"ok": 1}
    silent = envs.run([sys.executable, "-c", "print('no json here')"], timeout_s=60)
    with pytest.raises(RunFailed, match=r"printed no JSON result \(exit 0\):\nno json here"):
        silent.result()
