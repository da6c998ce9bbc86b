#!/usr/bin/env bash
# ctxgate core load test: k6 against mock-upstream directly and through ctxgate, back to back,
# for non-streamed and streamed chat completions at fixed rates and at max throughput.
# Writes loadtests/results/YYYY-MM-DD-core.md (QUICK=1: ...-core-quick.md) and prints it.
#
#   bash loadtests/run.sh            # full run, ~4 minutes plus the build
#   QUICK=1 bash loadtests/run.sh    # smoke run, ~45 s once built
#
# Knobs (environment): SKIP_BUILD=1, RATES="100 1000", MODES="json stream", SKIP_MAX=1,
# RATE_DURATION=20s, MAX_DURATION=15s, MAX_VUS=64, MOCK_LATENCY_MS=0, MOCK_CHUNKS=8,
# MOCK_CHUNK_DELAY_MS=0, PIN=1 (k6 on CPU 0, mock-upstream and ctxgate on CPU 1),
# TAG=name (report becomes YYYY-MM-DD-core-name.md, so side experiments keep the main report),
# KEEP_WORK=1 (keep the temp dir with logs and /metrics scrapes).
# All traffic goes to 127.0.0.1; every k6 run is bounded by its duration (plus k6's 30s graceful
# stop), every wait loop by a count.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
START_TS=$(date +%s)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RATES=${RATES:-"50 200"}
  RATE_DURATION=${RATE_DURATION:-2s}
  MAX_DURATION=${MAX_DURATION:-2s}
  WARMUP_DURATION=1s
  MAX_VUS=${MAX_VUS:-16}
else
  RATES=${RATES:-"100 1000"}
  RATE_DURATION=${RATE_DURATION:-20s}
  MAX_DURATION=${MAX_DURATION:-15s}
  WARMUP_DURATION=3s
  MAX_VUS=${MAX_VUS:-64}
fi
MODES=${MODES:-"json stream"}
SKIP_MAX=${SKIP_MAX:-0}
PIN=${PIN:-0}
TAG=${TAG:-}
MOCK_LATENCY_MS=${MOCK_LATENCY_MS:-0}
MOCK_CHUNKS=${MOCK_CHUNKS:-8}
MOCK_CHUNK_DELAY_MS=${MOCK_CHUNK_DELAY_MS:-0}

# Raw k6 summaries land beside the report as $NAME-CASE-{direct,gateway}.json (gitignored).
report_name core

# --- processes and cleanup (lib.sh: cleanup, init_work) ------------------------------------------
MOCK_PID="" GW_PID="" K6_PID=""
stop_children() { stop_pids 50 "$K6_PID" "$GW_PID" "$MOCK_PID"; }
failure_logs() { # RC
  echo "run.sh failed (exit $1); last lines of the server logs:" >&2
  tail -n 20 "$WORK/mock.log" "$WORK/ctxgate.log" >&2 2>/dev/null || true
}
init_work loadtest

# PIN=1 separates the load generator from the servers; both still share the machine.
K6_CPU=() SRV_CPU=()
if [[ $PIN == 1 ]]; then K6_CPU=(taskset -c 0) SRV_CPU=(taskset -c 1); fi

# --- k6 and the build (run copies of the binaries) -----------------------------------------------
install_k6
copy_binaries

# --- servers -----------------------------------------------------------------------------------------
MOCK_PORT=$(free_port)
GW_PORT=$(free_port)
while [[ $GW_PORT == "$MOCK_PORT" ]]; do GW_PORT=$(free_port); done
DIRECT_URL="http://127.0.0.1:$MOCK_PORT/v1"
GATEWAY_URL="http://127.0.0.1:$GW_PORT/v1"

"${SRV_CPU[@]}" "$WORK/bin/mock-upstream" --listen "127.0.0.1:$MOCK_PORT" --latency "$MOCK_LATENCY_MS" \
  --chunks "$MOCK_CHUNKS" --chunk-delay "$MOCK_CHUNK_DELAY_MS" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
wait_mock "$MOCK_PID" "$WORK/mock.log"
log "mock-upstream (pid $MOCK_PID) at $DIRECT_URL"

cat >"$WORK/ctxgate.toml" <<EOF
[server]
max_concurrent_requests = 10000
[telemetry]
log_level = "warn"
[[upstreams]]
name = "mock"
base_url = "$DIRECT_URL"
EOF
RUST_LOG=warn "${SRV_CPU[@]}" "$WORK/bin/ctxgate" serve --config "$WORK/ctxgate.toml" --listen "127.0.0.1:$GW_PORT" \
  --upstream "$DIRECT_URL" >"$WORK/ctxgate.log" 2>&1 &
GW_PID=$!
wait_gateway "$GW_PID" "http://127.0.0.1:$GW_PORT"
log "ctxgate (pid $GW_PID) at $GATEWAY_URL"

