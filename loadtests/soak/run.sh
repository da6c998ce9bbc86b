#!/usr/bin/env bash
# ctxgate soak test (issue 14): DURATION of mixed plain, streamed and session traffic (k6,
# soak.js) with client disconnects, while the gateway is restarted every RESTART_EVERY, by
# SIGTERM (graceful) and SIGKILL in turn. Samples the gateway's RSS every RSS_EVERY seconds;
# at the end reads every session's transcript and checks that each turn k6 saw answered is
# there exactly once. Writes loadtests/results/YYYY-MM-DD-soak.md (TAG=x: ...-soak-x.md) and
# prints it. Not in CI.
#
#   bash loadtests/soak/run.sh                                # 30 minutes plus the build
#   DURATION=2m RESTART_EVERY=40s bash loadtests/soak/run.sh  # smoke run
#
# Knobs (environment): DURATION (30m), RESTART_EVERY (3m), RSS_EVERY (5), PLAIN_RATE (4),
# STREAM_RATE (4), SESSIONS (12), THINK_MS (500), TURNS (40), ABORT_FRAC (0.2), ABORT_MS (120),
# PAD_BYTES (0: filler added to each session user message, to grow the store faster),
# MOCK_LATENCY_MS (10), MOCK_CHUNKS (8), MOCK_CHUNK_DELAY_MS (40), WINDOW_GRACE_MS (1000: how
# long after the new gateway is healthy a request still counts as inside the restart window),
# SKIP_BUILD=1, TAG=name, KEEP_WORK=1 (keep the temp dir with logs, the k6 request log, the
# store).
# All traffic goes to 127.0.0.1; every wait loop is bounded by a count; a trap stops every child
# by PID on exit, Ctrl-C or SIGTERM.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LT=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$LT/.." && pwd)
START_TS=$(date +%s)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$LT/lib.sh"

DURATION=${DURATION:-30m}
RESTART_EVERY=${RESTART_EVERY:-3m}
RSS_EVERY=${RSS_EVERY:-5}
PLAIN_RATE=${PLAIN_RATE:-4}
STREAM_RATE=${STREAM_RATE:-4}
SESSIONS=${SESSIONS:-12}
THINK_MS=${THINK_MS:-500}
TURNS=${TURNS:-40}
ABORT_FRAC=${ABORT_FRAC:-0.2}
ABORT_MS=${ABORT_MS:-120}
MOCK_LATENCY_MS=${MOCK_LATENCY_MS:-10}
MOCK_CHUNKS=${MOCK_CHUNKS:-8}
MOCK_CHUNK_DELAY_MS=${MOCK_CHUNK_DELAY_MS:-40}
WINDOW_GRACE_MS=${WINDOW_GRACE_MS:-1000}
TAG=${TAG:-}
PAD_BYTES=${PAD_BYTES:-0}

secs() { # k6-style duration (30m, 40s, 1h, 1m30s, or plain seconds) -> seconds
  python3 - "$1" <<'EOF'
import re, sys
t = sys.argv[1]
if re.fullmatch(r"\d+", t):
    print(int(t)); sys.exit()
parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", t)
if not parts or "".join(a + b for a, b in parts) != t:
    sys.exit(f"bad duration: {t}")
print(round(sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)))
EOF
}
DURATION_S=$(secs "$DURATION")
RESTART_S=$(secs "$RESTART_EVERY")

DATE=$(date -u +%F)
RESULTS="$LT/results"
NAME="$DATE-soak"
[[ -n $TAG ]] && NAME="$NAME-$TAG"
REPORT="$RESULTS/$NAME.md"

now_ms() { date +%s%3N; }

# --- processes and cleanup (lib.sh: cleanup, init_work) ------------------------------------------
MOCK_PID="" GW_PID="" K6_PID="" SAMPLER_PID=""
stop_children() { stop_pids 100 "$SAMPLER_PID" "$K6_PID" "$GW_PID" "$MOCK_PID"; }
failure_logs() { # RC
  echo "soak/run.sh failed (exit $1); last lines of the server logs:" >&2
  tail -n 20 "$WORK/mock.log" "$WORK"/ctxgate-*.log >&2 2>/dev/null || true
}
init_work soak

# --- k6 and the build (run copies of the binaries) -----------------------------------------------
install_k6
copy_binaries
GIT_REV=$(git_rev loadtests/mock-upstream)

# --- servers -----------------------------------------------------------------------------------------
MOCK_PORT=$(free_port)
GW_PORT=$(free_port)
while [[ $GW_PORT == "$MOCK_PORT" ]]; do GW_PORT=$(free_port); done
MOCK_URL="http://127.0.0.1:$MOCK_PORT/v1"
GW_ORIGIN="http://127.0.0.1:$GW_PORT"

