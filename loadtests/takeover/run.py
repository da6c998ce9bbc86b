#!/usr/bin/env python3
"""Crash-takeover benchmark (issue 14): SIGKILL the gateway serving a streamed session turn,
N times, and check that every interrupted turn completes exactly once.

Per kill, on the embedded store: a client starts a streamed session turn; after it has read
two events the gateway is SIGKILLed; a new gateway starts on the same store file, and a
follower (`GET /v1/sessions/{id}/stream`) waits for `[DONE]`. Timed: from the restart (the new
process spawned) to `[DONE]` at the follower.

On Redis: two gateways share one redis-server; the turn runs on A, A is SIGKILLed, a follower
on B waits for `[DONE]` (B takes the turn over once A's lease has lapsed). Timed: from the
kill to `[DONE]`. A is then restarted for the next kill.

Exactly once, per turn: the session's transcript is the user message and the whole answer,
once; and the upstream received the turn's request exactly twice (the original and one
re-issue). Lost: no answer in the transcript. Duplicated: the answer twice, or more than one
re-issue.

The upstream is a scripted stand-in in this process (stdlib HTTP server) that streams
`--chunks` content chunks `--chunk-delay` ms apart and counts requests per turn. Stdlib only.

    python3 loadtests/takeover/run.py                     # 100 kills on each store
    python3 loadtests/takeover/run.py --kills 5 --stores embedded   # smoke

Needs target/release/ctxgate (`cargo build --release -p ctxgate`) and, for Redis,
`redis-server` on PATH. Writes loadtests/results/YYYY-MM-DD-takeover.md and prints it.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUTH = "Bearer sk-takeover-bench"
# The gateways' log level (TAKEOVER_LOG=info to see each takeover in the kept logs).
LOG_LEVEL = os.environ.get("TAKEOVER_LOG", "warn")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the scripted upstream ---------------------------------------------------------------------


class Upstream:
    """Counts chat requests per turn marker (the last user message) and streams a fixed
    answer for it slowly, so a kill lands mid-stream."""

    def __init__(self, chunks, delay_ms):
        self.chunks, self.delay = chunks, delay_ms / 1000
        self.counts, self.lock = {}, threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                marker = body["messages"][-1]["content"]
                with upstream.lock:
                    upstream.counts[marker] = upstream.counts.get(marker, 0) + 1
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    for i, word in enumerate(upstream.answer(marker).split(" ")):
                        delta = {"content": (" " if i else "") + word}
                        if i == 0:
                            delta["role"] = "assistant"
                        self.event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                        time.sleep(upstream.delay)
                    self.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 5, "completion_tokens": upstream.chunks,
                                          "total_tokens": 5 + upstream.chunks}})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway serving it was killed

            def event(self, chunk):
                chunk.update({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                              "created": 0, "model": "bench-model"})
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, marker):
        return " ".join([f"answer-to-{marker}"] + [f"w{i}" for i in range(1, self.chunks)])

    def count(self, marker):
        with self.lock:
            return self.counts.get(marker, 0)


# --- gateways -----------------------------------------------------------------------------------


class Gateway:
    def __init__(self, binary, work, name, upstream_port, store, lease):
        self.binary, self.work, self.name = binary, work, name
        self.port = free_port()
        self.config = work / f"{name}.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[telemetry]\nlog_level = "{LOG_LEVEL}"\n'
            f'[sessions]\nstore = "{store}"\nlease = "{lease}"\n'
            f'[[upstreams]]\nname = "bench"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
            f'api_key_env = "TAKEOVER_BENCH_UPSTREAM_KEY"\n'
        )
        self.proc, self.starts = None, 0

    def start(self, wait=True):
        self.starts += 1
        log = open(self.work / f"{self.name}-{self.starts}.log", "wb")
        env = dict(os.environ, TAKEOVER_BENCH_UPSTREAM_KEY="sk-upstream", RUST_LOG=LOG_LEVEL)
        self.proc = subprocess.Popen([str(self.binary), "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited; see {self.work}/{self.name}-{self.starts}.log")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        sys.exit(f"{self.name} not ready after {timeout}s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def sse_data(line):
    return line[len(b"data: "):].strip() if line.startswith(b"data: ") else None


def start_turn(gateway, session, marker, events_before_kill):
    """Sends a streamed turn and returns once the client has read `events_before_kill` events
    (the connection is left open: the kill cuts it)."""
    c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user", "content": marker}]})
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json", "authorization": AUTH, "x-session-id": session})
    r = c.getresponse()
    if r.status != 200:
        sys.exit(f"turn {session}: status {r.status}: {r.read()[:300]!r}")
    seen = 0
    while seen < events_before_kill:
        line = r.fp.readline()
        if not line:
            sys.exit(f"turn {session}: stream ended before the kill")
        if sse_data(line) is not None:
            seen += 1
    return c


def follow_to_done(gateway, session, deadline_s=60):
    """Connects a follower as soon as the gateway accepts and reads until `[DONE]` or an
    error event; returns (outcome, monotonic time it ended)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=deadline_s)
            c.request("GET", f"/v1/sessions/{session}/stream", headers={"authorization": AUTH})
            r = c.getresponse()
        except OSError:
            time.sleep(0.005)  # not listening yet
            continue
        if r.status != 200:
            return f"status {r.status}", time.monotonic()
        while True:
            line = r.fp.readline()
            if not line:
                return "ended without [DONE]", time.monotonic()
            data = sse_data(line)
            if data == b"[DONE]":
                return "done", time.monotonic()
            if data and b'"error"' in data:
                return f"error event {data[:200]!r}", time.monotonic()
    return "no follower connection", time.monotonic()


