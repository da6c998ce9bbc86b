//! What a session costs: the checkpoint store operations every chat request on a session pays
//! (one `load` and two `commit`s: admit, then the answer), and the latency the whole session path
//! adds to a request end to end. Sessions are on by default and run on every turn of a long agent
//! conversation, so this is the cost that must stay small next to an LLM call.
//!
//! Both stores are measured: the embedded redb file (durable commit, so it includes an fsync, in
//! a tempdir) and Redis (a private `redis-server` child on a free ephemeral loopback port, no
//! persistence, killed at the end; never 6379).
//!
//! 1. Criterion group `checkpoint`: `load` and `commit` of checkpoints of 10, 100 and 500 turns.
//!    A turn is two messages of 300–800 bytes of JSON each: a user (or, after a tool call, a
//!    `tool`) message and an assistant message, one assistant message in four carrying
//!    `tool_calls`. Each commit passes the version the previous one returned, so every
//!    iteration is a successful compare-and-set. Throughput is the checkpoint's JSON size.
//! 2. `commit_percentiles` (printed after criterion): 2,000 sequential commits of a 100-turn
//!    checkpoint per store, after 200 unmeasured warm-up commits; p50/p90/p99/max in µs,
//!    against the target "commit p99 ≤ 2 ms for a 100-turn session on Redis".
//! 3. `e2e_added_latency` (printed last): mock-upstream and ctxgate in-process, a keep-alive
//!    reqwest client sending 1,000 non-streamed chat requests without a session and 1,000 with
//!    `x-session-id` in append mode, in alternating blocks of 50 (ABBA order) to spread drift
//!    over both variants. A fresh session starts every 100 session requests, so the stored
//!    transcript (and the history spliced into the upstream body) stays bounded at 200
//!    messages. Added latency is session minus no-session, per percentile; target: added p50
//!    ≤ 1 ms.
//!
//! `cargo bench --bench session` runs everything (about a minute on 2 cores, after compiling). A filter
//! argument selects criterion benchmarks as usual and also the two printed passes by name
//! (`commit_percentiles`, `e2e_added_latency`). Without `--bench` (e.g. `cargo test --benches`)
//! each part runs once at a tiny size as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/redis_child.rs"]
mod redis_child;

use criterion::{BenchmarkId, Criterion, Throughput};
use ctxgate::config::{Config, UpstreamConfig};
use ctxgate::session::checkpoint::now_ms;
use ctxgate::session::embedded::EmbeddedStore;
use ctxgate::session::redis::RedisStore;
use ctxgate::session::{Checkpoint, Commit, GoalLock, SessionKey, SessionStore, UsageTotals};
use ctxgate::AppState;
use redis_child::RedisChild;
use serde_json::json;
use serde_json::value::RawValue;

const TURN_COUNTS: [usize; 3] = [10, 100, 500];
const CREDENTIAL: &[u8] = b"Bearer sk-bench-client";
const TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

// === realistic transcripts ===

/// Words for message prose, separated by single spaces.
const WORDS: &str = "the session store commits checkpoint after each turn so a client that disconnects \
    loses nothing; `load` returns version and document, while `commit` compares it atomically. redb \
    fsyncs on Redis runs Lua script with TTL refresh. naïve retries double-write — so we keep \
    compare-and-set semantics (see RFC 7231) instead.";

const TOOLS: [&str; 4] = ["read_file", "search_code", "run_tests", "apply_patch"];

/// Prose of at least `len` bytes: words, some newlines, now and then a fenced code block with
/// quotes and backslashes, so serialisation has escapes to do as in real conversations.
fn prose(rng: &mut fastrand::Rng, len: usize) -> String {
    let words: Vec<&str> = WORDS.split(' ').collect();
    let mut out = String::with_capacity(len + 64);
    while out.len() < len {
        match rng.u8(..40) {
            0 => {
                out.push_str("\n\n```rust\nlet key = format!(\"{}:{}\", scope, id); // \"quoted\" \\n\n```\n")
            }
            1..=3 => out.push_str(".\n"),
            _ => {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push(' ');
                }
                out.push_str(words[rng.usize(..words.len())]);
            }
        }
    }
    out
}