"$WORK/bin/mock-upstream" --listen "127.0.0.1:$MOCK_PORT" --latency "$MOCK_LATENCY_MS" \
  --chunks "$MOCK_CHUNKS" --chunk-delay "$MOCK_CHUNK_DELAY_MS" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
wait_mock "$MOCK_PID" "$WORK/mock.log"
log "mock-upstream (pid $MOCK_PID) at $MOCK_URL"

mkdir -p "$WORK/data"
cat >"$WORK/ctxgate.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
max_concurrent_requests = 10000
shutdown_timeout = "10s"
[telemetry]
log_level = "warn"
[sessions]
store = "embedded:$WORK/data/ctxgate.redb"
[[upstreams]]
name = "mock"
base_url = "$MOCK_URL"
EOF
"$WORK/bin/ctxgate" check-config "$WORK/ctxgate.toml" >"$WORK/check-config.txt" 2>&1 ||
  { cat "$WORK/check-config.txt" >&2; echo "ctxgate check-config refused the config" >&2; exit 1; }

INCARNATION=0
# Starts ctxgate (a new incarnation, its own log) and waits until /readyz answers 200.
start_gateway() {
  INCARNATION=$((INCARNATION + 1))
  RUST_LOG=warn "$WORK/bin/ctxgate" serve --config "$WORK/ctxgate.toml" \
    >"$WORK/ctxgate-$INCARNATION.log" 2>&1 &
  GW_PID=$!
  printf '%s %s\n' "$GW_PID" "$INCARNATION" >"$WORK/gw.pid.tmp"
  mv "$WORK/gw.pid.tmp" "$WORK/gw.pid"
  wait_for 30 "ctxgate (incarnation $INCARNATION)" "$GW_PID" curl -sf --max-time 1 "$GW_ORIGIN/readyz"
}
start_gateway
log "ctxgate (pid $GW_PID) at $GW_ORIGIN, store $WORK/data/ctxgate.redb"

# --- RSS sampler -------------------------------------------------------------------------------------
# Every RSS_EVERY s: time, the gateway's pid and incarnation, VmRSS and VmHWM (kB), load average,
# the store file's size (kB; redb caches its pages in memory, up to 1 GiB by default).
echo "epoch_s,pid,incarnation,vmrss_kb,vmhwm_kb,load1,store_kb" >"$WORK/rss.csv"
(
  trap 'exit 0' TERM
  while :; do
    read -r pid inc <"$WORK/gw.pid" || true
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
    hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
    store=$(( $(stat -c %s "$WORK/data/ctxgate.redb" 2>/dev/null || echo 0) / 1024 ))
    [[ -n $rss ]] && printf '%s,%s,%s,%s,%s,%s,%s\n' "$(date +%s)" "$pid" "$inc" "$rss" "$hwm" \
      "$(cut -d' ' -f1 /proc/loadavg)" "$store" >>"$WORK/rss.csv"
    sleep "$RSS_EVERY"
  done
) &
SAMPLER_PID=$!

# --- k6 ----------------------------------------------------------------------------------------------
RUN_ID="$START_TS-$RANDOM"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
K6_START_MS=$(now_ms)
"$K6" run --quiet --address 127.0.0.1:0 --log-format raw --console-output "$WORK/requests.jsonl" \
  -e "BASE_URL=$GW_ORIGIN/v1" -e "DURATION=$DURATION" -e "PLAIN_RATE=$PLAIN_RATE" \
  -e "STREAM_RATE=$STREAM_RATE" -e "SESSIONS=$SESSIONS" -e "THINK_MS=$THINK_MS" -e "TURNS=$TURNS" \
  -e "ABORT_FRAC=$ABORT_FRAC" -e "ABORT_MS=$ABORT_MS" -e "RUN_ID=$RUN_ID" -e "PAD_BYTES=$PAD_BYTES" \
  -e "SUMMARY=$WORK/k6-summary.json" "$HERE/soak.js" >"$WORK/k6.log" 2>&1 &
K6_PID=$!
log "k6 (pid $K6_PID) for $DURATION: plain $PLAIN_RATE/s, stream $STREAM_RATE/s, $SESSIONS session VUs; restarts every $RESTART_EVERY"

