#!/usr/bin/env bash
# Stage 3 on a GPU node: Search-R1-style multi-turn PPO with VeRL 0.9.1 (sap train-ppo).
#
#   scripts/train_ppo.sh CONFIG [INIT] [-- more sap options]
#
#   CONFIG   experiment YAML, e.g. configs/paper/nq_qwen2.5-3b.yaml
#   INIT     sft (default: runs/<experiment>/sft/merged) or base (model.path)
#
# Before: 'make setup-gpu' on this node (VeRL with vLLM, FSDP and flash-attn in .venv-rl), an
# index ('sap retriever index') and a retriever answering at the config's retriever.url
# (scripts/retrieval_launch.sh). Several nodes: start a Ray cluster first ('ray start --head' on
# the first node, 'ray start --address HEAD:6379' on the others, all from this checkout with
# .venv-rl active), run a retriever on every node (the agent loop calls retriever.url from
# every node's agent-loop workers: use 127.0.0.1 with one retriever per node, or one shared
# host:port), set ppo.nnodes and ppo.n_gpus_per_node, then run this script on the head node.
#
# Environment: SAP (default .venv/bin/sap), SAP_SET (extra '--set k=v' arguments), DRY_RUN=1
# (validate and print the VeRL command only).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1
shift
INIT=sft
if [[ $# -ge 1 && "$1" != "--" ]]; then
  INIT=$1
  shift
fi
[[ "${1:-}" == "--" ]] && shift
SAP=${SAP:-.venv/bin/sap}

if ! command -v nvidia-smi >/dev/null && [[ "${DRY_RUN:-0}" != 1 ]]; then
  echo "error: no NVIDIA GPU on this machine; VeRL's trainer needs CUDA (DRY_RUN=1 validates only)" >&2
  exit 2
fi
args=(train-ppo --config "$CONFIG" --init "$INIT")
[[ "${DRY_RUN:-0}" == 1 ]] && args+=(--dry-run)
# shellcheck disable=SC2206
[[ -n "${SAP_SET:-}" ]] && args+=(${SAP_SET})
exec "$SAP" "${args[@]}" "$@"