fn raw(value: &serde_json::Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).unwrap()
}

/// The text of a message of `target` (a random length in the range) bytes of JSON; `envelope` is the JSON around the text.
fn sized(rng: &mut fastrand::Rng, target: std::ops::RangeInclusive<usize>, envelope: usize) -> String {
    let target = rng.usize(target);
    prose(rng, target.saturating_sub(envelope).max(40))
}

/// `turns` turns of two messages each, deterministic for a given count.
fn transcript(turns: usize) -> Vec<Box<RawValue>> {
    let mut rng = fastrand::Rng::with_seed(0x5e55_1014 + turns as u64);
    let mut messages = Vec::with_capacity(turns * 2);
    let mut pending_call: Option<String> = None;
    for turn in 0..turns {
        let first = match pending_call.take() {
            Some(call_id) => {
                let content = sized(&mut rng, 300..=800, 70);
                json!({"role": "tool", "tool_call_id": call_id, "content": content})
            }
            None => json!({"role": "user", "content": sized(&mut rng, 300..=800, 35)}),
        };
        messages.push(raw(&first));
        let second = if turn % 4 == 3 {
            let call_id = format!("call_{:024x}", rng.u128(..));
            let tool = TOOLS[rng.usize(..TOOLS.len())];
            let arguments = json!({
                "path": format!("src/session/{}.rs", ["store", "redis", "embedded"][rng.usize(..3)]),
                "reason": sized(&mut rng, 150..=400, 0),
            })
            .to_string();
            let content = sized(&mut rng, 100..=250, 0);
            pending_call = Some(call_id.clone());
            json!({
                "role": "assistant",
                "content": content,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": tool, "arguments": arguments}}],
            })
        } else {
            json!({"role": "assistant", "content": sized(&mut rng, 300..=800, 40), "refusal": null})
        };
        messages.push(raw(&second));
    }
    messages
}

fn checkpoint(turns: usize) -> Checkpoint {
    let now = now_ms();
    let mut cp = Checkpoint::new(now);
    cp.transcript = transcript(turns);
    // Through serde, so fields added to the goal lock later (all defaulted) need no edit here.
    cp.goal = Some(
        serde_json::from_value::<GoalLock>(json!({
            "goal": "Make session commits atomic across replicas",
            "strategy": "compare-and-set on a version",
            "constraints": ["no new dependencies", "keep the schema-1 fixture loading"],
            "locked_ms": now,
        }))
        .unwrap(),
    );
    let t = turns as u64;
    cp.usage = UsageTotals {
        requests: t,
        prompt_tokens: t * t * 150,
        completion_tokens: t * 160,
        cached_tokens: t * t * 120,
    };
    cp
}

// === stores ===

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Both stores, named; the tempdir holds the redb file.
fn open_stores(
    rt: &tokio::runtime::Runtime,
    redis: &RedisChild,
    dir: &tempfile::TempDir,
) -> Vec<(&'static str, Arc<dyn SessionStore>)> {
    let embedded = EmbeddedStore::open(&dir.path().join("bench.redb"), TTL).unwrap();
    let redis = rt.block_on(RedisStore::connect(&redis.url(), "ctxgate-bench:", TTL, STORE_TIMEOUT)).unwrap();
    vec![("embedded", Arc::new(embedded)), ("redis", Arc::new(redis))]
}

async fn commit_ok(store: &dyn SessionStore, key: &SessionKey, version: u64, cp: &Checkpoint) -> u64 {
    match store.commit(key, version, &cp.encode()).await.unwrap() {
        Commit::Committed(v) => v,
        Commit::Conflict(v) => panic!("commit at {version} conflicted: the session is at {v}"),
    }
}

