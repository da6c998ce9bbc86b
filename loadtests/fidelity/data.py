"""Test cases for the fidelity benchmark: BFCL multi_turn_long_context agent sessions, BFCL memory
(user-stated facts), and a seeded generator of agent sessions. See loadtests/README.md, "Fidelity".

A case is a chat request: one system message, a history of whole turns, and a question (the last
message, a user message). One older message holds the gold fact: a string that occurs in that
message and nowhere else in the request (not in other messages, not in `tools`, not in the
question). Cases are sized by ctxgate's own token count (see `Counter`) to within a tolerance of a
target; the sizing picks whole turns and never edits a message to fit.
"""
import hashlib
import json
import random
import re

# ----------------------------------------------------------------------------- token counting


class Counter:
    """ctxgate's count (src/tokens.rs): per message, 4 + o200k tokens of its text (string content,
    or the text parts of an array joined by newlines) followed by "\\n name \\n arguments" for each
    tool call; plus the `tools` JSON, as sent, counted as text. Cached by the message's JSON."""

    def __init__(self, encoding):
        self.enc = encoding
        self.cache = {}

    def text(self, s):
        return len(self.enc.encode_ordinary(s))

    def message(self, m, key=None):
        key = key if key is not None else json.dumps(m, ensure_ascii=False, sort_keys=True)
        n = self.cache.get(key)
        if n is None:
            n = 4 + self.text(message_text(m))
            self.cache[key] = n
        return n

    def tools(self, tools_json):
        return self.text(tools_json)


def message_text(m):
    if not isinstance(m, dict):
        return ""
    c = m.get("content")
    if isinstance(c, str):
        text = c
    elif isinstance(c, list):
        text = "\n".join(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    else:
        text = ""
    for tc in m.get("tool_calls") or []:
        f = tc.get("function") or {}
        text += "\n" + f.get("name", "") + "\n" + f.get("arguments", "")
    return text


def dumps(value):
    """How this client serialises: Python's default separators (", ", ": "), keys in insertion
    order, UTF-8 as is. Deliberately not serde's compact form, so byte-for-byte checks mean it."""
    return json.dumps(value, ensure_ascii=False)


def message_id(raw):
    """ctxgate's marker id: the first 10 hex digits of SHA-256 over the message's bytes as sent."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:10]


# ----------------------------------------------------------------------------- turns


def turns_of(messages):
    """Whole turns, as the naive baseline drops them: a user message alone, or an assistant
    message with the tool results that follow it."""
    turns, cur = [], None
    for m in messages:
        if m["role"] == "tool" and cur is not None and cur[0]["role"] == "assistant":
            cur.append(m)
            continue
        if cur is not None:
            turns.append(cur)
        cur = [m]
    if cur is not None:
        turns.append(cur)
    return turns


def turn_starts(messages, lead=1):
    """ctxgate's turn starts (src/compress/rules.rs Conversation::turn_starts)."""
    starts = []
    for i in range(lead, len(messages)):
        role = messages[i]["role"]
        if role == "user" or (role == "assistant" and (i == lead or messages[i - 1]["role"] != "assistant")):
            starts.append(i)
        elif i == lead:
            starts.append(i)
    return starts


def protected_from(messages, keep=4):
    """Index of the first message ctxgate protects as a recent turn (the last `keep` turns before
    the question), so a gold message before it sits in the span an epoch compacts first."""
    starts = turn_starts(messages)
    return starts[-(keep + 1)] if len(starts) > keep else 1


class Case:
    def __init__(self, dataset, factor, index, tools, messages, gold_index, gold, extra=None):
        self.dataset = dataset
        self.factor = factor
        self.index = index
        self.tools = tools
        self.messages = messages
        self.gold_index = gold_index
        self.gold = gold  # list of strings, all of which must be present
        self.extra = extra or {}


def all_texts(tools_json, messages):
    return [tools_json] + [message_text(m) for m in messages]


def occurrences(texts, s):
    return sum(t.count(s) for t in texts)


# ----------------------------------------------------------------------------- BFCL long_context

BFCL_SYSTEM = "You are an assistant that completes the user's tasks by calling the provided functions."
ATOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@/:\-]{4,38}[A-Za-z0-9]")


