//! Graceful shutdown: new connections are refused, a stream in flight runs to its end.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::Server;
use support::{chat_body, fixtures, sse_data, Chunk, Gate, Harness};

#[tokio::test]
async fn a_stream_in_flight_finishes_after_shutdown_begins() {
    // Given a stream parked upstream after its first chunk
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "before")),
        Chunk::Wait(gate.clone()),
        Chunk::json(fixtures::content_chunk(1, "after")),
        Chunk::done(),
    ]);
    let mut h = Harness::builder().upstream(upstream).start().await;
    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut body = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();

    // When shutdown begins
    h.begin_shutdown();

    // Then new connections are refused
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(h.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // And the stream in flight completes
    gate.open();
    while let Some(chunk) = stream.next().await {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = sse_data(&body);
    assert_eq!(events.len(), 3, "{body}");
    assert!(events[1].contains("after"));
    assert_eq!(events[2], "[DONE]");

    // And the server task returns once drained
    tokio::time::timeout(Duration::from_secs(5), h.join())
        .await
        .expect("serve did not return after draining");
}

#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(vec![Chunk::json(fixtures::content_chunk(0, "stuck")), Chunk::Wait(gate.clone())]);
    let mut h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.shutdown_timeout = Duration::from_millis(200))
        .start()
        .await;
    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();

    h.begin_shutdown();

    tokio::time::timeout(Duration::from_secs(5), h.join()).await.expect("drain timeout was not enforced");
}
