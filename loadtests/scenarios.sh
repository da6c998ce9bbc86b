#!/usr/bin/env bash
# ctxgate feature scenarios under k6: what each feature costs at a fixed arrival rate.
#
#   bash loadtests/scenarios.sh all                 # every scenario, 100 req/s for 20 s each
#   bash loadtests/scenarios.sh sessions tools      # some of them
#   QUICK=1 bash loadtests/scenarios.sh all         # smoke: 2 s per run at 20 req/s
#
# Scenarios: plain (non-streamed chat), stream (TTFB), sessions (multi-turn, X-Session-Id on
# Redis), compression (rules on long conversations), tools (gateway tool fan-out), ratelimit
# (a gateway key over its requests_per_minute), responses (a Responses turn next to the same turn
# as Chat Completions, both through ctxgate to the chat-only mock, and direct), chain
# (previous_response_id chains of CHAIN_TURNS turns on Redis).
# For each: a fresh mock-upstream, redis-server when the scenario needs it (own ephemeral port,
# own temp dir), and ctxgate with the scenario's config; k6 against the mock directly (where a
# direct run means something), then through ctxgate, with ctxgate's /metrics scraped before and
# after. Writes loadtests/results/YYYY-MM-DD-scenarios.md (…-scenarios-quick.md with QUICK=1,
# …-scenarios-TAG.md with TAG=) and prints it; raw k6 summaries go beside it as *.json
# (gitignored).
#
# Knobs (environment): RATE (100), DURATION (20s), SKIP_BUILD=1, KEEP_WORK=1, TAG=name,
# P99_MS (250: p99 threshold of each scenario's main latency metric), TURNS (8), CHAIN_TURNS (50),
# TOOL_CALLS (4), LIMIT_RPM (1200), LIMIT_BURST (20), LIMIT_RATE (offered rate for ratelimit,
# default 2 x the limit), LIMIT_DURATION (30s), RL_TOLERANCE (0.05: allowed deviation of the
# admitted count), RL_STORE (local: the [rate_limits] store; redis: a redis-server of its own),
# REDIS_SERVER_BIN (redis-server).
# All traffic stays on 127.0.0.1; every k6 run is bounded by its duration, every wait by a count.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
START_TS=$(date +%s)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
ALL_SCENARIOS="plain stream sessions compression tools ratelimit responses chain"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RATE=${RATE:-20}
  DURATION=${DURATION:-2s}
  WARMUP=1s
  LIMIT_RPM=${LIMIT_RPM:-600}
  LIMIT_DURATION=${LIMIT_DURATION:-3s}
  RL_TOLERANCE=${RL_TOLERANCE:-0.15} # ~50 admitted in 3 s: a request or two of jitter is several %
else
  RATE=${RATE:-100}
  DURATION=${DURATION:-20s}
  WARMUP=3s
  LIMIT_RPM=${LIMIT_RPM:-1200}
  LIMIT_DURATION=${LIMIT_DURATION:-30s}
  RL_TOLERANCE=${RL_TOLERANCE:-0.05}
fi
P99_MS=${P99_MS:-250}
TURNS=${TURNS:-8}
CHAIN_TURNS=${CHAIN_TURNS:-50}
TOOL_CALLS=${TOOL_CALLS:-4}
LIMIT_BURST=${LIMIT_BURST:-20}
LIMIT_RATE=${LIMIT_RATE:-$(( LIMIT_RPM * 2 / 60 ))}
RL_STORE=${RL_STORE:-local}
TAG=${TAG:-}
REDIS_SERVER_BIN=${REDIS_SERVER_BIN:-redis-server}

