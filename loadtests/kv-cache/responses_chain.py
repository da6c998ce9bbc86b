#!/usr/bin/env python3
"""A Responses API chain from the OpenAI Agents SDK through ctxgate to a real llama-server (which
speaks only Chat Completions): does the prompt cache keep hitting while ctxgate compresses the chain?

Each turn is `Runner.run(agent, new_input, previous_response_id=<last>)` with an
`OpenAIResponsesModel` whose client points at ctxgate: the client sends only the new user message
(a ~300-token log excerpt and a question); ctxgate rebuilds the conversation from its store,
translates it to a chat request and compresses it (rules, `context_window` below the chain's size,
so epochs happen). With `--upstream-api responses` ctxgate sends llama-server Responses requests
instead (its `/v1/responses`; ctxgate's native path, which compresses the items themselves). Two modes, each on a freshly started llama-server with Qwen2.5-Coder-0.5B
(`--cache-ram 0`, 1 slot, `-c 16384`):
  full   ctxgate with compression off: the whole chain every turn (the physical reference)
  rules  ctxgate with compression on (the model's own tokenizer.json, no margin)
Reported per mode: Σ input tokens, Σ cached (usage.input_tokens_details.cached_tokens, which
ctxgate translates from llama-server's prompt_tokens_details), cached share, prefix-reuse
efficiency = Σ cached_t / Σ max(0, input_t - new_t), new_t = what turn t added as the server
counts it (this mode's previous answer, and the new user message as the full run's input grew
by it), epochs, wall per turn. Answers are capped at 512 tokens (the SDK fails a turn that ends
`incomplete`, so the cap is loose).

  .work/venv/bin/python responses_chain.py [--turns 24] [--context-window 4096] [--modes full,rules]
Needs: setup.sh (llama-server, Qwen2.5-Coder-0.5B, its tokenizer.json), target/release/ctxgate,
openai==3.63.0 and openai-agents==0.24.0 in the venv (setup.sh installs them).
"""
import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from run import CTXGATE, HERE, http, stop, wait_ready  # noqa: E402

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

set_tracing_disabled(True)
# Qwen2.5-Coder-0.5B: SmolLM2-135M rambles past any answer cap at temperature 0, and the Agents
# SDK fails a turn whose response ends `incomplete`.
MODEL = "qwen"
TOKENIZER = os.path.join(HERE, ".work", "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.tokenizer.json")
def start_llama(port, logdir, mode, ctx):
    env = dict(os.environ, CTX=str(ctx), LOG_FILE=os.path.join(logdir, f"llama-{mode}.log"))
    p = subprocess.Popen([os.path.join(HERE, "serve.sh"), MODEL, str(port), "--cache-ram", "0", "--metrics"], env=env)
    wait_ready(f"http://127.0.0.1:{port}/health", p, "llama-server", 180)
    return p


def start_ctxgate(binary, port, llama_port, logdir, mode, window, upstream_api):
    """ctxgate as run.py configures it: compression off for `full`, rules for the other modes;
    `upstream_api` says whether llama-server gets chat requests or Responses requests."""
    conf = argparse.Namespace(context_window=window, keep_recent_turns=2, token_margin=0.0, tokenizer=TOKENIZER,
                              ctxgate_bin=binary, upstream_api=upstream_api)
    return run.start_ctxgate(conf, "off" if mode == "full" else "rules", port, llama_port, logdir)


def metric(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name) and not l.startswith("#"))


