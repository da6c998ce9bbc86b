#!/usr/bin/env python3
"""KV-cache benchmark: one long scripted BFCL agent session, four ways, against a real llama-server.

Modes
  direct   client -> llama-server, full history every turn
  sliding  client-side naive sliding window (drop oldest whole turns until the estimate fits 0.8 x context_window)
  rules    client -> ctxgate (compression.mode = "rules")  -> llama-server, full history every turn
  hybrid   client -> ctxgate (compression.mode = "hybrid") -> llama-server, full history every turn

The client replays the recorded BFCL conversation: the model's own answer is used for timing/usage only, then the
recorded assistant tool call and tool result are appended, so every mode sees the same client history.

Usage (from loadtests/kv-cache, after ./setup.sh and `cargo build --release` in the repo root):
  .work/venv/bin/python run.py [--model smollm2] [--convs 64,82,66,83] [--context-window 6656]
                               [--server-ctx 16384] [--modes direct,sliding,rules,hybrid]
Standard library only. See README.md for the definitions of every reported number.
"""
import argparse, datetime, hashlib, shutil, json, os, re, signal, subprocess, sys, time, urllib.error, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
WORK = os.path.join(HERE, ".work")
# CTXGATE_BIN: another build, to compare two builds on the same server
CTXGATE = os.environ.get("CTXGATE_BIN") or os.path.join(REPO, "target", "release", "ctxgate")
SYSTEM = "You are a helpful assistant that controls the user's systems through the provided tools."
MODES = ["direct", "sliding", "rules", "hybrid"]


