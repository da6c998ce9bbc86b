#!/usr/bin/env python3
"""Fidelity benchmark (issue 13): what survives ctxgate's rules compression, against a naive
"drop the oldest whole turns" baseline, on stateless requests sized 1.1-4x the context window.

Started by run.sh (venv, tiktoken data, BFCL data, release build). Directly:
  .work/venv/bin/python run.py --binary /tmp/x/ctxgate [--window 16384] [--cases 40] [--seed 13]

Per request: a recording fake OpenAI upstream (http.server, in this process, on a free loopback
port) keeps the body ctxgate sent, keyed by the request's Authorization header (a distinct one per
case, so no two cases share ctxgate's stateless compression state). Method and definitions:
loadtests/README.md, section "Fidelity".
"""
import argparse
import datetime
import http.server as httpserver
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import tiktoken

import data

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
BFCL = os.path.join(REPO, "loadtests", "kv-cache", ".work", "bfcl")
MODEL = "gpt-4o-mini"  # tiktoken maps it to o200k, so ctxgate counts with o200k too
MARKER = re.compile(r"\[ctxgate:elided .*?; ctxgate_expand restores (?:it|each|them|the whole)\]", re.S)
# a message id, or a dropped run's: its first and last message ids joined by ".."
MARKER_IDS = re.compile(r"\[ctxgate:elided ((?:id=[0-9a-f]{10}(?:\.\.[0-9a-f]{10})? )+)")
REF = re.compile(r"(?:same output as call|superseded by the later \S+ call) ([^\s;]+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
MARKER_KINDS = ["duplicate", "superseded", "truncated", "blob", "tool_masked", "assistant_prose", "dropped_steps", "user"]
GOLD_FATES = ["truncated (gold cut from the middle)", "masked or referenced", "dropped with its step", "not named"]
RULES = ["whitespace", "ansi", "duplicate_tool_results", "superseded_reads", "truncate_tool_outputs", "elide_blobs",
         "mask_old_tool_results", "mask_assistant_messages", "drop_oldest", "elide_user_messages"]


# ----------------------------------------------------------------------------- fake upstream

class Recorder:
    """Request bodies by Authorization header. For a header registered in `expand` (the gold
    message's id), a first request whose messages carry a marker naming that id is answered with
    a call to ctxgate_expand for it, as a model would ask, so the gateway's own tool loop runs."""

    def __init__(self):
        self.bodies = {}
        self.expand = {}
        self.lock = threading.Lock()


def start_upstream(recorder):
    completion = json.dumps({
        "id": "chatcmpl-fidelity", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    def expand_call(gold_id):
        return json.dumps({
            "id": "chatcmpl-fidelity-expand", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_fid_expand", "type": "function",
                    "function": {"name": "ctxgate_expand", "arguments": json.dumps({"id": gold_id})}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    class Handler(httpserver.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            auth = self.headers.get("authorization", "")
            with recorder.lock:
                seen = recorder.bodies.setdefault(auth, [])
                seen.append(body)
                gold_id = recorder.expand.get(auth)
                first = len(seen) == 1
            answer = completion
            if gold_id and first and f"id={gold_id}".encode() in body:
                answer = expand_call(gold_id)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self):
            out = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ----------------------------------------------------------------------------- ctxgate

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=300):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def write_config(path, port, upstream_port, store, window):
    text = f"""# Written by loadtests/fidelity/run.py
[server]
listen = "127.0.0.1:{port}"

[sessions]
store = "embedded:{store}"

[[upstreams]]
name = "fake"
base_url = "http://127.0.0.1:{upstream_port}/v1"

[compression]
mode = "rules"
context_window = {window}
high_water = 0.8
low_water = 0.5
# everything else at its default: keep_recent_turns = 4, every rule on, mask_by_age off,
# max_tool_output_tokens = 2000, expand = true
"""
    with open(path, "w") as f:
        f.write(text)
    return text


def start_ctxgate(binary, config, log_path, port):
    log = open(log_path, "w")
    proc = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"ctxgate exited (rc {proc.returncode}); see {log_path}")
        try:
            if http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("ctxgate did not become healthy in 60 s")


def saved_by_rule(port):
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    out = {}
    for m in re.finditer(r'^ctxgate_compression_saved_tokens_total\{rule="([a-z_]+)"\} (\d+)', body.decode(), re.M):
        out[m.group(1)] = int(m.group(2))
    return out


# ----------------------------------------------------------------------------- JSON, raw

_WS = re.compile(r"\s*")
_DEC = json.JSONDecoder()


def raw_members(text):
    """Top-level object members as raw text slices."""
    i = _WS.match(text, 0).end()
    assert text[i] == "{"
    i += 1
    out = {}
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "}":
            return out
        key, i = _DEC.raw_decode(text, i)
        i = _WS.match(text, i).end()
        assert text[i] == ":"
        i = _WS.match(text, i + 1).end()
        _, j = _DEC.raw_decode(text, i)
        out[key] = text[i:j]
        i = _WS.match(text, j).end()
        if text[i] == ",":
            i += 1


def raw_elements(text):
    """A JSON array's elements as raw text slices."""
    i = _WS.match(text, 0).end()
    assert text[i] == "["
    i += 1
    out = []
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "]":
            return out
        _, j = _DEC.raw_decode(text, i)
        out.append(text[i:j])
        i = _WS.match(text, j).end()
        if text[i] == ",":
            i += 1


def norm(text):
    return " ".join(ANSI.sub("", text).split())


# ----------------------------------------------------------------------------- one case

def baseline(turn_tokens, fixed, budget):
    """Naive: drop the oldest whole turns until the request fits `budget`. Returns the index of
    the first kept turn and the tokens sent."""
    total = fixed + sum(turn_tokens)
    k = 0
    while total > budget and k < len(turn_tokens):
        total -= turn_tokens[k]
        k += 1
    return k, total


def run_case(case, counter, port, recorder, window, run_id):
    low = int(window * 0.5)
    tools_raw = data.dumps(case.tools)
    raws = [data.dumps(m) for m in case.messages]
    body = ('{"model": "' + MODEL + '", "messages": [' + ", ".join(raws) + '], "tools": ' + tools_raw
            + ', "stream": false}')
    auth = f"Bearer fid-{run_id}-{case.dataset}-{case.factor}-{case.index}"
    ids = {data.message_id(r): i for i, r in enumerate(raws)}
    tokens = [counter.message(m, key=r) for m, r in zip(case.messages, raws)]
    tools_tokens = counter.tools(tools_raw)
    ours_before = tools_tokens + sum(tokens)
    gold_raw = raws[case.gold_index]
    gold_id = data.message_id(gold_raw)

    before_rules = saved_by_rule(port)
    t0 = time.perf_counter()
    status, headers, resp = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                 {"content-type": "application/json", "authorization": auth})
    latency = time.perf_counter() - t0
    rules = {k: v - before_rules.get(k, 0) for k, v in saved_by_rule(port).items() if v - before_rules.get(k, 0)}
    r = {"dataset": case.dataset, "factor": case.factor, "index": case.index, "status": status,
         "messages": len(case.messages), "gold_index": case.gold_index, "gold": case.gold,
         "gold_role": case.messages[case.gold_index]["role"], "gold_tokens": tokens[case.gold_index],
         "latency_ms": round(latency * 1000, 2), "rules_saved": rules, **case.extra}
    if status != 200:
        r["error"] = resp.decode(errors="replace")[:500]
        return r
    before = int(headers.get("x-ctxgate-tokens-before", -1))
    after = int(headers.get("x-ctxgate-tokens-after", -1))
    r.update(tokens_before=before, tokens_after=after, ours_before=ours_before,
             compression=headers.get("x-ctxgate-compression"), after_ratio=after / window)

    with recorder.lock:
        bodies = recorder.bodies.pop(auth, [])
    sent = bodies[0].decode()
    up_members = raw_members(sent)
    up_raw = raw_elements(up_members["messages"])
    up = [json.loads(x) for x in up_raw]
    up_tools = json.loads(up_members.get("tools", "[]"))
    r["expand_tool_offered"] = any(t.get("function", {}).get("name") == "ctxgate_expand" for t in up_tools)
    up_texts = [data.message_text(m) for m in up]
    marker_ids = []
    for t in up_texts:
        for m in MARKER_IDS.finditer(t):
            marker_ids.extend(x[3:] for x in m.group(1).split())
    # a run id covers every message from its first id to its last, in the request as sent
    covered = {}
    for mid in marker_ids:
        if ".." in mid:
            first, last = mid.split("..")
            if first in ids and last in ids:
                for raw in raws[ids[first]:ids[last] + 1]:
                    covered.setdefault(data.message_id(raw), mid)
    stripped = [MARKER.sub("", t) for t in up_texts]
    r["markers"] = sum(len(MARKER.findall(t)) for t in up_texts)
    marker_tokens = [counter.text(mk) for t in up_texts for mk in MARKER.findall(t)]
    r["marker_tokens"] = sum(marker_tokens)
    r["marker_tokens_max"] = max(marker_tokens, default=0)
    # our count of what went upstream (the client's tools, not ctxgate_expand), against the header
    client_tools = [t for t in up_tools if t.get("function", {}).get("name") != "ctxgate_expand"]
    r["ours_after_msgs"] = sum(counter.message(m, key=x) for m, x in zip(up, up_raw))
    r["ours_after"] = r["ours_after_msgs"] + tools_tokens
    r["client_tools_forwarded"] = len(client_tools) == len(case.tools)

    # verbatim: every gold string in the text of some upstream message, markers taken out
    r["verbatim"] = all(any(g in t for t in stripped) for g in case.gold)
    r["gold_only_in_marker"] = not r["verbatim"] and all(any(g in t for t in up_texts) for g in case.gold)
    r["gold_whole"] = gold_raw in up_raw
    r["gold_named"] = gold_id in marker_ids or gold_id in covered
    gold_ref = gold_id if gold_id in marker_ids else covered.get(gold_id, gold_id)
    r["gold_in_run"] = gold_ref != gold_id

    # every marker id: the originals endpoint, byte for byte
    resolved = {}
    for mid in dict.fromkeys(marker_ids):
        st, _, got = http("GET", f"http://127.0.0.1:{port}/v1/ctxgate/originals/{mid}",
                          headers={"authorization": auth})
        if ".." in mid:
            first, last = mid.split("..")
            if first not in ids or last not in ids:
                resolved[mid] = "unknown-id"
            elif st != 200:
                resolved[mid] = f"http-{st}"
            else:
                got_msgs = raw_elements(raw_members(got.decode())["messages"])
                want_msgs = raws[ids[first]:ids[last] + 1]
                if got_msgs == want_msgs:
                    resolved[mid] = "exact"
                elif [json.loads(x) for x in got_msgs] == [json.loads(x) for x in want_msgs]:
                    resolved[mid] = "json-equal"
                else:
                    resolved[mid] = "different"
        elif mid not in ids:
            resolved[mid] = "unknown-id"
        elif st != 200:
            resolved[mid] = f"http-{st}"
        else:
            msg = raw_members(got.decode())["message"]
            want = raws[ids[mid]]
            if msg == want:
                resolved[mid] = "exact"
            elif json.loads(msg) == json.loads(want):
                resolved[mid] = "json-equal"
            else:
                resolved[mid] = "different"
    r["marker_ids"] = len(resolved)
    r["marker_resolution"] = {k: sum(1 for v in resolved.values() if v == k) for k in set(resolved.values())}
    r["gold_resolution"] = resolved.get(gold_ref)
    r["recoverable"] = r["gold_named"] and resolved.get(gold_ref) == "exact"
    r["recoverable_json"] = r["gold_named"] and resolved.get(gold_ref) in ("exact", "json-equal")
    r["retained"] = r["verbatim"] or r["recoverable"]

    # The gateway's tool loop, in a second request (its own Authorization, so its own stored
    # state): the fake model calls ctxgate_expand with the gold message's id when a marker names it.
    r["expand_asked"] = False
    if r["gold_named"]:
        auth2 = auth + "-expand"
        with recorder.lock:
            recorder.expand[auth2] = gold_ref
        st2, h2, resp2 = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                              {"content-type": "application/json", "authorization": auth2})
        with recorder.lock:
            bodies2 = recorder.bodies.pop(auth2, [])
            recorder.expand.pop(auth2, None)
        r["expand_status"] = st2
        r["expand_asked"] = len(bodies2) > 1
        r["expand_headers_present"] = "x-ctxgate-tokens-after" in h2
    if r["expand_asked"]:
        second = json.loads(bodies2[1])
        answer = next((m.get("content") for m in second["messages"]
                       if m.get("role") == "tool" and m.get("tool_call_id") == "call_fid_expand"), None)
        original_text = data.message_text(case.messages[case.gold_index])
        r["expand_answered"] = answer is not None
        r["expand_has_gold"] = answer is not None and all(g in answer for g in case.gold)
        # a run's answer holds each message's text under its id line
        r["expand_whole"] = answer is not None and (
            original_text in answer if r["gold_in_run"] else answer.split("\n", 1)[-1] == original_text)
        r["expand_capped"] = answer is not None and "more bytes; ask again with a query" in answer
        client = json.loads(resp2)
        r["expand_hidden_from_client"] = not client["choices"][0]["message"].get("tool_calls")
    r["upstream_calls"] = len(bodies)
    r["headers_present"] = "x-ctxgate-tokens-after" in headers

    # what the markers stand for, and references that must point at a whole copy
    kinds = {}
    whole_calls = {m.get("tool_call_id") for m, t in zip(up, up_texts) if m.get("role") == "tool" and "[ctxgate:elided " not in t}
    broken = 0
    for m, t in zip(up, up_texts):
        for mk in MARKER.findall(t):
            if "from the middle of this output" in mk:
                k = "truncated"
            elif "-byte encoded blob" in mk:
                k = "blob"
            elif "same output as call" in mk:
                k = "duplicate"
            elif "superseded by the later" in mk:
                k = "superseded"
            elif "model steps calling" in mk or re.search(r"\d+ assistant messages;", mk):
                k = "dropped_steps"
            elif m.get("role") == "user":
                k = "user"
            elif m.get("role") == "assistant":
                k = "assistant_prose"
            else:
                k = "tool_masked"
            kinds[k] = kinds.get(k, 0) + 1
            if f"id={gold_ref}" in mk:
                r["gold_marker_kind"] = k
            ref = REF.search(mk)
            if ref and ref.group(1) not in whole_calls:
                broken += 1
    r["marker_kinds"] = kinds
    r["broken_references"] = broken

    # originals lost without a marker: neither present (modulo whitespace/ANSI) nor named by a marker
    by_call = {}
    for m, t in zip(up, up_texts):
        if m.get("role") == "tool" and "[ctxgate:elided " not in t:
            by_call.setdefault(m.get("tool_call_id"), []).append(norm(t))
    up_plain = {norm(t) for m, t in zip(up, up_texts) if "[ctxgate:elided " not in t}
    lost = {"tool": 0, "user": 0, "assistant": 0}
    named = set(marker_ids) | set(covered)
    for i, (m, raw) in enumerate(zip(case.messages, raws)):
        role = m["role"]
        if role not in lost or data.message_id(raw) in named:
            continue
        t = norm(data.message_text(m))
        if role == "tool":
            ok = t in by_call.get(m["tool_call_id"], [])
        else:
            ok = raw in up_raw or (t in up_plain if t else any(x == raw for x in up_raw))
            if not ok and m.get("tool_calls"):
                # an assistant step kept with its calls (prose masked leaves a marker, so named)
                ok = any(u.get("tool_calls") == m["tool_calls"] for u in up)
        if not ok:
            lost[role] += 1
    r["lost_without_marker"] = lost
    r["tool_results"] = sum(1 for m in case.messages if m["role"] == "tool")

    # the naive baseline, counted as ctxgate counts
    turns = data.turns_of(case.messages[1:-1])
    starts, at = [], 1
    for t in turns:
        starts.append(at)
        at += len(t)
    tt = [sum(tokens[s:s + len(t)]) for s, t in zip(starts, turns)]
    fixed = tools_tokens + tokens[0] + tokens[-1]
    for name, budget in (("same", after), ("low", low)):
        k, total = baseline(tt, fixed, budget)
        first = starts[k] if k < len(starts) else len(case.messages) - 1
        r[f"naive_{name}_tokens"] = total
        r[f"naive_{name}_fits"] = total <= budget
        r[f"naive_{name}_verbatim"] = case.gold_index >= first
    # what ctxgate can never cut: tools, system, the last turn (the question)
    r["floor_tokens"] = fixed
    r["budget_allows"] = fixed <= low
    if case.dataset == "bfcl-mem":
        r["user_fits_quarter"] = case.extra["user_tokens"] <= low / 4
    return r


# ----------------------------------------------------------------------------- report

def gold_fate(r):
    """What happened to a gold message that is not verbatim, from the markers naming it."""
    if not r["gold_named"]:
        return "not named"
    k = r.get("gold_marker_kind")
    if k == "truncated":
        return "truncated (gold cut from the middle)"
    if k == "dropped_steps":
        return "dropped with its step"
    return "masked or referenced"


def pct(n, d):
    return "–" if d == 0 else f"{100 * n / d:.0f}%"


def q(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))] if v else float("nan")


