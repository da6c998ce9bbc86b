//! What a compaction epoch of the rules pipeline costs a request.
//!
//! `rules/128k` runs [`plan`] with `force: true` (so every iteration compacts) on a seeded
//! synthetic agent transcript of about 128k o200k tokens: a system prompt, user turns, assistant
//! steps with one to three tool calls, and their results: source files read with line numbers
//! (some a few hundred lines long, many read again after an edit), `cargo test` output in ANSI
//! colours, grep hits, a `git status` that repeats, and screenshots as base64 blobs.
//! - `warm`: a session's steady state, the token cache has seen every message. Timed:
//!   [`analyse`] (every message's role, text and calls parsed again; counts from the cache),
//!   the tools' tokens and [`plan`] (turns, the rules, the layout).
//! - `analyse` and `plan`: the two halves of `warm`, to see which one dominates.
//! - `cold`: the same with a fresh [`TokenCounter`] each iteration, so every message (and every
//!   rewritten one) is tokenised: the first request of a session, or one after a restart.
//! - `rebuild`: [`ChatRequest::rebuild`] of the (parsed) request around the planned messages.
//! - `count/tiktoken-rs` and `count/bpe-openai`: the request body tokenised whole by each
//!   library (the gateway counts with `bpe-openai`; the counts are the same); `count/one-text/*`:
//!   the messages' contents as one text (a pasted log, one huge tool output) by the library on
//!   one thread and by the gateway's counter, which counts a long text in pieces on every core.
//!
//! The target is `warm` at or below 5 ms for 128k tokens.
//!
//! `responses/items/128k`: what a Responses request to an upstream with the Responses API pays
//! on top: the same transcript as items mapped to the compressor's messages (`map`), and the
//! compressed messages back to items (`rebuild`).
//!
//! `rules/bfcl_long_context` runs `warm` over every conversation of BFCL v4
//! `multi_turn_long_context` converted to OpenAI chat JSONL (`loadtests/kv-cache/setup.sh`;
//! `CTXGATE_BFCL` points at another file). Criterion times the whole set per iteration; its
//! throughput is conversations per second. Without the file the group is skipped.
//!
//! Tokens before and after and what each rule saved are printed to stderr once per input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use ctxgate::compress::plan::{plan, Input, Plan};
use ctxgate::compress::rules::{Rule, RuleStats, Rules};
use ctxgate::compress::{analyse, fixed_tokens};
use ctxgate::config::{CompressionMode, Encoding, Policy, RulesConfig};
use ctxgate::openai::ChatRequest;
use ctxgate::responses::items;
use ctxgate::tokens::TokenCounter;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

const TARGET_TOKENS: u64 = 128_000;

const FILES: [&str; 12] = [
    "src/limiter.rs",
    "src/server.rs",
    "src/router.rs",
    "src/session/store.rs",
    "src/session/redis.rs",
    "src/upstream/client.rs",
    "src/upstream/retry.rs",
    "src/config/mod.rs",
    "src/config/validate.rs",
    "src/tools/fanout.rs",
    "tests/limiter.rs",
    "tests/sessions.rs",
];

const WORDS: [&str; 16] = [
    "tenant", "quota", "window", "request", "session", "token", "budget", "cursor", "frame", "header",
    "stream", "epoch", "prefix", "span", "lease", "route",
];

const ASKS: [&str; 8] = [
    "The rate limiter lets bursts through after a config reload. Find out why and fix it; keep the \
     public API as it is.",
    "Tests are   failing on CI but not locally.  Can you run them and look at   the first failure?\n\n\n\n\
     I think it is the session store.",
    "Good. Now make the retry policy respect `retry-after` from the upstream, capped at 30 s.   ",
    "Please also add a test for the redis store that covers the TTL refresh on every commit.",
    "That looks wrong: the window must slide, not reset. Re-read the limiter and try again.\n\n\n",
    "Here is what I see in production:\n\n    WARN limiter: tenant=acme rejected=412 window=1s\n    \
     WARN limiter: tenant=acme rejected=398 window=1s\n\nWhy would the window be 1s?",
    "Ok, run the whole suite once more and summarise what changed.",
    "Before you continue: check the router for the same bug, it copies the limiter's key extraction.",
];