if [[ $# == 0 ]]; then
  echo "usage: $0 all | SCENARIO... (scenarios: $ALL_SCENARIOS)" >&2
  exit 2
fi
SCENARIOS=()
for arg in "$@"; do
  if [[ $arg == all ]]; then
    read -r -a SCENARIOS <<<"$ALL_SCENARIOS"
  elif [[ " $ALL_SCENARIOS " == *" $arg "* ]]; then
    SCENARIOS+=("$arg")
  else
    echo "unknown scenario: $arg (scenarios: $ALL_SCENARIOS)" >&2
    exit 2
  fi
done

report_name scenarios

# --- processes and cleanup (lib.sh: cleanup, init_work) ------------------------------------------
MOCK_PID="" GW_PID="" REDIS_PID="" K6_PID=""
stop_servers() {
  stop_pid "$GW_PID"; GW_PID=""
  stop_pid "$MOCK_PID"; MOCK_PID=""
  stop_pid "$REDIS_PID"; REDIS_PID=""
}
stop_children() { stop_pid "$K6_PID"; stop_servers; }
failure_logs() { # RC
  echo "scenarios.sh failed (exit $1); last lines of the current scenario's logs:" >&2
  tail -n 20 "${CUR:-$WORK}"/*.log >&2 2>/dev/null || true
}
init_work scenarios

# --- k6 and binaries -------------------------------------------------------------------------------
install_k6
copy_binaries

# --- servers ---------------------------------------------------------------------------------------
start_mock() { # extra mock-upstream flags...
  local port; port=$(free_port)
  "$WORK/bin/mock-upstream" --listen "127.0.0.1:$port" "$@" >"$CUR/mock.log" 2>&1 &
  MOCK_PID=$!
  MOCK_ORIGIN="http://127.0.0.1:$port"
  wait_mock "$MOCK_PID" "$CUR/mock.log"
}

start_redis() {
  command -v "$REDIS_SERVER_BIN" >/dev/null || { echo "redis-server not found (set REDIS_SERVER_BIN)" >&2; return 1; }
  local port; port=$(free_port)
  mkdir -p "$CUR/redis"
  "$REDIS_SERVER_BIN" --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$CUR/redis" --logfile "$CUR/redis.log" >/dev/null 2>&1 &
  REDIS_PID=$!
  REDIS_URL="redis://127.0.0.1:$port/"
  wait_for 10 redis-server "$REDIS_PID" python3 - "$port" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
EOF
}

start_gateway() {
  local port; port=$(free_port)
  GW_URL="http://127.0.0.1:$port/v1"
  GW_ORIGIN="http://127.0.0.1:$port"
  RUST_LOG=warn "$WORK/bin/ctxgate" serve --config "$CUR/ctxgate.toml" --listen "127.0.0.1:$port" \
    >"$CUR/ctxgate.log" 2>&1 &
  GW_PID=$!
  wait_gateway "$GW_PID" "$GW_ORIGIN"
}

# The config every scenario starts from; scenarios append their sections.
base_config() { # STORE [LINE for the upstream's table]
  cat <<EOF
[server]
max_concurrent_requests = 10000
[telemetry]
log_level = "warn"
[sessions]
store = "$1"
[[upstreams]]
name = "mock"
base_url = "$MOCK_ORIGIN/v1"
${2:-}
EOF
}

# --- measurement -------------------------------------------------------------------------------------
scrape() { curl -sf --max-time 5 "$GW_ORIGIN/metrics" >"$1"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# k6_run SCRIPT URL SUMMARY LOG [-e K=V]...: prints nothing, sets K6_RC.
K6_RC=0
k6_run() {
  local script=$1 url=$2 summary=$3 logf=$4
  shift 4
  # A fresh RUN_ID per k6 run keeps session ids and conversations of different runs apart.
  local -a env=(-e "BASE_URL=$url" -e "P99_MS=$P99_MS" -e "RUN_ID=$START_TS-$RANDOM$RANDOM")
  [[ -n $summary ]] && env+=(-e "SUMMARY=$summary")
  "$K6" run --quiet --address 127.0.0.1:0 "${env[@]}" "$@" "$script" >"$logf" 2>&1 &
  K6_PID=$!
  k6_wait "$logf" 14
}

# measure ID SCRIPT DIRECT(0|1) RATE DURATION [-e K=V]...: warm-up, direct run, gateway run.
measure() {
  local id=$1 script=$2 direct=$3 rate=$4 duration=$5
  shift 5
  local -a common=(-e "RATE=$rate" -e "DURATION=$duration" "$@")
  local d_json="" d_rc="" d_load=""
  # The warm-up opens connections and fills caches; the rate-limit scenario skips it, so its
  # key starts with a full bucket.
  if [[ ${NO_WARMUP:-0} != 1 ]]; then
    log "$id: warm-up ($WARMUP, not recorded)"
    k6_run "$script" "$GW_URL" "" "$CUR/k6-warmup.log" "${common[@]}" -e GATEWAY=1 -e "DURATION=$WARMUP" \
      -e "P99_MS=60000" 2>/dev/null
  fi
  if [[ $direct == 1 ]]; then
    log "$id: DIRECT $rate/s $duration"
    k6_run "$script" "$MOCK_ORIGIN/v1" "$RAW_PREFIX-$id-direct.json" "$CUR/k6-direct.log" "${common[@]}" -e GATEWAY=0
    d_json="$RAW_PREFIX-$id-direct.json" d_rc=$K6_RC d_load=$(load1)
    sleep 1
  fi
  scrape "$CUR/metrics-$id-before.txt"
  log "$id: VIA GATEWAY $rate/s $duration"
  k6_run "$script" "$GW_URL" "$RAW_PREFIX-$id-gateway.json" "$CUR/k6-gateway.log" "${common[@]}" -e GATEWAY=1
  local g_rc=$K6_RC g_load; g_load=$(load1)
  scrape "$CUR/metrics-$id-after.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$rate" "$duration" \
    "$d_json" "$d_rc" "$RAW_PREFIX-$id-gateway.json" "$g_rc" \
    "$CUR/metrics-$id-before.txt" "$CUR/metrics-$id-after.txt" "$d_load" "$g_load" "${EXTRA:-}" "$CUR/ctxgate.log" >>"$WORK/cases.tsv"
  EXTRA=""
}

# --- scenarios -----------------------------------------------------------------------------------------
scenario_plain() {
  start_mock
  base_config "embedded:$CUR/ctxgate.redb" >"$CUR/ctxgate.toml"
  start_gateway
  measure plain "$HERE/chat.js" 1 "$RATE" "$DURATION" -e MODE=json
}

scenario_stream() {
  start_mock
  base_config "embedded:$CUR/ctxgate.redb" >"$CUR/ctxgate.toml"
  start_gateway
  measure stream "$HERE/chat.js" 1 "$RATE" "$DURATION" -e MODE=stream -e "TTFB_P99_MS=$P99_MS"
}

scenario_sessions() {
  start_mock
  start_redis
  base_config "$REDIS_URL" >"$CUR/ctxgate.toml"
  start_gateway
  measure sessions "$HERE/scenarios/sessions.js" 1 "$RATE" "$DURATION" -e "TURNS=$TURNS"
}

scenario_compression() {
  start_mock
  start_redis
  {
    base_config "$REDIS_URL"
    cat <<'EOF'
[compression]
mode = "rules"
context_window = 4096     # the synthetic conversations are ~3x that
keep_recent_turns = 2
[compression.rules]
max_tool_output_tokens = 200
mask_after_turns = 4
EOF
  } >"$CUR/ctxgate.toml"
  start_gateway
  measure compression "$HERE/scenarios/compression.js" 1 "$RATE" "$DURATION" -e "TURNS=$TURNS"
}

scenario_tools() {
  start_mock --tool-calls "$TOOL_CALLS" --tool-name lookup
  {
    base_config "embedded:$CUR/ctxgate.redb"
    cat <<EOF
[[tools]]
name = "lookup"
description = "Looks an item up in the inventory."
parameters = { type = "object", properties = { q = { type = "string" } }, required = ["q"] }
inject = true
timeout = "10s"
max_concurrency = 256
[tools.http]
url = "$MOCK_ORIGIN/tools/lookup"
EOF
  } >"$CUR/ctxgate.toml"
  start_gateway
  measure tools "$HERE/scenarios/tools.js" 1 "$RATE" "$DURATION" -e "TOOL_CALLS=$TOOL_CALLS"
}

scenario_ratelimit() {
  start_mock
  local store=$RL_STORE
  if [[ $store == redis ]]; then start_redis; store=$REDIS_URL; fi
  local key digest
  key="ck-loadtest-$(python3 -c 'import secrets;print(secrets.token_hex(12))')"
  digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
  {
    # With gateway keys, an upstream must hold a credential or say it takes none (the mock).
    base_config "embedded:$CUR/ctxgate.redb" "keyless = true"
    cat <<EOF
[rate_limits]
store = "$store"
[[auth.keys]]
name = "loadtest"
sha256 = "$digest"
requests_per_minute = $LIMIT_RPM
burst = $LIMIT_BURST
EOF
  } >"$CUR/ctxgate.toml"
  if ! "$WORK/bin/ctxgate" check-config "$CUR/ctxgate.toml" >"$CUR/check-config.log" 2>&1; then
    log "ratelimit: this ctxgate does not accept [auth]/[rate_limits] yet; skipped:"
    head -n 5 "$CUR/check-config.log" >&2
    printf '%s\tskipped\t%s\n' ratelimit "$(head -n 3 "$CUR/check-config.log" | tr '\t\n' '  ')" >>"$WORK/skipped.tsv"
    return 0
  fi
  start_gateway
  EXTRA="limit_rpm=$LIMIT_RPM;burst=$LIMIT_BURST;store=$RL_STORE;tolerance=$RL_TOLERANCE"
  NO_WARMUP=1 measure ratelimit "$HERE/scenarios/ratelimit.js" 0 "$LIMIT_RATE" "$LIMIT_DURATION" \
    -e "API_KEY=$key" -e "LIMIT_RPM=$LIMIT_RPM" -e "BURST=$LIMIT_BURST" -e "TOLERANCE=$RL_TOLERANCE"
}

scenario_responses() {
  start_mock
  base_config "embedded:$CUR/ctxgate.redb" >"$CUR/ctxgate.toml"
  start_gateway
  # Two rows from one gateway: the turn as Chat Completions, then as Responses; each with its own
  # direct run (the same chat turn to the mock), so the two "added" columns share a baseline.
  measure responses-chat "$HERE/scenarios/responses.js" 1 "$RATE" "$DURATION" -e API=chat
  measure responses "$HERE/scenarios/responses.js" 1 "$RATE" "$DURATION" -e API=responses
}

scenario_chain() {
  start_mock
  start_redis
  base_config "$REDIS_URL" >"$CUR/ctxgate.toml"
  start_gateway
  measure chain "$HERE/scenarios/responses.js" 0 "$RATE" "$DURATION" -e API=chain -e "TURNS=$CHAIN_TURNS"
}

# --- runs ------------------------------------------------------------------------------------------------
mkdir -p "$RESULTS"
: >"$WORK/cases.tsv"
: >"$WORK/skipped.tsv"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in "${SCENARIOS[@]}"; do
  CUR="$WORK/$s"
  mkdir -p "$CUR"
  log "=== scenario $s"
  "scenario_$s"
  stop_servers
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

GIT_REV=$(git_rev)

export_run_facts
LT_P99_MS=$P99_MS LT_TURNS=$TURNS LT_CHAIN_TURNS=$CHAIN_TURNS LT_TOOL_CALLS=$TOOL_CALLS \
  python3 "$HERE/scenarios_report.py" "$WORK" >"$REPORT"

show_report
# A failed threshold (k6 exit 99) or a k6 error in any run fails the whole script.
if ! awk -F'\t' '($5 != "" && $5 != 0) || $7 != 0 { bad = 1 } END { exit bad }' "$WORK/cases.tsv"; then
  log "some k6 runs failed their thresholds or errored (see the report)"
  exit 99
fi
