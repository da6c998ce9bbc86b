#!/usr/bin/env python3
"""Prefix reuse without a model: the generated agent session of run.py through ctxgate to a mock upstream
that records each request, scored as a one-slot KV cache (llama-server with one slot and no prompt cache in
RAM) scores it: each request reuses the longest token prefix it shares with the one before.

It measures what the real run measures of the layout alone (prefix-reuse efficiency, epochs, Σ prompt
tokens, the largest request), in minutes and with nothing else on the CPU; the real run adds the model's
own tokenizer, its chat template and the wall time. Tokens are o200k's over the rendered prompt (each
message's role and content, tool calls' names and arguments, in order), not a model's.

Usage (from the repo root, after `cargo build --release` and `bash loadtests/fidelity/run.sh` once, whose
venv has tiktoken):
  loadtests/fidelity/.work/venv/bin/python loadtests/kv-cache/prefix_sim.py [--session gen:3:12000]
      [--context-window 8192] [--keep-recent-turns 2] [--low-water 0.5] [--high-water 0.8]
      [--modes rules,sliding] [--bin target/release/ctxgate]
`--session chain:SEED:TURNS` replays responses_chain.py's chain instead (log excerpts, no tools).
"""
import argparse, http.server, json, os, socket, sys, tempfile, threading, types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (the session generator, the sliding window and ctxgate's config)

CACHE = os.path.join(HERE, "..", "fidelity", ".work", "tiktoken-cache")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mock(http.server.BaseHTTPRequestHandler):
    """A chat upstream that records every request body and answers a short completion."""
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Mock.seen.append(body)
        answer = json.dumps({
            "id": "chatcmpl-sim", "object": "chat.completion", "created": 1, "model": body.get("model", "m"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_):
        pass


def chain_session(seed, turns):
    """responses_chain.py's chain as a chat: `turns` log excerpts (~370 tokens each) with a one-line
    answer after each, the same growth per turn; a request after every excerpt. No tools."""
    import random
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are an on-call assistant. Answer in one short sentence."}]
    points = []
    for t in range(turns):
        messages.append({"role": "user", "content": run.log_excerpt(rng, t)})
        points.append(len(messages))
        service = rng.choice(run.LOG_SERVICES)
        messages.append({"role": "assistant", "content": f"{service} looks slowest, at {rng.randrange(100, 900)}ms."})
    return [], messages, points


def render(messages, tools, enc):
    """A prompt's tokens as a chat template lays them out: the tools first (in the system prompt, as
    llama-server's templates put them), then each message's role, text and calls, in order."""
    tokens = enc.encode(json.dumps(tools), disallowed_special=()) if tools else []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content)
        text = f"<|{m['role']}|>{content or ''}"
        for call in m.get("tool_calls") or []:
            text += f"<call>{call['function']['name']}{call['function']['arguments']}"
        tokens.extend(enc.encode(text, disallowed_special=()))
    return tokens


def shared(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def new_as_sent(sent, tools, enc, added):
    """Tokens of each request's new messages as they were sent (the last `added[t]` messages, after any
    rewriting the sender did to them), so a sender that shrinks new content is not counted as reusing
    more than there was."""
    out = []
    for messages, k in zip(sent, added):
        out.append(len(render(messages, tools, enc)) - len(render(messages[:len(messages) - k], tools, enc)))
    return out


def score(prompts, news, sent_news=None):
    """Σ prompt, Σ cached (the prefix each shares with the one before) and prefix-reuse efficiency:
    cached against what each request could have reused (all but its new messages). `efficiency`
    takes the new messages as the uncompressed session has them (run.py's reference, which a sender
    that shrinks them can pass 100% on); `efficiency_as_sent` takes them as this sender sent them."""
    cached = [0] + [shared(prompts[t - 1], prompts[t]) for t in range(1, len(prompts))]
    total = sum(len(p) for p in prompts)
    reusable = sum(max(0, len(p) - n) for p, n in zip(prompts, news))
    out = {"turns": len(prompts), "prompt_tokens": total, "cached_tokens": sum(cached),
           "uncached_tokens": total - sum(cached),
           "largest": max(len(p) for p in prompts), "efficiency": sum(cached) / reusable if reusable else 1.0,
           "breaks": sum(1 for t in range(1, len(prompts)) if cached[t] < len(prompts[t - 1]))}
    if sent_news is not None:
        reusable = sum(max(0, len(p) - n) for p, n in zip(prompts, sent_news))
        out["efficiency_as_sent"] = sum(cached) / reusable if reusable else 1.0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--session", default="gen:3:12000")
    ap.add_argument("--context-window", type=int, default=8192)
    ap.add_argument("--keep-recent-turns", type=int, default=2)
    ap.add_argument("--low-water", type=float, default=0.5)
    ap.add_argument("--high-water", type=float, default=0.8)
    ap.add_argument("--modes", default="rules,sliding")
    ap.add_argument("--bin", default=os.path.join(run.REPO, "target", "release", "ctxgate"))
    ap.add_argument("--logs", help="keep ctxgate's config and log in this directory")
    args = ap.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", CACHE)
    import tiktoken
    enc = tiktoken.get_encoding("o200k_base")
    kind, seed, size = args.session.split(":")
    if kind == "chain":
        tools, messages, points = chain_session(int(seed), int(size))
    else:
        tools, messages, points = run.gen_session(int(seed), int(size))
    direct = [render(messages[:p], tools, enc) for p in points]
    news = [len(direct[0])] + [len(direct[t]) - len(direct[t - 1]) for t in range(1, len(direct))]
    added = [points[0]] + [points[t] - points[t - 1] for t in range(1, len(points))]
    results = {"session": args.session, "context_window": args.context_window,
               "marks": [args.low_water, args.high_water],
               "direct": score(direct, news)}

    for mode in args.modes.split(","):
        if mode == "sliding":
            # The same estimate-and-drop as run.py's, counting the JSON of each message in o200k tokens.
            est = types.SimpleNamespace(count=lambda key, obj: len(enc.encode(json.dumps(obj), disallowed_special=())))
            sent = [run.sliding_window(messages[:p], tools, est, int(0.8 * args.context_window))[0] for p in points]
            results[mode] = score([render(s, tools, enc) for s in sent], news,
                                  new_as_sent(sent, tools, enc, added))
            continue
        mock_port, gate_port = free_port(), free_port()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", mock_port), Mock)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        Mock.seen = []
        with tempfile.TemporaryDirectory() as scratch:
            logdir = args.logs or scratch
            os.makedirs(logdir, exist_ok=True)
            conf = types.SimpleNamespace(context_window=args.context_window, keep_recent_turns=args.keep_recent_turns,
                                         token_margin=0.0, tokenizer="", ctxgate_bin=args.bin,
                                         low_water=args.low_water, high_water=args.high_water)
            gate = run.start_ctxgate(conf, mode, gate_port, mock_port, logdir)
            try:
                headers = {"X-Session-Id": f"sim-{mode}", "Authorization": "Bearer sk-sim"}
                for p in points:
                    body = {"model": "sim", "messages": messages[:p], "tools": tools, "max_tokens": 16}
                    status, _, answer = run.http("POST", f"http://127.0.0.1:{gate_port}/v1/chat/completions",
                                                 body, headers)
                    assert status == 200, answer[:300]
                _, _, metrics = run.http("GET", f"http://127.0.0.1:{gate_port}/metrics")
                epochs = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                             if line.startswith("ctxgate_compression_epochs_total{") and f'stage="{mode}"' in line)
            finally:
                run.stop(gate)
                server.shutdown()
        sent = [s["messages"] for s in Mock.seen]
        results[mode] = dict(score([render(m, s.get("tools"), enc) for m, s in zip(sent, Mock.seen)], news,
                                   new_as_sent(sent, tools, enc, added)), epochs=epochs)

    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
