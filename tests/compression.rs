//! Context compression through the gateway: response headers, opt-out, the prefix-stable
//! layout over a long session, stateless conversations, and the hybrid state sheet written
//! by a (mock) upstream in the background, including when that upstream fails or is slow.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::Duration;

use ctxgate::config::{CompressionMode, Config, RulesConfig};
use mock_upstream::Server;
use serde_json::{json, Value};
use support::stores::{Store, StoreUrl};
use support::{fixtures, Harness, HarnessBuilder, Reply};

const INSTRUCTION_MARK: &str = "Write a state sheet of the conversation above";

fn policy(c: &mut Config, mode: CompressionMode, window: u64) {
    c.compression.policy.mode = mode;
    c.compression.policy.context_window = window;
    c.compression.policy.keep_recent_turns = 2;
}

/// Rules that cannot reach the target alone, so hybrid has to place a sheet.
fn weak_rules(c: &mut Config) {
    c.compression.policy.rules = RulesConfig { whitespace: true, ..RulesConfig::none() };
}

/// The `n`th model step of an agent: a tool call and a long, coloured result.
fn step(n: usize) -> [Value; 2] {
    let id = format!("call_{n}");
    let output: String =
        (0..60).map(|l| format!("\u{1b}[32mok\u{1b}[0m   step {n} line {l}:    value {}\n", l * n)).collect();
    [
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": "run", "arguments": format!("{{\"n\":{n}}}")}}
        ]}),
        json!({"role": "tool", "tool_call_id": id, "content": output}),
    ]
}

fn conversation(steps: usize) -> Vec<Value> {
    let mut messages = vec![
        json!({"role": "system", "content": "You are an agent."}),
        json!({"role": "user", "content": "Fix the build."}),
    ];
    for n in 0..steps {
        messages.extend(step(n));
    }
    messages
}

fn request(messages: &[Value]) -> Value {
    json!({
        "model": "mock-model",
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}],
        "x_unknown": {"z": 1, "a": 2},
    })
}

/// The messages of each chat request the upstream received, as raw JSON texts.
fn upstream_messages(server: &Server) -> Vec<Vec<String>> {
    server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.json())
        .filter(|body| !is_sheet_call(body))
        .map(|body| body["messages"].as_array().unwrap().iter().map(Value::to_string).collect())
        .collect()
}

