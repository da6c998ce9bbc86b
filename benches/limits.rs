//! What gateway keys and per-key limits cost a request, piece by piece:
//!
//! Each iteration is one `block_on` on a 2-thread runtime, whose own cost (a few µs) is in every
//! async row; `count_prompt_tokens` is synchronous.
//!
//! - `auth/lookup`: SHA-256 of the presented key and the lookup among 100 configured keys.
//! - `auth/admit_local`: the in-process request cell (GCRA) and in-flight slot of a key that
//!   is never over its limits.
//! - `auth/admit_redis`: the same through the shared limiter: the local pre-check plus one Lua
//!   GCRA script on a private `redis-server` (one loopback round trip).
//! - `auth/charge_tokens_local` / `_redis`: a token charge, and its correction when dropped
//!   (the whole charge given back; in Redis the correction is a second script, spawned).
//! - `auth/count_prompt_tokens`: the estimate of a 20-message request with `tools`, already
//!   parsed (the pipeline parses once), warm (a session's messages are counted once, then
//!   cached).
//!
//! `cargo bench --bench limits`; `cargo test --benches` runs each once as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/redis_child.rs"]
mod redis_child;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use ctxgate::auth::{count_prompt_tokens, hash_key, KeyPolicy, KeyRing, Limiter};
use ctxgate::config::{AuthConfig, Encoding, KeyConfig};
use ctxgate::openai::{ChatRequest, Usage, UsageObserver};
use ctxgate::telemetry::Metrics;
use ctxgate::tokens::TokenCounter;
use redis_child::RedisChild;
use serde_json::json;

fn key(i: usize) -> KeyConfig {
    KeyConfig {
        name: format!("team-{i}"),
        sha256: hash_key(format!("sk-team-{i}-secret").as_bytes()),
        models: vec!["gpt-4o*".into()],
        // Far above what the bench sends: every check admits.
        requests_per_minute: NonZeroU32::new(u32::MAX / 2),
        burst: None,
        tokens_per_minute: NonZeroU32::new(u32::MAX / 2),
        max_concurrent: NonZeroU32::new(1024),
    }
}

fn request_body() -> Bytes {
    let mut messages = vec![json!({"role": "system", "content": "You are a careful coding agent."})];
    for turn in 0..19 {
        messages.push(json!({
            "role": if turn % 2 == 0 { "user" } else { "assistant" },
            "content": format!("turn {turn}: please look at src/auth/limits.rs and explain the GCRA cell; ").repeat(8),
        }));
    }
    let tools: Vec<_> = (0..8)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"), "description": "Reads a file.",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}})
        })
        .collect();
    Bytes::from(json!({"model": "gpt-4o", "messages": messages, "tools": tools}).to_string())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let redis = RedisChild::start();
    let conn = rt.block_on(ctxgate::redis_conn::connect(&redis.url(), Duration::from_secs(1))).unwrap();
    let metrics = Arc::new(Metrics::new());
    let keys: Vec<KeyConfig> = (0..100).map(key).collect();
    let ring = KeyRing::new(&AuthConfig { keys: keys.clone(), ..AuthConfig::default() }, None).unwrap();
    let policy = Arc::new(KeyPolicy::from_config(&keys[42]).unwrap());
    let local = Arc::new(Limiter::new(None, metrics.clone()));
    let shared = Arc::new(Limiter::new(
        Some((conn, "ctxgate-bench:".into(), Duration::from_secs(1))),
        metrics.clone(),
    ));
    let body = request_body();
    // The pipeline parses a request once; the count reads the parsed messages.
    let request = ChatRequest::parse(body.clone()).unwrap();
    let counter = TokenCounter::new(Encoding::O200kBase);
    // The upstream reports nothing used: every charge is given back in full when dropped, so
    // the key never runs dry and each iteration pays for the charge and its correction.
    let usage = Usage { prompt_tokens: 0, completion_tokens: 0, prompt_tokens_details: None };
    println!("request body {} B, estimate {} tokens", body.len(), count_prompt_tokens(&counter, &request));

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let mut group = c.benchmark_group("auth");
    group.bench_function("lookup", |b| {
        b.iter(|| rt.block_on(async { black_box(ring.lookup(b"sk-team-42-secret").await.unwrap()) }))
    });
    for (name, limiter) in [("local", &local), ("redis", &shared)] {
        group.bench_function(format!("admit_{name}"), |b| {
            b.iter(|| rt.block_on(async { black_box(limiter.admit(&policy).await.unwrap()) }))
        });
        group.bench_function(format!("charge_tokens_{name}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let charge = limiter.charge_tokens(&policy, 1000).await.unwrap().unwrap();
                    charge.record(&usage);
                    // Dropping corrects the charge: −1000 tokens (in Redis, a second script call
                    // spawned in the background).
                    drop(charge);
                })
            })
        });
    }
    group.bench_function("count_prompt_tokens", |b| {
        b.iter(|| black_box(count_prompt_tokens(&counter, &request)))
    });
    group.finish();
    c.final_summary();
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(redis);
}