# --- restarts ----------------------------------------------------------------------------------------
# windows.csv: one line per restart: signal, sent (ms), old process gone (ms), new one ready (ms).
echo "n,signal,old_pid,signal_ms,exited_ms,ready_ms,exit_status" >"$WORK/windows.csv"
END_S=$(( $(date +%s) + DURATION_S ))
n=0
while :; do
  next=$(( $(date +%s) + RESTART_S ))
  # Leave the last stretch alone: no restart closer than RESTART_S/2 to the end.
  (( next + RESTART_S / 2 > END_S )) && break
  while (( $(date +%s) < next )); do
    kill -0 "$K6_PID" 2>/dev/null || break 2
    kill -0 "$GW_PID" 2>/dev/null || { echo "ctxgate died on its own (incarnation $INCARNATION)" >&2; exit 1; }
    sleep 1
  done
  n=$((n + 1))
  if (( n % 2 == 1 )); then sig=TERM; else sig=KILL; fi
  old=$GW_PID
  t_sig=$(now_ms)
  kill -"$sig" "$old"
  status=0
  wait "$old" 2>/dev/null || status=$?
  t_exit=$(now_ms)
  GW_PID=""
  start_gateway
  t_ready=$(now_ms)
  echo "$n,$sig,$old,$t_sig,$t_exit,$t_ready,$status" >>"$WORK/windows.csv"
  log "restart $n: SIG$sig to pid $old (exit status $status, gone after $((t_exit - t_sig)) ms), new pid $GW_PID ready after $((t_ready - t_sig)) ms"
done

if wait "$K6_PID"; then K6_RC=0; else K6_RC=$?; fi
K6_PID=""
K6_END_MS=$(now_ms)
log "k6 finished (exit $K6_RC): $(grep -h '^soak k6:' "$WORK/k6.log" || tail -n 3 "$WORK/k6.log")"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Detached turns (a client that went away) finish on their own; give them a moment.
sleep 3
SESSION_AUTH="Bearer sk-soak-not-a-real-key"
log "verifying transcripts (live gateway)"
python3 "$HERE/soak.py" verify --base "$GW_ORIGIN" --auth "$SESSION_AUTH" \
  --requests "$WORK/requests.jsonl" --out "$WORK/verify-live.json"
# Once more after a final graceful restart: what was acknowledged must also be on disk.
kill -TERM "$GW_PID"
wait "$GW_PID" || true
GW_PID=""
start_gateway
log "verifying transcripts (after a final SIGTERM restart, pid $GW_PID)"
python3 "$HERE/soak.py" verify --base "$GW_ORIGIN" --auth "$SESSION_AUTH" \
  --requests "$WORK/requests.jsonl" --out "$WORK/verify-restarted.json"

kill -TERM "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""

# RSS CSV: kept beside the report when small (under 64 KiB), else only in the work dir.
mkdir -p "$RESULTS"
RSS_CSV_KEPT=""
if (( $(stat -c %s "$WORK/rss.csv") < 65536 )); then
  cp "$WORK/rss.csv" "$RESULTS/$NAME-rss.csv"
  RSS_CSV_KEPT="${RESULTS#"$ROOT"/}/$NAME-rss.csv"
fi

SOAK_DATE=$DATE SOAK_GIT="$GIT_REV" SOAK_BIN_BUILT="$BIN_BUILT" SOAK_K6_VERSION="$K6_VERSION" \
SOAK_NPROC=$(nproc) SOAK_CPU="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)" \
SOAK_KERNEL="$(uname -r)" SOAK_MEM="$(awk '/^MemTotal:/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)" \
SOAK_LOAD_START="$LOAD_START" SOAK_LOAD_END="$LOAD_END" SOAK_DURATION="$DURATION" \
SOAK_RESTART_EVERY="$RESTART_EVERY" SOAK_PAD_BYTES=$PAD_BYTES SOAK_PLAIN_RATE=$PLAIN_RATE SOAK_STREAM_RATE=$STREAM_RATE \
SOAK_SESSIONS=$SESSIONS SOAK_THINK_MS=$THINK_MS SOAK_TURNS=$TURNS SOAK_ABORT_FRAC=$ABORT_FRAC \
SOAK_ABORT_MS=$ABORT_MS SOAK_MOCK="--latency $MOCK_LATENCY_MS --chunks $MOCK_CHUNKS --chunk-delay $MOCK_CHUNK_DELAY_MS" \
SOAK_WINDOW_GRACE_MS=$WINDOW_GRACE_MS SOAK_K6_RC=$K6_RC SOAK_K6_START_MS=$K6_START_MS SOAK_K6_END_MS=$K6_END_MS \
SOAK_RSS_CSV="$RSS_CSV_KEPT" RSS_EVERY=$RSS_EVERY SOAK_WALL=$(( $(date +%s) - START_TS )) \
  python3 "$HERE/soak.py" report "$WORK" >"$REPORT"

if grep -qv '^\s*$' "$WORK"/ctxgate-*.log 2>/dev/null; then
  log "ctxgate logged (warn level and above; first lines per incarnation):"
  for f in "$WORK"/ctxgate-*.log; do [[ -s $f ]] && { echo "== $(basename "$f")"; head -n 5 "$f"; }; done >&2
fi
show_report