// === 1. criterion: load and commit ===

fn checkpoint_group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    stores: &[(&str, Arc<dyn SessionStore>)],
) {
    let mut group = c.benchmark_group("checkpoint");
    for turns in TURN_COUNTS {
        let cp = Arc::new(checkpoint(turns));
        let bytes = cp.to_bytes().len();
        group.throughput(Throughput::Bytes(bytes as u64));
        for (name, store) in stores {
            let key = SessionKey::new(CREDENTIAL, &format!("criterion-{turns}"));
            let mut version = rt.block_on(async {
                let _ = store.delete(&key).await.unwrap();
                commit_ok(store.as_ref(), &key, 0, &cp).await
            });
            let loaded = rt.block_on(store.load(&key)).unwrap().unwrap();
            assert_eq!((loaded.version, loaded.checkpoint.transcript.len()), (version, turns * 2));

            group.bench_function(BenchmarkId::new(format!("{name}_load"), turns), |b| {
                b.iter_custom(|iters| {
                    let (store, key) = (store.clone(), key.clone());
                    // On a worker thread, as a request's task would run it.
                    rt.block_on(rt.spawn(async move {
                        let started = Instant::now();
                        for _ in 0..iters {
                            black_box(store.load(&key).await.unwrap());
                        }
                        started.elapsed()
                    }))
                    .unwrap()
                })
            });
            group.bench_function(BenchmarkId::new(format!("{name}_commit"), turns), |b| {
                b.iter_custom(|iters| {
                    let (store, key, cp, from) = (store.clone(), key.clone(), cp.clone(), version);
                    let (elapsed, to) = rt
                        .block_on(rt.spawn(async move {
                            let mut version = from;
                            let started = Instant::now();
                            for _ in 0..iters {
                                version = commit_ok(store.as_ref(), &key, version, &cp).await;
                            }
                            (started.elapsed(), version)
                        }))
                        .unwrap();
                    version = to;
                    elapsed
                })
            });
        }
    }
    group.finish();
}

// === 2. commit percentiles ===

struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    Percentiles { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: samples[samples.len() - 1] }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn commit_percentiles(
    rt: &tokio::runtime::Runtime,
    stores: &[(&str, Arc<dyn SessionStore>)],
    warmup: usize,
    commits: usize,
) {
    let cp = Arc::new(checkpoint(100));
    let bytes = cp.to_bytes().len();
    println!("\n### commit_percentiles: {commits} sequential commits of a 100-turn checkpoint ({bytes} B), after {warmup} warm-up commits\n");
    println!("| store | p50 µs | p90 µs | p99 µs | max µs | p99 ≤ 2 ms |");
    println!("|---|---:|---:|---:|---:|---|");
    for (name, store) in stores {
        let (store, cp) = (store.clone(), cp.clone());
        let mut samples = rt
            .block_on(rt.spawn(async move {
                let key = SessionKey::new(CREDENTIAL, "percentiles");
                let _ = store.delete(&key).await.unwrap();
                let mut version = 0;
                for _ in 0..warmup {
                    version = commit_ok(store.as_ref(), &key, version, &cp).await;
                }
                let mut samples = Vec::with_capacity(commits);
                for _ in 0..commits {
                    let started = Instant::now();
                    version = commit_ok(store.as_ref(), &key, version, &cp).await;
                    samples.push(started.elapsed());
                }
                samples
            }))
            .unwrap();
        let p = percentiles(&mut samples);
        let ok = if p.p99 <= Duration::from_millis(2) { "yes" } else { "no" };
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {ok} |",
            us(p.p50),
            us(p.p90),
            us(p.p99),
            us(p.max)
        );
    }
}

// === 3. end-to-end added latency ===

/// A gateway in front of a default-mode mock upstream, with `store` as its session store.
struct Gateway {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _upstream: mock_upstream::Server,
}

