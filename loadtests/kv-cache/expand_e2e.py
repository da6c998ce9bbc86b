#!/usr/bin/env python3
"""End to end: does a real small model call `ctxgate_expand` to answer a question about a passage
that compression masked, and does the answer then hold the fact?

For each case a chat request goes client -> ctxgate (rules, a small window) -> llama-server: an
agent session whose older `fetch_page` result states a fact (a code) among ~1,500 tokens of
prose, then other tool results large enough that the page is masked, then the user's question.
ctxgate answers `ctxgate_expand` calls in its own tool loop; the client sees only the final answer.
Each case is asked twice: as is, and with a hint in the question ("if part of this conversation
was shortened, use ctxgate_expand"). Reported per case: whether the page was masked (the marker is
in what ctxgate sent), how many `ctxgate_expand` calls ctxgate answered (its `ctxgate_tool_calls`
counter), and whether the client's answer holds the code.

Usage (from loadtests/kv-cache, after ./setup.sh and `cargo build --release`):
  .work/venv/bin/python expand_e2e.py [--model qwen] [--cases 6]
Standard library only; writes results/<date>-expand-e2e-<model>.{json,md}.
"""
import argparse, datetime, json, os, random, re, shutil, subprocess, sys, time

import run  # HTTP helpers and server start/stop of the KV-cache benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("amber falcon river granite copper meadow harbor willow cobalt ember lantern summit orchid "
         "quartz tundra velvet").split()
PROSE = ("the service keeps its state in a small table and writes a journal entry for every change so that "
         "operators can follow what happened during an incident and roll back a bad deploy quickly").split()
TOOLS = [
    {"type": "function", "function": {"name": "fetch_page", "description": "Fetch a web page as text.",
     "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}},
    {"type": "function", "function": {"name": "tail_logs", "description": "Last lines of a service's log.",
     "parameters": {"type": "object", "properties": {"service": {"type": "string"}}, "required": ["service"]}}},
]


def prose(rng, words):
    return " ".join(rng.choice(PROSE) for _ in range(words))


def case(rng, k):
    code = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"
    cluster = rng.choice(["staging", "billing", "search", "ingest"])
    # A long page with the fact in its middle: the budget cannot keep the page whole, so its
    # middle is cut (or the page masked) and the fact is only recoverable.
    paras = [prose(rng, 60) + "." for _ in range(60)]
    paras.insert(rng.randint(25, 35), f"The access code for the {cluster} cluster is {code}.")
    page = "\n\n".join(paras)
    msgs = [{"role": "system", "content": "You are a helpful operations assistant. Use the tools when needed."},
            {"role": "user", "content": f"Read the runbook at https://wiki.test/runbooks/{cluster} and then check the logs."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}_1", "type": "function", "function": {
                "name": "fetch_page", "arguments": json.dumps({"url": f"https://wiki.test/runbooks/{cluster}"})}}]},
            {"role": "tool", "tool_call_id": f"c{k}_1", "content": page}]
    for j, svc in enumerate(["api", "worker", "scheduler"], 2):
        log = "\n".join(f"2026-12-06T07:{i // 60:02d}:{i % 60:02d}Z INFO {svc}: {prose(rng, 12)}" for i in range(30))
        msgs += [{"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}_{j}", "type": "function",
                  "function": {"name": "tail_logs", "arguments": json.dumps({"service": svc})}}]},
                 {"role": "tool", "tool_call_id": f"c{k}_{j}", "content": log}]
    msgs.append({"role": "assistant", "content": "The logs look normal for all three services."})
    return cluster, code, msgs


def question(cluster, hint):
    q = f"What is the access code for the {cluster} cluster from the runbook? Answer with the code only."
    if hint:
        q += " If a part of this conversation was shortened, call ctxgate_expand with the id in its marker to read it."
    return {"role": "user", "content": q}