# ---------------------------------------------------------------- HTTP helpers
def http(method, url, body=None, headers=None, timeout=3600):
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_ready(url, proc, what, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early (rc {proc.returncode}); see its log")
        try:
            if http("GET", url, timeout=5)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    sys.exit(f"{what} not ready after {timeout}s")


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- session
def build_session(path, conv_ids):
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[r["id"].rsplit("_", 1)[-1]] = r
    tools, messages = None, [{"role": "system", "content": SYSTEM}]
    for k, cid in enumerate(conv_ids):
        r = rows[cid]
        if tools is None:
            tools = r["tools"]
        elif json.dumps(r["tools"], sort_keys=True) != json.dumps(tools, sort_keys=True):
            sys.exit(f"conversation {cid} has a different tools list; pick conversations sharing one tool set")
        for m in r["messages"]:
            m = json.loads(json.dumps(m))
            # tool-call ids restart at call_0 in every BFCL conversation: make them unique in the session
            if m.get("tool_calls"):
                for tc in m["tool_calls"]:
                    tc["id"] = f"c{k}_{tc['id']}"
            if m["role"] == "tool":
                m["tool_call_id"] = f"c{k}_{m['tool_call_id']}"
            messages.append(m)
    # a request is sent after every user message and after every tool result that ends a run of tool results
    points = [i + 1 for i, m in enumerate(messages)
              if m["role"] in ("user", "tool") and (i + 1 == len(messages) or messages[i + 1]["role"] != "tool")]
    return tools, messages, points


def gen_session(seed, tokens):
    """A generated agent session (the fidelity benchmark's generator): fresh, repeated (exact duplicate) and
    log-noisy (ANSI colours, heartbeat runs, blank-line runs) tool results, about `tokens` tokens long."""
    sys.path.insert(0, os.path.join(HERE, "..", "fidelity"))
    import random
    import data

    class Approx:  # sizing only (whole turns until the stream is long enough): ~4 bytes per token
        def message(self, m):
            return len(json.dumps(m)) // 4

    stream = data.Generator(random.Random(seed)).turns(tokens, Approx())
    messages = [{"role": "system", "content": data.GEN_SYSTEM}] + [m for t in stream for m in t]
    points = [i + 1 for i, m in enumerate(messages)
              if m["role"] in ("user", "tool") and (i + 1 == len(messages) or messages[i + 1]["role"] != "tool")]
    return data.gen_tools(), messages, points


LOG_SERVICES = ["auth", "billing", "search", "gateway", "scheduler", "storage", "mailer", "indexer"]


def log_excerpt(rng, turn):
    """A log excerpt of about 370 SmolLM2 tokens and a question: what an operator pastes into a chat
    (each turn of responses_chain.py's chain, and of prefix_sim.py's `chain:` session)."""
    lines = []
    for i in range(7):
        svc = rng.choice(LOG_SERVICES)
        level = rng.choice(["INFO", "INFO", "INFO", "WARN", "ERROR"])
        lines.append(f"2026-12-06T{10 + turn % 10:02d}:{i * 4:02d}:{rng.randrange(60):02d}Z {level} {svc}: "
                     f"request {rng.randrange(10**6):06d} took {rng.randrange(5, 900)}ms "
                     f"(shard {rng.randrange(16)}, retries {rng.randrange(3)})")
    question = rng.choice(["Which service looks slowest here?", "Any errors worth a ticket?",
                           "Summarise this excerpt in one line.", "Is anything retrying too much?"])
    return f"Excerpt {turn + 1} of the overnight logs:\n" + "\n".join(lines) + f"\n\n{question}"


def turn_units(msgs):
    """Non-system messages grouped into droppable units: a user message, or an assistant message with its tool results."""
    units, i = [], 0
    while i < len(msgs):
        if msgs[i]["role"] == "system":
            i += 1
            continue
        j = i + 1
        if msgs[i]["role"] == "assistant":
            while j < len(msgs) and msgs[j]["role"] == "tool":
                j += 1
        units.append((i, j))
        i = j
    return units


class Estimator:
    """Prompt-size estimate for the sliding window: llama-server POST /tokenize of the JSON text of the tools list
    and of each message (summed; each message is tokenized once and cached)."""

    def __init__(self, base):
        self.base, self.cache = base, {}

    def count(self, key, obj):
        if key not in self.cache:
            st, _, b = http("POST", self.base + "/tokenize", {"content": json.dumps(obj)})
            assert st == 200, b
            self.cache[key] = len(json.loads(b)["tokens"])
        return self.cache[key]


def sliding_window(history, tools, est, budget):
    fixed = est.count("tools", tools) + sum(est.count(i, m) for i, m in enumerate(history) if m["role"] == "system")
    units = turn_units(history)
    sizes = [sum(est.count(k, history[k]) for k in range(a, b)) for a, b in units]
    total, first = fixed + sum(sizes), 0
    while total > budget and first < len(units) - 1:  # never drop the unit that ends the history
        total -= sizes[first]
        first += 1
    keep = [m for m in history if m["role"] == "system"]
    for a, b in units[first:]:
        keep.extend(history[a:b])
    return keep, total, first


# ---------------------------------------------------------------- servers
def start_llama(args, mode, port, logdir):
    env = dict(os.environ, CTX=str(args.server_ctx), LOG_FILE=os.path.join(logdir, f"llama-{mode}.log"))
    extra = ["--cache-ram", "0", "--metrics"]
    if args.model == "smollm2":
        # SmolLM2's own template drops tools and tool messages; its 8192 training context is raised so that the
        # direct run can hold the whole session (quality is irrelevant here: answers are discarded).
        extra += ["--chat-template-file", os.path.join(HERE, "chatml-tools.jinja"),
                  "--override-kv", "llama.context_length=int:32768"]
    p = subprocess.Popen([os.path.join(HERE, "serve.sh"), args.model, str(port)] + extra, env=env)
    wait_ready(f"http://127.0.0.1:{port}/health", p, "llama-server", 180)
    return p


def start_ctxgate(args, mode, port, llama_port, logdir):
    cfg = os.path.join(logdir, f"ctxgate-{mode}.toml")
    store = os.path.join(logdir, f"ctxgate-{mode}.redb")
    if os.path.exists(store):
        os.remove(store)
    with open(cfg, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
request_timeout = "30m"

[telemetry]
log_format = "json"
log_level = "info"

[sessions]
store = "embedded:{store}"

[[upstreams]]
name = "llama"
base_url = "http://127.0.0.1:{llama_port}/v1"
first_byte_timeout = "20m"
idle_timeout = "5m"
{f'api = "{args.upstream_api}"' if getattr(args, "upstream_api", None) else ""}

[compression]
mode = "{mode}"
context_window = {args.context_window}
high_water = {getattr(args, "high_water", 0.8)}
low_water = {getattr(args, "low_water", 0.5)}
pre_compaction = {max(0.6, getattr(args, "low_water", 0.5) + 0.05)}
keep_recent_turns = {args.keep_recent_turns}
token_margin = {args.token_margin}
{f'tokenizer = "{os.path.abspath(args.tokenizer)}"' if getattr(args, "tokenizer", "") else ""}

[compression.summarizer]
timeout = "10m"
max_wait = "2s"
max_tokens = 512
""")
    chk = subprocess.run([args.ctxgate_bin, "check-config", cfg], capture_output=True, text=True)
    if chk.returncode != 0:
        sys.exit(f"check-config failed:\n{chk.stdout}{chk.stderr}")
    log = open(os.path.join(logdir, f"ctxgate-{mode}.log"), "w")
    p = subprocess.Popen([args.ctxgate_bin, "-c", cfg], stdout=log, stderr=subprocess.STDOUT, cwd=logdir)
    wait_ready(f"http://127.0.0.1:{port}/healthz", p, "ctxgate", 60)
    return p


def metric_lines(text, prefix):
    return [l for l in text.splitlines() if l.startswith(prefix)]


# ---------------------------------------------------------------- one mode
def run_mode(args, mode, tools, messages, points, logdir):
    llama_port, gate_port = args.port, args.port + 1
    llama = start_llama(args, mode, llama_port, logdir)
    gate = None
    try:
        base = f"http://127.0.0.1:{llama_port}"
        headers = {}
        if mode in ("rules", "hybrid"):
            gate = start_ctxgate(args, mode, gate_port, llama_port, logdir)
            base = f"http://127.0.0.1:{gate_port}"
            headers = {"X-Session-Id": f"kv-{mode}", "Authorization": "Bearer sk-kv-cache-bench"}
        est = Estimator(f"http://127.0.0.1:{llama_port}")
        budget = int(args.high_water * args.context_window)
        rows, t_mode = [], time.time()
        for t, end in enumerate(points, 1):
            history = messages[:end]
            row = {"turn": t, "history_messages": end}
            if mode == "sliding":
                sent, est_tokens, dropped = sliding_window(history, tools, est, budget)
                row.update(sliding_estimate=est_tokens, dropped_units=dropped, sent_messages=len(sent))
            else:
                sent = history
            body = {"model": args.model, "messages": sent, "tools": tools,
                    "max_tokens": args.max_tokens, "temperature": 0, "stream": False}
            t0 = time.time()
            st, hdr, raw = http("POST", base + "/v1/chat/completions", body, headers)
            row["wall_s"] = round(time.time() - t0, 3)
            row["status"] = st
            hl = {k.lower(): v for k, v in hdr.items()}
            for h in ("x-ctxgate-tokens-before", "x-ctxgate-tokens-after", "x-ctxgate-compression"):
                if h in hl:
                    row[h[len("x-ctxgate-"):].replace("-", "_")] = hl[h]
            try:
                resp = json.loads(raw)
            except Exception:
                resp = {"raw": raw[:300].decode(errors="replace")}
            if st == 200:
                u = resp.get("usage") or {}
                row["prompt_tokens"] = u.get("prompt_tokens")
                row["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                row["completion_tokens"] = u.get("completion_tokens")
                tm = resp.get("timings") or {}
                row["server_prompt_n"] = tm.get("prompt_n")
                row["server_prompt_ms"] = tm.get("prompt_ms")
            else:
                msg = json.dumps(resp)[:400]
                row["error"] = msg
                row["overflow"] = st == 400 and bool(re.search(r"context|exceed", msg, re.I))
            rows.append(row)
            print(f"[{mode}] turn {t:3d}/{len(points)} st={st} prompt={row.get('prompt_tokens')} "
                  f"cached={row.get('cached_tokens')} wall={row['wall_s']:.1f}s "
                  f"ctxgate={row.get('compression', '-')}:{row.get('tokens_before', '')}->{row.get('tokens_after', '')}"
                  + (f" sliding_est={row['sliding_estimate']} dropped={row['dropped_units']}" if mode == "sliding" else ""),
                  flush=True)
        out = {"mode": mode, "rows": rows, "mode_wall_s": round(time.time() - t_mode, 1)}
        st, _, m = http("GET", f"http://127.0.0.1:{llama_port}/metrics")
        if st == 200:
            out["llama_metrics"] = metric_lines(m.decode(), "llamacpp:")
        if gate:
            # let a background state sheet finish before reading the counters (bounded)
            time.sleep(2)
            st, _, m = http("GET", base + "/metrics")
            out["ctxgate_metrics"] = metric_lines(m.decode(), "ctxgate_compression") + \
                metric_lines(m.decode(), "ctxgate_summar") + metric_lines(m.decode(), "ctxgate_sheet")
        return out
    finally:
        stop(gate)
        stop(llama)


# ---------------------------------------------------------------- summary
def summarize(results, n_turns):
    direct = {r["turn"]: r for r in results.get("direct", {}).get("rows", [])}
    new = {}
    prev = 0
    for t in range(1, n_turns + 1):
        p = direct.get(t, {}).get("prompt_tokens")
        if p is None:
            new[t] = None
            continue
        new[t] = p - prev if t > 1 else p
        prev = p
    summary = {}
    for mode, res in results.items():
        rows = res["rows"]
        ok = [r for r in rows if r["status"] == 200]
        P = sum(r["prompt_tokens"] for r in ok)
        C = sum(r["cached_tokens"] or 0 for r in ok)
        reusable = sum(max(0, r["prompt_tokens"] - new[r["turn"]]) for r in ok if new.get(r["turn"]) is not None)
        P_known = sum(r["prompt_tokens"] for r in ok if new.get(r["turn"]) is not None)
        C_known = sum(r["cached_tokens"] or 0 for r in ok if new.get(r["turn"]) is not None)
        epochs = {}
        for l in res.get("ctxgate_metrics", []):
            m = re.match(r'ctxgate_compression_epochs_total\{(.*)\}\s+(\S+)', l)
            if m:
                lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                epochs[lab.get("stage", m.group(1))] = epochs.get(lab.get("stage", m.group(1)), 0) + float(m.group(2))
        sheets = None
        for l in res.get("ctxgate_metrics", []):
            if l.startswith("ctxgate_summarizer_duration_seconds_count"):
                sheets = int(float(l.split()[-1]))
        server_prompt = None
        for l in res.get("llama_metrics", []):
            if l.startswith("llamacpp:prompt_tokens_total"):
                server_prompt = float(l.split()[-1])
        walls = [r["wall_s"] for r in rows]
        summary[mode] = {
            "turns": len(rows), "turns_completed": len(ok),
            "overflows": sum(1 for r in rows if r.get("overflow")),
            "errors": sum(1 for r in rows if r["status"] != 200),
            "prompt_tokens": P, "cached_tokens": C,
            "cached_share": C / P if P else None,
            "physical_limit": reusable / P_known if P_known else None,
            "prefix_reuse_efficiency": C_known / reusable if reusable else None,
            "wall_total_s": round(sum(walls), 1), "wall_mean_s": round(sum(walls) / len(walls), 2) if walls else None,
            "ctxgate_epochs": epochs or None,
            "state_sheet_calls": sheets,
            "server_prefill_tokens_incl_summarizer": server_prompt,
            "mode_wall_s": res.get("mode_wall_s"),
        }
    return summary, new


def table(summary, meta):
    d = summary.get("direct")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    session = meta.get("session", "bfcl")
    what = f"BFCL long_context {','.join(meta['convs'])}" if session == "bfcl" else f"generated session {session}"
    lines = [f"Model {meta['model']}, {meta['n_turns']} turns ({what}), "
             f"ctxgate context_window {meta['context_window']} (high water {int(0.8 * meta['context_window'])}, "
             f"token_margin {meta.get('token_margin', 0)}), "
             f"server -c {meta['server_ctx']}, max_tokens {meta['max_tokens']}, --cache-ram 0, 1 slot.", "",
             "| mode | turns ok | overflows | Σ prompt tokens | vs direct | cached / prompt | physical limit | prefix-reuse eff. | mean wall/turn | total wall | speed-up vs direct | epochs | server prefill (incl. sheet) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        s = summary.get(mode)
        if not s:
            continue
        vs = f"{100 * (s['prompt_tokens'] / d['prompt_tokens'] - 1):+.1f}%" if d and d["prompt_tokens"] else "-"
        sp = f"{d['wall_mean_s'] / s['wall_mean_s']:.2f}x" if d and s["wall_mean_s"] else "-"
        ep = ", ".join(f"{k}={int(v)}" for k, v in (s["ctxgate_epochs"] or {}).items()) or "-"
        if s.get("state_sheet_calls"):
            ep += f" ({s['state_sheet_calls']} sheet calls)"
        sv = "-" if s["server_prefill_tokens_incl_summarizer"] is None else str(int(s["server_prefill_tokens_incl_summarizer"]))
        lines.append(f"| {mode} | {s['turns_completed']}/{s['turns']} | {s['overflows']} | {s['prompt_tokens']} | {vs} | "
                     f"{pct(s['cached_share'])} | {pct(s['physical_limit'])} | {pct(s['prefix_reuse_efficiency'])} | "
                     f"{s['wall_mean_s']:.2f} s | {s['wall_total_s']:.0f} s | {sp} | {ep} | {sv} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="serve.sh model name (smollm2 | qwen)")
    ap.add_argument("--data", default=os.path.join(WORK, "bfcl", "long_context.jsonl"))
    ap.add_argument("--convs", default="64,82,66,83", help="BFCL multi_turn_long_context ids (one shared tool set)")
    ap.add_argument("--context-window", type=int, default=6656, help="ctxgate compression.context_window")
    ap.add_argument("--high-water", type=float, default=0.8)
    ap.add_argument("--keep-recent-turns", type=int, default=2)
    ap.add_argument("--server-ctx", type=int, default=16384, help="llama-server -c (must hold the direct session)")
    ap.add_argument("--token-margin", type=float, default=0.0, help="ctxgate compression.token_margin (the model's "
                    "tokenizer counts this much more than o200k)")
    ap.add_argument("--tokenizer", default="", help="ctxgate compression.tokenizer: the model's own tokenizer.json "
                    "(setup.sh writes one per model under .work/models/)")
    ap.add_argument("--session", default="bfcl", help="bfcl (the --convs conversations) or gen:SEED:TOKENS (a generated "
                    "session with repeated and log-noisy tool results, ~TOKENS o200k tokens)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--modes", default="direct,rules,hybrid,sliding")
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--max-turns", type=int, default=0, help="stop after N turns (0 = all)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--reuse", help="results JSON (or a run's partial.json) whose modes not listed in --modes are "
                    "merged into this report (e.g. to rerun one mode)")
    args = ap.parse_args()
    convs = args.convs.split(",")
    if args.session.startswith("gen:"):
        _, seed, tokens = args.session.split(":")
        tools, messages, points = gen_session(int(seed), int(tokens))
    else:
        tools, messages, points = build_session(args.data, convs)
    if args.max_turns:
        points = points[:args.max_turns]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    logdir = os.path.join(WORK, "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    # a private copy of the binary: a concurrent `cargo build` must not change ctxgate between modes
    args.ctxgate_bin = os.path.join(logdir, "ctxgate")
    if any(m in ("rules", "hybrid") for m in args.modes.split(",")):
        shutil.copy2(CTXGATE, args.ctxgate_bin)
    print(f"session: {len(messages)} messages, {len(points)} turns; logs in {logdir}", flush=True)
    results, reused = {}, {}
    if args.reuse:
        prev = json.load(open(args.reuse))["results"]
        reused = {m: r for m, r in prev.items() if m not in args.modes.split(",")}
    for mode in args.modes.split(","):
        results[mode] = run_mode(args, mode, tools, messages, points, logdir)
        # partial results survive a later failure
        json.dump({"partial": True, "results": results}, open(os.path.join(logdir, "partial.json"), "w"), indent=1)
    for m in MODES:  # report order
        if m in reused:
            results[m] = dict(reused[m], reused_from=args.reuse)
    results = {m: results[m] for m in MODES if m in results}
    summary, new = summarize(results, len(points))
    meta = {"model": args.model, "session": args.session, "convs": convs, "token_margin": args.token_margin, "tokenizer": os.path.basename(args.tokenizer), "n_turns": len(points), "context_window": args.context_window,
            "high_water": args.high_water, "keep_recent_turns": args.keep_recent_turns, "server_ctx": args.server_ctx,
            "max_tokens": args.max_tokens, "sliding_estimate": "llama-server /tokenize of json.dumps(tools) + "
            "json.dumps(message) per message, summed", "date": stamp, "logs": logdir, "reused": {m: args.reuse for m in reused},
            "ctxgate_sha256": hashlib.sha256(open(args.ctxgate_bin, "rb").read()).hexdigest()
            if os.path.exists(args.ctxgate_bin) else None}
    md = table(summary, meta)
    print("\n" + md)
    base = os.path.join(args.out, f"{stamp}-{args.model}" + ("" if args.session == "bfcl" else "-" + args.session.replace(":", "-")))
    json.dump({"meta": meta, "summary": summary, "new_tokens_per_turn": new, "results": results},
              open(base + ".json", "w"), indent=1)
    open(base + ".md", "w").write(md + "\n")
    print(f"\nwrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