const THOUGHTS: [&str; 6] = [
    "Let me read the relevant files first.",
    "I'll run the tests to see the current state.",
    "The failure points at the window computation; let me look at where it is reset.",
    "I'll search for other uses of this function before changing its signature.",
    "Applying the fix now, then re-running the affected tests.",
    "Let me check the working tree and take a screenshot of the dashboard to confirm.",
];

fn capital(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
}

/// One block of plausible Rust, from a few shapes.
fn code_block(rng: &mut fastrand::Rng) -> Vec<String> {
    let a = WORDS[rng.usize(..WORDS.len())];
    let b = WORDS[rng.usize(..WORDS.len())];
    let (ca, cb) = (capital(a), capital(b));
    match rng.u8(..3) {
        0 => vec![
            format!("/// Returns the {a} for `{b}`, or an error when the {b} is unknown or expired."),
            format!("pub fn {a}_for_{b}(&self, {b}: &{cb}Id) -> Result<{ca}, Error> {{"),
            format!("    let entry = self.{b}s.get({b}).ok_or(Error::Unknown{cb}(*{b}))?;"),
            format!("    if entry.{a}.is_expired(Instant::now()) {{"),
            format!("        return Err(Error::Expired {{ {b}: *{b}, at: entry.{a}.expires_at() }});"),
            "    }".into(),
            format!("    Ok(entry.{a}.clone())"),
            "}".into(),
            String::new(),
        ],
        1 => vec![
            "#[derive(Clone, Debug, Default, Serialize, Deserialize)]".into(),
            format!("pub struct {ca}{cb} {{"),
            format!("    /// How many {b}s one {a} may hold."),
            format!("    pub max_{b}s: usize,"),
            format!("    pub {a}_ttl: Duration,        // {} seconds by default", rng.u32(1..600)),
            "    #[serde(default)]".into(),
            format!("    pub labels: Vec<{ca}Label>,"),
            "}".into(),
            String::new(),
        ],
        _ => vec![
            "#[tokio::test]".into(),
            format!("async fn {a}_survives_a_{b}_restart() {{"),
            "    let harness = Harness::start().await;".into(),
            format!("    let first = harness.{a}(\"{b}-{}\").await.unwrap();", rng.u32(..1000)),
            format!("    harness.restart_{b}().await;"),
            format!("    assert_eq!(harness.{a}(\"{b}-{}\").await.unwrap(), first);", rng.u32(..1000)),
            "}".into(),
            String::new(),
        ],
    }
}

/// The lines of `FILES[file]` after `version` edits: the same bytes for the same version.
fn source(file: usize, version: u32) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(file as u64);
    let len = if file.is_multiple_of(4) { rng.usize(200..350) } else { rng.usize(40..160) };
    let mut lines = vec!["use std::collections::HashMap;".to_string(), String::new()];
    while lines.len() < len {
        lines.extend(code_block(&mut rng));
    }
    for v in 0..version {
        let mut edit = fastrand::Rng::with_seed(1_000 + file as u64 * 31 + u64::from(v));
        let at = edit.usize(..lines.len());
        lines.insert(at, format!("    // fixed in edit {v}: {}", WORDS[edit.usize(..WORDS.len())]));
    }
    lines
}

fn cargo_test(rng: &mut fastrand::Rng) -> String {
    let mut out = String::from(
        "\u{1b}[1m\u{1b}[32m   Compiling\u{1b}[0m ctxgate v0.1.0 (/work/app)\n\u{1b}[1m\u{1b}[33mwarning\
         \u{1b}[0m\u{1b}[1m: unused variable: `started`\u{1b}[0m\n  \u{1b}[1m\u{1b}[34m-->\u{1b}[0m \
         src/limiter.rs:88:13\n\u{1b}[1m\u{1b}[32m    Finished\u{1b}[0m `test` profile [unoptimized + \
         debuginfo] target(s) in 7.42s\n     Running unittests src/lib.rs \
         (target/debug/deps/ctxgate-3f2a9c1d0b7e6a45)\n\n",
    );
    let tests = if rng.u8(..6) == 0 { rng.usize(150..300) } else { rng.usize(10..40) };
    out.push_str(&format!("running {tests} tests\n"));
    let mut failed = Vec::new();
    for t in 0..tests {
        let name = format!("{}::tests::{}_{t}", WORDS[t % WORDS.len()], WORDS[rng.usize(..WORDS.len())]);
        if rng.u8(..40) == 0 {
            out.push_str(&format!("test {name} ... \u{1b}[31mFAILED\u{1b}[0m\n"));
            failed.push(name);
        } else {
            out.push_str(&format!("test {name} ... \u{1b}[32mok\u{1b}[0m\n"));
        }
    }
    for name in &failed {
        out.push_str(&format!(
            "\n---- {name} stdout ----\nthread '{name}' panicked at src/limiter.rs:{}:9:\n\
             assertion `left == right` failed\n  left: {}\n right: {}\n",
            rng.u32(10..400),
            rng.u32(..9),
            rng.u32(..9)
        ));
    }
    let result = if failed.is_empty() { "\u{1b}[32mok\u{1b}[0m" } else { "\u{1b}[31mFAILED\u{1b}[0m" };
    out.push_str(&format!(
        "\ntest result: {result}. {} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; \
         finished in {}.{:02}s\n",
        tests - failed.len(),
        failed.len(),
        rng.u32(..9),
        rng.u32(..100)
    ));
    out
}

