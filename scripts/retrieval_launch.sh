#!/usr/bin/env bash
# Launch sap's retrieval server on a GPU node (Search-R1's POST /retrieve on PORT).
#
#   scripts/retrieval_launch.sh INDEX_DIR [PORT] [GPUS] [HOST]
#
#   INDEX_DIR  built by 'sap retriever index' (its meta.json names the encoder; the encoder's
#              settings are read from there, so queries are embedded exactly as the passages were)
#   PORT       default 8000
#   GPUS       CUDA_VISIBLE_DEVICES for the encoder and FAISS (default: all; "" = CPU only).
#              With GPUs, the FAISS index is sharded across them in fp16.
#   HOST       default 127.0.0.1; 0.0.0.0 to serve other nodes of the cluster
#
# Environment: SAP_PYTHON (default .venv/bin/python), INDEX_TYPE (flat|hnsw|sq8|ivfpq; default:
# the first built), SAP_RETRIEVER_ARGS (more 'sap retriever serve' options, e.g. --max-batch 128).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
INDEX_DIR=$1
PORT=${2:-8000}
HOST=${4:-127.0.0.1}
PYTHON=${SAP_PYTHON:-.venv/bin/python}

if [[ ! -f "$INDEX_DIR/meta.json" ]]; then
  echo "error: $INDEX_DIR is not an index directory (no meta.json); build one with 'sap retriever index'" >&2
  exit 2
fi
if [[ $# -ge 3 ]]; then
  export CUDA_VISIBLE_DEVICES=$3
fi

args=(retriever serve --index "$INDEX_DIR" --host "$HOST" --port "$PORT")
if [[ -n "${INDEX_TYPE:-}" ]]; then
  args+=(--index-type "$INDEX_TYPE")
fi
if [[ "${CUDA_VISIBLE_DEVICES-unset}" != "" ]] && "$PYTHON" -c 'import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)' 2>/dev/null; then
  args+=(--gpu)
fi
# shellcheck disable=SC2206
args+=(${SAP_RETRIEVER_ARGS:-})

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
echo "serving $INDEX_DIR on http://$HOST:$PORT (GPUs: ${CUDA_VISIBLE_DEVICES-all})" >&2
exec "$PYTHON" -m sap "${args[@]}"