def summarize(results, window):
    out = {}
    for ds in sorted({r["dataset"] for r in results}):
        for f in sorted({r["factor"] for r in results if r["dataset"] == ds}):
            rs = [r for r in results if r["dataset"] == ds and r["factor"] == f and r["status"] == 200]
            if not rs:
                continue
            n = len(rs)
            # The band is where an epoch lands; a request the lossless passes alone bring under
            # the high-water mark has no epoch and goes as it is.
            allow = [r for r in rs if r["budget_allows"] and r["compression"] != "none"]
            ratios = [r["after_ratio"] for r in rs]
            not_verb = [r for r in rs if not r["verbatim"]]
            s = {
                "cases": n, "errors": sum(1 for r in results if r["dataset"] == ds and r["factor"] == f and r["status"] != 200),
                "before_mean": statistics.mean(r["tokens_before"] for r in rs),
                "before_ratio_min": min(r["tokens_before"] for r in rs) / window,
                "before_ratio_max": max(r["tokens_before"] for r in rs) / window,
                "after_mean": statistics.mean(r["tokens_after"] for r in rs),
                "after_ratio_p50": q(ratios, 0.5), "after_ratio_min": min(ratios), "after_ratio_max": max(ratios),
                "budget_allows": len(allow),
                "no_epoch": sum(1 for r in rs if r["compression"] == "none"),
                "in_band": sum(1 for r in allow if 0.45 <= r["after_ratio"] <= 0.55),
                "below_band": sum(1 for r in allow if r["after_ratio"] < 0.45),
                "above_band": sum(1 for r in allow if r["after_ratio"] > 0.55),
                "verbatim": sum(r["verbatim"] for r in rs),
                "not_verbatim": len(not_verb),
                "named_when_not_verbatim": sum(r["gold_named"] for r in not_verb),
                "recoverable_when_not_verbatim": sum(r["recoverable"] for r in not_verb),
                "recoverable_json_when_not_verbatim": sum(r["recoverable_json"] for r in not_verb),
                "retained": sum(r["retained"] for r in rs),
                "retained_json": sum(r["verbatim"] or r["recoverable_json"] for r in rs),
                "gold_only_in_marker": sum(r["gold_only_in_marker"] for r in rs),
                "naive_same": sum(r["naive_same_verbatim"] for r in rs),
                "naive_low": sum(r["naive_low_verbatim"] for r in rs),
                "naive_low_fits": sum(r["naive_low_fits"] for r in rs),
                "tool_results": sum(r["tool_results"] for r in rs),
                "tool_lost": sum(r["lost_without_marker"]["tool"] for r in rs),
                "user_lost": sum(r["lost_without_marker"]["user"] for r in rs),
                "assistant_lost": sum(r["lost_without_marker"]["assistant"] for r in rs),
                "marker_ids": sum(r["marker_ids"] for r in rs),
                "marker_exact": sum(r["marker_resolution"].get("exact", 0) for r in rs),
                "marker_json_equal": sum(r["marker_resolution"].get("json-equal", 0) for r in rs),
                "marker_other": sum(v for r in rs for k, v in r["marker_resolution"].items() if k not in ("exact", "json-equal")),
                "header_matches_ours": sum(r["tokens_before"] == r["ours_before"] for r in rs),
                "after_matches_ours": sum(r["tokens_after"] == r["ours_after"] for r in rs),
                "expand_offered": sum(r["expand_tool_offered"] for r in rs),
                "with_markers": sum(r["markers"] > 0 for r in rs),
                "latency_p50_ms": q([r["latency_ms"] for r in rs], 0.5),
                "latency_max_ms": max(r["latency_ms"] for r in rs),
                "expand_asked": sum(r["expand_asked"] for r in rs),
                "expand_has_gold": sum(r.get("expand_has_gold", False) for r in rs),
                "expand_whole": sum(r.get("expand_whole", False) for r in rs),
                "expand_capped": sum(r.get("expand_capped", False) for r in rs),
                "expand_hidden": sum(r.get("expand_hidden_from_client", False) for r in rs),
                "expand_headers": sum(r.get("expand_headers_present", False) for r in rs if r["expand_asked"]),
                "broken_references": sum(r["broken_references"] for r in rs),
                "marker_tokens_mean": statistics.mean(r["marker_tokens"] for r in rs),
                "marker_tokens_max": max(r["marker_tokens_max"] for r in rs),
                "marker_kinds": {k: sum(r["marker_kinds"].get(k, 0) for r in rs) for k in MARKER_KINDS},
                "gold_fate": {k: sum(1 for r in not_verb if gold_fate(r) == k) for k in GOLD_FATES},
                "rules_saved": {k: sum(r["rules_saved"].get(k, 0) for r in rs) for k in RULES},
                "rules_cases": {k: sum(1 for r in rs if r["rules_saved"].get(k)) for k in RULES},
            }
            if ds == "bfcl-mem":
                fit = [r for r in rs if r["user_fits_quarter"]]
                s["user_fit_cases"] = len(fit)
                s["user_fit_verbatim"] = sum(r["verbatim"] for r in fit)
                s["user_fit_naive_same"] = sum(r["naive_same_verbatim"] for r in fit)
                s["elide_user_cases"] = sum(1 for r in rs if r["rules_saved"].get("elide_user_messages"))
            out[(ds, f)] = s
    return out


