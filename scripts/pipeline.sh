#!/usr/bin/env bash
# Run every stage of one experiment config end to end, with its retriever:
#   index -> retriever -> prepare-sft -> train-sft -> train-ppo -> eval -> report
#
#   bash scripts/pipeline.sh configs/demo/smollm2_cpu.yaml              # what `make demo` runs (CPU; make demo-tiny: tiny_cpu.yaml)
#   bash scripts/pipeline.sh configs/paper/nq_qwen2.5-3b.yaml           # the paper's recipe, 8-GPU node
#   bash scripts/pipeline.sh CONFIG eval.limit=8 sft.num_train_epochs=1 # extra args: config overrides
#
# Environment:
#   SAP=...            the sap executable (default: .venv/bin/sap)
#   STAGES="..."       stages to run (default: all of: index retriever prepare-sft train-sft train-ppo eval report)
#   RETRIEVER_URL=...  use a retriever that is already running instead of starting one
#   optional stage "collect" (STAGES="index retriever collect prepare-sft ..."): sap collect's teacher
#                      trajectories (collect.teacher; docs/collect.md), then prepare-sft reads them
#
# Every stage reuses what a previous run finished (index, SFT data and model, finished eval
# questions), so a second run is quick. The retriever this script starts is stopped on exit,
# on failure and on Ctrl-C. Logs: runs/<experiment>/logs/.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,19p' "$0"; exit 2; }
config=$1
shift
[ -f "$config" ] || { echo "pipeline: config not found: $config" >&2; exit 2; }
cd "$(dirname "$0")/.."
SAP=${SAP:-.venv/bin/sap}
[ -x "$SAP" ] || command -v "$SAP" >/dev/null || { echo "pipeline: $SAP not found (run 'make install')" >&2; exit 2; }
STAGES=${STAGES:-"index retriever prepare-sft train-sft train-ppo eval report"}

sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
get() { "$SAP" config get "$1" --config "$config" "${sets[@]}"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

run_dir=$(get run_dir)
logs=$run_dir/logs
mkdir -p "$logs"
corpus=$(get retriever.corpus)
index=$(get retriever.index_dir)
t0=$SECONDS

if want index; then
  step "index: $corpus -> $index"
  if [ -f "$index/meta.json" ]; then
    echo "reusing $index"
  else
    "$SAP" retriever index --corpus "$corpus" --out "$index" --config "$config" "${sets[@]}"
  fi
fi

retriever_pid=
cleanup() {
  local status=$?
  if [ -n "$retriever_pid" ] && kill -0 "$retriever_pid" 2>/dev/null; then
    kill -TERM "$retriever_pid" 2>/dev/null || true
    wait "$retriever_pid" 2>/dev/null || true
    echo "retriever stopped"
  fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if want retriever; then
  if [ -n "${RETRIEVER_URL:-}" ]; then
    url=$RETRIEVER_URL
  else
    port=$("$SAP" config get retriever.serve.port --config "$config" "${sets[@]}")
    if [ "$port" = 0 ] || (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    url=http://127.0.0.1:$port
    step "retriever: serving $index at $url (log: $logs/retriever.log)"
    "$SAP" retriever serve --index "$index" --port "$port" --config "$config" "${sets[@]}" >"$logs/retriever.log" 2>&1 &
    retriever_pid=$!
    "$SAP" retriever wait --url "$url" --pid "$retriever_pid" --timeout 600 --log "$logs/retriever.log"
  fi
  sets+=(--set "retriever.url=$url")
fi

if want collect; then
  collect_out=$(get collect.out)
  step "collect: teacher trajectories -> $collect_out (teacher: $(get collect.teacher.model))"
  "$SAP" collect --config "$config" "${sets[@]}"
  sets+=(--set "sft.prepare.inputs=[$collect_out/trajectories.jsonl]")
fi

if want prepare-sft; then
  step "prepare-sft -> $run_dir/sft/data"
  "$SAP" prepare-sft --config "$config" "${sets[@]}"
fi

if want train-sft; then
  step "train-sft -> $run_dir/sft/merged (log: $run_dir/sft/)"
  if [ -f "$run_dir/sft/summary.json" ] && [ -f "$run_dir/sft/merged/config.json" ]; then
    echo "reusing $run_dir/sft/merged"
  else
    "$SAP" train-sft --config "$config" "${sets[@]}" --overwrite
  fi
fi

if want train-ppo; then
  # VeRL's trainer on the GPUs, or sap's CPU mode without one (ppo.device: auto); a rerun
  # resumes from the last checkpoint and only merges when every step is done.
  step "train-ppo: $(get ppo.total_training_steps) PPO step(s) -> $run_dir/ppo/merged (log: $run_dir/ppo/train.log)"
  "$SAP" train-ppo --config "$config" "${sets[@]}"
fi

if want eval; then
  step "eval -> $run_dir/eval/<group>/"
  "$SAP" eval --group all --config "$config" "${sets[@]}"
fi

if want report; then
  step "report -> $run_dir/report.md"
  "$SAP" report --config "$config" "${sets[@]}"
fi

printf '\npipeline finished in %ss. Everything is under %s:\n' "$((SECONDS - t0))" "$run_dir"
find "$run_dir" -maxdepth 2 -mindepth 1 \( -name merged -o -name data -o -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.txt' -o -name '*.yaml' -o -name logs -o -type d \) -print | sort | sed 's/^/  /'