fn base64(rng: &mut fastrand::Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len).map(|_| ALPHABET[rng.usize(..64)] as char).collect()
}

/// A seeded agent session, message by message.
struct Agent {
    rng: fastrand::Rng,
    versions: [u32; FILES.len()],
    calls: usize,
    messages: Vec<Value>,
}

impl Agent {
    /// One tool call: its name, its arguments and its result.
    fn call(&mut self) -> (String, String, String) {
        let rng = &mut self.rng;
        // Files are read far more often than the rest, and a few of them most of all.
        let file = if rng.bool() { rng.usize(..3) } else { rng.usize(..FILES.len()) };
        let path = FILES[file];
        match rng.u8(..40) {
            0..=15 => {
                // Half the reads are of a window of the file, as agents page through long ones.
                let lines = source(file, self.versions[file]);
                let (offset, limit) = if rng.bool() {
                    let offset = rng.usize(..lines.len() / 2);
                    (offset, rng.usize(30..80).min(lines.len() - offset))
                } else {
                    (0, lines.len())
                };
                let text: String = lines[offset..offset + limit]
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("{:>6}\t{l}\n", offset + i + 1))
                    .collect();
                let args = if offset == 0 && limit == lines.len() {
                    json!({"path": path})
                } else {
                    json!({"path": path, "offset": offset + 1, "limit": limit})
                };
                ("read_file".into(), args.to_string(), text)
            }
            16..=21 => ("run_tests".into(), json!({"command": "cargo test"}).to_string(), cargo_test(rng)),
            22..=28 => {
                let pattern = WORDS[rng.usize(..WORDS.len())];
                let hits: String = (0..rng.usize(3..40))
                    .map(|_| {
                        let f = rng.usize(..FILES.len());
                        let lines = source(f, self.versions[f]);
                        let n = rng.usize(..lines.len());
                        format!("{}:{}:{}\n", FILES[f], n + 1, lines[n])
                    })
                    .collect();
                ("grep".into(), json!({"pattern": pattern, "path": "."}).to_string(), hits)
            }
            29..=34 => {
                self.versions[file] += 1;
                let args = json!({"path": path, "old_string": "let cutoff = now - self.window;",
                    "new_string": "let cutoff = now.saturating_sub(self.window);"});
                let text = format!("Applied 1 edit to {path} (+1 -1).");
                ("edit_file".into(), args.to_string(), text)
            }
            35..=38 => {
                let changed: String = (0..FILES.len())
                    .filter(|&f| self.versions[f] > 0)
                    .map(|f| format!("\tmodified:   {}\n", FILES[f]))
                    .collect();
                let text = format!(
                    "On branch fix/limiter-window\nChanges not staged for commit:\n  (use \"git add \
                     <file>...\" to update what will be committed)\n{changed}\nno changes added to commit\n"
                );
                ("bash".into(), json!({"command": "git status"}).to_string(), text)
            }
            _ => {
                let len = rng.usize(1_500..5_000);
                let png = base64(rng, len);
                let text =
                    format!("Screenshot of http://localhost:3000/dashboard\ndata:image/png;base64,{png}");
                (
                    "take_screenshot".into(),
                    json!({"url": "http://localhost:3000/dashboard"}).to_string(),
                    text,
                )
            }
        }
    }

    /// One model step: an assistant message with its calls, then their results.
    fn step(&mut self) {
        let calls: Vec<_> = (0..self.rng.usize(1..=3)).map(|_| self.call()).collect();
        let mut tool_calls = Vec::new();
        let mut results = Vec::new();
        for (name, arguments, text) in calls {
            self.calls += 1;
            let id = format!("call_{:04}{}", self.calls, base64(&mut self.rng, 20).replace(['+', '/'], "x"));
            tool_calls.push(
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}),
            );
            results.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
        }
        let content =
            if self.rng.bool() { Value::Null } else { THOUGHTS[self.rng.usize(..THOUGHTS.len())].into() };
        self.messages.push(json!({"role": "assistant", "content": content, "tool_calls": tool_calls}));
        self.messages.extend(results);
    }
}

