"""The VeRL internals sap's CPU mode (:mod:`sap.rl.cpu`) relies on are where VeRL 0.9.1 had them:
a VeRL upgrade that moves one fails here, naming it, instead of hanging a training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sap.rl import cpu

pytestmark = [pytest.mark.rl_env]


def test_every_patch_point_is_where_the_cpu_mode_expects_it():
    try:
        lines = cpu.check_patch_points()
    except cpu.PatchPointMissing as e:
        pytest.fail(f"VeRL moved an internal that sap's CPU mode patches: {e}")
    assert len(lines) == len(cpu.PATCH_POINTS)


def test_a_moved_internal_is_named(monkeypatch):
    monkeypatch.setattr(cpu, "PATCH_POINTS", [*cpu.PATCH_POINTS, ("verl.workers.rollout.replica", "RolloutReplicaRegistryMoved")])
    with pytest.raises(cpu.PatchPointMissing, match=r"verl\.workers\.rollout\.replica\.RolloutReplicaRegistryMoved"):
        cpu.check_patch_points()
    with pytest.raises(cpu.PatchPointMissing, match=r"verl\.no_such_module"):
        cpu.patch_point("verl.no_such_module", "x")


PROBE = """
import json, verl
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import get_rollout_replica_class
import verl.workers.engine_workers as ew, verl.utils.model as um, verl.workers.engine.fsdp.transformer_impl as ti
policy = ti.CPUOffloadPolicy(pin_memory=True)
print(json.dumps({
    "device": get_device_name(), "backend": get_nccl_backend(), "device_id": get_platform().current_device(),
    "empty_cache": get_torch_device().empty_cache() is None,
    "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
    "critic_engine": EngineRegistry.get_engine_cls("value_model", "fsdp2").__name__,
    "rollout": get_rollout_class("hf", "async").__name__, "replica": get_rollout_replica_class("hf").__name__,
    "gloo": ew.initialize_global_process_group_ray.__name__ == "initialize_global_process_group_ray" and hasattr(ew.initialize_global_process_group_ray, "__wrapped__"),
    "critic_loader": hasattr(um.load_valuehead_model, "__wrapped__"), "pin_memory": policy.pin_memory,
}))
"""


def _probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_plugin_loads_through_verls_external_module_hook():
    got = _probe(cpu.cpu_env())
    assert got == {
        "device": "cpu",
        "backend": "gloo",
        "device_id": "cpu",
        "empty_cache": True,
        "engine": "FSDPEngineWithLMHead",
        "critic_engine": "FSDPEngineWithValueHead",
        "rollout": "HFServerAdapter",
        "replica": "HFReplica",
        "gloo": True,
        "critic_loader": True,
        "pin_memory": False,
    }


def test_without_the_cpu_environment_verl_is_untouched():
    env = {k: "" for k in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    done = subprocess.run(
        [sys.executable, "-c", "import verl, sap.rl.cpu as c, verl.workers.rollout.base as b; print(c._installed, ('hf', 'async') in b._ROLLOUT_REGISTRY)"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]
