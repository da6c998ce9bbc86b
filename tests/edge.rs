//! The edge holds against slow and greedy clients: stalled heads and idle connections are
//! closed, open connections are capped, trickled bodies time out, probes stay outside the
//! data plane's limits, and oversized heads are refused before they reach an upstream. Raw
//! sockets, so the test controls every byte and its timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Reads until the peer closes (EOF or reset) or `within` passes; returns what was read and
/// whether the connection was closed in time.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut read = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (read, closed)
}

/// Reads one response (head and `content-length` body) within two seconds; returns the status
/// and the body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut read = Vec::new();
    let mut buf = [0u8; 8192];
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let text = String::from_utf8_lossy(&read).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if body.len() >= length {
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    return (status, body.to_string());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole response: {text:?}");
            read.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no response within 2 s")
}

fn openai_error(body: &str) -> Value {
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(json["error"].get(key).is_some(), "missing {key} in {json}");
    }
    json["error"].clone()
}

/// A chat request head declaring `length` body bytes, of which `sent` are sent.
fn chat_head(length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: ctxgate\r\ncontent-type: application/json\r\nauthorization: Bearer sk-test-client\r\ncontent-length: {length}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_stalled_request_head_is_closed_after_the_header_timeout() {
    // Given a gateway with a 1 s head timeout
    let h =
        Harness::builder().config(|c| c.server.header_read_timeout = Duration::from_secs(1)).start().await;

    // When a client sends half a head and stops
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: ctxgate\r\nx-slow: ").await.unwrap();
    let started = Instant::now();

    // Then the gateway closes the connection after about a second
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    let elapsed = started.elapsed();
    assert!(closed, "the stalled connection is still open after 3 s");
    assert!(elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500), "{elapsed:?}");
    assert_eq!(h.metric(r#"ctxgate_connections_closed_total{reason="header_timeout"}"#).await, 1.0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes() {
    // Given a 500 ms head timeout and a 1.5 s idle timeout
    let h = Harness::builder()
        .config(|c| {
            c.server.header_read_timeout = Duration::from_millis(500);
            c.server.idle_timeout = Duration::from_millis(1500);
        })
        .start()
        .await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nhost: ctxgate\r\n\r\n";
    stream.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut stream).await, (200, "ok\n".to_string()));

    // When the connection sits idle for longer than the head timeout
    tokio::time::sleep(Duration::from_millis(900)).await;

    // Then it still serves the next request
    stream.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut stream).await, (200, "ok\n".to_string()));

    // And it is closed once idle for the idle timeout
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(closed, "the idle connection is still open after 3 s");
    assert!(started.elapsed() >= Duration::from_millis(1200), "{:?}", started.elapsed());
    assert_eq!(h.metric(r#"ctxgate_connections_closed_total{reason="idle_timeout"}"#).await, 1.0);
}

#[tokio::test]
async fn connections_past_the_cap_get_503_and_healthz_answers_once_one_frees() {
    // Given a cap of 3 connections, all held by clients that send nothing
    let h =
        Harness::builder().config(|c| c.server.max_connections = Some(3.try_into().unwrap())).start().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(h.addr).await.unwrap());
    }

    // When one more client connects
    let mut extra = TcpStream::connect(h.addr).await.unwrap();
    extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: ctxgate\r\n\r\n").await.unwrap();

    // Then it gets a 503 in the OpenAI shape, and the connection is closed
    let (status, body) = read_response(&mut extra).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(openai_error(&body)["code"], "overloaded");
    let (_, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(closed, "a refused connection stays open");

    // And an HTTP client is told the same
    let refused = h.client.get(format!("{}/healthz", h.url)).send().await.unwrap();
    assert_eq!(refused.status(), 503);

    // And once held connections leave, /healthz answers again
    held.truncate(1);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let response = h.client.get(format!("{}/healthz", h.url)).send().await;
        if response.as_ref().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "no free slot 2 s after a connection left: {response:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.metric(r#"ctxgate_connections_closed_total{reason="refused"}"#).await >= 1.0);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    // Given a 1 s body read timeout
    let h = Harness::builder().config(|c| c.server.body_read_timeout = Duration::from_secs(1)).start().await;

    // When a client declares a 100-byte body and sends 10 bytes of it
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(format!("{}{{\"model\":", chat_head(100)).as_bytes()).await.unwrap();
    let started = Instant::now();

    // Then it gets a 408 in the OpenAI shape after about a second
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 408, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(800), "{:?}", started.elapsed());
    let error = openai_error(&body);
    assert_eq!(error["code"], "request_body_timeout");
    assert_eq!(error["type"], "invalid_request_error");
    // And nothing reached the upstream
    assert!(h.upstream(0).requests().is_empty());
}

#[tokio::test]
async fn probes_and_metrics_answer_while_trickled_bodies_hold_every_slot() {
    // Given two concurrency slots, each held by a client trickling a declared body
    let h =
        Harness::builder().config(|c| c.server.max_concurrent_requests = 2.try_into().unwrap()).start().await;
    let mut trickling = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream.write_all(format!("{}{{", chat_head(1000)).as_bytes()).await.unwrap();
        trickling.push(stream);
    }
    // (the data plane is full once a request there is shed)
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.client.get(h.v1("/models")).send().await.unwrap().status() != 503 {
        assert!(Instant::now() < deadline, "the trickling clients never filled the slots");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // When the probes and the scraper call meanwhile
    // Then they answer 200
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = h.client.get(format!("{}{path}", h.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    drop(trickling);
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_never_reaches_the_upstream() {
    // Given the default 64 KiB head limit
    let h = Harness::start().await;

    // When a client sends a 100 KB header
    let big = h.client.get(h.v1("/models")).header("x-big", "a".repeat(100 * 1024)).send().await.unwrap();

    // Then the gateway answers 431 with an error body in the OpenAI shape
    assert_eq!(big.status(), 431);
    let body: serde_json::Value = big.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_header_too_large", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    // And a head past twice the limit is refused by the HTTP layer itself, and the connection closed
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let huge = "a".repeat(200 * 1024);
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: ctxgate\r\nx-big: {huge}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (read, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&read);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");
    assert!(closed);

    // And the upstream saw neither
    assert!(h.upstream(0).requests().is_empty());

    // And a head under the limit still passes
    let fine = h.client.get(h.v1("/models")).header("x-big", "a".repeat(16 * 1024)).send().await.unwrap();
    assert_eq!(fine.status(), 200);
}
