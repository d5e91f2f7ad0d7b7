#!/usr/bin/env bash
# Evaluate groups on a GPU node: starts the retriever if none answers, then `sap eval` + `sap report`.
#
#   bash scripts/eval.sh CONFIG [GROUP ...]          # default GROUP: all
#   RETRIEVER_INDEX=indexes/wiki18-e5 bash scripts/eval.sh configs/paper/nq_qwen2.5-3b.yaml sft sft_rl
#
# Environment: SAP (default .venv/bin/sap), RETRIEVER_INDEX (index folder to serve when the
# configured retriever.url is not answering), EXTRA (more `sap eval` options, e.g. "--limit 100").
# On a GPU node the core environment holds `vllm` (make install VLLM_PKG=vllm==<version>).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:?usage: scripts/eval.sh CONFIG [GROUP ...]}
shift
EVAL_GROUPS=("$@")
[ ${#EVAL_GROUPS[@]} -eq 0 ] && EVAL_GROUPS=(all)
SAP=${SAP:-.venv/bin/sap}
PY=$(dirname "$SAP")/python

URL=$("$PY" -c "import sys; from sap.rules.config import load_config; print(load_config(sys.argv[1]).retriever.url)" "$CONFIG")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if ! curl -sf "$URL/health" >/dev/null; then
  : "${RETRIEVER_INDEX:?the retriever at $URL is not answering; set RETRIEVER_INDEX to an index folder to serve}"
  PORT=${URL##*:}
  "$SAP" retriever serve --index "$RETRIEVER_INDEX" --port "${PORT%%/*}" &
  SERVER_PID=$!
  "$SAP" retriever wait --url "$URL" --pid "$SERVER_PID" --timeout 600
fi

ARGS=()
for g in "${EVAL_GROUPS[@]}"; do ARGS+=(--group "$g"); done
# shellcheck disable=SC2086
"$SAP" eval --config "$CONFIG" "${ARGS[@]}" ${EXTRA:-}
"$SAP" report --config "$CONFIG"