async fn start_gateway(store: String) -> Gateway {
    let upstream = mock_upstream::Server::builder().record(false).start().await.unwrap();
    let mut config = Config::default();
    config.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstreams = vec![UpstreamConfig {
        name: "mock".into(),
        base_url: upstream.base_url(),
        first_byte_timeout: Duration::from_secs(10),
        ..UpstreamConfig::default()
    }];
    config.sessions.store = store;
    config.sessions.key_prefix = "ctxgate-bench-e2e:".into();
    let env = std::collections::BTreeMap::<String, String>::new();
    let state = AppState::new(config.validated(&env).unwrap(), &env).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ctxgate::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Gateway { url, shutdown: Some(tx), task, _upstream: upstream }
}

impl Gateway {
    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// How the e2e pass is sized.
#[derive(Clone, Copy)]
struct E2eSize {
    warmup: usize,
    per_variant: usize,
    block: usize,
    session_len: usize,
}

struct E2eRun {
    plain: Vec<Duration>,
    session: Vec<Duration>,
}

/// Session ids for append-mode requests: a new session every `len` requests, each request
/// paired with the version it must commit at (admit and answer commit once each: 2n after the
/// n-th turn).
struct Sessions {
    prefix: String,
    len: usize,
    sent: usize,
}

impl Sessions {
    fn new(kind: &str, label: &str, nonce: &str, len: usize) -> Self {
        Self { prefix: format!("{kind}-{label}-{nonce}"), len, sent: 0 }
    }

