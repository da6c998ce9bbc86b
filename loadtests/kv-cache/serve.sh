#!/usr/bin/env bash
# Usage: serve.sh MODEL_NAME PORT [extra llama-server args...]
#   MODEL_NAME: qwen | qwen15 | smollm2 (or a file name / path of a .gguf under .work/models)
# Starts llama-server on 127.0.0.1:PORT (exec, so the caller's PID is the server's).
# Defaults: --jinja, -c CTX (env CTX; 32768 for qwen, 8192 for smollm2), 2 threads, 1 slot,
# prompt caching on (llama-server default), --cache-reuse NOT enabled (pass e.g. --cache-reuse 256).
# Server logs go to stderr; set LOG_FILE to redirect them. Run ./setup.sh first.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$HERE/.work"
if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL_NAME PORT [extra llama-server args...]" >&2
  exit 2
fi
name="$1" port="$2"; shift 2

case "$name" in
  qwen)    model="$WORK/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"; ctx="${CTX:-32768}" ;;
  smollm2) model="$WORK/models/smollm2-135m-instruct-q4_1.gguf";       ctx="${CTX:-8192}" ;;
  qwen15)  model="$WORK/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"; ctx="${CTX:-32768}" ;;
  /*)      model="$name"; ctx="${CTX:-8192}" ;;
  *)       model="$WORK/models/$name"; ctx="${CTX:-8192}" ;;
esac
[[ -f "$model" ]] || { echo "model not found: $model (run setup.sh)" >&2; exit 1; }
[[ -x "$WORK/bin/llama-server" ]] || { echo "llama-server not built (run setup.sh)" >&2; exit 1; }

# The binaries look for their shared libs next to themselves; set this anyway (see TEST-MATERIAL pitfalls).
export LD_LIBRARY_PATH="$WORK/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ -n "${LOG_FILE:-}" ]]; then exec >>"$LOG_FILE" 2>&1; fi

exec "$WORK/bin/llama-server" \
  -m "$model" \
  --host 127.0.0.1 --port "$port" \
  --jinja \
  -c "$ctx" \
  -t 2 -tb 2 \
  -np 1 \
  --no-webui \
  "$@"
