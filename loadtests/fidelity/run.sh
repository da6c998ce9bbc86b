#!/usr/bin/env bash
# Fidelity benchmark (issue 13): what survives ctxgate's rules compression on stateless requests
# sized 1.1-4x the window, against a naive drop-oldest-turns baseline. See loadtests/README.md,
# section "Fidelity". Everything it installs goes under loadtests/fidelity/.work/ (gitignored).
#
#   bash loadtests/fidelity/run.sh                      # build, then the full run (~3-5 min once built)
#   REV=HEAD bash loadtests/fidelity/run.sh             # build a clean export of a commit instead of the work tree
#   SKIP_BUILD=1 bash loadtests/fidelity/run.sh         # use the binary already built
#   bash loadtests/fidelity/run.sh --cases 10 --tag quick   # any run.py option (--window, --sizes, --seed, --sets)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="$HERE/.work"
VENV="$WORK/venv"
TIKTOKEN_VERSION="0.14.0"
O200K_SHA256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_URL="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
BFCL="$REPO/loadtests/kv-cache/.work/bfcl"
log() { printf '[fidelity] %s\n' "$*" >&2; }
mkdir -p "$WORK"

# 1. Python: a venv with tiktoken (the only dependency).
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import tiktoken, sys; sys.exit(tiktoken.__version__ != '$TIKTOKEN_VERSION')" 2>/dev/null; then
  log "installing tiktoken==$TIKTOKEN_VERSION"
  "$VENV/bin/pip" install --disable-pip-version-check -q "tiktoken==$TIKTOKEN_VERSION"
fi

# 2. ctxgate, built and copied away so a concurrent rebuild cannot swap it mid-run. By default
#    from the work tree (as it is, other people's uncommitted changes included: the report says
#    so); with REV=<commit> from a clean `git archive` of that commit under .work/src, with its
#    own target dir (.work/target: a full release build the first time, ~6+ min on 2 cores).
if [[ -n "${REV:-}" ]]; then
  sha="$(git -C "$REPO" rev-parse --verify "$REV^{commit}")"
  SRC="$WORK/src"
  if [[ "$(cat "$SRC/.rev" 2>/dev/null)" != "$sha" ]]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    git -C "$REPO" archive "$sha" | tar -x -C "$SRC"
    echo "$sha" >"$SRC/.rev"
  fi
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release -p ctxgate (git archive of ${sha:0:12})"
    (cd "$SRC" && CARGO_TARGET_DIR="$WORK/target" cargo build --release -p ctxgate)
  fi
  BUILT="$WORK/target/release/ctxgate"
  SOURCE="commit ${sha:0:12} (clean git archive)"
else
  dirty="$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock)"
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release -p ctxgate"
    (cd "$REPO" && cargo build --release -p ctxgate)
  fi
  BUILT="$REPO/target/release/ctxgate"
  SOURCE="work tree at $(git -C "$REPO" rev-parse --short HEAD)"
  [[ -n "$dirty" ]] && SOURCE="$SOURCE with uncommitted changes under src/ or Cargo.* when built"
  [[ "${SKIP_BUILD:-0}" == 1 ]] && SOURCE="target/release/ctxgate as found (not rebuilt; work tree at $(git -C "$REPO" rev-parse --short HEAD))"
fi
BIN_DIR="$(mktemp -d /tmp/ctxgate-fidelity-bin.XXXXXX)"
trap 'rm -rf "$BIN_DIR"' EXIT
cp "$BUILT" "$BIN_DIR/ctxgate"

# 3. tiktoken's o200k vocabulary, offline: the same file ctxgate's tiktoken-rs crate embeds,
#    placed in tiktoken's cache under the name tiktoken looks for (sha1 of its URL); tiktoken
#    checks its sha256 before using it.
CACHE="$WORK/tiktoken-cache"
KEY="$(printf '%s' "$O200K_URL" | sha1sum | cut -d' ' -f1)"
if [[ ! -f "$CACHE/$KEY" ]]; then
  find_vocab() { ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tiktoken-rs-*/assets/o200k_base.tiktoken 2>/dev/null | tail -1; }
  src="$(find_vocab)"
  if [[ -z "$src" ]]; then (cd "$REPO" && cargo fetch >/dev/null); src="$(find_vocab)"; fi
  [[ -n "$src" ]] || { log "no o200k_base.tiktoken in the cargo registry"; exit 1; }
  [[ "$(sha256sum "$src" | cut -d' ' -f1)" == "$O200K_SHA256" ]] || { log "$src: unexpected sha256"; exit 1; }
  mkdir -p "$CACHE" && cp "$src" "$CACHE/$KEY"
fi
export TIKTOKEN_CACHE_DIR="$CACHE"

# 4. BFCL data, extracted by the KV-cache benchmark's setup (only its data step: no llama-server
#    build, no models).
if [[ ! -s "$BFCL/long_context.jsonl" || ! -f "$BFCL/memory/possible_answer/BFCL_v4_memory.json" ]]; then
  log "BFCL data missing: running loadtests/kv-cache/setup.sh"
  bash "$REPO/loadtests/kv-cache/setup.sh" data
fi

cmd="bash loadtests/fidelity/run.sh${*:+ $*}"
[[ -n "${REV:-}" ]] && cmd="REV=$REV $cmd"
[[ "${SKIP_BUILD:-0}" == 1 ]] && cmd="SKIP_BUILD=1 $cmd"
"$VENV/bin/python" "$HERE/run.py" --binary "$BIN_DIR/ctxgate" --source "$SOURCE" --command "$cmd" "$@"
