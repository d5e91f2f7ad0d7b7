"""CPU mode for ``sap train-ppo``: VeRL 0.9.1's own ``verl.trainer.main_ppo`` on a machine with no
CUDA GPU.

Two halves, one module:

- **the driver side** (imported by :mod:`sap.stages.train_ppo` in sap's core environment, no
  VeRL import): :func:`cpu_overrides` (the Hydra overrides CPU needs, added after sap's own and
  before ``ppo.verl``) and :func:`cpu_env` (the environment of the trainer process);
- **the plugin** (inside every VeRL process of a CPU run): VeRL imports this module through its
  own ``VERL_USE_EXTERNAL_MODULES`` hook (``verl/__init__.py``), and with ``VERL_PLATFORM=cpu``
  set, :func:`install` registers a CPU platform and an ``hf`` rollout engine and adjusts the few
  VeRL internals that assume an accelerator. Nothing happens on a GPU node: sap sets neither
  variable there.

VeRL internals this module touches (``verl==0.9.1``; ``tests/rl/test_cpu_patch_points.py``
checks every one of them and names the one that moved):

=========================================================================  =====================================
VeRL internal                                                              what sap does with it
=========================================================================  =====================================
``verl.plugin.platform.platform_manager.PlatformRegistry.register``        registers platform ``cpu``
``verl.plugin.platform.platform_base.PlatformBase``                        :class:`CPUPlatform` implements it
``verl.utils.distributed.initialize_global_process_group_ray``             backend ``gloo`` (VeRL builds
  (imported by name into ``verl.workers.engine_workers``)                  ``cpu:gloo,cpu:gloo``: duplicate)
``verl.workers.engine.base.EngineRegistry`` (``_engines``)                 FSDP engines also for ``cpu``
``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead``         registered for device ``cpu``
``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithValueHead``      registered for device ``cpu``
``verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy``             ``pin_memory=False`` (no accelerator)
``verl.utils.model.load_valuehead_model``                                  critic loads with the configured
                                                                           attention (``flash_attention_2``
                                                                           is hard-coded)
``verl.workers.rollout.replica.RolloutReplicaRegistry.register``           rollout replica ``hf``
``verl.workers.rollout.replica.RolloutReplica``                            :class:`HFReplica` subclasses it
``verl.workers.rollout.base._ROLLOUT_REGISTRY``                            ``("hf", "async")`` adapter
``verl.workers.rollout.base.BaseRollout``                                  :class:`HFServerAdapter` subclasses it
``verl.workers.rollout.replica.TokenOutput``                               returned by the ``hf`` server
=========================================================================  =====================================

Overrides (:func:`cpu_overrides`) and why: ``trainer.device=cpu``; ``rollout.name=hf``;
``ray_init.num_gpus`` = the configured GPUs (VeRL's placement asks Ray for ``GPU`` resources:
they are a label here, no CUDA is used); ``ray_init.num_cpus`` large enough for every Ray actor
VeRL starts (TransferQueue's controller and storage units wait silently for a free CPU);
``fsdp2`` for actor, reference and critic (FSDP1's ``sync_module_states`` fails with CPU
parameters); ``sdpa`` attention for actor and critic; one TransferQueue storage unit, one reward
worker, dataloader workers 0 (a shutdown traceback otherwise); no validation before training.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The module VeRL imports through ``VERL_USE_EXTERNAL_MODULES``.
PLUGIN_MODULE = __name__ if __name__ != "__main__" else "sap.rl.cpu"
#: Name of the rollout engine and of the VeRL platform this module registers.
ROLLOUT_NAME = "hf"
PLATFORM_NAME = "cpu"
#: Where the rollout server records a fingerprint of the weights it received (JSON lines).
WEIGHTS_LOG_ENV = "SAP_ROLLOUT_WEIGHTS_LOG"
#: Ray CPUs: enough for the task runner, TransferQueue (controller + storage unit), agent-loop and
#: reward workers, the rollout server and the trainer workers; Ray CPUs are scheduling slots.
RAY_NUM_CPUS = 32


# --- the driver side (core environment, no VeRL) -------------------------------------------------


def cpu_overrides(n_gpus: int, agent_workers: int) -> dict[str, Any]:
    """The Hydra overrides that make VeRL's trainer run on CPU (``n_gpus`` becomes Ray's
    ``GPU`` label count: one FSDP rank and one rollout replica per label)."""
    return {
        "trainer.device": "cpu",
        "actor_rollout_ref.rollout.name": ROLLOUT_NAME,
        "+ray_kwargs.ray_init.num_cpus": max(RAY_NUM_CPUS, 8 + 2 * agent_workers + 2 * n_gpus),
        "+ray_kwargs.ray_init.num_gpus": n_gpus,
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.ref.strategy": "fsdp2",
        "critic.strategy": "fsdp2",
        "+actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
        "+critic.model.override_config.attn_implementation": "sdpa",
        "reward.num_workers": 1,
        "data.dataloader_num_workers": 0,
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
        "trainer.val_before_train": False,
    }


def ray_cpus_needed(n_gpus: int, agent_workers: int, reward_workers: int, storage_units: int) -> int:
    """Ray CPUs the v1 trainer's actors ask for: the task runner, TransferQueue's controller and
    each storage unit, agent-loop and reward workers, a trainer worker per GPU label (+ margin)."""
    return 2 + storage_units + agent_workers + reward_workers + 2 * n_gpus + 4


def check_ray_capacity(overrides: dict[str, Any], n_gpus: int, agent_workers: int) -> None:
    """Refuse a CPU configuration whose Ray actors cannot all be scheduled: VeRL's TransferQueue
    would wait for a free Ray CPU forever, printing nothing. Raises ValueError naming the keys."""
    cpus = int(overrides.get("+ray_kwargs.ray_init.num_cpus", overrides.get("ray_kwargs.ray_init.num_cpus", RAY_NUM_CPUS)))
    units = int(overrides.get("transfer_queue.backend.SimpleStorage.num_data_storage_units", 8))
    reward = int(overrides.get("reward.num_workers", 8))
    need = ray_cpus_needed(n_gpus, agent_workers, reward, units)
    if cpus < need:
        raise ValueError(
            f"CPU mode: Ray gets {cpus} CPUs (+ray_kwargs.ray_init.num_cpus) but VeRL's actors need about {need} "
            f"({units} TransferQueue storage unit(s), {agent_workers} agent-loop and {reward} reward worker(s), {n_gpus} trainer "
            f"rank(s)); with fewer, TransferQueue waits forever. Raise +ray_kwargs.ray_init.num_cpus or lower "
            f"transfer_queue.backend.SimpleStorage.num_data_storage_units in ppo.verl."
        )


def cpu_env(weights_log: Path | None = None) -> dict[str, str]:
    """Environment of a CPU run's trainer process (Ray workers inherit it)."""
    env = {
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "RAY_DEDUP_LOGS": "0",
        # Ray's memory monitor kills its own workers when the *host* passes 95% memory, whoever
        # uses it: on a shared CPU machine that ends training for other programs' memory. The
        # kernel's OOM killer still acts on a real shortage.
        "RAY_memory_monitor_refresh_ms": "0",
    }
    if weights_log is not None:
        env[WEIGHTS_LOG_ENV] = str(weights_log)
    return env