fn tools() -> Value {
    let tool = |name: &str, description: &str, properties: Value| {
        json!({"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "additionalProperties": false}}})
    };
    let path = json!({"path": {"type": "string", "description": "Path relative to the repository root."}});
    json!([
        tool("read_file", "Read a file of the repository, with line numbers.", path.clone()),
        tool(
            "grep",
            "Search the repository for a regular expression.",
            json!({"pattern": {"type": "string"}, "path": {"type": "string"}})
        ),
        tool(
            "edit_file",
            "Replace one exact string in a file.",
            json!({"path": {"type": "string"}, "old_string": {"type": "string"}, "new_string": {"type": "string"}})
        ),
        tool(
            "run_tests",
            "Run a test command and return its output.",
            json!({"command": {"type": "string"}})
        ),
        tool("bash", "Run a shell command in the repository.", json!({"command": {"type": "string"}})),
        tool("take_screenshot", "Screenshot a URL, as a base64 PNG.", json!({"url": {"type": "string"}})),
    ])
}

/// A request body and its messages, as the server would have them.
struct Conversation {
    body: Vec<u8>,
    messages: Vec<Box<RawValue>>,
    tools: Option<Box<RawValue>>,
}

/// The synthetic agent transcript, grown until its request is `TARGET_TOKENS` tokens.
fn transcript() -> Conversation {
    let counter = TokenCounter::new(Encoding::O200kBase);
    let tools = tools();
    let system = format!(
        "You are a coding agent working in a Rust repository. Use the tools to read, search, edit and \
         test. Keep changes minimal and explain them.\n\n{}",
        source(7, 0).join("\n")
    );
    let mut agent = Agent {
        rng: fastrand::Rng::with_seed(42),
        versions: [0; FILES.len()],
        calls: 0,
        messages: vec![json!({"role": "system", "content": system})],
    };
    let mut total = u64::from(counter.json(&tools.to_string()));
    let mut counted = 0;
    let mut steps = 0usize;
    while total < TARGET_TOKENS {
        if steps.is_multiple_of(6) {
            let ask = ASKS[(steps / 6) % ASKS.len()];
            // Now and then the user pastes a screenshot inline.
            let content = if steps.is_multiple_of(42) {
                format!("{ask}\n\n![dashboard](data:image/png;base64,{})", base64(&mut agent.rng, 3_000))
            } else {
                ask.to_string()
            };
            agent.messages.push(json!({"role": "user", "content": content}));
        }
        agent.step();
        steps += 1;
        for m in &agent.messages[counted..] {
            total += u64::from(counter.message(&m.to_string()));
        }
        counted = agent.messages.len();
    }
    let body = json!({"model": "gpt-4o-2024-08-06", "messages": agent.messages, "tools": tools,
        "tool_choice": "auto", "stream": true, "temperature": 0});
    let body = serde_json::to_vec(&body).unwrap();
    let messages = agent.messages.iter().map(|m| serde_json::value::to_raw_value(m).unwrap()).collect();
    let tools = ChatRequest::parse(body.clone().into()).unwrap().tools().map(ToOwned::to_owned);
    Conversation { tools, body, messages }
}

#[derive(Deserialize)]
struct BfclRecord {
    tools: Box<RawValue>,
    messages: Vec<Box<RawValue>>,
}

fn bfcl() -> Option<(PathBuf, Vec<Conversation>)> {
    let path = std::env::var_os("CTXGATE_BFCL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("loadtests/kv-cache/.work/bfcl/long_context.jsonl")
    });
    let text = std::fs::read_to_string(&path).ok()?;
    let conversations = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let record: BfclRecord = serde_json::from_str(line).unwrap();
            Conversation { body: Vec::new(), messages: record.messages, tools: Some(record.tools) }
        })
        .collect();
    Some((path, conversations))
}

