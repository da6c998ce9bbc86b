#!/usr/bin/env python3
"""Fact retention after compression, on BFCL v4 memory (the prereq conversations and their 155 questions).

For each scenario (customer, finance, healthcare, notetaker, student) the prereq conversation(s) of that scenario are
concatenated into one chat: system + user turns, with a scripted assistant "Noted." between user turns.
A question counts as retained if any of its accepted answers occurs (case-insensitive substring) in the text of
the messages. Reported: share of questions retained in the original chat, after rules, and after hybrid.

  after rules   `ctxgate compress --mode rules --force --stats json --config CFG FILE`, CFG has
                context_window = 1/3 of the chat's tokens (ctxgate's own count) and keep_recent_turns = 2.
  after hybrid  the chat is replayed turn by turn through `ctxgate` (mode hybrid, same window, X-Session-Id) to a
                real llama-server; a small recording proxy between them keeps every upstream request body, and the
                last request that carries the client's final user turn is scored (system, state sheet and
                verbatim text). The state sheet is written by the same model (SmolLM2-135M by default).

Usage: .work/venv/bin/python retention.py [--hybrid notetaker,healthcare|all|none] [--model smollm2] [--summarizer-model qwen15]
Standard library only.
"""
import argparse, datetime, http.server as hs, json, os, socketserver, subprocess, sys, tempfile, threading, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
WORK = os.path.join(HERE, ".work")
MEM = os.path.join(WORK, "bfcl", "memory")
CTXGATE = os.path.join(REPO, "target", "release", "ctxgate")
SCENARIOS = ["customer", "finance", "healthcare", "notetaker", "student"]
SYSTEM = "You are a helpful assistant. Remember what the user tells you about themselves."

sys.path.insert(0, HERE)
from run import http, wait_ready, stop  # noqa: E402  (run.py: stdlib HTTP helpers)


def jsonl(p):
    return [json.loads(l) for l in open(p) if l.strip()]


def build_chat(scn):
    users = []
    for conv in jsonl(os.path.join(MEM, f"memory_{scn}.json")):
        for turn in conv["question"]:
            users += [m["content"] for m in turn if m["role"] == "user"]
    msgs = [{"role": "system", "content": SYSTEM}]
    for k, u in enumerate(users):
        if k:
            msgs.append({"role": "assistant", "content": "Noted."})
        msgs.append({"role": "user", "content": u})
    return msgs


def questions():
    qs = {q["id"]: q for q in jsonl(os.path.join(MEM, "BFCL_v4_memory.json"))}
    out = {s: [] for s in SCENARIOS}
    for a in jsonl(os.path.join(MEM, "possible_answer", "BFCL_v4_memory.json")):
        out[qs[a["id"]]["scenario"]].append(a["ground_truth"])
    return out


def text_of(msgs):
    parts = []
    for m in msgs:
        c = m.get("content")
        if isinstance(c, list):
            c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        parts.append(c or "")
    return "\n".join(parts).lower()


def share(answers, msgs):
    t = text_of(msgs)
    hit = sum(1 for acc in answers if any(str(a).lower() in t for a in acc))
    return hit, len(answers)


def config(path, window, mode="rules", listen="127.0.0.1:18200", upstream="http://127.0.0.1:18202/v1", store=None,
           sheet=None):
    """`sheet`: (base URL, model) of a separate summarizer upstream; its sheet waits up to 10 minutes (a slow
    CPU model), so the request that needs it places it rather than falling back to rules."""
    with open(path, "w") as f:
        f.write(f"""[server]
listen = "{listen}"
request_timeout = "30m"
[sessions]
store = "embedded:{store or os.path.join(os.path.dirname(path), 'ret.redb')}"
[[upstreams]]
name = "llama"
base_url = "{upstream}"
first_byte_timeout = "20m"
idle_timeout = "5m"
[compression]
mode = "{mode}"
context_window = {window}
high_water = 0.8
low_water = 0.5
pre_compaction = 0.6
keep_recent_turns = 2
[compression.summarizer]
timeout = "10m"
max_wait = "{'10m' if sheet else '2s'}"
max_tokens = 512
""")
        if sheet:
            f.write(f"""upstream = "sheet"
model = "{sheet[1]}"
[[upstreams]]
name = "sheet"
base_url = "{sheet[0]}"
first_byte_timeout = "20m"
idle_timeout = "5m"
[[routes]]
models = ["{sheet[1]}"]
upstreams = ["sheet"]
[[routes]]
models = ["*"]
upstreams = ["llama"]
""")


