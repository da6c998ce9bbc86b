#!/usr/bin/env python3
"""Replica benchmark: several concurrent agent sessions through ctxgate to a pool of real llama-server replicas.

Each session replays one BFCL v4 `multi_turn_base` conversation (its own tool set, real tool outputs) with its
full history and `X-Session-Id`, one request after every user message and after every run of tool results, as
run.py does for one session. All sessions run at once, each turn after the previous one's answer. Modes, each on
freshly started replicas (cold caches) and a fresh ctxgate:

  single          ctxgate -> one replica (a plain upstream): the cache-hit ceiling
  round_robin     ctxgate -> pool of N replicas, balance = "round_robin", no affinity
  least_requests  ctxgate -> pool, p2c over requests in flight, no affinity
  affinity        ctxgate -> pool, session affinity (rendezvous, bounded load)
  kill            affinity, and the replica that is home to the most sessions is SIGKILLed once every session
                  is halfway through its turns: which sessions moved, and what their next turns cost

Replicas: llama-server, 1 slot each (`-np 1`), `-t THREADS`, the host-RAM prompt cache on (llama-server's default
8 GiB `--cache-ram`: a replica keeps the prefixes of every session it served, as a real server's prefix cache
does, so a turn back on a replica that saw the session's earlier turns reuses them). Usage (from
loadtests/kv-cache, after ./setup.sh and `cargo build --release` in the repo root):

  .work/venv/bin/python replicas.py [--work DIR] [--replicas 3] [--sessions 6] [--max-turns 6] [--modes ...]

`--work` is the setup.sh directory (default .work next to this file). Standard library only. Definitions of the
reported numbers are in README.md ("Replicas").
"""
import argparse, collections, datetime, hashlib, json, os, re, shutil, signal, subprocess, sys, threading, time
import urllib.error, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
CTXGATE = os.path.join(REPO, "target", "release", "ctxgate")
SYSTEM = "You are a helpful assistant that controls the user's systems through the provided tools."
MODES = ["single", "round_robin", "least_requests", "affinity", "kill"]
ENDPOINT = "x-ctxgate-upstream-endpoint"


# ---------------------------------------------------------------- HTTP and processes
def http(method, url, body=None, headers=None, timeout=3600):
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, {}, str(e).encode()


def wait_ready(url, proc, what, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early (rc {proc.returncode}); see its log")
        if http("GET", url, timeout=5)[0] == 200:
            return
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


def start_replica(args, port, logdir, name):
    model = {"smollm2": "smollm2-135m-instruct-q4_1.gguf", "qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"}[args.model]
    cmd = [os.path.join(args.work, "bin", "llama-server"), "-m", os.path.join(args.work, "models", model),
           "--host", "127.0.0.1", "--port", str(port), "--jinja", "-c", str(args.server_ctx),
           "-t", str(args.threads), "-tb", str(args.threads), "-np", "1", "--no-webui", "--metrics"]
    if args.model == "smollm2":
        # SmolLM2's own template drops tools and tool messages (see README.md).
        cmd += ["--chat-template-file", os.path.join(HERE, "chatml-tools.jinja")]
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(args.work, "bin"))
    log = open(os.path.join(logdir, f"{name}.log"), "w")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/health", p, name)
    return p


