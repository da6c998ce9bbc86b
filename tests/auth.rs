//! Gateway keys through the real gateway: 401/403/429 in the OpenAI shape, the key never
//! reaching the upstream, token charges corrected by `usage`, sessions scoped by key, and keys
//! held in a real redis-server changing without a restart.
#![allow(clippy::unwrap_used)]

mod support;

use std::num::NonZeroU32;
use std::time::Duration;

use ctxgate::auth::hash_key;
use ctxgate::config::{Config, KeyConfig};
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{chat_body, fixtures, key, Harness, Reply};

const TEAM_A: &str = "sk-team-a-secret";
const TEAM_B: &str = "sk-team-b-secret";

fn n(v: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(v)
}

/// Two keys: team-a (with `a`'s changes) and team-b, which may only call `gpt-4o*`.
fn keys(a: impl FnOnce(&mut KeyConfig) + Send + 'static) -> impl FnOnce(&mut Config) + Send + 'static {
    move |config: &mut Config| {
        let mut team_a = key("team-a", TEAM_A);
        a(&mut team_a);
        let mut team_b = key("team-b", TEAM_B);
        team_b.models = vec!["gpt-4o*".into()];
        config.auth.keys = vec![team_a, team_b];
        // The mock takes no credential.
        config.upstreams.iter_mut().for_each(|u| u.keyless = true);
    }
}

fn chat_as(h: &Harness, raw: &str) -> reqwest::RequestBuilder {
    h.client.post(h.v1("/chat/completions")).bearer_auth(raw).json(&chat_body(false))
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_and_probes_stay_open() {
    let h = Harness::builder().config(keys(|_| {})).start().await;
    let (status, body) =
        error_of(h.client.post(h.v1("/chat/completions")).json(&chat_body(false)).send().await.unwrap())
            .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = error_of(chat_as(&h, "sk-nope").send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains("sk-nope"), "the key is echoed: {body}");
    let (status, _) = error_of(h.client.get(h.v1("/models")).send().await.unwrap()).await;
    assert_eq!(status, 401);
    let (status, _) = error_of(h.client.get(h.v1("/sessions/s1")).send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert!(h.upstream(0).requests().is_empty(), "a refused request reached the upstream");
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let status = h.client.get(format!("{}{probe}", h.url)).send().await.unwrap().status();
        assert_eq!(status, 200, "{probe}");
    }
    assert_eq!(h.metric("ctxgate_auth_failures_total{reason=\"missing\"}").await, 3.0);
    assert_eq!(h.metric("ctxgate_auth_failures_total{reason=\"unknown\"}").await, 1.0);
}

#[tokio::test]
async fn the_gateway_key_never_reaches_the_upstream() {
    let h = Harness::builder()
        .config(keys(|_| {}))
        .config(|c| c.upstreams[0].api_key_env = Some("UPSTREAM_KEY".into()))
        .start_with_env([("UPSTREAM_KEY", "sk-upstream")])
        .await;
    let response = chat_as(&h, TEAM_A).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let requests = h.upstream(0).requests();
    assert_eq!(requests[0].headers["authorization"], "Bearer sk-upstream");
    assert!(!format!("{:?}", requests[0].headers).contains(TEAM_A));

    // Without a key of its own, the upstream gets no Authorization at all.
    let open = Harness::builder().config(keys(|_| {})).start().await;
    assert_eq!(chat_as(&open, TEAM_A).send().await.unwrap().status(), 200);
    assert!(open.upstream(0).requests()[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn models_outside_a_keys_list_are_403() {
    let h = Harness::builder().config(keys(|_| {})).start().await;
    let (status, body) = error_of(chat_as(&h, TEAM_B).send().await.unwrap()).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "model_not_allowed");
    // Passed-through routes naming a model are checked too.
    let embeddings = h
        .client
        .post(h.v1("/embeddings"))
        .bearer_auth(TEAM_B)
        .json(&json!({"model": "text-embedding-3-small", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 403);
    let mut allowed = chat_body(false);
    allowed["model"] = "gpt-4o-mini".into();
    let response =
        h.client.post(h.v1("/chat/completions")).bearer_auth(TEAM_B).json(&allowed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h.upstream(0).requests().len(), 1);
    assert_eq!(h.metric("ctxgate_auth_failures_total{reason=\"model\"}").await, 2.0);
}

#[tokio::test]
async fn requests_over_the_rate_get_429_with_retry_after() {
    let h = Harness::builder()
        .config(keys(|a| {
            a.requests_per_minute = n(60);
            a.burst = n(2);
        }))
        .start()
        .await;
    for _ in 0..2 {
        assert_eq!(chat_as(&h, TEAM_A).send().await.unwrap().status(), 200);
    }
    let response = chat_as(&h, TEAM_A).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, body) = error_of(response).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(h.upstream(0).requests().len(), 2);
    // Another key has its own budget.
    let mut other = chat_body(false);
    other["model"] = "gpt-4o".into();
    let response =
        h.client.post(h.v1("/chat/completions")).bearer_auth(TEAM_B).json(&other).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h.metric("ctxgate_rate_limited_total{key=\"team-a\",limit=\"requests\"}").await, 1.0);
}

/// A request of about `words` prompt tokens.
fn long_chat(words: usize) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "word ".repeat(words)}]})
}

