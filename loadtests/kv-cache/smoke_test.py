"""Smoke test for a llama-server started with serve.sh (stdlib only).
Usage: python smoke_test.py PORT [--tools]
  1. two chat completions sharing a ~1500-token system prefix -> reports cached_tokens and prefill tok/s
  2. --tools: sends the first BFCL multi_turn_base conversation (truncated) with its tools and checks
     that the chat template renders tools, assistant tool_calls and tool messages (/apply-template).
"""
import json, sys, time, urllib.request
from pathlib import Path

PORT = int(sys.argv[1])
BASE = f"http://127.0.0.1:{PORT}"
WORK = Path(__file__).resolve().parent / ".work"


def post(path, body):
    req = urllib.request.Request(BASE + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read()), time.time() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.time() - t


def chat(messages, **kw):
    return post("/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 8,
                                         "temperature": 0, "cache_prompt": True, **kw})


def report(tag, status, r, wall):
    u, t = r.get("usage", {}), r.get("timings", {})
    print(f"{tag}: http={status} prompt_tokens={u.get('prompt_tokens')} "
          f"cached_tokens={u.get('prompt_tokens_details', {}).get('cached_tokens')} "
          f"timings.cache_n={t.get('cache_n')} prompt_n={t.get('prompt_n')} "
          f"prefill={t.get('prompt_per_second', 0):.1f} tok/s gen={t.get('predicted_per_second', 0):.1f} tok/s "
          f"wall={wall:.2f}s")
    return u, t


# ~1500-token system prompt, deterministic, no repeated 8-gram boilerplate
words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
lines = [f"Rule {i}: when handling item {i * 7 % 101} prefer {words[i % 26]} over {words[(i * 5) % 26]} "
         f"unless the {words[(i * 3) % 26]} flag is {i % 3}." for i in range(60)]
system = "You are a careful assistant. Follow these rules.\n" + "\n".join(lines)

s1, r1, w1 = chat([{"role": "system", "content": system}, {"role": "user", "content": "What is rule 7 about?"}])
u1, t1 = report("req1 (cold)", s1, r1, w1)
s2, r2, w2 = chat([{"role": "system", "content": system}, {"role": "user", "content": "Summarise rule 42 briefly."}])
u2, t2 = report("req2 (same prefix)", s2, r2, w2)
cached = u2.get("prompt_tokens_details", {}).get("cached_tokens") or 0
ok = s1 == s2 == 200 and cached > 0.8 * (u2.get("prompt_tokens") or 1)
print(f"cached-prefix check: {'OK' if ok else 'FAIL'} ({cached}/{u2.get('prompt_tokens')} cached)")

if "--tools" in sys.argv:
    rec = json.loads((WORK / "bfcl" / "base.jsonl").open().readline())
    msgs = rec["messages"]
    cut = next(i for i, m in enumerate(msgs) if m["role"] == "tool") + 1  # user, assistant(tool_calls), tool
    msgs = msgs[:cut + 2] if cut + 2 <= len(msgs) else msgs[:cut]
    while msgs[-1]["role"] == "assistant":
        msgs.pop()
    print(f"tools: {rec['id']} with {len(rec['tools'])} tools, roles={[m['role'] for m in msgs]}")
    st, tpl, _ = post("/apply-template", {"messages": msgs, "tools": rec["tools"]})
    prompt = tpl.get("prompt", "")
    tc = msgs[next(i for i, m in enumerate(msgs) if m.get("tool_calls"))]["tool_calls"][0]["function"]["name"]
    checks = {"tools rendered": rec["tools"][0]["function"]["name"] in prompt,
              "tool_call rendered": "<tool_call>" in prompt and tc in prompt,
              "tool result rendered": "<tool_response>" in prompt}
    print(f"apply-template: http={st} prompt_chars={len(prompt)} {checks}")
    st, r, w = chat(msgs, tools=rec["tools"], max_tokens=64)
    report("tools chat", st, r, w)
    msg = (r.get("choices") or [{}])[0].get("message", {})
    print("reply:", json.dumps({k: msg.get(k) for k in ("content", "tool_calls")})[:400])
    ok = ok and st == 200 and all(checks.values())

sys.exit(0 if ok else 1)
