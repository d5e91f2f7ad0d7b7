#!/usr/bin/env bash
# LoRA SFT on a GPU node: create the environments if needed, prepare the step-wise data if the
# run has none yet, then `sap train-sft` (LLaMA-Factory; every visible GPU through its torchrun
# launcher) and the merge into runs/<experiment>/sft/merged.
#
#   scripts/train_sft.sh configs/paper/nq_qwen2.5-3b.yaml --set model.path=models/Qwen2.5-3B-Instruct
#   CUDA_VISIBLE_DEVICES=0,1 scripts/train_sft.sh CONFIG --set sft.deepspeed=z2
#   scripts/train_sft.sh CONFIG --resume            # after a crash: from the last checkpoint
#
# Multi-node: set sft.nnodes, sft.node_rank, sft.master_addr, sft.master_port (or LLaMA-Factory's
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) and run this on every node.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: scripts/train_sft.sh CONFIG.yaml [sap train-sft options]" >&2
  exit 2
fi
config=$1
shift

make -s install setup-sft

# Options after CONFIG that are --set overrides also apply to prepare-sft (e.g. run_root).
sets=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --set | -s) sets+=(--set "${args[i + 1]:-}") ;;
  esac
done

data=$(.venv/bin/python - "$config" "${sets[@]}" <<'PY'
import sys
from sap.rules.config import load_config
from sap.stages.prepare_sft import DATA_FILE
overrides = [sys.argv[i + 1] for i in range(2, len(sys.argv) - 1) if sys.argv[i] == "--set"]
cfg = load_config(sys.argv[1], overrides)
print(cfg.run_dir / "sft" / "data" / DATA_FILE)
PY
)
if [ ! -f "$data" ]; then
  echo "no SFT data at $data: running sap prepare-sft first" >&2
  .venv/bin/sap prepare-sft --config "$config" "${sets[@]}"
fi

exec .venv/bin/sap train-sft --config "$config" "$@"