# --- measurement helpers -----------------------------------------------------------------------
scrape() { curl -sf --max-time 5 "http://127.0.0.1:$GW_PORT/metrics" >"$1"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
rss_sample() { # label -> appends "label<TAB>VmRSS kB<TAB>VmHWM kB" to rss.tsv
  local rss hwm
  rss=$(awk '/^VmRSS:/{print $2}' "/proc/$GW_PID/status")
  hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$GW_PID/status")
  printf '%s\t%s\t%s\n' "$1" "$rss" "$hwm" >>"$WORK/rss.tsv"
}
# Notes the load average and whether a compiler (e.g. a concurrent cargo build) is running, so the
# report can say which runs were disturbed.
note_load() {
  local compilers=0 name n
  # One name at a time: pgrep -x refuses patterns longer than a 15-character process name.
  for name in rustc cc1 cc1plus ld cargo; do
    n=$(pgrep -c -x "$name" || true)
    compilers=$((compilers + ${n:-0}))
  done
  printf '%s\t%s\t%s\n' "$1" "$(cut -d' ' -f1 /proc/loadavg)" "${compilers:-0}" >>"$WORK/load.tsv"
}
check_alive() {
  kill -0 "$MOCK_PID" 2>/dev/null || { echo "mock-upstream died" >&2; exit 1; }
  kill -0 "$GW_PID" 2>/dev/null || { echo "ctxgate died" >&2; exit 1; }
}

# k6 URL MODE MAXFLAG RATE VUS DURATION SUMMARY LOG -> prints the exit code. Runs k6 in the
# background and waits, so a signal reaches the trap promptly.
K6_RC=0
k6_run() {
  local url=$1 mode=$2 max=$3 rate=$4 vus=$5 duration=$6 summary=$7 logf=$8
  local -a env=(-e "BASE_URL=$url" -e "MODE=$mode" -e "DURATION=$duration")
  if [[ $max == 1 ]]; then env+=(-e MAX=1 -e "VUS=$vus"); else env+=(-e "RATE=$rate"); fi
  [[ -n $summary ]] && env+=(-e "SUMMARY=$summary")
  "${K6_CPU[@]}" "$K6" run --quiet --address 127.0.0.1:0 "${env[@]}" "$HERE/chat.js" >"$logf" 2>&1 &
  K6_PID=$!
  k6_wait "$logf" 12
}

# case ID MODE KIND RATE VUS DURATION: direct then gateway, recorded in cases.tsv.
run_case() {
  local id=$1 mode=$2 kind=$3 rate=$4 vus=$5 duration=$6 max=0
  [[ $kind == max ]] && max=1
  check_alive
  log "case $id: DIRECT $mode $([[ $max == 1 ]] && echo "max ${vus} VUs" || echo "$rate req/s") $duration"
  k6_run "$DIRECT_URL" "$mode" "$max" "$rate" "$vus" "$duration" "$RAW_PREFIX-$id-direct.json" "$WORK/k6-$id-direct.log"
  local d_rc=$K6_RC
  note_load "$id direct"
  sleep 1
  check_alive
  scrape "$WORK/metrics-$id-before.txt"
  local cpu0; cpu0=$(cpu_ticks)
  log "case $id: VIA GATEWAY"
  k6_run "$GATEWAY_URL" "$mode" "$max" "$rate" "$vus" "$duration" "$RAW_PREFIX-$id-gateway.json" "$WORK/k6-$id-gateway.log"
  local g_rc=$K6_RC
  note_load "$id gateway"
  local cpu1; cpu1=$(cpu_ticks)
  scrape "$WORK/metrics-$id-after.txt"
  rss_sample "after $id"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$mode" "$kind" "$rate" "$vus" "$duration" \
    "$RAW_PREFIX-$id-direct.json" "$d_rc" "$RAW_PREFIX-$id-gateway.json" "$g_rc" \
    "$WORK/metrics-$id-before.txt" "$WORK/metrics-$id-after.txt" "$cpu0" "$cpu1" >>"$WORK/cases.tsv"
  sleep 1
}

# --- runs --------------------------------------------------------------------------------------------
mkdir -p "$RESULTS"
: >"$WORK/cases.tsv"
: >"$WORK/rss.tsv"
: >"$WORK/load.tsv"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
rss_sample "idle, after start-up"

log "warm-up ($WARMUP_DURATION at 200 req/s each way, not recorded)"
k6_run "$DIRECT_URL" json 0 200 20 "$WARMUP_DURATION" "" "$WORK/k6-warmup-direct.log" >/dev/null 2>&1
k6_run "$GATEWAY_URL" stream 0 200 20 "$WARMUP_DURATION" "" "$WORK/k6-warmup-gateway.log" >/dev/null 2>&1
rss_sample "after warm-up"

for mode in $MODES; do
  for rate in $RATES; do
    run_case "$mode-$rate" "$mode" rate "$rate" "$(( rate / 10 > 10 ? rate / 10 : 10 ))" "$RATE_DURATION"
  done
done
if [[ $SKIP_MAX != 1 ]]; then
  for mode in $MODES; do
    run_case "$mode-max" "$mode" max 0 "$MAX_VUS" "$MAX_DURATION"
  done
fi

scrape "$WORK/metrics-final.txt"
# Idle for a moment, then sample again: RSS that stays at the peak is normal for an allocator,
# RSS that keeps climbing run after run would be a leak.
sleep 2
rss_sample "end, idle 2s after the last run"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

GIT_REV=$(git_rev)

export_run_facts
LT_MOCK_LATENCY=$MOCK_LATENCY_MS LT_MOCK_CHUNKS=$MOCK_CHUNKS LT_MOCK_CHUNK_DELAY=$MOCK_CHUNK_DELAY_MS \
LT_RATE_DURATION=$RATE_DURATION LT_MAX_DURATION=$MAX_DURATION LT_MAX_VUS=$MAX_VUS \
LT_PIN=$PIN LT_CLK_TCK=$(getconf CLK_TCK) \
  python3 "$HERE/report.py" "$WORK" >"$REPORT"

if [[ -s $WORK/ctxgate.log ]]; then
  log "ctxgate logged (warn level and above):"
  head -n 20 "$WORK/ctxgate.log" >&2
fi
show_report