def transcript(gateway, session):
    c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    c.request("GET", f"/v1/sessions/{session}/messages", headers={"authorization": AUTH})
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        return f"status {r.status}: {body[:300]!r}"
    return json.loads(body)["data"]


def judge(upstream, gateway, session, marker):
    """'exactly once', 'lost' or 'duplicated', with the evidence."""
    messages = transcript(gateway, session)
    if isinstance(messages, str):
        return "lost", f"transcript: {messages}"
    answer = upstream.answer(marker)
    answers = [m for m in messages if m.get("role") == "assistant"]
    sent = upstream.count(marker)
    if not answers:
        return "lost", f"transcript {messages!r}, upstream requests {sent}"
    if len(answers) > 1 or sent > 2:
        return "duplicated", f"{len(answers)} answers, upstream requests {sent}"
    if answers[0].get("content") != answer or sent != 2:
        return "wrong", f"answer {answers[0].get('content')!r}, upstream requests {sent}"
    return "exactly once", ""


# --- runs ---------------------------------------------------------------------------------------


def run_embedded(args, binary, work, upstream):
    store = f"embedded:{work / 'embedded.redb'}"
    g = Gateway(binary, work, "embedded", upstream.port, store, args.lease)
    g.start()
    results = []
    try:
        for i in range(args.kills):
            session, marker = f"e{i}", f"embedded-{i}"
            client = start_turn(g, session, marker, args.events_before_kill)
            g.kill()
            client.close()
            restarted = time.monotonic()
            g.start(wait=False)
            outcome, ended = follow_to_done(g, session)
            verdict, why = judge(upstream, g, session, marker)
            results.append((ended - restarted, outcome, verdict, why))
            progress("embedded", i, args.kills, results[-1])
    finally:
        g.stop()
    return results


def run_redis(args, binary, work, upstream):
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    store = f"redis://127.0.0.1:{redis_port}"
    a = Gateway(binary, work, "redis-a", upstream.port, store, args.lease)
    b = Gateway(binary, work, "redis-b", upstream.port, store, args.lease)
    results = []
    try:
        time.sleep(0.2)
        a.start()
        b.start()
        for i in range(args.kills):
            session, marker = f"r{i}", f"redis-{i}"
            client = start_turn(a, session, marker, args.events_before_kill)
            a.kill()
            killed = time.monotonic()
            client.close()
            outcome, ended = follow_to_done(b, session)
            verdict, why = judge(upstream, b, session, marker)
            results.append((ended - killed, outcome, verdict, why))
            progress("redis", i, args.kills, results[-1])
            a.start()
    finally:
        a.stop()
        b.stop()
        redis.terminate()
        redis.wait()
    return results


def progress(store, i, n, result):
    took, outcome, verdict, why = result
    if verdict != "exactly once" or outcome != "done" or took > 1 or (i + 1) % 10 == 0 or i + 1 == n:
        print(f"[{store} {i + 1}/{n}] {took * 1000:.0f} ms, {outcome}, {verdict} {why}", file=sys.stderr)


def summary(name, timed_from, results, target):
    times = sorted(t for t, *_ in results)
    verdicts = [v for _, _, v, _ in results]
    done = sum(1 for _, o, _, _ in results if o == "done")
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1000  # noqa: E731
    return (f"| {name} | {len(results)} | {verdicts.count('exactly once')} | {verdicts.count('lost')} | "
            f"{verdicts.count('duplicated')} | {verdicts.count('wrong')} | {done} | {timed_from} | "
            f"{q(0.5):.0f} / {q(0.95):.0f} / {times[-1] * 1000:.0f} | {target} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--stores", default="embedded,redis")
    p.add_argument("--lease", default="5s", help="sessions.lease (the default is 5s)")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--chunk-delay", type=int, default=50, help="ms between streamed chunks")
    p.add_argument("--events-before-kill", type=int, default=2)
    p.add_argument("--binary", default=str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
                                           / "release" / "ctxgate"))
    p.add_argument("--tag", default="")
    p.add_argument("--keep", action="store_true", help="keep the work directory (gateway logs)")
    args = p.parse_args()

    # The checkout the binary was presumably built from, read before the run.
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="ctxgate-takeover."))
    binary = work / "ctxgate"
    shutil.copy(args.binary, binary)  # a concurrent rebuild cannot swap it mid-run
    upstream = Upstream(args.chunks, args.chunk_delay)
    started = datetime.now(timezone.utc)
    rows = []
    stores = args.stores.split(",")
    if "embedded" in stores:
        res = run_embedded(args, binary, work, upstream)
        rows.append(summary("embedded", "restart", res, "≤ 1,000 ms"))
    if "redis" in stores:
        res = run_redis(args, binary, work, upstream)
        rows.append(summary(f"Redis, 2 replicas, lease {args.lease}", "kill", res, f"≤ lease + 1 s"))
    report = "\n".join([
        f"# Crash takeover: {args.kills} kills per store ({started:%Y-%m-%d %H:%M} UTC, {rev})",
        "",
        f"Each kill: a streamed session turn ({args.chunks} chunks {args.chunk_delay} ms apart) "
        f"is SIGKILLed after the client read {args.events_before_kill} events. "
        f"Command: `python3 loadtests/takeover/run.py --kills {args.kills} --stores {args.stores} "
        f"--lease {args.lease}`.",
        "",
        "| store | kills | exactly once | lost | duplicated | wrong answer | follower got [DONE] "
        "| timed from | to [DONE] p50 / p95 / max (ms) | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    results = ROOT / "loadtests" / "results"
    results.mkdir(exist_ok=True)
    name = f"{started:%Y-%m-%d}-takeover{'-' + args.tag if args.tag else ''}.md"
    (results / name).write_text(report)
    print(report)
    if args.keep:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