def bfcl_streams(path, seed):
    """One stream per distinct `tools` list: that group's conversations concatenated in a seeded
    order, call ids renumbered so they stay unique (ctxgate pairs results with calls by id)."""
    groups = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                groups.setdefault(json.dumps(rec["tools"], sort_keys=True), []).append(rec)
    rng = random.Random(seed)
    streams = []
    for key in sorted(groups):
        recs = sorted(groups[key], key=lambda r: r["id"])
        rng.shuffle(recs)
        n, turns = 0, []
        for rec in recs:
            ids = {}
            msgs = []
            for m in rec["messages"]:
                m = json.loads(json.dumps(m))
                for tc in m.get("tool_calls") or []:
                    ids[tc["id"]] = f"call_{n}"
                    tc["id"] = ids[tc["id"]]
                    n += 1
                if m["role"] == "tool":
                    m["tool_call_id"] = ids[m["tool_call_id"]]
                msgs.append(m)
            for t in turns_of(msgs):
                turns.append((rec["id"], t))
        streams.append({"tools": groups[key][0]["tools"], "turns": turns, "ids": [r["id"] for r in recs]})
    return streams


def _window(rng, turn_tokens, fixed, target, tol, tries=400):
    """A contiguous run of turns [s, e) whose tokens plus `fixed` land within target ± tol."""
    lo, hi = target * (1 - tol), target * (1 + tol)
    n = len(turn_tokens)
    for _ in range(tries):
        e = rng.randint(1, n)
        total, s = fixed, e
        while s > 0 and total < lo:
            s -= 1
            total += turn_tokens[s]
        if lo <= total <= hi:
            return s, e
    return None


def _unique_atom(rng, text, texts, tries=60):
    cands = sorted({m.group(0) for m in ATOM.finditer(text)})  # sorted: set order varies per process
    rng.shuffle(cands)
    for c in cands[:tries]:
        if occurrences(texts, c) == 1:
            return c
    return None


def bfcl_lc_cases(streams, counter, factor, window, count, tol, seed, keep=4):
    rng = random.Random(f"bfcl-lc:{seed}:{factor}")
    target = factor * window
    sys_msg = {"role": "system", "content": BFCL_SYSTEM}
    cases = []
    eligible = [s for s in streams if sum(counter.message(m) for _, t in s["turns"] for m in t) > target * 1.05]
    attempts = 0
    while len(cases) < count and attempts < count * 200:
        attempts += 1
        stream = rng.choice(eligible)
        tools_json = dumps(stream["tools"])
        tt = [sum(counter.message(m) for m in t) for _, t in stream["turns"]]
        # the question is ~40 tokens; the system prompt ~20
        fixed = counter.tools(tools_json) + counter.message(sys_msg) + 45
        w = _window(rng, tt, fixed, target, tol)
        if w is None:
            continue
        s, e = w
        history = [json.loads(json.dumps(m)) for _, t in stream["turns"][s:e] for m in t]
        msgs = [sys_msg] + history
        limit = protected_from(msgs + [{"role": "user", "content": "?"}], keep)
        tool_idx = [i for i in range(1, limit) if msgs[i]["role"] == "tool" and len(msgs[i]["content"] or "") >= 12]
        if not tool_idx:
            continue
        rng.shuffle(tool_idx)
        texts = all_texts(tools_json, msgs)
        for gi in tool_idx[:8]:
            atom = _unique_atom(rng, msgs[gi]["content"], texts)
            if atom:
                break
        else:
            continue
        call = next(tc for m in msgs[:gi] for tc in (m.get("tool_calls") or []) if tc["id"] == msgs[gi]["tool_call_id"])
        fn = call["function"]
        q = (f"Earlier in this session you called {fn['name']} with {fn['arguments']}. "
             "What exactly did that call return? Quote the values from its result verbatim.")
        if atom in q:
            continue
        msgs.append({"role": "user", "content": q})
        total = counter.tools(tools_json) + sum(counter.message(m) for m in msgs)
        if not (target * (1 - tol) <= total <= target * (1 + tol)):
            continue
        if protected_from(msgs, keep) <= gi:
            continue
        src = sorted({cid for cid, _ in stream["turns"][s:e]})
        cases.append(Case("bfcl-lc", factor, len(cases), stream["tools"], msgs, gi, [atom],
                          {"source": src, "gold_call": fn["name"]}))
    return cases


# ----------------------------------------------------------------------------- BFCL memory

MEM_SYSTEM = ("You are an assistant that completes the user's tasks by calling the provided functions. "
              "Remember what the user tells you about themselves.")
SCENARIOS = ["customer", "finance", "healthcare", "notetaker", "student"]


def _fragments(source):
    parts = re.split(r"\.\.\.|…|”|“", source.strip())
    out = []
    for p in parts:
        p = p.strip().strip('"').strip()
        if len(p) >= 6:
            out.append(p)
    return out