def start_ctxgate(args, mode, port, replica_ports, logdir):
    cfg = os.path.join(logdir, f"ctxgate-{mode}.toml")
    store = os.path.join(logdir, f"ctxgate-{mode}.redb")
    urls = [f"http://127.0.0.1:{p}/v1" for p in replica_ports]
    if mode == "single":
        upstream = f'base_url = "{urls[0]}"\n'
    else:
        balance = "round_robin" if mode == "round_robin" else "least_requests"
        affinity = "true" if mode in ("affinity", "kill") else "false"
        upstream = (f"[upstreams.pool]\nendpoints = {json.dumps(urls)}\nbalance = \"{balance}\"\naffinity = {affinity}\n"
                    "[upstreams.pool.health]\ncheck_path = \"/health\"\ncheck_interval = \"2s\"\n")
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
first_byte_timeout = "20m"
idle_timeout = "5m"
{upstream}""")
    chk = subprocess.run([args.ctxgate_bin, "check-config", cfg], capture_output=True, text=True)
    if chk.returncode != 0:
        sys.exit(f"check-config failed:\n{chk.stdout}{chk.stderr}")
    log = open(os.path.join(logdir, f"ctxgate-{mode}.log"), "w")
    p = subprocess.Popen([args.ctxgate_bin, "-c", cfg], stdout=log, stderr=subprocess.STDOUT, cwd=logdir)
    wait_ready(f"http://127.0.0.1:{port}/healthz", p, "ctxgate", 60)
    return p


# ---------------------------------------------------------------- sessions
def pick_sessions(path, n, max_turns):
    """One conversation per tool set, smallest tool sets first, each the shortest with at least 4 turns."""
    by_tools = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            by_tools[json.dumps(r["tools"], sort_keys=True)].append(r)
    picked = []
    for tools_key in sorted(by_tools, key=len):
        rows = sorted(by_tools[tools_key], key=lambda r: len(json.dumps(r["messages"])))
        for r in rows:
            messages = [{"role": "system", "content": SYSTEM}] + r["messages"]
            points = [i + 1 for i, m in enumerate(messages) if m["role"] in ("user", "tool")
                      and (i + 1 == len(messages) or messages[i + 1]["role"] != "tool")]
            if len(points) >= 4:
                picked.append({"id": r["id"], "tools": r["tools"], "messages": messages, "points": points[:max_turns]})
                break
        if len(picked) == n:
            return picked
    sys.exit(f"only {len(picked)} tool sets with a conversation of 4+ turns")


def run_session(args, base, mode, s, session, rows, progress, lock):
    headers = {"X-Session-Id": f"{mode}-{s}", "Authorization": "Bearer sk-kv-cache-bench"}
    for t, end in enumerate(session["points"], 1):
        body = {"model": args.model, "messages": session["messages"][:end], "tools": session["tools"],
                "max_tokens": args.max_tokens, "temperature": 0}
        row = {"session": s, "turn": t, "attempts": 0}
        t0 = time.time()
        while True:
            row["attempts"] += 1
            st, hdr, raw = http("POST", base + "/v1/chat/completions", body, headers)
            # An agent retries a turn that failed in flight (a replica killed mid-request); a second failure
            # is recorded as it is.
            if st == 200 or row["attempts"] >= 2:
                break
            row.setdefault("first_error", f"{st} {raw[:200].decode(errors='replace')}")
            time.sleep(1)
        row["wall_s"] = round(time.time() - t0, 3)
        row["status"] = st
        row["endpoint"] = hdr.get(ENDPOINT, "single" if mode == "single" else None)
        row["finished_at"] = time.time()
        if st == 200:
            resp = json.loads(raw)
            u = resp.get("usage") or {}
            row["prompt_tokens"] = u.get("prompt_tokens")
            row["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            tm = resp.get("timings") or {}
            row["server_prompt_n"] = tm.get("prompt_n")
        else:
            row["error"] = raw[:300].decode(errors="replace")
        with lock:
            rows.append(row)
            progress[0] += 1
        print(f"[{mode}] s{s} turn {t}/{len(session['points'])} st={st} ep={row['endpoint']} "
              f"prompt={row.get('prompt_tokens')} cached={row.get('cached_tokens')} wall={row['wall_s']:.1f}s"
              + (f" (retried: {row['first_error'][:60]})" if "first_error" in row else ""), flush=True)


def run_mode(args, mode, sessions, logdir):
    n = 1 if mode == "single" else args.replicas
    ports = [args.port + i for i in range(n)]
    gate_port = args.port + 50
    replicas = {}
    gate = None
    try:
        for i, p in enumerate(ports):
            replicas[f"127.0.0.1:{p}"] = start_replica(args, p, logdir, f"{mode}-replica{i}")
        gate = start_ctxgate(args, mode, gate_port, ports, logdir)
        base = f"http://127.0.0.1:{gate_port}"
        rows, progress, lock = [], [0], threading.Lock()
        total = sum(len(s["points"]) for s in sessions)
        threads = [threading.Thread(target=run_session, args=(args, base, mode, i, s, rows, progress, lock))
                   for i, s in enumerate(sessions)]
        t0 = time.time()
        for th in threads:
            th.start()
            time.sleep(0.2)
        killed = None
        if mode == "kill":
            # Every session past half its turns, so the victim's sessions all have turns left.
            def halfway():
                with lock:
                    done = collections.Counter(r["session"] for r in rows)
                return all(done[i] >= max(1, len(s["points"]) // 2) for i, s in enumerate(sessions))
            while not halfway() and any(th.is_alive() for th in threads):
                time.sleep(0.2)
            with lock:
                homes = collections.Counter(r["endpoint"] for r in rows if r["turn"] == 1 and r["endpoint"])
            victim = homes.most_common(1)[0][0]
            replicas[victim].kill()
            replicas[victim].wait()
            killed = {"endpoint": victim, "at_s": round(time.time() - t0, 1), "turns_done": progress[0]}
            print(f"[{mode}] SIGKILL replica {victim} after {progress[0]}/{total} turns", flush=True)
        for th in threads:
            th.join()
        out = {"mode": mode, "rows": sorted(rows, key=lambda r: (r["session"], r["turn"])),
               "makespan_s": round(time.time() - t0, 1), "killed": killed, "replica_prefill": {}}
        for ep, proc in replicas.items():
            if proc.poll() is None:
                st, _, m = http("GET", f"http://{ep}/metrics")
                for line in m.decode(errors="replace").splitlines() if st == 200 else []:
                    if line.startswith("llamacpp:prompt_tokens_total"):
                        out["replica_prefill"][ep] = float(line.split()[-1])
        st, _, m = http("GET", base + "/metrics")
        out["ctxgate_metrics"] = [l for l in m.decode(errors="replace").splitlines() if l.startswith("ctxgate_upstream_")]
        return out
    finally:
        stop(gate)
        for proc in replicas.values():
            stop(proc)


# ---------------------------------------------------------------- summary
def summarize(res):
    rows = res["rows"]
    by_session = collections.defaultdict(list)
    for r in rows:
        by_session[r["session"]].append(r)
    ok = [r for r in rows if r["status"] == 200]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] or 0 for r in ok)
    reusable = 0
    on_home = 0
    homes = {}
    for s, rs in by_session.items():
        rs.sort(key=lambda r: r["turn"])
        homes[s] = rs[0]["endpoint"]
        prev = None
        for r in rs:
            # History is append-only: all of the previous turn's prompt could be reused.
            if r["status"] == 200 and prev is not None:
                reusable += min(prev, r["prompt_tokens"])
            if r["status"] == 200:
                prev = r["prompt_tokens"]
            on_home += r["endpoint"] == homes[s]
    walls = [r["wall_s"] for r in rows]
    return {
        "turns": len(rows), "turns_ok": len(ok), "retried": sum(1 for r in rows if r["attempts"] > 1),
        "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": cached / prompt if prompt else None,
        "prefix_reuse_efficiency": cached / reusable if reusable else None,
        "wall_mean_s": sum(walls) / len(walls) if walls else None, "makespan_s": res["makespan_s"],
        "share_on_session_replica": on_home / len(rows) if rows else None,
        "server_prefill": sum(res["replica_prefill"].values()) if res["replica_prefill"] else None,
        "homes": homes,
    }


def kill_report(res):
    """Per session: its replica before the kill, where its turns went after, and what the first turn after cost."""
    killed = res.get("killed")
    if not killed:
        return []
    by_session = collections.defaultdict(list)
    for r in res["rows"]:
        by_session[r["session"]].append(r)
    out = []
    for s, rs in sorted(by_session.items()):
        rs.sort(key=lambda r: r["turn"])
        home = rs[0]["endpoint"]
        after = [r for r in rs if r["endpoint"] != home]
        first_away = after[0] if after else None
        out.append({
            "session": s, "home": home, "home_killed": home == killed["endpoint"],
            "turns": len(rs), "turns_elsewhere": len(after),
            "moved_to": sorted({r["endpoint"] for r in after}),
            "first_moved_turn": first_away and first_away["turn"],
            "first_moved_prompt": first_away and first_away.get("prompt_tokens"),
            "first_moved_cached": first_away and first_away.get("cached_tokens"),
            "first_moved_wall_s": first_away and first_away["wall_s"],
            "retried_turns": sum(1 for r in rs if r["attempts"] > 1),
        })
    return out


def table(summaries, meta):
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    single = summaries.get("single")
    lines = [f"Model {meta['model']}, {meta['sessions']} concurrent sessions (BFCL multi_turn_base "
             f"{', '.join(meta['conversations'])}), {meta['turns']} turns in all; {meta['replicas']} llama-server replicas, "
             f"1 slot, {meta['threads']} thread(s) each, -c {meta['server_ctx']}, host prompt cache on; max_tokens "
             f"{meta['max_tokens']}.", "",
             "| mode | turns ok | retried | Σ prompt | cached / prompt | prefix-reuse eff. | vs single | turns on session's replica | mean wall/turn | makespan | server prefill |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        s = summaries.get(mode)
        if not s:
            continue
        vs = "-"
        if single and single["prefix_reuse_efficiency"] and s["prefix_reuse_efficiency"] is not None:
            vs = f"{100 * (s['prefix_reuse_efficiency'] - single['prefix_reuse_efficiency']):+.1f} pt"
        lines.append(f"| {mode} | {s['turns_ok']}/{s['turns']} | {s['retried']} | {s['prompt_tokens']} | "
                     f"{pct(s['cached_share'])} | {pct(s['prefix_reuse_efficiency'])} | {vs} | "
                     f"{pct(s['share_on_session_replica'])} | {s['wall_mean_s']:.1f} s | {s['makespan_s']:.0f} s | "
                     f"{'-' if s['server_prefill'] is None else int(s['server_prefill'])} |")
    return "\n".join(lines)


def kill_table(rows, killed):
    if not rows:
        return ""
    lines = ["", f"Kill: replica {killed['endpoint']} SIGKILLed at {killed['at_s']} s, after {killed['turns_done']} turns.", "",
             "| session | replica | killed? | turns | turns elsewhere | moved to | first moved turn: prompt / cached / wall | retried turns |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = "-" if r["first_moved_turn"] is None else (
            f"turn {r['first_moved_turn']}: {r['first_moved_prompt']} / {r['first_moved_cached']} / {r['first_moved_wall_s']:.1f} s")
        lines.append(f"| {r['session']} | {r['home']} | {'yes' if r['home_killed'] else 'no'} | {r['turns']} | "
                     f"{r['turns_elsewhere']} | {', '.join(r['moved_to']) or '-'} | {first} | {r['retried_turns']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(HERE, ".work"), help="setup.sh's directory (bin/, models/, bfcl/)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen"])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama-server -t/-tb per replica")
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--max-turns", type=int, default=6, help="turns per session (its first N request points)")
    ap.add_argument("--server-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--port", type=int, default=18200)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    args.work = os.path.abspath(args.work)
    sessions = pick_sessions(os.path.join(args.work, "bfcl", "base.jsonl"), args.sessions, args.max_turns)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    logdir = os.path.join(args.work, "runs", "replicas-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    args.ctxgate_bin = os.path.join(logdir, "ctxgate")
    shutil.copy2(CTXGATE, args.ctxgate_bin)
    print(f"{len(sessions)} sessions ({', '.join(s['id'] for s in sessions)}), "
          f"{sum(len(s['points']) for s in sessions)} turns; logs in {logdir}", flush=True)
    results, summaries = {}, {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(args, mode, sessions, logdir)
        summaries[mode] = summarize(results[mode])
        json.dump({"partial": True, "results": results}, open(os.path.join(logdir, "partial.json"), "w"), indent=1)
    meta = {"model": args.model, "replicas": args.replicas, "threads": args.threads, "sessions": len(sessions),
            "conversations": [s["id"].rsplit("_", 1)[-1] for s in sessions],
            "turns": sum(len(s["points"]) for s in sessions), "server_ctx": args.server_ctx,
            "max_tokens": args.max_tokens, "date": stamp, "logs": logdir,
            "ctxgate_sha256": hashlib.sha256(open(args.ctxgate_bin, "rb").read()).hexdigest()}
    kill_rows = kill_report(results["kill"]) if "kill" in results else []
    md = table(summaries, meta) + kill_table(kill_rows, results.get("kill", {}).get("killed"))
    print("\n" + md)
    base = os.path.join(args.out, f"{stamp}-replicas-{args.model}")
    json.dump({"meta": meta, "summary": summaries, "kill": kill_rows, "results": results}, open(base + ".json", "w"), indent=1)
    open(base + ".md", "w").write(md + "\n")
    print(f"\nwrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