def ratio_text(a, b):
    if b == 0:
        return "∞" if a else "–"
    return f"{a / b:.2f}×"


def report(summary, meta, window):
    low = int(window * 0.5)
    L = []
    L.append(f"# Fidelity benchmark — {meta['date']}")
    L.append("")
    source = meta["source"] or f"`{meta['commit']}`{' (uncommitted changes under src/ at the end of the run)' if meta['dirty'] else ''}"
    L.append(f"ctxgate built from {source}, release binary "
             f"sha256 `{meta['binary_sha256'][:16]}…`, `[compression] mode = \"rules\"`, `context_window = {window}` "
             f"(high-water {int(window * 0.8)}, low-water {low} tokens), every other compression setting at its default. "
             f"Seed {meta['seed']}, {meta['cases']} cases per size and data set, sizes within ±{meta['tolerance'] * 100:.0f}% "
             f"of the target. Wall time {meta['wall_s']:.0f} s. Command: `{meta['command']}`.")
    L.append("")
    L.append(f"Machine: {meta['machine']}. Load average at start {meta['load_start']}, at end {meta['load_end']}. "
             f"Busy processes at start: {meta['busy_start'] or 'none over 5% CPU'}; at end: {meta['busy_end'] or 'none over 5% CPU'}.")
    L.append("")
    L.append("Definitions (method and data in loadtests/README.md, section \"Fidelity\"): **verbatim**: every gold string is in "
             "the text of a message of the request ctxgate sent upstream, markers' own text taken out. **naive**: the client "
             "drops its oldest whole turns (a user message, or an assistant message with its tool results; never the system "
             "prompt or the question) until the request fits ctxgate's `x-ctxgate-tokens-after` (same tokens) or the "
             "low-water mark, counted as ctxgate counts. **recoverable**: a marker in the upstream request names the gold "
             "message's id and `GET /v1/ctxgate/originals/{id}` returns that message byte for byte as sent. **lost without a "
             "marker**: an original tool result neither in the upstream request (modulo whitespace and ANSI) nor named by a "
             "marker. **budget allows**: tools + system prompt + question ≤ the low-water mark. **no epoch**: the "
             "lossless passes alone (whitespace, ANSI) brought the request under the high-water mark, so nothing was "
             "compacted (`x-ctxgate-compression: none`); the band counts only compacted requests.")
    L.append("")
    L.append("## Per size")
    L.append("")
    L.append("| data set | size | cases | tokens before (mean) | after (mean) | after / window: p50 [min–max] | in 0.45–0.55 (budget allows; no epoch) "
             "| **verbatim** | naive, same tokens | naive, low-water | ctxgate ÷ naive (same) | not verbatim: marker named / original byte-exact "
             "| **verbatim or recoverable** | same, counting a JSON-equal original as recovered | tool results lost without a marker |")
    L.append("|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for (ds, f), s in summary.items():
        n = s["cases"]
        L.append(
            f"| {ds} | {f}× | {n}{' (+' + str(s['errors']) + ' errors)' if s['errors'] else ''} | {s['before_mean']:.0f} "
            f"| {s['after_mean']:.0f} | {s['after_ratio_p50']:.3f} [{s['after_ratio_min']:.3f}–{s['after_ratio_max']:.3f}] "
            f"| {s['in_band']}/{s['budget_allows']}"
            f"{' (' + str(s['below_band']) + ' below, ' + str(s['above_band']) + ' above)' if s['in_band'] < s['budget_allows'] else ''}"
            f"{'; ' + str(s['no_epoch']) + ' no epoch' if s['no_epoch'] else ''} "
            f"| **{pct(s['verbatim'], n)}** ({s['verbatim']}) | {pct(s['naive_same'], n)} ({s['naive_same']}) "
            f"| {pct(s['naive_low'], n)} ({s['naive_low']}) | {ratio_text(s['verbatim'], s['naive_same'])} "
            f"| {s['named_when_not_verbatim']}/{s['not_verbatim']} / {s['recoverable_when_not_verbatim']}/{s['not_verbatim']} "
            f"| **{pct(s['retained'], n)}** | {pct(s['retained_json'], n)} | {s['tool_lost']} of {s['tool_results']} |")
    L.append("")
    mem = [(f, s) for (ds, f), s in summary.items() if ds == "bfcl-mem"]
    if mem:
        L.append(f"### User-stated facts (bfcl-mem), by whether the case's user messages fit a quarter of the budget "
                 f"(≤ {low // 4} tokens = low-water / 4)")
        L.append("")
        L.append("| size | cases that fit | verbatim (ctxgate) | naive, same tokens | cases that do not fit | verbatim | epochs that elided user messages |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for f, s in mem:
            nf = s["cases"] - s["user_fit_cases"]
            L.append(f"| {f}× | {s['user_fit_cases']} | {pct(s['user_fit_verbatim'], s['user_fit_cases'])} ({s['user_fit_verbatim']}) "
                     f"| {pct(s['user_fit_naive_same'], s['user_fit_cases'])} "
                     f"| {nf} | {pct(s['verbatim'] - s['user_fit_verbatim'], nf)} | {s['elide_user_cases']} |")
        L.append("")
    L.append("## Checks")
    L.append("")
    L.append("| data set | size | header tokens-before = our count | tokens-after = our count of the upstream request | requests with markers / offering ctxgate_expand "
             "| marker ids: byte-exact / JSON-equal only / other | gold only inside a marker's description | naive at low-water fits | ctxgate latency p50 / max (ms) |")
    L.append("|---|---|---:|---:|---|---|---:|---:|---|")
    for (ds, f), s in summary.items():
        n = s["cases"]
        L.append(f"| {ds} | {f}× | {s['header_matches_ours']}/{n} | {s['after_matches_ours']}/{n} | {s['with_markers']} / {s['expand_offered']} "
                 f"| {s['marker_exact']} / {s['marker_json_equal']} / {s['marker_other']} (of {s['marker_ids']}) "
                 f"| {s['gold_only_in_marker']} | {s['naive_low_fits']}/{n} | {s['latency_p50_ms']:.0f} / {s['latency_max_ms']:.0f} |")
    L.append("")
    L.append("## Markers, references, ctxgate_expand")
    L.append("")
    L.append("Markers in the upstream requests by kind; references (a duplicate's or superseded read's marker) whose target "
             "call is not whole in the request; what became of gold messages that are not verbatim; and the gateway's "
             "tool loop, where the fake model called `ctxgate_expand` with the gold message's id whenever a marker named it.")
    L.append("")
    L.append("| data set | size | " + " | ".join(MARKER_KINDS) + " | marker tokens per request (mean) | largest marker (tokens) | broken references | gold not verbatim: "
             + " / ".join(GOLD_FATES) + " | expand called | answer holds the gold | answer = whole original text | answer capped at expand_max_bytes | call hidden from client | x-ctxgate-tokens-* headers on that response |")
    L.append("|---|---|" + "---:|" * len(MARKER_KINDS) + "---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for (ds, f), s in summary.items():
        L.append(f"| {ds} | {f}× | " + " | ".join(str(s["marker_kinds"][k]) for k in MARKER_KINDS)
                 + f" | {s['marker_tokens_mean']:.0f} | {s['marker_tokens_max']} | {s['broken_references']} | " + " / ".join(str(s["gold_fate"][k]) for k in GOLD_FATES)
                 + f" | {s['expand_asked']} | {s['expand_has_gold']} | {s['expand_whole']} | {s['expand_capped']} | {s['expand_hidden']} | {s['expand_headers']} |")
    L.append("")
    L.append("## Tokens saved per rule (sum over the cases; in how many cases the rule saved anything)")
    L.append("")
    L.append("| data set | size | " + " | ".join(RULES) + " |")
    L.append("|---|---|" + "---:|" * len(RULES))
    for (ds, f), s in summary.items():
        L.append(f"| {ds} | {f}× | " + " | ".join(
            f"{s['rules_saved'][k]} ({s['rules_cases'][k]})" if s["rules_saved"][k] else "–" for k in RULES) + " |")
    L.append("")
    return "\n".join(L)


def busy_processes(interval=1.0):
    """Processes using >= 5% of a core over `interval` seconds (from /proc/PID/stat)."""
    def sample():
        out = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        s = f.read()
                except OSError:
                    continue
                name = s[s.index("(") + 1:s.rindex(")")]
                fields = s[s.rindex(")") + 2:].split()
                out[pid] = (name, int(fields[11]) + int(fields[12]))
        return out
    a = sample()
    time.sleep(interval)
    b = sample()
    hz = os.sysconf("SC_CLK_TCK")
    busy = sorted(((b[p][1] - a[p][1]) / hz / interval * 100, b[p][0]) for p in b if p in a)
    return ", ".join(f"{name} {cpu:.0f}%" for cpu, name in reversed(busy) if cpu >= 5)


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--window", type=int, default=16384)
    ap.add_argument("--sizes", default="1.1,1.5,2,3,4")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--sets", default="bfcl-lc,gen,bfcl-mem")
    ap.add_argument("--out", default=os.path.join(REPO, "loadtests", "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--command", default="")
    ap.add_argument("--source", default="", help="what the binary was built from (run.sh says)")
    args = ap.parse_args()
    t_start = time.time()
    load_start, busy_start = load(), busy_processes()

    counter = data.Counter(tiktoken.get_encoding("o200k_base"))
    sizes = [float(x) for x in args.sizes.split(",")]
    sets = args.sets.split(",")
    streams = data.bfcl_streams(os.path.join(BFCL, "long_context.jsonl"), args.seed)
    mem_q, mem_skipped, mem_total = data.memory_questions(os.path.join(BFCL, "memory"))
    cases = []
    for f in sizes:
        if "bfcl-lc" in sets:
            cases += data.bfcl_lc_cases(streams, counter, f, args.window, args.cases, args.tolerance, args.seed)
        if "gen" in sets:
            cases += data.gen_cases(counter, f, args.window, args.cases, args.tolerance, args.seed)
        if "bfcl-mem" in sets:
            cases += data.memory_cases(mem_q, streams, counter, f, args.window, args.cases, args.tolerance, args.seed)
    print(f"[fidelity] {len(cases)} cases built in {time.time() - t_start:.1f} s", file=sys.stderr)

    work = tempfile.mkdtemp(prefix="ctxgate-fidelity-")
    recorder = Recorder()
    upstream = start_upstream(recorder)
    port = free_port()
    cfg = os.path.join(work, "ctxgate.toml")
    write_config(cfg, port, upstream.server_address[1], os.path.join(work, "store.redb"), args.window)
    chk = subprocess.run([args.binary, "check-config", cfg], capture_output=True, text=True)
    if chk.returncode != 0:
        sys.exit(f"check-config failed:\n{chk.stdout}{chk.stderr}")
    proc = start_ctxgate(args.binary, cfg, os.path.join(work, "ctxgate.log"), port)
    run_id = os.urandom(4).hex()
    results = []
    try:
        for i, case in enumerate(cases):
            results.append(run_case(case, counter, port, recorder, args.window, run_id))
            if (i + 1) % 50 == 0:
                print(f"[fidelity] {i + 1}/{len(cases)}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        upstream.shutdown()
        with open(os.path.join(work, "ctxgate.log"), errors="replace") as f:
            log_lines = f.read().splitlines()
        if not args.keep_work:
            subprocess.run(["rm", "-rf", work])

    summary = summarize(results, args.window)
    sha = subprocess.run(["sha256sum", args.binary], capture_output=True, text=True).stdout.split()[0]
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                                capture_output=True, text=True).stdout.strip())
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem_gib = int(open("/proc/meminfo").readline().split()[1]) / 1024 / 1024
    date = datetime.date.today().isoformat()
    meta = {"date": date, "commit": commit, "dirty": dirty, "source": args.source, "binary_sha256": sha, "seed": args.seed, "cases": args.cases,
            "tolerance": args.tolerance, "window": args.window, "sizes": sizes, "sets": sets,
            "wall_s": time.time() - t_start, "command": args.command or " ".join(sys.argv),
            "machine": f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}",
            "load_start": load_start, "load_end": load(), "busy_start": busy_start, "busy_end": busy_processes(),
            "ctxgate_log_lines": len(log_lines), "ctxgate_log_tail": log_lines[-20:],
            "memory_questions": {"total": mem_total, "usable": len(mem_q), "skipped": mem_skipped},
            "streams": [{"conversations": len(s["ids"]), "tools_tokens": counter.tools(data.dumps(s["tools"])),
                         "tokens": sum(counter.message(m) for _, t in s["turns"] for m in t)} for s in streams]}
    text = report(summary, meta, args.window)
    os.makedirs(args.out, exist_ok=True)
    stem = f"{date}-fidelity{'-' + args.tag if args.tag else ''}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "summary": {f"{k[0]}@{k[1]}": v for k, v in summary.items()}, "cases": results}, f, indent=1)
    print(f"[fidelity] wrote {os.path.join(args.out, stem)}.md and .json" + (f"; work dir {work}" if args.keep_work else ""),
          file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