def memory_questions(mem_dir):
    """The BFCL v4 memory questions whose source sentence (split at "..." and quotes into
    fragments of 6+ characters) occurs verbatim in exactly one prereq user message."""
    pre = {}
    for scn in SCENARIOS:
        with open(f"{mem_dir}/memory_{scn}.json") as f:
            pre[scn] = [json.loads(l) for l in f if l.strip()]
    with open(f"{mem_dir}/BFCL_v4_memory.json") as f:
        qs = [json.loads(l) for l in f if l.strip()]
    with open(f"{mem_dir}/possible_answer/BFCL_v4_memory.json") as f:
        ans = {r["id"]: r for r in (json.loads(l) for l in f if l.strip())}
    usable, skipped = [], []
    for q in qs:
        a = ans[q["id"]]
        frags = _fragments(a["source"])
        hits = []
        for conv in pre[q["scenario"]]:
            users = [m for turn in conv["question"] for m in turn if m["role"] == "user"]
            for k, m in enumerate(users):
                if frags and all(fr in m["content"] for fr in frags):
                    hits.append((conv, users, k))
        if len(hits) != 1:
            skipped.append(q["id"])
            continue
        conv, users, k = hits[0]
        usable.append({"id": q["id"], "scenario": q["scenario"], "question": q["question"][0][0]["content"],
                       "answers": a["ground_truth"], "fragments": frags, "prereq": conv["id"],
                       "users": users, "gold_turn": k})
    return usable, skipped, len(qs)


def memory_cases(questions, streams, counter, factor, window, count, tol, seed, keep=4):
    """The prereq conversation that holds the fact, its user turns spread over the first two
    thirds of an agent session made of BFCL long_context model steps (their own user messages
    left out), then the BFCL memory question."""
    rng = random.Random(f"bfcl-mem:{seed}:{factor}")
    target = factor * window
    sys_msg = {"role": "system", "content": MEM_SYSTEM}
    pool = list(questions)
    rng.shuffle(pool)
    cases = []
    for q in pool:
        if len(cases) >= count:
            break
        users = [{"role": "user", "content": m["content"]} for m in q["users"]]
        question = {"role": "user", "content": q["question"]}
        for _ in range(200):
            stream = rng.choice(streams)
            steps = [t for _, t in stream["turns"] if t[0]["role"] == "assistant"]
            tools_json = dumps(stream["tools"])
            fixed = (counter.tools(tools_json) + counter.message(sys_msg) + counter.message(question)
                     + sum(counter.message(u) for u in users))
            w = _window(rng, [sum(counter.message(m) for m in t) for t in steps], fixed, target, tol, tries=20)
            if w is None:
                continue
            filler = steps[w[0]:w[1]]
            n, f = len(users), len(filler)
            at = [k * (2 * f) // (3 * n) for k in range(n)]
            msgs, gi = [sys_msg], None
            for j in range(f + 1):
                for k in [k for k in range(n) if at[k] == j]:
                    if k == q["gold_turn"]:
                        gi = len(msgs)
                    msgs.append(users[k])
                if j < f:
                    msgs.extend(json.loads(json.dumps(m)) for m in filler[j])
            msgs.append(question)
            if gi is None or protected_from(msgs, keep) <= gi:
                continue
            texts = all_texts(tools_json, msgs)
            if any(occurrences(texts, fr) != 1 or fr not in msgs[gi]["content"] for fr in q["fragments"]):
                continue
            total = counter.tools(tools_json) + sum(counter.message(m) for m in msgs)
            if not (target * (1 - tol) <= total <= target * (1 + tol)):
                continue
            user_tokens = sum(counter.message(m) for m in msgs if m["role"] == "user")
            cases.append(Case("bfcl-mem", factor, len(cases), stream["tools"], msgs, gi, q["fragments"],
                              {"question_id": q["id"], "prereq": q["prereq"], "user_tokens": user_tokens,
                               "answers": q["answers"]}))
            break
    return cases


# ----------------------------------------------------------------------------- generator

WORDS = """amber anchor apple arch atlas autumn badge bamboo banner barrel basin beacon birch blaze bloom
border breeze brick bridge bronze buffer cabin cactus canal candle canyon carbon cargo cedar chalk
channel cherry cider cinder circuit citrus clover cobalt comet copper coral cotton crane crystal
cypress dawn delta desert diesel dune eagle echo ember falcon fern fiber flint forest fossil
garnet glacier granite harbor hazel helium heron indigo iris ivory jade jasper juniper kernel lagoon
lantern larch lava lemon linen lotus lumen magnet maple marble meadow mercury mesa mint mosaic
nectar needle nickel nova oak oasis olive onyx opal orbit orchid oxide paddle pebble pepper pine
pixel planet plaza plume polar poplar prism quartz quill radar raven reef ridge river rocket
saffron sage salt sand satin shadow shale signal silver slate solar spruce stone summit talon tango
thistle thunder tide timber topaz torch tulip tundra valley velvet vessel violet walnut willow
zephyr zinc""".split()
PROSE = """the a service request response cache latency queue worker retry deploy config value default
rollout window metric alert threshold region replica storage index schema migration client server
token budget limit error timeout handler pipeline batch stream record field table user account
team owner policy review change release build test check status report log event trace span
because when after before while since although therefore however also then only still often
usually rarely quickly slowly safely carefully is was are were has had will would should could
may might can must does did run runs ran move moves moved keep keeps kept read reads wrote write
update updates updated fail fails failed pass passes passed start starts started stop stops
stopped new old large small fast slow stable broken pending active idle remote local primary
secondary internal external""".split()
SERVICES = ["billing", "auth", "search", "ingest", "notifier", "gateway", "scheduler", "ledger", "catalog", "media"]
GEN_SYSTEM = "You are a careful software agent. Use the tools to inspect and change the user's services."


def gen_tools():
    def fn(name, desc, props, req):
        return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
            "type": "object", "properties": {k: {"type": v[0], "description": v[1]} for k, v in props.items()},
            "required": req}}}
    return [
        fn("read_file", "Read a file of the repository.", {"path": ("string", "Path from the repository root.")}, ["path"]),
        fn("write_file", "Replace a file's content.", {"path": ("string", "Path."), "content": ("string", "New content.")}, ["path", "content"]),
        fn("run_tests", "Run a test target and return its output.", {"target": ("string", "Test target.")}, ["target"]),
        fn("tail_logs", "The last lines of a service's log.", {"service": ("string", "Service name."), "lines": ("integer", "How many lines.")}, ["service"]),
        fn("fetch_page", "Fetch an internal documentation page as text.", {"url": ("string", "Page URL.")}, ["url"]),
        fn("get_ticket", "Read a ticket.", {"id": ("string", "Ticket id.")}, ["id"]),
        fn("get_build_status", "Status of a CI build.", {"build_id": ("string", "Build id.")}, ["build_id"]),
        fn("list_dir", "List a directory.", {"path": ("string", "Directory.")}, ["path"]),
    ]


