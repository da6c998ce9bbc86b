#!/usr/bin/env python3
"""The soak test's checker and report (called by loadtests/soak/run.sh; Python stdlib only).

  soak.py verify --base ORIGIN --auth 'Bearer ...' --requests requests.jsonl --out verify.json
      Reads every session k6 used (from its request log) back from the gateway
      (GET /v1/sessions/{id}/messages and GET /v1/sessions/{id}) and counts each turn marker
      `[turn <session>-<n>]` in the user messages of the transcript:
        lost        a turn k6 saw answered (200 and a chat.completion, or a stream that ended
                    with [DONE]) that is not in the transcript
        duplicated  a turn (answered or not) that is in the transcript more than once
      plus, for information, unanswered turns that were saved anyway (a client disconnect, a
      restart after the commit) and turns neither answered nor saved.

  soak.py report WORKDIR
      The markdown report from run.sh's work directory and SOAK_* environment variables.
"""

import argparse
import csv
import json
import os
import re
import statistics
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict

MARKER = re.compile(r"\[turn ([^\]\s]+)\]")


def read_requests(path):
    reqs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                reqs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return reqs


def get_json(base, path, auth):
    req = urllib.request.Request(base + path, headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def verify(args):
    reqs = read_requests(args.requests)
    sessions = defaultdict(lambda: {"sent": [], "acked": set(), "aborted": set(), "mode": None})
    for r in reqs:
        if "s" not in r:
            continue
        s = sessions[r["s"]]
        s["sent"].append(r["m"])
        s["mode"] = r.get("md")
        if r.get("ok"):
            s["acked"].add(r["m"])
        elif r.get("ab") and r.get("st") == 0 and r.get("e") == 1050:
            s["aborted"].add(r["m"])
    out = {
        "sessions": len(sessions),
        "turns_sent": 0,
        "turns_acked": 0,
        "lost": [],
        "duplicated": [],
        "unacked_saved": 0,
        "unacked_saved_aborted": 0,
        "unacked_saved_error": 0,
        "unacked_absent": 0,
        "unknown_markers": [],
        "sessions_not_found": [],
        "sessions_in_flight": [],
        "user_without_answer": [],
        "by_mode": {},
    }
    for sid, s in sorted(sessions.items()):
        q = urllib.parse.quote(sid, safe="")
        status, body = get_json(args.base, f"/v1/sessions/{q}/messages", args.auth)
        counts = Counter()
        if status == 404:
            out["sessions_not_found"].append(sid)
            msgs = []
        elif status != 200 or body is None:
            sys.exit(f"GET /v1/sessions/{sid}/messages: HTTP {status}")
        else:
            msgs = body.get("data", [])
        for i, m in enumerate(msgs):
            if m.get("role") != "user":
                continue
            found = MARKER.findall(text_of(m.get("content")))
            counts.update(found)
            nxt = msgs[i + 1] if i + 1 < len(msgs) else None
            if nxt is None or nxt.get("role") != "assistant":
                out["user_without_answer"].append({"session": sid, "index": i, "markers": found})
        if status == 200:
            st, view = get_json(args.base, f"/v1/sessions/{q}", args.auth)
            if st == 200 and view and view.get("in_flight"):
                out["sessions_in_flight"].append(sid)
        sent = set(s["sent"])
        mode = out["by_mode"].setdefault(
            s["mode"] or "?", {"sessions": 0, "sent": 0, "acked": 0, "lost": 0, "duplicated": 0, "unacked_saved": 0}
        )
        mode["sessions"] += 1
        mode["sent"] += len(s["sent"])
        mode["acked"] += len(s["acked"])
        out["turns_sent"] += len(s["sent"])
        out["turns_acked"] += len(s["acked"])
        for m in s["sent"]:
            n = counts.get(m, 0)
            if m in s["acked"] and n == 0:
                out["lost"].append({"session": sid, "marker": m})
                mode["lost"] += 1
            if n > 1:
                out["duplicated"].append({"session": sid, "marker": m, "count": n, "acked": m in s["acked"]})
                mode["duplicated"] += 1
            if m not in s["acked"]:
                if n >= 1:
                    out["unacked_saved"] += 1
                    mode["unacked_saved"] += 1
                    if m in s["aborted"]:
                        out["unacked_saved_aborted"] += 1
                    else:
                        out["unacked_saved_error"] += 1
                else:
                    out["unacked_absent"] += 1
        out["unknown_markers"] += [m for m in counts if m not in sent]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(
        f"sessions {out['sessions']}, turns sent {out['turns_sent']}, answered {out['turns_acked']}, "
        f"lost {len(out['lost'])}, duplicated {len(out['duplicated'])}, unanswered but saved "
        f"{out['unacked_saved']}, not found {len(out['sessions_not_found'])}, in flight "
        f"{len(out['sessions_in_flight'])}",
        file=sys.stderr,
    )


# --- report ---------------------------------------------------------------------------------------


def env(name, default=""):
    return os.environ.get(name, default)


def mb(kb):
    return f"{kb / 1024:.1f}"


def pct(values, p):
    v = sorted(values)
    if not v:
        return 0
    k = (len(v) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def status_label(r):
    st = r.get("st", 0)
    if st == 0:
        return f"0 (k6 error {r.get('e', '?')})"
    if st == 200:
        return "200 but incomplete"
    return str(st)


def report(args):
    work = args.work
    reqs = read_requests(os.path.join(work, "requests.jsonl"))
    windows = []
    with open(os.path.join(work, "windows.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            windows.append({k: (int(v) if k not in ("signal",) else v) for k, v in row.items()})
    grace = int(env("SOAK_WINDOW_GRACE_MS", "1000"))
    rss = []
    with open(os.path.join(work, "rss.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rss.append(
                {
                    "t": int(row["epoch_s"]),
                    "inc": int(row["incarnation"]),
                    "rss": int(row["vmrss_kb"]),
                    "hwm": int(row["vmhwm_kb"]),
                    "load": float(row["load1"]),
                    "store": int(row["store_kb"]) if row.get("store_kb") else None,
                }
            )
    verifies = {}
    for name in ("live", "restarted"):
        p = os.path.join(work, f"verify-{name}.json")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                verifies[name] = json.load(f)

    def in_window(r):
        t0, t1 = r.get("t0", 0), r.get("t1", 0)
        return any(t0 <= w["ready_ms"] + grace and t1 >= w["signal_ms"] for w in windows)

    k6_start = int(env("SOAK_K6_START_MS", "0"))
    k6_end = int(env("SOAK_K6_END_MS", "0"))
    span_s = max(1, (k6_end - k6_start) / 1000)
    window_ms = sum(w["ready_ms"] + grace - w["signal_ms"] for w in windows)

    kinds = ["plain", "stream", "sess_json", "sess_stream"]
    stats = {k: {"n": 0, "ok": 0, "abort": 0, "in": Counter(), "out": Counter(), "lat": []} for k in kinds}
    for r in reqs:
        k = r.get("k")
        if k not in stats:
            continue
        s = stats[k]
        s["n"] += 1
        if r.get("ok"):
            s["ok"] += 1
            if not in_window(r):
                s["lat"].append(r["t1"] - r["t0"])
        elif r.get("ab") and r.get("st") == 0 and r.get("e") == 1050:
            s["abort"] += 1  # the intended client disconnect (k6 request timeout)
        else:
            (s["in"] if in_window(r) else s["out"])[status_label(r)] += 1

    L = []
    w = L.append
    dur = env("SOAK_DURATION")
    w(f"# ctxgate soak — {env('SOAK_DATE')}, {dur}")
    w("")
    w(
        f"Command: `DURATION={dur} RESTART_EVERY={env('SOAK_RESTART_EVERY')} bash loadtests/soak/run.sh`; "
        f"wall time {env('SOAK_WALL')} s (k6 ran {span_s:.0f} s)."
    )
    w("")
    w(
        f"- ctxgate: release build of {env('SOAK_GIT')} (binary built {env('SOAK_BIN_BUILT')}), embedded "
        f"(redb) session store in a temp dir, `shutdown_timeout = \"10s\"`; k6 {env('SOAK_K6_VERSION')}; "
        f"mock-upstream `{env('SOAK_MOCK')}`."
    )
    w(
        f"- Machine: {env('SOAK_NPROC')} cores ({env('SOAK_CPU')}), {env('SOAK_MEM')}, Linux {env('SOAK_KERNEL')}; "
        f"load average (1/5/15 min) {env('SOAK_LOAD_START')} at the start, {env('SOAK_LOAD_END')} at the end."
    )
    if rss:
        loads = [x["load"] for x in rss]
        w(f"  1-minute load average over the run (every RSS sample): median {statistics.median(loads):.2f}, max {max(loads):.2f}.")
    w(
        f"- Load: plain JSON {env('SOAK_PLAIN_RATE')}/s and streamed {env('SOAK_STREAM_RATE')}/s (open model), "
        f"{env('SOAK_SESSIONS')} session VUs (one turn at a time, {env('SOAK_THINK_MS')} ms apart, half streamed; "
        f"sessions alternate between `X-Session-Mode: append` and full history; a new session id every {env('SOAK_TURNS')} turns; "
        f"{env('SOAK_PAD_BYTES', '0')} bytes of filler in each session user message). "
        f"{float(env('SOAK_ABORT_FRAC', '0')) * 100:.0f} % of streamed requests (plain and session) are cut off by a "
        f"{env('SOAK_ABORT_MS')} ms k6 timeout (client disconnect mid-stream)."
    )
    w(
        f"- Restarts every {env('SOAK_RESTART_EVERY')}, SIGTERM and SIGKILL in turn; a request is *inside* a "
        f"restart window when it overlaps [signal, new process ready + {grace} ms]. Windows covered "
        f"{window_ms / 1000:.1f} s of the run ({100 * window_ms / 1000 / span_s:.1f} %). k6 exit code {env('SOAK_K6_RC')}."
    )
    w("")

    # Restarts
    w("## Restarts")
    w("")
    w("| # | Signal | Old process gone after (ms) | New process ready after signal (ms) | Old exit status |")
    w("|---|---|---|---|---|")
    for x in windows:
        w(
            f"| {x['n']} | SIG{x['signal']} | {x['exited_ms'] - x['signal_ms']} | {x['ready_ms'] - x['signal_ms']} | "
            f"{x['exit_status']} |"
        )
    w("")

    # RSS
    w("## Gateway RSS (VmRSS, MB), per restart interval")
    w("")
    has_store = any(x["store"] is not None for x in rss)
    w("| Interval (incarnation) | Samples | Start | p50 | Max | End | VmHWM at end |" + (" Store file at end |" if has_store else ""))
    w("|---|---|---|---|---|---|---|" + ("---|" if has_store else ""))
    by_inc = defaultdict(list)
    for x in rss:
        by_inc[x["inc"]].append(x)
    ends = []
    for inc in sorted(by_inc):
        xs = by_inc[inc]
        vals = [x["rss"] for x in xs]
        ends.append(vals[-1])
        label = f"{inc}" + (" (after k6, final checks)" if inc == max(by_inc) and len(by_inc) > 1 else "")
        w(
            f"| {label} | {len(xs)} | {mb(vals[0])} | {mb(pct(vals, 0.5))} | {mb(max(vals))} | {mb(vals[-1])} | "
            f"{mb(xs[-1]['hwm'])} |" + (f" {mb(xs[-1]['store'] or 0)} |" if has_store else "")
        )
    if rss:
        allv = [x["rss"] for x in rss]
        w(f"| **all** | {len(rss)} | {mb(allv[0])} | {mb(pct(allv, 0.5))} | **{mb(max(allv))}** | {mb(allv[-1])} | |" + (" |" if has_store else ""))
    w("")
    csv_kept = env("SOAK_RSS_CSV")
    w(
        f"Samples every {env('RSS_EVERY', '5')} s: "
        + (f"`{csv_kept}` (epoch s, pid, incarnation, VmRSS kB, VmHWM kB, load1" + (", store file kB" if has_store else "") + ")." if csv_kept else "in the work dir only (too large to keep).")
    )
    w("")

    # Requests
    w("## Requests")
    w("")
    w("| Kind | Requests | OK | Intended disconnects | Errors inside restart windows (by status) | Errors outside (by status) | OK latency outside windows p50 / p99 (ms) |")
    w("|---|---|---|---|---|---|---|")
    tot = {"n": 0, "ok": 0, "abort": 0, "in": Counter(), "out": Counter()}
    for k in kinds:
        s = stats[k]
        for key in ("n", "ok", "abort"):
            tot[key] += s[key]
        tot["in"] += s["in"]
        tot["out"] += s["out"]
        fmt = lambda c: ", ".join(f"{v}× {k2}" for k2, v in sorted(c.items())) or "0"
        lat = f"{pct(s['lat'], 0.5):.0f} / {pct(s['lat'], 0.99):.0f}" if s["lat"] else "–"
        w(f"| {k} | {s['n']} | {s['ok']} | {s['abort']} | {fmt(s['in'])} | {fmt(s['out'])} | {lat} |")
    fmt = lambda c: ", ".join(f"{v}× {k2}" for k2, v in sorted(c.items())) or "0"
    w(
        f"| **all** | **{tot['n']}** | {tot['ok']} | {tot['abort']} | **{sum(tot['in'].values())}**: {fmt(tot['in'])} | "
        f"**{sum(tot['out'].values())}**: {fmt(tot['out'])} | |"
    )
    w("")
    w(
        "OK = 200 and a `chat.completion`, or 200 and a stream ending in `data: [DONE]`. Intended disconnects = "
        "the streamed requests cut off by their short k6 timeout (k6 error 1050), not errors. k6 error codes: "
        "1050 request timeout, 1212 connection refused (nothing listening), 1220 connection reset by peer, "
        "1000 generic (e.g. the connection closed mid-response: EOF); "
        "\"200 but incomplete\" = a 200 whose stream ended without `[DONE]` or whose body was not a chat.completion."
    )
    w("")

    # Sessions
    w("## Session turns: lost and duplicated")
    w("")
    w("| Check | Sessions | Turns sent | Answered (acked) | **Lost** | **Duplicated** | Unanswered but saved | Unanswered, not saved | Sessions not found | Still in flight | User message without an answer |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"live": "live gateway, right after k6", "restarted": "after a final SIGTERM restart"}
    for name, v in verifies.items():
        w(
            f"| {names[name]} | {v['sessions']} | {v['turns_sent']} | {v['turns_acked']} | **{len(v['lost'])}** | "
            f"**{len(v['duplicated'])}** | {v['unacked_saved']} ({v['unacked_saved_aborted']} cut off on purpose, {v['unacked_saved_error']} failed) | {v['unacked_absent']} | {len(v['sessions_not_found'])} | "
            f"{len(v['sessions_in_flight'])} | {len(v['user_without_answer'])} |"
        )
    w("")
    for name, v in verifies.items():
        for mode, m in sorted(v["by_mode"].items()):
            w(
                f"- {names[name]}, {mode} sessions: {m['sessions']} sessions, {m['sent']} turns sent, {m['acked']} "
                f"answered, {m['lost']} lost, {m['duplicated']} duplicated, {m['unacked_saved']} unanswered but saved."
            )
        for key in ("lost", "duplicated"):
            if v[key]:
                w(f"- {names[name]}: first {key}: `{json.dumps(v[key][:5])}`")
        if v["unknown_markers"]:
            w(f"- {names[name]}: markers in transcripts that k6 never logged: {len(v['unknown_markers'])}")
    w("")
    w(
        "Lost = a turn k6 saw answered that is missing from `GET /v1/sessions/{id}/messages`; duplicated = a turn "
        "marker present more than once. A turn whose answer the client did not get (disconnect, restart) may or "
        "may not be saved (append sessions keep it; a full-history client does not resend it, and the transcript "
        "follows the client), so it counts as neither."
    )
    print("\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--base", required=True)
    v.add_argument("--auth", required=True)
    v.add_argument("--requests", required=True)
    v.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("work")
    a = ap.parse_args()
    if a.cmd == "verify":
        verify(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
