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
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"

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

ONE_MOCK=""
[[ $MOCK_PROCS == 1 ]] && ONE_MOCK="-one-mock"
report_name pools "$ONE_MOCK"

# --- processes and cleanup (lib.sh: cleanup, init_work) ------------------------------------------
PIDS=() K6_PID=""
stop_children() {
  stop_pid "$K6_PID"
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
}
failure_logs() { # RC
  echo "pools.sh failed (exit $1); last lines of the server logs:" >&2
  tail -n 20 "$WORK"/*.log >&2 2>/dev/null || true
}
init_work pools

# --- k6 and binaries -------------------------------------------------------------------------------
install_k6
copy_binaries

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
  wait_mock "$!" "$WORK/mock.log"
else
  for name in a b c; do
    port=$(free_port)
    "$WORK/bin/mock-upstream" --listen "127.0.0.1:$port" >"$WORK/mock-$name.log" 2>&1 &
    PIDS+=($!)
    wait_mock "$!" "$WORK/mock-$name.log" "mock-upstream $name"
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
wait_gateway "$GW_PID" "http://127.0.0.1:$GW_PORT"
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
  k6_wait "$logf" 8
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

GIT_REV=$(git_rev)
# Other processes using CPU when the run ended (the report says what else was running).
ps -eo pcpu=,comm= --sort=-pcpu | head -n 8 >"$WORK/top.txt"

export_run_facts
LT_RATE=$RATE LT_DURATION=$DURATION LT_ROUNDS=$ROUNDS LT_MODE=$MODE LT_PREFIXES=$PREFIXES \
LT_TARGET_US=$TARGET_US LT_MOCK_PROCS=$MOCK_PROCS \
  python3 "$HERE/pools_report.py" "$WORK" >"$REPORT"

show_report
# A failed threshold (k6 exit 99) or a k6 error in any run fails the whole script.
if ! awk -F'\t' '$4 != 0 { bad = 1 } END { exit bad }' "$WORK/runs.tsv"; then
  log "some k6 runs failed their thresholds or errored (see the report)"
  exit 99
fi