fn completion_with_usage(prompt: u64, completion: u64) -> Reply {
    let mut body = fixtures::completion("ok");
    body["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    Reply::json(200, body)
}

#[tokio::test]
async fn tokens_are_charged_before_the_call_and_corrected_by_usage() {
    let h = Harness::builder().config(keys(|a| a.tokens_per_minute = n(1000))).start().await;
    let send = |body: Value| h.client.post(h.v1("/chat/completions")).bearer_auth(TEAM_A).json(&body).send();

    // Larger than the whole budget: refused before the upstream sees it.
    let (status, body) = error_of(send(long_chat(1500)).await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "tokens");
    assert!(h.upstream(0).requests().is_empty());

    // ~600 counted, 15 used: once the response is over, the rest comes back, so a second one
    // fits (without the correction it would wait ~13 s for 220 tokens).
    h.upstream(0).push(completion_with_usage(10, 5));
    let first = send(long_chat(600)).await.unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        h.upstream(0).push(completion_with_usage(900, 50));
        let response = send(long_chat(600)).await.unwrap();
        if response.status() == 200 {
            response.bytes().await.unwrap();
            break;
        }
        assert_eq!(response.status(), 429);
        assert!(tokio::time::Instant::now() < deadline, "the first request's tokens never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // That one really used 950, more than estimated: once its charge is settled (15 + 950
    // tokens used in all), the budget is spent.
    let used = "ctxgate_rate_limit_tokens_total{key=\"team-a\",kind=\"used\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while h.metric(used).await < 965.0 {
        assert!(tokio::time::Instant::now() < deadline, "the second charge was never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = error_of(send(long_chat(100)).await.unwrap()).await;
    assert_eq!(status, 429);
    let estimated = h.metric("ctxgate_rate_limit_tokens_total{key=\"team-a\",kind=\"estimated\"}").await;
    assert!((1200.0..1300.0).contains(&estimated), "two ~600-token estimates, got {estimated}");
}

#[tokio::test]
async fn requests_in_flight_are_capped_per_key() {
    let gate = support::Gate::new();
    let h = Harness::builder()
        .upstream(mock_upstream::Server::builder().reply(Reply::sse(vec![
            support::Chunk::json(fixtures::content_chunk(0, "held")),
            support::Chunk::Wait(gate.clone()),
            support::Chunk::json(fixtures::finish_chunk("stop")),
            support::Chunk::done(),
        ])))
        .config(keys(|a| a.max_concurrent = n(1)))
        .start()
        .await;
    let held = h
        .client
        .post(h.v1("/chat/completions"))
        .bearer_auth(TEAM_A)
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let (status, body) = error_of(chat_as(&h, TEAM_A).send().await.unwrap()).await;
    assert_eq!(status, 429);
    assert!(body["error"]["message"].as_str().unwrap().contains("concurrent"), "{body}");
    gate.open();
    held.bytes().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let status = chat_as(&h, TEAM_A).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream's slot was never given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sessions_are_scoped_by_key() {
    let h = Harness::builder().config(keys(|b| b.models = Vec::new())).start().await;
    let response = chat_as(&h, TEAM_A).header("x-session-id", "shared-name").send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let get = |raw: &'static str| h.client.get(h.v1("/sessions/shared-name")).bearer_auth(raw).send();
    assert_eq!(get(TEAM_A).await.unwrap().status(), 200);
    let (status, body) = error_of(get(TEAM_B).await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "session_not_found");
}

/// Sends requests with `raw` until it is accepted (any status but 401) or refused (401), as
/// `accepted` says; the status that did it. Panics after `within`.
async fn accepted_within(h: &Harness, raw: &str, accepted: bool, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = chat_as(h, raw).send().await.unwrap().status().as_u16();
        if (status != 401) == accepted {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status}, expected accepted = {accepted}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keys_held_in_redis_change_without_a_restart() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let h = Harness::builder()
        .config(move |c| {
            c.sessions.store = url;
            c.auth.redis = true;
            c.upstreams[0].keyless = true;
            c.auth.cache_ttl = Duration::from_millis(200);
        })
        .start()
        .await;
    const DYNAMIC: &str = "sk-added-at-runtime";
    let hash = hash_key(DYNAMIC.as_bytes());
    assert_eq!(chat_as(&h, DYNAMIC).send().await.unwrap().status(), 401);

    let entry = json!({"name": "dyn", "requests_per_minute": 600, "burst": 1}).to_string();
    redis.command(&["HSET", "ctxgate:auth:keys", &hash, &entry]).await;
    // Each change takes effect within the cache TTL.
    let until = |accepted| accepted_within(&h, DYNAMIC, accepted, Duration::from_secs(3));
    assert_eq!(until(true).await, 200);
    // Its limits came from Redis too (burst 1, then one request per 100 ms), counted in the
    // same Redis under the key's hash tag.
    assert_eq!(chat_as(&h, DYNAMIC).send().await.unwrap().status(), 429);
    assert_eq!(redis.command(&["EXISTS", "ctxgate:rl:{dyn}:req"]).await, "1");

    // A malformed entry is refused, not trusted: the cached good one expires and is not renewed.
    redis.command(&["HSET", "ctxgate:auth:keys", &hash, r#"{"name":"dyn","rpm":5}"#]).await;
    until(false).await;
    redis.command(&["HSET", "ctxgate:auth:keys", &hash, &entry]).await;
    until(true).await;
    // Revoked.
    redis.command(&["HDEL", "ctxgate:auth:keys", &hash]).await;
    until(false).await;
}

/// An embeddings request naming `model`, with `words` words of input.
fn embeddings(model: &str, words: usize) -> String {
    json!({"model": model, "input": "word ".repeat(words)}).to_string()
}

#[tokio::test]
async fn passthrough_models_are_checked_whatever_the_framing() {
    // Given team-b, which may only use gpt-4o*
    let h = Harness::builder().config(keys(|_| {})).start().await;
    let post = || h.client.post(h.v1("/embeddings")).bearer_auth(TEAM_B);
    let forbidden = embeddings("text-embedding-3-small", 1);
    let chunked = |body: String| {
        let chunks: Vec<Result<String, std::io::Error>> =
            body.as_bytes().chunks(7).map(|c| Ok(String::from_utf8(c.to_vec()).unwrap())).collect();
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };

    // When a forbidden model comes chunked, untyped, as text/plain, or over 1 MiB
    let over_a_mib = embeddings("text-embedding-3-small", 300_000);
    assert!(over_a_mib.len() > 1024 * 1024);
    let attempts = [
        ("chunked", post().header("content-type", "application/json").body(chunked(forbidden.clone()))),
        ("no content-type", post().body(forbidden.clone())),
        ("text/plain", post().header("content-type", "text/plain").body(forbidden.clone())),
        ("over 1 MiB", post().header("content-type", "application/json").body(over_a_mib)),
        ("chunked, untyped", post().body(chunked(forbidden.clone()))),
    ];
    // Then each is a 403
    for (framing, request) in attempts {
        let (status, body) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, 403, "{framing}: {body}");
        assert_eq!(body["error"]["code"], "model_not_allowed", "{framing}");
    }

    // When the model key is repeated (an allowed one first), or the body is not JSON, or names
    // no model on a route that needs one
    let repeated = r#"{"model":"gpt-4o","input":"x","model":"text-embedding-3-small"}"#;
    let escaped = r#"{"model":"gpt-4o","input":"x","mod\u0065l":"text-embedding-3-small"}"#;
    let refused = [
        (repeated.to_string(), "duplicate_key"),
        (escaped.to_string(), "duplicate_key"),
        ("model=text-embedding-3-small&input=x".to_string(), "invalid_json"),
        (json!({"input": "x"}).to_string(), "missing_required_parameter"),
    ];
    // Then each is a clear 400
    for (body, code) in refused {
        let (status, error) = error_of(post().body(chunked(body.clone())).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}");
    }
    assert!(h.upstream(0).requests().is_empty(), "a refused body reached the upstream");

    // And an allowed model still passes, chunked and untyped
    let response = post().body(chunked(embeddings("gpt-4o-embed", 1))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h.upstream(0).requests().len(), 1);
}

#[tokio::test]
async fn a_forbidden_model_does_not_use_up_the_keys_rate() {
    // Given team-b (gpt-4o* only) with a burst of two requests
    let h = Harness::builder()
        .config(keys(|_| {}))
        .config(|c| {
            c.auth.keys[1].requests_per_minute = n(60);
            c.auth.keys[1].burst = n(2);
        })
        .start()
        .await;

    // When it asks several times for models it may not use, in chat and passed through
    for _ in 0..3 {
        let (status, _) = error_of(chat_as(&h, TEAM_B).send().await.unwrap()).await;
        assert_eq!(status, 403);
        let embeddings = h
            .client
            .post(h.v1("/embeddings"))
            .bearer_auth(TEAM_B)
            .header("content-type", "application/json")
            .body(embeddings("emb", 1));
        assert_eq!(embeddings.send().await.unwrap().status(), 403);
    }

    // Then its burst is still whole: two allowed requests pass, the third is over the rate
    let mut allowed = chat_body(false);
    allowed["model"] = "gpt-4o-mini".into();
    let send = || h.client.post(h.v1("/chat/completions")).bearer_auth(TEAM_B).json(&allowed).send();
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn passthrough_bodies_count_against_tokens_per_minute() {
    // Given team-a with 1000 tokens per minute
    let h = Harness::builder().config(keys(|a| a.tokens_per_minute = n(1000))).start().await;
    let send = |words| {
        h.client
            .post(h.v1("/embeddings"))
            .bearer_auth(TEAM_A)
            .header("content-type", "application/json")
            .body(embeddings("text-embedding-3-small", words))
            .send()
    };

    // When an embeddings input is larger than the whole budget
    let (status, body) = error_of(send(1500).await.unwrap()).await;

    // Then it is refused before the upstream sees it
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "tokens");
    assert!(h.upstream(0).requests().is_empty());

    // And a smaller one is charged its estimate, then corrected by the upstream's usage (3)
    let response = send(600).await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let estimated = h.metric("ctxgate_rate_limit_tokens_total{key=\"team-a\",kind=\"estimated\"}").await;
    assert!((600.0..700.0).contains(&estimated), "a ~600-token estimate, got {estimated}");
    let used = "ctxgate_rate_limit_tokens_total{key=\"team-a\",kind=\"used\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while h.metric(used).await < 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "the charge was never corrected by usage");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(send(600).await.unwrap().status(), 200, "the unused estimate came back");
}

/// A `multipart/form-data` body with these text fields and an audio file.
fn form(fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "ctxgate-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&[0x52, 0x49, 0x46, 0x46, 0x00, 0xff, 0x10]);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn multipart_forms_are_checked_for_their_model() {
    // Given team-b, which may only use gpt-4o*
    let h = Harness::builder().config(keys(|_| {})).start().await;
    let send = |(content_type, body): (String, Vec<u8>)| {
        h.client
            .post(h.v1("/audio/transcriptions"))
            .bearer_auth(TEAM_B)
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    // When a transcription names a forbidden model, repeats the field, or names none
    let (forbidden, _) = error_of(send(form(&[("model", "whisper-1")])).await.unwrap()).await;
    let (repeated, _) =
        error_of(send(form(&[("model", "gpt-4o-transcribe"), ("model", "whisper-1")])).await.unwrap()).await;
    let (missing, _) = error_of(send(form(&[("language", "en")])).await.unwrap()).await;

    // Then it is refused before the upstream sees it
    assert_eq!((forbidden, repeated, missing), (403, 400, 400));
    assert!(h.upstream(0).requests().is_empty());

    // And an allowed model goes through with the form as sent
    let allowed = form(&[("model", "gpt-4o-transcribe")]);
    let status = send(allowed.clone()).await.unwrap().status();
    assert_ne!(status, 403);
    assert_eq!(h.upstream(0).requests()[0].body, allowed.1);
}