def compress(cfg, body_path, force=True, mode="rules"):
    cmd = [CTXGATE, "compress", "--mode", mode, "--stats", "json", "--config", cfg, body_path]
    if force:
        cmd.insert(4, "--force")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"compress failed: {r.stderr}")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout), stats


class Recorder(hs.BaseHTTPRequestHandler):
    upstream, bodies = None, []

    def log_message(self, *a):
        pass

    def _relay(self, method):
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else None
        if method == "POST" and self.path.endswith("/chat/completions"):
            Recorder.bodies.append(json.loads(data))
        req = urllib.request.Request(Recorder.upstream + self.path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                code, hdrs, out = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            code, hdrs, out = e.code, e.headers, e.read()
        self.send_response(code)
        self.send_header("Content-Type", hdrs.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_POST(self):
        self._relay("POST")

    def do_GET(self):
        self._relay("GET")


def hybrid(scn, msgs, window, args, tmp):
    lp, pp, gp = args.port, args.port + 1, args.port + 2
    env = dict(os.environ, CTX=str(args.server_ctx), LOG_FILE=os.path.join(tmp, f"llama-{scn}.log"))
    extra = ["--cache-ram", "0"]
    if args.model == "smollm2":
        extra += ["--chat-template-file", os.path.join(HERE, "chatml-tools.jinja"),
                  "--override-kv", "llama.context_length=int:32768"]
    llama = subprocess.Popen([os.path.join(HERE, "serve.sh"), args.model, str(lp)] + extra, env=env)
    Recorder.upstream, Recorder.bodies = f"http://127.0.0.1:{lp}", []
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    try:
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", pp), Recorder)
    except OSError:
        stop(llama)
        raise
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cfg = os.path.join(tmp, f"hybrid-{scn}.toml")
    sp, sheet_server, sheet = args.port + 3, None, None
    if args.summarizer_model:
        sheet = (f"http://127.0.0.1:{sp}/v1", args.summarizer_model)
        senv = dict(os.environ, CTX=str(args.server_ctx), LOG_FILE=os.path.join(tmp, f"llama-sheet-{scn}.log"))
        sheet_server = subprocess.Popen([os.path.join(HERE, "serve.sh"), args.summarizer_model, str(sp), "--cache-ram", "0"],
                                        env=senv)
    config(cfg, window, "hybrid", f"127.0.0.1:{gp}", f"http://127.0.0.1:{pp}/v1", os.path.join(tmp, f"{scn}.redb"), sheet)
    gate = None
    try:
        wait_ready(f"http://127.0.0.1:{lp}/health", llama, "llama-server", 180)
        if sheet_server:
            wait_ready(f"http://127.0.0.1:{sp}/health", sheet_server, "llama-server (summarizer)", 300)
        gate = subprocess.Popen([CTXGATE, "-c", cfg], stdout=open(os.path.join(tmp, f"ctxgate-{scn}.log"), "w"),
                                stderr=subprocess.STDOUT, cwd=tmp)
        wait_ready(f"http://127.0.0.1:{gp}/healthz", gate, "ctxgate", 60)
        ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "user"]
        acted, t0 = [], time.time()
        for end in ends:
            st, h, b = http("POST", f"http://127.0.0.1:{gp}/v1/chat/completions",
                            {"model": args.model, "messages": msgs[:end], "max_tokens": 8, "temperature": 0},
                            {"X-Session-Id": f"ret-{scn}-{int(t0)}", "Authorization": "Bearer sk-retention-bench"})
            hl = {k.lower(): v for k, v in h.items()}
            acted.append(f"{st}:{hl.get('x-ctxgate-compression', '-')}:{hl.get('x-ctxgate-tokens-before', '')}"
                         f"->{hl.get('x-ctxgate-tokens-after', '')}")
        last_user = msgs[-1]["content"]
        client = [b for b in Recorder.bodies if b["messages"] and b["messages"][-1].get("content") == last_user]
        users = {m["content"] for m in msgs if m["role"] == "user"}
        sheets = [b for b in Recorder.bodies if not (b["messages"] and b["messages"][-1].get("content") in users)]
        _, _, m = http("GET", f"http://127.0.0.1:{gp}/metrics")
        mets = [l for l in m.decode().splitlines() if l.startswith(("ctxgate_compression", "ctxgate_summar", "ctxgate_sheet"))]
        return client[-1]["messages"], {"turns": len(ends), "wall_s": round(time.time() - t0, 1), "per_turn": acted,
                                        "upstream_requests": len(Recorder.bodies), "summarizer_requests": len(sheets),
                                        "metrics": mets}
    finally:
        stop(gate)
        srv.shutdown()
        srv.server_close()
        stop(llama)
        stop(sheet_server)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hybrid", default="notetaker,healthcare", help="scenarios for the real-model hybrid run, 'all' or 'none'")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--summarizer-model", default="", help="serve.sh name of a separate summarizer model (e.g. qwen15), "
                    "on its own llama-server; default: the conversation's model writes the sheets")
    ap.add_argument("--server-ctx", type=int, default=16384)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    hyb = SCENARIOS if args.hybrid == "all" else [] if args.hybrid == "none" else args.hybrid.split(",")
    tmp = tempfile.mkdtemp(prefix="ctxgate-retention-")
    answers, res = questions(), {}
    for scn in SCENARIOS:
        msgs = build_chat(scn)
        body = {"model": args.model, "messages": msgs}
        bp = os.path.join(tmp, f"{scn}.json")
        json.dump(body, open(bp, "w"))
        cfg0 = os.path.join(tmp, "count.toml")
        config(cfg0, 10_000_000)
        _, st0 = compress(cfg0, bp, force=False, mode="off")
        total = st0["tokens_before"]
        window = max(256, total // 3)
        cfg = os.path.join(tmp, f"rules-{scn}.toml")
        config(cfg, window)
        out, st = compress(cfg, bp)
        r = {"questions": len(answers[scn]), "user_turns": sum(1 for m in msgs if m["role"] == "user"),
             "tokens": total, "context_window": window,
             "original": share(answers[scn], msgs), "rules": share(answers[scn], out["messages"]),
             "rules_tokens_after": st.get("tokens_after"), "rules_acted": st.get("acted")}
        if scn in hyb:
            args.port += 10  # fresh ports per scenario
            hm, info = hybrid(scn, msgs, window, args, tmp)
            r["hybrid"] = share(answers[scn], hm)
            r["hybrid_info"] = info
            r["hybrid_last_request_roles"] = [m["role"] for m in hm]
            r["hybrid_system_text"] = [m["content"][:1500] for m in hm if m["role"] == "system"]
        res[scn] = r
        print(scn, json.dumps({k: v for k, v in r.items() if k not in ("hybrid_system_text",)})[:600], flush=True)
    pct = lambda h: f"{h[0]}/{h[1]} ({100 * h[0] / h[1]:.0f}%)"
    lines = ["| scenario | user turns | tokens (ctxgate count) | context_window | original | after rules (tokens after) | after hybrid (real model) |",
             "|---|---|---|---|---|---|---|"]
    tot = {"original": [0, 0], "rules": [0, 0], "hybrid": [0, 0]}
    for scn, r in res.items():
        for k in tot:
            if k in r:
                tot[k][0] += r[k][0]
                tot[k][1] += r[k][1]
        lines.append(f"| {scn} | {r['user_turns']} | {r['tokens']} | {r['context_window']} | {pct(r['original'])} | "
                     f"{pct(r['rules'])} ({r['rules_tokens_after']}) | {pct(r['hybrid']) if 'hybrid' in r else 'not run'} |")
    lines.append(f"| all | | | | {pct(tot['original'])} | {pct(tot['rules'])} | "
                 f"{pct(tot['hybrid']) + ' (' + ','.join(hyb) + ' only)' if tot['hybrid'][1] else 'not run'} |")
    md = "\n".join(lines)
    print("\n" + md)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{stamp}-retention-{args.model}"
                        + (f"-sheets-{args.summarizer_model}" if args.summarizer_model else ""))
    json.dump({"results": res, "work_dir": tmp}, open(base + ".json", "w"), indent=1)
    open(base + ".md", "w").write(md + "\n")
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