class Generator:
    """A seeded agent session: user tasks, model steps calling tools, a closing answer per task.
    Tool results are fresh (pages, files, tickets), repeated (unchanged re-reads, build polls:
    exact duplicates), superseded (a file re-read after it was written) and log-noisy (ANSI
    colours, timestamps, heartbeat runs, trailing blanks, blank-line runs)."""

    def __init__(self, rng):
        self.rng = rng
        self.files = {}
        self.paths = [f"src/{s}/{m}.py" for s in rng.sample(SERVICES, 5) for m in ("handlers", "config", "models")]
        self.builds = {}
        self.calls = 0
        self.ticket = rng.randint(1000, 8000)

    def words(self, n, pool=PROSE):
        return " ".join(self.rng.choice(pool) for _ in range(n))

    def sentence(self, lo=8, hi=22):
        s = self.words(self.rng.randint(lo, hi))
        return s[0].upper() + s[1:] + "."

    def code_line(self):
        r = self.rng
        kind = r.randrange(6)
        a, b, c = r.choice(WORDS), r.choice(WORDS), r.choice(WORDS)
        ind = "    " * r.randint(0, 3)
        if kind == 0:
            return f"{ind}def {a}_{b}(self, {c}, timeout={r.randint(1, 90)}):"
        if kind == 1:
            return f"{ind}{a}_{b} = self.{c}.get(\"{a}\", {r.randint(0, 999)})"
        if kind == 2:
            return f"{ind}if {a} is None or {b} > {r.randint(1, 64)}:"
        if kind == 3:
            return f"{ind}return {a}.{b}({c}_{r.choice(WORDS)})"
        if kind == 4:
            return f"{ind}# {self.words(r.randint(4, 12))}"
        return ""

    def file(self, path):
        if path not in self.files:
            self.files[path] = [self.code_line() for _ in range(self.rng.choice([15, 30, 60, 90, 150]))]
        return "\n".join(self.files[path]) + "\n"

    def logs(self, service, lines):
        r = self.rng
        out = []
        levels = [("\x1b[32mINFO\x1b[0m", 6), ("\x1b[33mWARN\x1b[0m", 2), ("\x1b[31mERROR\x1b[0m", 1), ("\x1b[2mDEBUG\x1b[0m", 3)]
        t = r.randint(0, 80000)
        while len(out) < lines:
            t += r.randint(0, 4)
            ts = f"\x1b[90m2026-11-{r.randint(10, 28)}T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z\x1b[0m"
            lvl = r.choices([l for l, _ in levels], [w for _, w in levels])[0]
            if r.random() < 0.25:
                for _ in range(r.randint(2, 8)):
                    out.append(f"{ts} {lvl} {service}: heartbeat ok   ")
            elif r.random() < 0.05:
                out.extend(["", "", ""])
            else:
                out.append(f"{ts} {lvl} {service}.{r.choice(WORDS)}: {self.words(r.randint(5, 14))}  ")
        return "\n".join(out[:lines]) + "\n"

    def tests(self, target):
        r = self.rng
        out = [f"\x1b[1m============ test session starts: {target} ============\x1b[0m", ""]
        for _ in range(r.randint(20, 200)):
            ok = r.random() < 0.93
            mark = "\x1b[32mPASSED\x1b[0m" if ok else "\x1b[31mFAILED\x1b[0m"
            out.append(f"tests/test_{r.choice(WORDS)}.py::test_{r.choice(WORDS)}_{r.choice(WORDS)} {mark}   ")
            if not ok:
                out.extend(["", "    " + self.words(r.randint(6, 12)), f"    AssertionError: {r.randint(0, 99)} != {r.randint(100, 999)}", "", ""])
        out.append(f"\x1b[1m===== {r.randint(20, 200)} passed in {r.uniform(0.5, 40):.2f}s =====\x1b[0m")
        return "\n".join(out) + "\n"

    def page(self):
        return "\n\n".join(" ".join(self.sentence() for _ in range(self.rng.randint(2, 6)))
                           for _ in range(self.rng.randint(4, 22))) + "\n"

    def result(self, name, args):
        r = self.rng
        if name == "read_file":
            return self.file(args["path"])
        if name == "write_file":
            lines = self.files.setdefault(args["path"], [self.code_line() for _ in range(30)])
            for _ in range(r.randint(1, 4)):
                lines[r.randrange(len(lines))] = self.code_line()
            return dumps({"ok": True, "bytes": len("\n".join(lines))})
        if name == "run_tests":
            return self.tests(args["target"])
        if name == "tail_logs":
            return self.logs(args["service"], args.get("lines", 100))
        if name == "fetch_page":
            return self.page()
        if name == "get_ticket":
            return dumps({"id": args["id"], "title": self.sentence(4, 9), "status": r.choice(["open", "in_progress", "blocked"]),
                          "owner": r.choice(WORDS), "body": self.sentence(12, 40)})
        if name == "get_build_status":
            b = args["build_id"]
            state = self.builds.setdefault(b, r.randint(1, 4))
            self.builds[b] = state - 1
            status = "running" if state > 0 else r.choice(["passed", "failed"])
            return dumps({"build_id": b, "status": status, "stage": "integration" if state > 0 else "done",
                          "queued_jobs": 0, "url": f"https://ci.internal/builds/{b}"})
        if name == "list_dir":
            return "\n".join(f"{r.choice(WORDS)}_{r.choice(WORDS)}.{r.choice(['py', 'md', 'toml', 'json'])}"
                             for _ in range(r.randint(8, 60))) + "\n"
        raise ValueError(name)

    def call(self):
        r = self.rng
        name = r.choices(["read_file", "write_file", "run_tests", "tail_logs", "fetch_page", "get_ticket",
                          "get_build_status", "list_dir"], [30, 8, 12, 12, 12, 8, 12, 6])[0]
        if name in ("read_file", "write_file"):
            args = {"path": r.choice(self.paths)}
            if name == "write_file":
                args["content"] = "\n".join(self.code_line() for _ in range(r.randint(2, 6)))
        elif name == "run_tests":
            args = {"target": f"tests/{r.choice(SERVICES)}"}
        elif name == "tail_logs":
            args = {"service": r.choice(SERVICES), "lines": r.choice([40, 100, 200, 400])}
        elif name == "fetch_page":
            args = {"url": f"https://docs.internal/{r.choice(SERVICES)}/{r.choice(WORDS)}-{r.choice(WORDS)}"}
        elif name == "get_ticket":
            args = {"id": f"OPS-{self.ticket + r.randint(0, 30)}"}
        elif name == "get_build_status":
            args = {"build_id": f"b{r.randint(100, 104)}"}
        else:
            args = {"path": f"src/{r.choice(SERVICES)}"}
        self.calls += 1
        return {"id": f"call_{self.calls}", "type": "function", "function": {"name": name, "arguments": dumps(args)}}, name, args

    def turns(self, tokens, counter):
        """Turns until the stream holds `tokens` tokens."""
        r = self.rng
        out, total = [], 0
        while total < tokens:
            task = [{"role": "user", "content": f"Ticket OPS-{self.ticket + r.randint(0, 30)}: {self.sentence(6, 30)} "
                                                f"Please look at the {r.choice(SERVICES)} service."}]
            out.append(task)
            for _ in range(r.randint(2, 8)):
                calls = [self.call() for _ in range(2 if r.random() < 0.15 else 1)]
                step = [{"role": "assistant", "content": self.sentence(5, 18) if r.random() < 0.3 else None,
                         "tool_calls": [c for c, _, _ in calls]}]
                for c, name, args in calls:
                    step.append({"role": "tool", "tool_call_id": c["id"], "content": self.result(name, args)})
                out.append(step)
            out.append([{"role": "assistant", "content": " ".join(self.sentence() for _ in range(r.randint(2, 9)))}])
            total = sum(counter.message(m) for t in out for m in t)
        return out