async def chain(base_url, turns, seed):
    client = AsyncOpenAI(base_url=base_url, api_key="sk-chain-bench", max_retries=0, timeout=1800)
    agent = Agent(name="ops", instructions="You are an on-call assistant. Answer in one short sentence.",
                  model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(max_tokens=512, temperature=0))
    rng = random.Random(seed)
    rows, previous = [], None
    for t in range(turns):
        t0 = time.time()
        result = await Runner.run(agent, run.log_excerpt(rng, t), previous_response_id=previous)
        wall = time.time() - t0
        previous = result.last_response_id
        usage = result.raw_responses[-1].usage
        cached = usage.input_tokens_details.cached_tokens if usage.input_tokens_details else 0
        rows.append({"turn": t + 1, "input": usage.input_tokens, "cached": cached, "output": usage.output_tokens,
                     "wall": round(wall, 3)})
        print(f"  turn {t + 1:2d}: input {usage.input_tokens:5d} cached {cached:5d} wall {wall:6.2f}s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--context-window", type=int, default=4096)
    ap.add_argument("--modes", default="full,rules")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--server-ctx", type=int, default=16384, help="llama-server's -c")
    ap.add_argument("--upstream-api", choices=["chat", "responses"], default="chat",
                    help="what ctxgate sends llama-server: chat requests (translated) or Responses requests "
                         "(its /v1/responses, ctxgate's native path)")
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="chain-", dir=os.path.join(HERE, ".work"))
    binary = os.path.join(logdir, "ctxgate")
    shutil.copy2(CTXGATE, binary)  # a concurrent cargo build cannot change it between modes
    results = {}
    for mode in args.modes.split(","):
        print(f"== {mode}", flush=True)
        llama = start_llama(args.port, logdir, mode, args.server_ctx)
        gate = start_ctxgate(binary, args.port + 1, args.port, logdir, mode, args.context_window, args.upstream_api)
        try:
            t0 = time.time()
            rows = asyncio.run(chain(f"http://127.0.0.1:{args.port + 1}/v1", args.turns, args.seed))
            total = time.time() - t0
            _, _, body = http("GET", f"http://127.0.0.1:{args.port + 1}/metrics")
            text = body.decode()
            results[mode] = {"rows": rows, "total_wall": round(total, 1),
                             "epochs": metric(text, "ctxgate_compression_epochs_total"),
                             "responses": metric(text, "ctxgate_requests_total{")}
        finally:
            stop(gate)
            stop(llama)
    summary = {}
    full = results.get("full")
    for mode, r in results.items():
        rows = r["rows"]
        s_in, s_cached = sum(x["input"] for x in rows), sum(x["cached"] for x in rows)
        line = {"turns": len(rows), "input": s_in, "cached": s_cached, "cached_share": round(s_cached / s_in, 4),
                "epochs": r["epochs"], "mean_wall": round(sum(x["wall"] for x in rows) / len(rows), 2),
                "largest_input": max(x["input"] for x in rows)}
        if full:
            # What each turn added, as the server counts it: this mode's previous answer and the
            # new user message (from the full run: its input growth less its previous answer).
            fr = full["rows"]
            user = [fr[0]["input"]] + [max(0, b["input"] - a["input"] - a["output"]) for a, b in zip(fr, fr[1:])]
            new = [user[0]] + [u + prev["output"] for u, prev in zip(user[1:], rows)]
            possible = sum(max(0, x["input"] - n) for x, n in zip(rows, new))
            line["prefix_reuse_efficiency"] = round(s_cached / possible, 4) if possible else None
        else:
            # Without a full run (a chain longer than the server's context): a turn that reused
            # the whole previous prompt has exactly its new content uncached; an epoch turn's new
            # content is taken as the median of those.
            whole = [b["input"] - b["cached"] for a, b in zip(rows, rows[1:]) if b["cached"] >= a["input"]]
            typical = sorted(whole)[len(whole) // 2] if whole else 0
            new = [rows[0]["input"]] + [b["input"] - b["cached"] if b["cached"] >= a["input"] else typical
                                        for a, b in zip(rows, rows[1:])]
            possible = sum(max(0, x["input"] - n) for x, n in zip(rows, new))
            line["prefix_reuse_efficiency_est"] = round(s_cached / possible, 4) if possible else None
        summary[mode] = line
    print(json.dumps(summary, indent=1))
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.upstream_api == "chat" else f"-{args.upstream_api}-upstream"
    if args.context_window != 4096:
        suffix += f"-w{args.context_window}"
    path = os.path.join(args.out, f"{datetime.date.today()}-responses-chain-{MODEL}{suffix}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "summary": summary, "results": results,
                   "ctxgate_sha256": subprocess.run(["sha256sum", binary], capture_output=True, text=True).stdout.split()[0]},
                  f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