/// The rules policy under test: the defaults, a 200k window, every request compacted.
struct Pipeline {
    policy: Policy,
    rules: Rules,
}

impl Pipeline {
    fn new() -> Self {
        Self {
            policy: Policy { mode: CompressionMode::Rules, context_window: 200_000, ..Policy::default() },
            rules: Rules::new(&RulesConfig::default()),
        }
    }

    /// What a request pays: its messages analysed, the tools counted, the plan.
    fn run(&self, counter: &TokenCounter, conversation: &Conversation) -> Plan {
        let analysed = analyse(counter, &conversation.messages);
        let input = Input {
            messages: &conversation.messages,
            infos: &analysed.infos,
            tokens: &analysed.tokens,
            goal: None,
            fixed_tokens: fixed_tokens(counter, conversation.tools.as_deref(), None),
            policy: &self.policy,
            rules: &self.rules,
            counter,
            force: true,
            cold: false,
        };
        plan(&input, None, None)
    }
}

fn report(label: &str, before: u64, after: u64, stats: &RuleStats) {
    let saved: Vec<String> = Rule::ALL
        .iter()
        .map(|&r| (r, stats.get(r)))
        .filter(|&(_, s)| s > 0)
        .map(|(r, s)| format!("{}={s} ({:.1}%)", r.name(), 100.0 * s as f64 / before as f64))
        .collect();
    eprintln!(
        "{label}: tokens {before} -> {after} ({:.1}% saved); per rule: {}",
        100.0 * (before - after) as f64 / before as f64,
        saved.join(", ")
    );
}