# --- the plugin (inside VeRL's processes) --------------------------------------------------------


class PatchPointMissing(RuntimeError):
    """A VeRL internal that the CPU mode relies on is not where VeRL 0.9.1 had it."""


def patch_point(module: str, attr: str) -> Any:
    """``module.attr`` or :class:`PatchPointMissing` naming it (a VeRL upgrade must fail loudly)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise PatchPointMissing(f"sap's CPU mode needs VeRL module {module} (verl==0.9.1): {e}") from e
    if not hasattr(mod, attr):
        raise PatchPointMissing(f"sap's CPU mode needs {module}.{attr}, which this VeRL does not have (verl==0.9.1 had it)")
    return getattr(mod, attr)


#: Every VeRL internal the plugin touches, as (module, attribute): checked by :func:`check_patch_points`.
PATCH_POINTS: list[tuple[str, str]] = [
    ("verl.plugin.platform.platform_manager", "PlatformRegistry"),
    ("verl.plugin.platform.platform_base", "PlatformBase"),
    ("verl.utils.distributed", "initialize_global_process_group_ray"),
    ("verl.workers.engine_workers", "initialize_global_process_group_ray"),
    ("verl.workers.engine.base", "EngineRegistry"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithValueHead"),
    ("verl.workers.engine.fsdp.transformer_impl", "CPUOffloadPolicy"),
    ("verl.utils.model", "load_valuehead_model"),
    ("verl.workers.rollout.replica", "RolloutReplicaRegistry"),
    ("verl.workers.rollout.replica", "RolloutReplica"),
    ("verl.workers.rollout.replica", "TokenOutput"),
    ("verl.workers.rollout.base", "_ROLLOUT_REGISTRY"),
    ("verl.workers.rollout.base", "BaseRollout"),
]


def check_patch_points() -> list[str]:
    """Check that every patch point exists and still has the shape the plugin relies on;
    returns one line per point. Raises :class:`PatchPointMissing` naming the first one that moved."""
    import inspect

    lines = []
    for module, attr in PATCH_POINTS:
        obj = patch_point(module, attr)
        lines.append(f"{module}.{attr}")
        if attr == "initialize_global_process_group_ray" and "backend" not in inspect.signature(obj).parameters:
            raise PatchPointMissing(f"{module}.{attr} no longer takes backend=: sap's CPU mode passes backend='gloo'")
        if attr == "load_valuehead_model":
            params = set(inspect.signature(obj).parameters)
            if not {"local_path", "torch_dtype", "model_config", "trust_remote_code"} <= params:
                raise PatchPointMissing(f"{module}.{attr} changed its parameters ({sorted(params)}): sap's CPU critic loader mirrors them")
        if attr == "_ROLLOUT_REGISTRY" and not isinstance(obj, dict):
            raise PatchPointMissing(f"{module}.{attr} is no longer a dict of (name, mode) -> class path")
        if attr == "EngineRegistry" and not isinstance(getattr(obj, "_engines", None), dict):
            raise PatchPointMissing(f"{module}.{attr}._engines is gone: sap registers the FSDP engines for device 'cpu' there")
        if attr == "RolloutReplica":
            for method in ("launch_servers", "init_hybrid", "sleep", "wake_up", "abort_all_requests", "resume_generation"):
                if not hasattr(obj, method):
                    raise PatchPointMissing(f"{module}.{attr}.{method} is gone: sap's hf replica implements VeRL 0.9.1's interface")
        if attr == "BaseRollout":
            for method in ("resume", "update_weights", "release"):
                if not hasattr(obj, method):
                    raise PatchPointMissing(f"{module}.{attr}.{method} is gone: sap's hf adapter implements VeRL 0.9.1's interface")
    return lines


def _device_module() -> types.ModuleType:
    """``torch.cpu`` plus the ``torch.cuda``-style calls VeRL makes on its device module."""
    import torch

    dev = types.ModuleType("sap_cpu_device")
    for name in ("synchronize", "current_stream", "stream", "Stream", "Event", "device_count", "is_available", "current_device"):
        setattr(dev, name, getattr(torch.cpu, name))

    def _noop(*_: Any, **__: Any) -> None:
        return None

    def mem_get_info(*_: Any) -> tuple[int, int]:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return avail * page, pages * page

    dev.set_device = _noop
    dev.empty_cache = _noop
    dev.ipc_collect = _noop
    dev.set_per_process_memory_fraction = _noop
    dev.reset_peak_memory_stats = _noop
    dev.mem_get_info = mem_get_info
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(dev, name, lambda *_, **__: 0)
    dev.get_rng_state = lambda *_, **__: torch.get_rng_state()
    dev.set_rng_state = lambda state, *_, **__: torch.set_rng_state(state)
    dev.manual_seed = torch.manual_seed
    dev.manual_seed_all = torch.manual_seed
    dev.get_device_name = lambda *_: "cpu"
    return dev


def _platform_class() -> type:
    PlatformBase = patch_point("verl.plugin.platform.platform_base", "PlatformBase")

    class CPUPlatform(PlatformBase):
        """VeRL's platform interface on a CPU: device ``cpu``, backend ``gloo``, Ray resource
        ``GPU`` (a scheduling label: VeRL places one trainer rank per ``GPU``), no profiler."""

        _module = None

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            if CPUPlatform._module is None:
                CPUPlatform._module = _device_module()
            return CPUPlatform._module

        def is_available(self) -> bool:
            return True

        def current_device(self) -> str:
            return "cpu"  # VeRL uses it as a device: .to(get_device_id()), device_id=...

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            import torch

            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            self.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return CPUPlatform


def _gloo_process_group(original):
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray.__wrapped__ = original
    return initialize_global_process_group_ray


def _load_valuehead_model(original):
    """VeRL's critic loader with the attention implementation of the model's config (``sdpa`` on
    CPU) instead of its hard-coded ``flash_attention_2``; VeRL's own loader as the fallback."""

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        attn = getattr(model_config, "_attn_implementation", None) or "sdpa"
        if attn == "flash_attention_2":
            attn = "sdpa"
        try:
            return AutoModelForTokenClassification.from_pretrained(
                pretrained_model_name_or_path=local_path,
                torch_dtype=torch_dtype,
                config=model_config,
                attn_implementation=attn,
                trust_remote_code=trust_remote_code,
            )
        except (ValueError, OSError):  # no token-classification head for this architecture: VeRL's trl path
            return original(local_path=local_path, torch_dtype=torch_dtype, model_config=model_config, trust_remote_code=trust_remote_code)

    load_valuehead_model.__wrapped__ = original
    return load_valuehead_model