GOLD_LINES = {
    "read_file": lambda svc, code: f'{svc.upper()}_RECOVERY_CODE = "{code}"',
    "run_tests": lambda svc, code: f"INFO fixtures: recovery code for {svc} set to {code}",
    "tail_logs": lambda svc, code: f"INFO vault: issued recovery code {code} for {svc}",
    "fetch_page": lambda svc, code: f"The recovery code for {svc} was changed to {code} last Tuesday.",
}


def gen_cases(counter, factor, window, count, tol, seed, keep=4):
    """Generated sessions, a window of whole turns sized to the target, and a gold line inserted at
    a random line of one older text tool result (a file, a test run, a log, a page)."""
    rng = random.Random(f"gen:{seed}:{factor}")
    target = factor * window
    tools = gen_tools()
    tools_json = dumps(tools)
    sys_msg = {"role": "system", "content": GEN_SYSTEM}
    cases = []
    attempts = 0
    while len(cases) < count and attempts < count * 50:
        attempts += 1
        g = Generator(random.Random(rng.getrandbits(64)))
        stream = g.turns(target * 1.6, counter)
        fixed = counter.tools(tools_json) + counter.message(sys_msg) + 40
        w = _window(rng, [sum(counter.message(m) for m in t) for t in stream], fixed, target, tol)
        if w is None:
            continue
        msgs = [sys_msg] + [json.loads(json.dumps(m)) for t in stream[w[0]:w[1]] for m in t]
        limit = protected_from(msgs + [{"role": "user", "content": "?"}], keep)
        calls = {tc["id"]: tc for m in msgs for tc in (m.get("tool_calls") or [])}
        cand = [i for i in range(1, limit) if msgs[i]["role"] == "tool"
                and calls[msgs[i]["tool_call_id"]]["function"]["name"] in GOLD_LINES]
        if not cand:
            continue
        gi = rng.choice(cand)
        svc = rng.choice(SERVICES)
        code = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"
        lines = msgs[gi]["content"].split("\n")
        at = rng.randint(0, max(0, len(lines) - 1))
        lines.insert(at, GOLD_LINES[calls[msgs[gi]["tool_call_id"]]["function"]["name"]](svc, code))
        msgs[gi]["content"] = "\n".join(lines)
        msgs.append({"role": "user", "content": f"What is the recovery code for {svc} that came up earlier in this "
                                                "session? Answer with the code only."})
        texts = all_texts(tools_json, msgs)
        if occurrences(texts, code) != 1:
            continue
        total = counter.tools(tools_json) + sum(counter.message(m) for m in msgs)
        if not (target * (1 - tol) <= total <= target * (1 + tol)) or protected_from(msgs, keep) <= gi:
            continue
        name = calls[msgs[gi]["tool_call_id"]]["function"]["name"]
        cases.append(Case("gen", factor, len(cases), tools, msgs, gi, [code],
                          {"gold_call": name, "gold_line": at, "gold_lines": len(lines)}))
    return cases