fn rules_128k(c: &mut Criterion) {
    let pipeline = Pipeline::new();
    let conversation = transcript();
    let counter = TokenCounter::new(Encoding::O200kBase);
    let first = pipeline.run(&counter, &conversation);
    assert!(first.epoch.is_some());
    eprintln!(
        "rules/128k: {} messages, {} bytes of body, {} messages after",
        conversation.messages.len(),
        conversation.body.len(),
        first.messages.len()
    );
    report("rules/128k", first.tokens_before, first.tokens_after, &first.stats);
    // What the other rules do on their own: masking by age takes whole results first.
    let unmasked = Pipeline {
        rules: Rules::new(&RulesConfig { mask_old_tool_results: false, ..RulesConfig::default() }),
        ..Pipeline::new()
    };
    let alone = unmasked.run(&counter, &conversation);
    report("rules/128k without mask_old_tool_results", alone.tokens_before, alone.tokens_after, &alone.stats);
    let analysed = analyse(&counter, &conversation.messages);
    let fixed = fixed_tokens(&counter, conversation.tools.as_deref(), None);

    let mut group = c.benchmark_group("rules/128k");
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("warm", |b| b.iter(|| pipeline.run(&counter, black_box(&conversation))));
    group.bench_function("analyse", |b| b.iter(|| analyse(&counter, black_box(&conversation.messages))));
    group.bench_function("plan", |b| {
        b.iter(|| {
            let input = Input {
                messages: black_box(&conversation.messages),
                infos: &analysed.infos,
                tokens: &analysed.tokens,
                goal: None,
                fixed_tokens: fixed,
                policy: &pipeline.policy,
                rules: &pipeline.rules,
                counter: &counter,
                force: true,
                cold: false,
            };
            plan(&input, None, None)
        })
    });
    group.bench_function("cold", |b| {
        b.iter_batched(
            || TokenCounter::new(Encoding::O200kBase),
            // The counter is returned so that dropping its cache is not timed.
            |counter| {
                let plan = pipeline.run(&counter, black_box(&conversation));
                (counter, plan)
            },
            BatchSize::PerIteration,
        )
    });
    // The tokeniser alone, both libraries side by side on the same text: most of what `cold`
    // pays over `warm`.
    let body = std::str::from_utf8(&conversation.body).unwrap();
    group.bench_function("count/tiktoken-rs", |b| {
        b.iter(|| tiktoken_rs::o200k_base_singleton().encode_ordinary(black_box(body)).len())
    });
    group.bench_function("count/bpe-openai", |b| b.iter(|| bpe_openai::o200k_base().count(black_box(body))));
    // One long text as a message holds it (its contents unescaped, so with real line ends: a
    // pasted log, one huge tool output), counted by the library on one thread and by the
    // gateway's counter, which cuts a text over 32 KB into pieces counted on every core.
    let contents: String = conversation
        .messages
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(m.get()).ok())
        .filter_map(|m| m["content"].as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n");
    group.bench_function("count/one-text/bpe-openai", |b| {
        b.iter(|| bpe_openai::o200k_base().count(black_box(contents.as_str())))
    });
    group.bench_function("count/one-text/ctxgate", |b| {
        b.iter_batched(
            || TokenCounter::new(Encoding::O200kBase),
            |counter| counter.text(black_box(&contents)),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("rebuild", |b| {
        let request = ChatRequest::parse(conversation.body.clone().into()).unwrap();
        b.iter_batched(
            || first.messages.clone(),
            |messages| request.rebuild(black_box(messages), None, None).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The 128k transcript as Responses items (what a client sends a Responses upstream): a
/// message per text, a `function_call` per call, a `function_call_output` per result.
fn as_items(messages: &[Box<RawValue>]) -> Vec<Value> {
    let mut items = Vec::new();
    for raw in messages.iter().skip(1) {
        let m: Value = serde_json::from_str(raw.get()).unwrap();
        match m["role"].as_str() {
            Some("tool") => items.push(
                json!({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]}),
            ),
            Some("assistant") => {
                if let Some(text) = m["content"].as_str() {
                    items.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}));
                }
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    items.push(json!({"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
                                      "arguments": call["function"]["arguments"]}));
                }
            }
            _ => items.push(json!({"type": "message", "role": "user", "content": m["content"]})),
        }
    }
    items
}

/// A Responses request to an upstream with the Responses API pays this on top of the rules: its
/// items mapped to the compressor's messages, and the compressed messages back to items.
fn responses_items_128k(c: &mut Criterion) {
    let conversation = transcript();
    let items = as_items(&conversation.messages);
    let instructions =
        serde_json::from_str::<Value>(conversation.messages[0].get()).unwrap()["content"].clone();
    let instructions = instructions.as_str().map(str::to_string);
    let mapped = items::map(instructions.as_deref(), items.clone()).unwrap();
    let plan = Pipeline::new().run(
        &TokenCounter::new(Encoding::O200kBase),
        &Conversation {
            body: Vec::new(),
            messages: mapped.messages.clone(),
            tools: conversation.tools.clone(),
        },
    );
    eprintln!(
        "responses/items/128k: {} items, {} messages after compression",
        items.len(),
        plan.messages.len()
    );
    let mut group = c.benchmark_group("responses/items/128k");
    group.bench_function("map", |b| {
        b.iter_batched(
            || items.clone(),
            |items| items::map(instructions.as_deref(), black_box(items)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("rebuild", |b| b.iter(|| mapped.rebuild(black_box(&plan.messages))));
    group.finish();
}

fn rules_bfcl(c: &mut Criterion) {
    let Some((path, conversations)) = bfcl() else {
        eprintln!(
            "rules/bfcl_long_context: skipped, no BFCL file (set CTXGATE_BFCL or run \
             loadtests/kv-cache/setup.sh to write loadtests/kv-cache/.work/bfcl/long_context.jsonl)"
        );
        return;
    };
    let pipeline = Pipeline::new();
    let counter = TokenCounter::new(Encoding::O200kBase);
    let (mut before, mut after, mut compacted, mut stats) = (0, 0, 0, RuleStats::default());
    let mut largest = 0;
    for conversation in &conversations {
        let plan = pipeline.run(&counter, conversation);
        before += plan.tokens_before;
        after += plan.tokens_after;
        largest = largest.max(plan.tokens_before);
        compacted += usize::from(plan.epoch.is_some());
        stats.merge(&plan.stats);
    }
    let messages: usize = conversations.iter().map(|c| c.messages.len()).sum();
    eprintln!(
        "rules/bfcl_long_context: {} conversations from {}, {messages} messages, {compacted} compacted, \
         mean {} tokens, largest {largest}",
        conversations.len(),
        path.display(),
        before / conversations.len().max(1) as u64,
    );
    report("rules/bfcl_long_context", before, after, &stats);

    let mut group = c.benchmark_group("rules");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(conversations.len() as u64));
    group.bench_function("bfcl_long_context", |b| {
        b.iter(|| {
            for conversation in &conversations {
                black_box(pipeline.run(&counter, black_box(conversation)));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    targets = rules_128k, responses_items_128k, rules_bfcl
}
criterion_main!(benches);