def _no_pin_offload_policy(policy_cls):
    class CPUOffloadPolicyNoPin(policy_cls):
        """FSDP2's CPU offload without pinned memory (pinning needs an accelerator)."""

        def __init__(self, pin_memory: bool = False, **kwargs: Any):
            super().__init__(pin_memory=False, **kwargs)

    return CPUOffloadPolicyNoPin


_installed = False


def install() -> None:
    """Register the CPU platform and the ``hf`` rollout, and adjust VeRL's accelerator
    assumptions (the table in the module docstring). Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True

    registry = patch_point("verl.plugin.platform.platform_manager", "PlatformRegistry")
    registry.register(platform=PLATFORM_NAME)(_platform_class())

    import verl.utils.distributed as dist_mod
    import verl.workers.engine_workers as workers_mod

    original = patch_point("verl.utils.distributed", "initialize_global_process_group_ray")
    patch_point("verl.workers.engine_workers", "initialize_global_process_group_ray")
    wrapped = _gloo_process_group(getattr(original, "__wrapped__", original))
    dist_mod.initialize_global_process_group_ray = wrapped
    workers_mod.initialize_global_process_group_ray = wrapped

    engines = patch_point("verl.workers.engine.base", "EngineRegistry")
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    for model_type, cls_name in (("language_model", "FSDPEngineWithLMHead"), ("value_model", "FSDPEngineWithValueHead")):
        engine_cls = patch_point("verl.workers.engine.fsdp.transformer_impl", cls_name)
        for backend in ("fsdp", "fsdp2"):
            if PLATFORM_NAME not in engines._engines.get(model_type, {}).get(backend, {}):
                engines.register(model_type=model_type, backend=backend, device=PLATFORM_NAME)(engine_cls)
    fsdp_impl.CPUOffloadPolicy = _no_pin_offload_policy(patch_point("verl.workers.engine.fsdp.transformer_impl", "CPUOffloadPolicy"))

    import verl.utils.model as model_mod

    loader = patch_point("verl.utils.model", "load_valuehead_model")
    model_mod.load_valuehead_model = _load_valuehead_model(getattr(loader, "__wrapped__", loader))

    replicas = patch_point("verl.workers.rollout.replica", "RolloutReplicaRegistry")
    replicas.register(ROLLOUT_NAME, lambda: sys.modules[__name__].HFReplica)
    patch_point("verl.workers.rollout.base", "_ROLLOUT_REGISTRY")[(ROLLOUT_NAME, "async")] = f"{PLUGIN_MODULE}.HFServerAdapter"


# --- the hf rollout engine -------------------------------------------------------------------------


def weights_fingerprint(named: dict[str, Any]) -> dict[str, list[float]]:
    """``{name: [sum, sum of squares]}`` in float64: enough to tell two weight sets apart."""
    out = {}
    for name, tensor in named.items():
        t = tensor.detach().double()
        out[name] = [float(t.sum()), float((t * t).sum())]
    return out


class HFServer:
    """The rollout server of one ``hf`` replica (a Ray actor): VeRL's token-in/token-out
    ``generate`` over :class:`sap.rl.hf_server.HFGenerationServer`, the control calls VeRL makes on
    a rollout server (sleep/wake/abort/kv-cache: nothing to free on CPU), and ``update_weights``
    (``load_state_dict`` of the actor's tensors, in chunks)."""

    def __init__(self, model_path: str, replica_rank: int, weights_log: str | None = None):
        from sap.rl.hf_server import HFGenerationServer

        self.server = HFGenerationServer(model_path)
        self.replica_rank = replica_rank
        self.global_steps: int | None = None
        self.weights_log = weights_log
        self._received: dict[str, Any] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any):
        out = await self.server.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        out.extra_fields = {"global_steps": self.global_steps}
        return out

    def load_weights(self, chunk: list[tuple[str, Any]]) -> int:
        import torch

        params = dict(self.server.model.named_parameters())
        params.update({k: v for k, v in self.server.model.named_buffers() if k not in params})
        loaded = 0
        with torch.no_grad():
            for name, tensor in chunk:
                target = params.get(name)
                if target is None:
                    continue
                target.copy_(tensor.to(target.dtype).view_as(target))
                self._received[name] = target
                loaded += 1
        return loaded

    def finish_weights(self, global_steps: int | None) -> int:
        if global_steps is not None:
            self.global_steps = global_steps
        n = len(self._received)
        if self.weights_log and self.replica_rank == 0:
            record = {
                "global_steps": global_steps,
                "time": time.time(),
                "tensors": weights_fingerprint(dict(self.server.model.named_parameters())),
            }
            with open(self.weights_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self._received = {}
        return n

    def parameters_fingerprint(self) -> dict[str, list[float]]:
        return weights_fingerprint(dict(self.server.model.named_parameters()))

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **_: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


def server_name(replica_rank: int) -> str:
    return f"{ROLLOUT_NAME}_server_{replica_rank}"


def _replica_base():
    return patch_point("verl.workers.rollout.replica", "RolloutReplica")


def _adapter_base():
    return patch_point("verl.workers.rollout.base", "BaseRollout")


def __getattr__(name: str) -> Any:  # PEP 562: HFReplica / HFServerAdapter built on first use
    if name == "HFReplica":
        cls = _build_replica()
    elif name == "HFServerAdapter":
        cls = _build_adapter()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls


def _build_replica() -> type:
    import ray

    base = _replica_base()

    class HFReplica(base):
        """One ``hf`` rollout replica: a :class:`HFServer` Ray actor next to its hybrid
        trainer workers (which sync weights into it through :class:`HFServerAdapter`)."""

        async def launch_servers(self):
            if self.is_reward_model or self.is_teacher_model:
                raise NotImplementedError("sap's CPU hf rollout serves the policy only (no reward or teacher model)")
            server_cls = ray.remote(HFServer)
            server = server_cls.options(name=server_name(self.replica_rank), num_cpus=0, max_concurrency=64).remote(
                model_path=getattr(self.model_config, "local_path", None) or self.model_config.path,
                replica_rank=self.replica_rank,
                weights_log=os.environ.get(WEIGHTS_LOG_ENV),
            )
            self.servers = [server]
            self._server_handle = server
            self._server_address = f"{server_name(self.replica_rank)} (ray actor)"

    return HFReplica


def _build_adapter() -> type:
    import ray

    base = _adapter_base()

    class HFServerAdapter(base):
        """The rollout side of a hybrid trainer worker: forwards VeRL's weight sync (the
        actor's full tensors, ``engine.get_per_tensor_param``) to the replica's :class:`HFServer`."""

        CHUNK_BYTES = 64 << 20

        def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
            super().__init__(config, model_config, device_mesh)
            rank = int(os.environ.get("RANK", 0))
            per_replica = self.config.tensor_model_parallel_size * self.config.data_parallel_size * self.config.pipeline_model_parallel_size
            self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
            self.is_leader = rank % per_replica == 0
            self._handle = None
            self.sleep_level = 2

        def _server(self):
            if self._handle is None:
                self._handle = ray.get_actor(server_name(self.replica_rank))
            return self._handle

        async def resume(self, tags: list[str]):
            return None

        async def release(self):
            return None

        async def update_weights(self, weights, global_steps: int | None = None, wire_format: str = "named_tensors", **kwargs: Any):
            if wire_format != "named_tensors":
                raise NotImplementedError(f"sap's hf rollout takes full tensors (wire_format='named_tensors'), got {wire_format!r}")
            if kwargs.get("peft_config") is not None:
                raise NotImplementedError(
                    "sap's hf rollout takes merged weights: set actor_rollout_ref.model.lora.merge=true for LoRA on CPU"
                )
            pending, size, refs = [], 0, []
            for name, tensor in weights:
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if not self.is_leader:
                    continue
                full = full.detach().to("cpu").contiguous()
                pending.append((name, full))
                size += full.numel() * full.element_size()
                if size >= self.CHUNK_BYTES:
                    refs.append(self._server().load_weights.remote(pending))
                    pending, size = [], 0
            if self.is_leader:
                if pending:
                    refs.append(self._server().load_weights.remote(pending))
                await asyncio.gather(*refs)
                await self._server().finish_weights.remote(global_steps)

    return HFServerAdapter


def _wanted() -> bool:
    modules = [m.strip() for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",")]
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME and PLUGIN_MODULE in modules


if _wanted() and "verl" in sys.modules:
    install()