def expand_calls(base):
    st, _, m = run.http("GET", base + "/metrics")
    n = 0
    for line in m.decode().splitlines():
        if line.startswith("ctxgate_tool_calls") and 'tool="ctxgate_expand"' in line:
            n += float(line.rsplit(" ", 1)[1])
    return int(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--context-window", type=int, default=4096)
    ap.add_argument("--port", type=int, default=18200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    logdir = os.path.join(run.WORK, "runs", "expand-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(logdir, exist_ok=True)
    args.ctxgate_bin = os.path.join(logdir, "ctxgate")
    shutil.copy2(run.CTXGATE, args.ctxgate_bin)
    # run.start_ctxgate's settings: rules, the window above, two recent turns kept.
    args.keep_recent_turns, args.token_margin, args.server_ctx = 1, 0.0, 16384
    llama_port, gate_port = args.port, args.port + 1
    llama = subprocess.Popen(["bash", os.path.join(HERE, "serve.sh"), args.model, str(llama_port), "--cache-ram", "0"],
                             stdout=open(os.path.join(logdir, "llama.log"), "w"), stderr=subprocess.STDOUT,
                             env=dict(os.environ, CTX=str(args.server_ctx)))
    gate = None
    rows = []
    try:
        run.wait_ready(f"http://127.0.0.1:{llama_port}/health", llama, "llama-server", 300)
        gate = run.start_ctxgate(args, "rules", gate_port, llama_port, logdir)
        base = f"http://127.0.0.1:{gate_port}"
        rng = random.Random(args.seed)
        for k in range(args.cases):
            cluster, code, msgs = case(rng, k)
            for hint in (False, True):
                before = expand_calls(base)
                body = {"model": args.model, "messages": msgs + [question(cluster, hint)], "tools": TOOLS,
                        "max_tokens": 64, "temperature": 0}
                # What ctxgate sends upstream for this body, offline, with the same config: is the
                # code still there verbatim?
                with open(os.path.join(logdir, "body.json"), "w") as f:
                    json.dump(body, f)
                sent = subprocess.run([args.ctxgate_bin, "compress", "-c", os.path.join(logdir, "ctxgate-rules.toml"),
                                       os.path.join(logdir, "body.json")], capture_output=True, text=True).stdout
                t0 = time.time()
                st, hdr, raw = run.http("POST", base + "/v1/chat/completions", body)
                wall = time.time() - t0
                hl = {k2.lower(): v for k2, v in hdr.items()}
                resp = json.loads(raw) if raw.startswith(b"{") else {}
                msg = ((resp.get("choices") or [{}])[0].get("message") or {})
                answer = msg.get("content") or ""
                row = {"case": k, "hint": hint, "status": st, "code": code, "wall_s": round(wall, 1),
                       "compression": hl.get("x-ctxgate-compression"), "tokens_before": hl.get("x-ctxgate-tokens-before"),
                       "tokens_after": hl.get("x-ctxgate-tokens-after"), "expand_calls": expand_calls(base) - before,
                       "code_sent_verbatim": code in sent, "answer": answer[:200], "client_tool_calls": [c["function"]["name"] for c in msg.get("tool_calls") or []],
                       "answer_has_code": code in answer}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        run.stop(gate)
        run.stop(llama)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    n = len(rows) // 2
    lines = [f"# ctxgate_expand end to end — {stamp}, {args.model}", "",
             f"{n} cases, each asked without and with a hint; window {args.context_window}; temperature 0; "
             f"logs in {logdir}.", "",
             "| case | hint | compressed (tokens) | code still in what was sent | expand calls answered by ctxgate | client saw a tool call | answer holds the code | answer |",
             "|---:|---|---|---|---:|---|---|---|"]
    for r in rows:
        said = re.sub(r"[|\n]", " ", r["answer"])[:80]
        lines.append(f"| {r['case']} | {'yes' if r['hint'] else 'no'} | {r['tokens_before']} → {r['tokens_after']} | "
                     f"{'yes' if r['code_sent_verbatim'] else 'no'} | {r['expand_calls']} | {', '.join(r['client_tool_calls']) or 'no'} | {'yes' if r['answer_has_code'] else 'no'} | "
                     f"{said} |")
    for hint in (False, True):
        sub = [r for r in rows if r["hint"] == hint]
        lines.append("")
        lines.append(f"{'With' if hint else 'Without'} hint: code still verbatim in what was sent {sum(r['code_sent_verbatim'] for r in sub)}/{len(sub)}, "
                     f"expand called in {sum(r['expand_calls'] > 0 for r in sub)}/{len(sub)}, "
                     f"answer holds the code in {sum(r['answer_has_code'] for r in sub)}/{len(sub)}.")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"{stamp}-expand-e2e-{args.model}")
    json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, open(out + ".json", "w"), indent=1)
    open(out + ".md", "w").write(md)


if __name__ == "__main__":
    main()
