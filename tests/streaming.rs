//! Streamed chat completions: every upstream SSE event reaches the client as it arrives, intact
//! and in order, and a client that leaves mid-stream leaves nothing behind.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::Server;
use support::{chat_body, fixtures, sse_data, Chunk, Gate, Harness};

#[tokio::test]
async fn first_chunk_arrives_while_the_upstream_holds_the_rest() {
    // Given an upstream that sends one chunk, then waits on a gate
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "Hel")),
        Chunk::Wait(gate.clone()),
        Chunk::json(fixtures::content_chunk(1, "lo")),
        Chunk::done(),
    ]);
    let h = Harness::builder().upstream(upstream).start().await;

    // When the client streams through the gateway
    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();

    // Then the first event arrives before the gate opens
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    let first = std::str::from_utf8(&first).unwrap();
    assert!(first.contains("Hel"), "{first}");
    assert_eq!(h.upstream(0).open_streams(), 1);

    // And the rest follows once it opens
    gate.open();
    let mut rest = String::new();
    while let Some(chunk) = stream.next().await {
        rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(rest.contains("lo") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test]
async fn parallel_tool_call_deltas_arrive_intact_and_in_order() {
    let mut chunks: Vec<Chunk> = fixtures::tool_call_chunks().into_iter().map(Chunk::json).collect();
    chunks.push(Chunk::json(fixtures::usage_chunk()));
    chunks.push(Chunk::done());
    let expected: Vec<String> = fixtures::tool_call_chunks()
        .iter()
        .chain([fixtures::usage_chunk()].iter())
        .map(|v| v.to_string())
        .chain(["[DONE]".to_string()])
        .collect();
    let h = Harness::builder().upstream(Server::builder().stream(chunks)).start().await;

    let body = h.chat().json(&chat_body(true)).send().await.unwrap().text().await.unwrap();

    // Every event, byte for byte, in order
    assert_eq!(sse_data(&body), expected);
    // And the arguments reassemble per index
    let mut args = [String::new(), String::new()];
    for event in sse_data(&body).iter().filter(|d| *d != "[DONE]") {
        let v: serde_json::Value = serde_json::from_str(event).unwrap();
        for call in v["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap() as usize;
            args[i].push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(args, fixtures::tool_call_arguments());
}

#[tokio::test]
async fn usage_chunk_passes_and_is_counted() {
    let h = Harness::start().await;

    let body = h.chat().json(&chat_body(true)).send().await.unwrap().text().await.unwrap();

    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage, fixtures::usage_chunk());
    assert_eq!(h.metric(r#"ctxgate_tokens_total{upstream="u0",kind="completion"}"#).await, 5.0);
    assert_eq!(h.metric(r#"ctxgate_time_to_first_byte_seconds_count{route="chat_completions"}"#).await, 1.0);
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_stream() {
    // Given a stream parked upstream after its first chunk
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "partial")),
        Chunk::Wait(gate.clone()),
        Chunk::done(),
    ]);
    let h = Harness::builder().upstream(upstream).start().await;
    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(h.metric("ctxgate_requests_in_flight").await, 1.0 + 1.0, "the stream and this scrape");

    // When the client goes away
    drop(stream);

    // Then the upstream body is dropped and nothing is left in flight
    assert!(h.upstream(0).wait_for_open_streams(0, Duration::from_secs(5)).await, "upstream stream leaked");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.metric("ctxgate_requests_in_flight").await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "in-flight gauge never went back down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn silent_upstream_mid_stream_is_cut_after_the_idle_timeout() {
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(vec![Chunk::json(fixtures::content_chunk(0, "a")), Chunk::Wait(gate.clone())]);
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.upstreams[0].idle_timeout = Duration::from_millis(200))
        .start()
        .await;

    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), response.text()).await.unwrap();

    assert!(result.is_err(), "a cut stream must not look complete to the client");
    assert_eq!(h.metric(r#"ctxgate_upstream_stream_aborts_total{upstream="u0"}"#).await, 1.0);
    assert!(h.upstream(0).wait_for_open_streams(0, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_slow_but_steady_stream_outlives_the_idle_timeout() {
    // Given chunks 120 ms apart against a 200 ms idle timeout: 480 ms in all
    let mut chunks = Vec::new();
    for i in 0..4 {
        chunks.push(Chunk::Delay(Duration::from_millis(120)));
        chunks.push(Chunk::json(fixtures::content_chunk(i, "t")));
    }
    chunks.push(Chunk::done());
    let h = Harness::builder()
        .upstream(Server::builder().stream(chunks))
        .config(|c| c.upstreams[0].idle_timeout = Duration::from_millis(200))
        .start()
        .await;

    let body = h.chat().json(&chat_body(true)).send().await.unwrap().text().await.unwrap();

    assert_eq!(sse_data(&body).len(), 5, "{body}");
    assert_eq!(h.metric(r#"ctxgate_upstream_stream_aborts_total{upstream="u0"}"#).await, 0.0);
}