    fn next(&mut self) -> (String, u64) {
        let n = self.sent;
        self.sent += 1;
        (format!("{}-{}", self.prefix, n / self.len), 2 * (n % self.len + 1) as u64)
    }
}

async fn e2e_run(store: String, label: &'static str, size: E2eSize) -> E2eRun {
    let gateway = start_gateway(store).await;
    let client = reqwest::Client::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let user_texts: Vec<String> = (0..64).map(|_| sized(&mut rng, 300..=800, 0)).collect();
    let nonce = format!("{:08x}", fastrand::u32(..));

    let send = |text: &str, session: Option<(String, u64)>| {
        let mut request = client
            .post(&gateway.url)
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-bench-client");
        let body = match &session {
            Some((id, _)) => {
                request = request.header("x-session-id", id).header("x-session-mode", "append");
                json!({"model": "mock-model", "messages": [{"role": "user", "content": text}]})
            }
            None => json!({"model": "mock-model", "messages": [
                {"role": "system", "content": "You are a careful senior Rust reviewer."},
                {"role": "user", "content": text},
            ]}),
        };
        let request = request.body(body.to_string());
        async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            let status = response.status();
            let version = response.headers().get("x-ctxgate-session-version").cloned();
            let body = response.bytes().await.unwrap();
            let elapsed = started.elapsed();
            let text = String::from_utf8_lossy(&body);
            assert!(status.is_success() && text.contains(r#""chat.completion""#), "{status}: {text}");
            if let Some((id, expected)) = session {
                let version = version.unwrap_or_else(|| panic!("no session version on {id}"));
                assert_eq!(version.to_str().unwrap(), expected.to_string(), "session {id}");
            }
            elapsed
        }
    };

    let mut warm = Sessions::new("warm", label, &nonce, size.session_len);
    for i in 0..size.warmup {
        send(&user_texts[i % 64], None).await;
        send(&user_texts[i % 64], Some(warm.next())).await;
    }

    let mut sessions = Sessions::new("bench", label, &nonce, size.session_len);
    let mut run = E2eRun { plain: Vec::new(), session: Vec::new() };
    let blocks = size.per_variant / size.block;
    for b in 0..blocks {
        // ABBA: alternate which variant goes first, so slow drift hits both alike.
        let session_first = b % 2 == 1;
        for pass in 0..2 {
            let with_session = (pass == 0) == session_first;
            for i in 0..size.block {
                let text = &user_texts[(b * size.block + i) % 64];
                if with_session {
                    run.session.push(send(text, Some(sessions.next())).await);
                } else {
                    run.plain.push(send(text, None).await);
                }
            }
        }
    }
    gateway.stop().await;
    run
}

fn e2e_added_latency(rt: &tokio::runtime::Runtime, redis: &RedisChild, size: E2eSize) {
    let dir = tempfile::tempdir().unwrap();
    let stores =
        [("embedded", format!("embedded:{}", dir.path().join("s.redb").display())), ("redis", redis.url())];
    println!(
        "\n### e2e_added_latency: {} sequential non-streamed chat requests per variant, blocks of {}, \
         append-mode session reset every {} requests; ms\n",
        size.per_variant, size.block, size.session_len
    );
    println!("| store | no-session p50 | no-session p99 | session p50 | session p99 | added p50 | added p99 | added p50 ≤ 1 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (label, store) in stores {
        let mut run = rt.block_on(rt.spawn(e2e_run(store, label, size))).unwrap();
        let plain = percentiles(&mut run.plain);
        let session = percentiles(&mut run.session);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let added_p50 = ms(session.p50) - ms(plain.p50);
        let added_p99 = ms(session.p99) - ms(plain.p99);
        let ok = if added_p50 <= 1.0 { "yes" } else { "no" };
        println!(
            "| {label} | {:.3} | {:.3} | {:.3} | {:.3} | {added_p50:+.3} | {added_p99:+.3} | {ok} |",
            ms(plain.p50),
            ms(plain.p99),
            ms(session.p50),
            ms(session.p99),
        );
    }
}

// === main ===

/// Criterion options that take a value, so the value is not mistaken for a filter.
const VALUE_OPTIONS: [&str; 18] = [
    "--color",
    "-c",
    "--save-baseline",
    "-s",
    "--baseline",
    "-b",
    "--baseline-lenient",
    "--load-baseline",
    "--profile-time",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

/// Whether a printed pass is selected: no filter given, or the filter is part of its name.
fn selected(args: &[String], pass: &str) -> bool {
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    let mut filters = Vec::new();
    let mut skip = false;
    for arg in args.iter().skip(1) {
        if skip {
            skip = false;
        } else if VALUE_OPTIONS.contains(&arg.as_str()) {
            skip = true;
        } else if !arg.starts_with('-') {
            filters.push(arg.as_str());
        }
    }
    filters.is_empty() || filters.iter().any(|f| pass.contains(f))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) is a smoke test.
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");

    let rt = runtime();
    let redis = RedisChild::start();
    let dir = tempfile::tempdir().unwrap();
    let stores = open_stores(&rt, &redis, &dir);

    if full {
        for turns in TURN_COUNTS {
            let cp = checkpoint(turns);
            let sizes: Vec<usize> = cp.transcript.iter().map(|m| m.get().len()).collect();
            println!(
                "checkpoint of {turns} turns: {} B; messages {}..{} B, mean {} B",
                cp.to_bytes().len(),
                sizes.iter().min().unwrap(),
                sizes.iter().max().unwrap(),
                sizes.iter().sum::<usize>() / sizes.len()
            );
        }
    }

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    checkpoint_group(&mut criterion, &rt, &stores);
    criterion.final_summary();

    if selected(&args, "commit_percentiles") {
        let (warmup, commits) = if full { (200, 2_000) } else { (5, 20) };
        commit_percentiles(&rt, &stores, warmup, commits);
    }
    if selected(&args, "e2e_added_latency") {
        let size = if full {
            E2eSize { warmup: 100, per_variant: 1_000, block: 50, session_len: 100 }
        } else {
            E2eSize { warmup: 2, per_variant: 10, block: 5, session_len: 10 }
        };
        e2e_added_latency(&rt, &redis, size);
    }

    drop(stores);
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(redis);
}