fn is_sheet_call(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m.to_string().contains(INSTRUCTION_MARK))
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn headers_report_what_compression_did_and_only_content_changes() {
    let h = Harness::builder()
        .config(|c| {
            // About 9,000 tokens once the colours and padding are gone: past high water.
            policy(c, CompressionMode::Rules, 10_000);
            c.compression.policy.rules.drop_oldest = false;
        })
        .start()
        .await;
    let response = h.chat().json(&request(&conversation(12))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let before: u64 = header(&response, "x-ctxgate-tokens-before").parse().unwrap();
    let after: u64 = header(&response, "x-ctxgate-tokens-after").parse().unwrap();
    assert_eq!(header(&response, "x-ctxgate-compression"), "rules");
    assert!(after < before, "{after} !< {before}");

    let sent = h.upstream(0).requests().pop().unwrap().json();
    assert_eq!(sent["x_unknown"], json!({"z": 1, "a": 2}), "unknown fields survive");
    let raw = String::from_utf8(h.upstream(0).requests().pop().unwrap().body.to_vec()).unwrap();
    assert!(
        raw.contains(r#""tools":[{"function":{"name":"run","parameters":{"properties""#),
        "tools are canonical: {raw}"
    );
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2 + 2 * 12, "one message for each message");
    assert_eq!(messages[0], json!({"role": "system", "content": "You are an agent."}));
    // Tool output lost its ANSI colours and runs of blanks (the recent turns too: lossless
    // passes apply to every message); otherwise the recent turns are as sent.
    assert!(!messages[3]["content"].as_str().unwrap().contains('\u{1b}'));
    let last = messages.last().unwrap();
    assert_eq!(last["tool_call_id"], step(11)[1]["tool_call_id"]);
    let expected: String = (0..60).map(|l| format!("ok step 11 line {l}: value {}\n", l * 11)).collect();
    assert_eq!(last["content"], expected);

    // A streamed request on a session is compressed the same way and still streams.
    let mut streamed = request(&conversation(12));
    streamed["stream"] = true.into();
    let response = h.chat().header("x-session-id", "s").json(&streamed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ctxgate-compression"), "rules");
    assert_eq!(header(&response, "x-ctxgate-tokens-after"), after.to_string());
    let body = response.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let sent = h.upstream(0).requests().pop().unwrap().json();
    assert_eq!(sent["messages"].as_array().unwrap().len(), 2 + 2 * 12);
}

#[tokio::test]
async fn past_the_marks_the_oldest_turns_are_dropped_whole() {
    let h = Harness::builder().config(|c| policy(c, CompressionMode::Rules, 4_000)).start().await;
    let response = h.chat().json(&request(&conversation(12))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let after: u64 = header(&response, "x-ctxgate-tokens-after").parse().unwrap();
    // What is left is the two recent turns, which are always kept.
    assert!(after <= 3_200, "{after} tokens: still past the high-water mark");
    let sent = h.upstream(0).requests().pop().unwrap().json();
    let messages = sent["messages"].as_array().unwrap();
    assert!(messages.len() < 2 + 2 * 12);
    assert_eq!(
        messages[1],
        json!({"role": "user", "content": "Fix the build."}),
        "the latest user message stays"
    );
    // Every tool result still follows its call.
    for (i, m) in messages.iter().enumerate().filter(|(_, m)| m["role"] == "tool") {
        assert_eq!(messages[i - 1]["tool_calls"][0]["id"], m["tool_call_id"]);
    }
}

#[tokio::test]
async fn a_request_can_opt_out() {
    let h = Harness::builder().config(|c| policy(c, CompressionMode::Rules, 4_000)).start().await;
    let body = serde_json::to_vec(&request(&conversation(12))).unwrap();
    let response = h
        .chat()
        .header("content-type", "application/json")
        .header("x-ctxgate-compression", "off")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ctxgate-compression"), "off", "the opt-out is said back");
    let sent = h.upstream(0).requests().pop().unwrap();
    assert_eq!(sent.body.as_ref(), body.as_slice(), "sent byte for byte");
    assert!(!sent.headers.contains_key("x-ctxgate-compression"), "the gateway's own header stays here");
}

#[tokio::test]
async fn under_the_marks_only_the_lossless_passes_apply() {
    let h = Harness::builder().config(|c| policy(c, CompressionMode::Rules, 128_000)).start().await;
    let body = request(&conversation(3));
    let response = h.chat().json(&body).send().await.unwrap();
    assert_eq!(header(&response, "x-ctxgate-compression"), "none", "no epoch");
    let before: u64 = header(&response, "x-ctxgate-tokens-before").parse().unwrap();
    let after: u64 = header(&response, "x-ctxgate-tokens-after").parse().unwrap();
    assert!(after < before, "colours and padding go from the first request on: {after} !< {before}");

    let sent = h.upstream(0).requests().pop().unwrap().json();
    let (sent, original) = (sent["messages"].as_array().unwrap(), body["messages"].as_array().unwrap());
    assert_eq!(sent.len(), original.len());
    for (s, o) in sent.iter().zip(original) {
        if o["role"] != "tool" {
            assert_eq!(s, o, "only tool output had anything to normalise");
            continue;
        }
        assert_eq!(s["tool_call_id"], o["tool_call_id"]);
        let (s, o) = (s["content"].as_str().unwrap(), o["content"].as_str().unwrap());
        assert!(!s.contains('\u{1b}'), "no terminal escapes left");
        let words = |t: &str| {
            t.replace("\u{1b}[32m", "")
                .replace("\u{1b}[0m", "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(words(s), words(o), "every word kept, in order");
    }
}

/// Splits the turns into stable ones (the request began with the previous request's
/// messages) and the rest, which must be compaction epochs.
fn count_prefix_breaks(requests: &[Vec<String>]) -> usize {
    requests.windows(2).filter(|w| !w[1].starts_with(&w[0])).count()
}

async fn start(store: Store, builder: HarnessBuilder) -> (Harness, StoreUrl) {
    let store = store.url().await;
    let url = store.url.clone();
    (builder.config(move |c| c.sessions.store = url).start().await, store)
}

/// A 40-turn agent session: every request that is not a compaction epoch starts with the
/// previous request's upstream messages, byte for byte; epochs are few and all turns fit.
async fn session_requests_keep_their_prefix(store: Store) {
    let (h, _store) = start(
        store,
        Harness::builder().config(|c| {
            policy(c, CompressionMode::Rules, 24_000);
            c.upstreams[0].prompt_cache_key = true;
        }),
    )
    .await;
    let mut messages = conversation(0);
    for n in 0..40 {
        messages.extend(step(n));
        let response =
            h.chat().header("x-session-id", "agent").json(&request(&messages)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let after: u64 = header(&response, "x-ctxgate-tokens-after").parse().unwrap();
        assert!(after <= 24_000, "turn {n}: {after} tokens");
    }
    let requests = upstream_messages(h.upstream(0));
    let breaks = count_prefix_breaks(&requests);
    let epochs = h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="rules"}"#).await;
    assert!(epochs >= 1.0, "the session never compacted");
    assert!(breaks as f64 <= epochs, "{breaks} prefix breaks but {epochs} epochs");
    assert!(breaks <= 8, "{breaks} of 40 turns missed the cache");
    // The session's requests all carry the same cache key.
    let keys: std::collections::HashSet<String> =
        h.upstream(0).requests().iter().map(|r| r.json()["prompt_cache_key"].to_string()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.iter().next().unwrap().starts_with("\"ctxgate-"));
    let shared = h.metric(r#"ctxgate_compression_prefix_bytes_total{model="other",stage="shared"}"#).await;
    let previous =
        h.metric(r#"ctxgate_compression_prefix_bytes_total{model="other",stage="previous"}"#).await;
    assert!(shared / previous > 0.8, "{shared} of {previous} bytes shared");
    // The upstream's cached tokens are counted per model (the mock reports 4 per request).
    let cached = h.metric(r#"ctxgate_model_tokens_total{model="other",stage="cached"}"#).await;
    assert_eq!(cached, 4.0 * 40.0);
}

/// A stateless client that resends the same history gets the same bytes upstream, and the
/// next turn extends them.
async fn stateless_conversations_get_the_same_bytes(store: Store) {
    let (h, _store) =
        start(store, Harness::builder().config(|c| policy(c, CompressionMode::Rules, 6_000))).await;
    let mut messages = conversation(0);
    let mut last = Vec::new();
    for n in 0..24 {
        messages.extend(step(n));
        for _ in 0..2 {
            let response = h.chat().json(&request(&messages)).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
        let requests = h.upstream(0).requests();
        let (a, b) = (requests[requests.len() - 2].body.clone(), requests[requests.len() - 1].body.clone());
        assert_eq!(a, b, "turn {n}: the same history gave other bytes");
        last = requests.last().unwrap().json()["messages"].as_array().unwrap().clone();
    }
    assert!(last.len() < 2 + 2 * 24 || last.iter().any(|m| m.to_string().contains("[ctxgate:")));
    let requests: Vec<Vec<String>> = upstream_messages(h.upstream(0)).into_iter().step_by(2).collect();
    let breaks = count_prefix_breaks(&requests);
    let epochs = h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="rules"}"#).await;
    assert!(epochs >= 1.0);
    assert!(breaks as f64 <= epochs, "{breaks} prefix breaks but {epochs} epochs");
}

/// Hybrid with rules too weak to reach the target, so a sheet has to act.
fn hybrid() -> HarnessBuilder {
    Harness::builder().config(|c| {
        policy(c, CompressionMode::Hybrid, 8_000);
        weak_rules(c);
    })
}

/// Hybrid: the sheet is written in the background by the upstream, with the session's own
/// prefix, and a later epoch places it after the system messages.
async fn hybrid_places_a_sheet_written_in_the_background(store: Store) {
    let (h, _store) = start(store, hybrid()).await;
    let mut messages = conversation(0);
    let mut placed = false;
    for n in 0..60 {
        messages.extend(step(n));
        let response = h.chat().header("x-session-id", "hy").json(&request(&messages)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        if header(&response, "x-ctxgate-compression") == "hybrid" {
            placed = true;
            break;
        }
    }
    assert!(placed, "no sheet was placed");
    let requests = h.upstream(0).requests();
    let sheet_call = requests.iter().map(|r| r.json()).find(is_sheet_call).unwrap();
    let sent = requests.last().unwrap().json();
    let sent = sent["messages"].as_array().unwrap();
    assert_eq!(sent[0], json!({"role": "system", "content": "You are an agent."}));
    assert!(sent[1]["content"].as_str().unwrap().starts_with("[ctxgate state sheet, epoch"), "{}", sent[1]);
    for heading in ["## Active Task", "## Blocked", "## Resolved Questions"] {
        assert!(sent[1]["content"].as_str().unwrap().contains(heading));
    }
    // The sheet call shares the session's prefix and its tools.
    assert_eq!(sheet_call["messages"][0], sent[0]);
    assert_eq!(sheet_call["tools"], request(&[])["tools"]);
    assert_eq!(h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="hybrid"}"#).await, 1.0);
}

/// Hybrid without a session: once a sheet is placed, a client resending the same history
/// gets the same bytes, sheet included.
async fn stateless_hybrid_replays_the_same_sheet(store: Store) {
    let (h, _store) = start(store, hybrid()).await;
    let mut messages = conversation(0);
    for n in 0..60 {
        messages.extend(step(n));
        let response = h.chat().json(&request(&messages)).send().await.unwrap();
        if header(&response, "x-ctxgate-compression") == "hybrid" {
            let again = h.chat().json(&request(&messages)).send().await.unwrap();
            assert_eq!(header(&again, "x-ctxgate-compression"), "hybrid");
            let requests: Vec<_> =
                h.upstream(0).requests().into_iter().filter(|r| !is_sheet_call(&r.json())).collect();
            let (a, b) = (&requests[requests.len() - 2], &requests[requests.len() - 1]);
            assert_eq!(a.body, b.body, "the same history gave other bytes");
            assert!(String::from_utf8_lossy(&b.body).contains("[ctxgate state sheet, epoch"));
            return;
        }
    }
    panic!("no sheet was placed");
}

/// A sheet upstream that fails or is slow: requests go on with rules, never waiting longer
/// than `max_wait`, and the failures are counted.
async fn falls_back_to_rules(sheet_upstream: mock_upstream::Builder, reason: &str) {
    let h = Harness::builder()
        .upstream(Server::builder())
        .upstream(sheet_upstream)
        .config(|c| {
            policy(c, CompressionMode::Hybrid, 8_000);
            weak_rules(c);
            c.compression.policy.rules.drop_oldest = true;
            c.routes.clear();
            c.compression.summarizer.upstream = Some("u1".into());
            c.compression.summarizer.timeout = Duration::from_millis(300);
            c.compression.summarizer.max_wait = Duration::from_millis(50);
            c.retry.max_retries = 0;
        })
        .start()
        .await;
    let mut messages = conversation(0);
    for n in 0..40 {
        messages.extend(step(n));
        let response = h.chat().header("x-session-id", "fb").json(&request(&messages)).send().await.unwrap();
        assert_eq!(response.status(), 200, "turn {n}");
        assert_ne!(header(&response, "x-ctxgate-compression"), "hybrid");
    }
    assert!(h.upstream(1).requests().iter().any(|r| is_sheet_call(&r.json())), "no sheet was asked for");
    let fallbacks = h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="fallback"}"#).await;
    assert!(fallbacks >= 1.0);
    let failures = h.metric(&format!(r#"ctxgate_summarizer_failures_total{{reason="{reason}"}}"#)).await;
    assert!(failures >= 1.0, "{reason}: {failures}");
}

#[tokio::test]
async fn a_failing_summarizer_falls_back_to_rules() {
    let failing = (0..50).fold(Server::builder(), |b, _| b.fail(500));
    falls_back_to_rules(failing, "upstream_status").await;
}

#[tokio::test]
async fn a_slow_summarizer_falls_back_to_rules() {
    let slow = (0..50).fold(Server::builder(), |b, _| {
        b.reply(Reply::json(200, fixtures::completion("## Active Task\nlate")).delay(Duration::from_secs(5)))
    });
    falls_back_to_rules(slow, "timeout").await;
}

#[test]
fn the_compress_command_shows_what_would_be_sent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&request(&conversation(12))).unwrap()).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ctxgate"))
        .args(["compress", "--mode", "rules", "--force", "--stats", "json"])
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let sent: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(sent["x_unknown"], json!({"z": 1, "a": 2}));
    assert_eq!(sent["messages"].as_array().unwrap().len(), 2 + 2 * 12);
    let stats: Value = serde_json::from_slice(&output.stderr).unwrap();
    assert!(stats["tokens_after"].as_u64().unwrap() < stats["tokens_before"].as_u64().unwrap());
    assert!(stats["saved_by_rule"]["ansi"].as_u64().unwrap() > 0);
    assert_eq!(stats["acted"], "rules");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_ctxgate"))
        .args(["compress", "-"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid chat request"));
}

on_both_stores!(
    session_requests_keep_their_prefix,
    stateless_conversations_get_the_same_bytes,
    hybrid_places_a_sheet_written_in_the_background,
    stateless_hybrid_replays_the_same_sheet,
);

/// A tokenizer that makes every character a token: a model whose count of the same text is
/// about four times tiktoken's.
const CHARACTER_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Split","pattern":{"Regex":"."},"behavior":"Isolated","invert":false},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#;

/// A request's size as the one-token-per-character model counts it: each message's text and
/// calls plus four tokens of framing, and the `tools` array.
fn characters(body: &Value) -> usize {
    let messages = body["messages"].as_array().unwrap();
    let text = |m: &Value| match &m["content"] {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => {
            parts.iter().filter_map(|p| p["text"].as_str()).map(|t| t.chars().count()).sum()
        }
        _ => 0,
    };
    let calls = |m: &Value| {
        m["tool_calls"].as_array().map_or(0, |calls| {
            calls
                .iter()
                .map(|c| {
                    2 + c["function"]["name"].as_str().unwrap_or("").chars().count()
                        + c["function"]["arguments"].as_str().unwrap_or("").chars().count()
                })
                .sum()
        })
    };
    messages.iter().map(|m| 4 + text(m) + calls(m)).sum::<usize>() + body["tools"].to_string().chars().count()
}

#[tokio::test]
async fn counted_with_the_models_own_tokenizer_no_request_exceeds_its_context() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, CHARACTER_TOKENIZER).unwrap();
    const CONTEXT: u64 = 24_000;
    let mut largest = Vec::new();
    for own in [false, true] {
        // Given a model whose context is 24,000 of its own tokens
        let path = own.then(|| tokenizer.clone());
        let h = Harness::builder()
            .config(move |c| {
                policy(c, CompressionMode::Rules, CONTEXT);
                c.compression.policy.tokenizer = path;
            })
            .start()
            .await;
        // When an agent's history grows well past it
        let mut messages = conversation(0);
        for n in 0..30 {
            messages.extend(step(n));
            assert_eq!(h.chat().json(&request(&messages)).send().await.unwrap().status(), 200);
        }
        // Then counted as that model counts, the largest request sent
        let sent = h.upstream(0).requests().iter().map(|r| characters(&r.json())).max().unwrap();
        largest.push(sent as u64);
    }
    assert!(largest[0] > CONTEXT, "counted with tiktoken a request overflows: {}", largest[0]);
    assert!(largest[1] <= CONTEXT, "counted with the model's tokenizer none does: {}", largest[1]);
}

#[test]
fn the_compress_command_says_why_it_did_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&request(&conversation(3))).unwrap()).unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ctxgate"))
            .arg("compress")
            .args(args)
            .arg(&file)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stderr).unwrap()
    };
    // With the defaults compression is off, and the command says so and what to pass
    let off = run(&[]);
    assert!(off.contains("compression is off") && off.contains("--mode rules"), "{off}");
    // With rules, a short request is under the mark: it says --force would compact it
    let under = run(&["--mode", "rules"]);
    assert!(under.contains("under the compaction mark") && under.contains("--force"), "{under}");
    // And with --force it acts, with nothing to explain
    let forced = run(&["--mode", "rules", "--force"]);
    assert!(!forced.contains("nothing done"), "{forced}");
}
