//! Unit tests that drive a live server over hand-written HTTP/1.1 on raw sockets, so chunk
//! timing and disconnects are under the test's exact control.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::service::{default_token, DEFAULT_CONTENT};
use crate::{fixtures, Chunk, Gate, Reply, Server};

const PATIENCE: Duration = Duration::from_secs(5);

/// Opens a connection and writes one request; the server closes after answering it.
async fn send(server: &Server, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.addr()).await.unwrap();
    let len = body.len();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n{body}"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

struct Response {
    status: u16,
    /// Lower-cased, for header lookups.
    head: String,
    /// De-chunked when the response was chunked.
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

async fn roundtrip(server: &Server, method: &str, path: &str, body: &str) -> Response {
    let mut s = send(server, method, path, body).await;
    let mut raw = Vec::new();
    timeout(PATIENCE, s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Response { status: head[9..12].parse().unwrap(), head, body }
}

fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = raw.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        raw = &rest[size + 2..];
    }
}

/// Reads until `buf` contains `needle`.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &str) {
    let found = |buf: &[u8]| String::from_utf8_lossy(buf).contains(needle);
    timeout(PATIENCE, async {
        while !found(buf) {
            assert_ne!(s.read_buf(buf).await.unwrap(), 0, "EOF before {needle:?}");
        }
    })
    .await
    .unwrap();
}

fn text(buf: &[u8]) -> String {
    String::from_utf8_lossy(buf).into_owned()
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

#[tokio::test]
async fn default_chat_returns_completion_and_is_recorded() {
    let server = Server::builder().start().await.unwrap();
    let res = roundtrip(&server, "POST", "/v1/chat/completions?x=1", r#"{"model":"m"}"#).await;
    assert_eq!(res.status, 200);
    assert!(res.head.contains("content-type: application/json"));
    assert_eq!(res.json(), fixtures::completion(DEFAULT_CONTENT));

    let recorded = server.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, http::Method::POST);
    assert_eq!(recorded[0].path, "/v1/chat/completions?x=1");
    assert_eq!(recorded[0].headers["host"], "mock");
    assert_eq!(recorded[0].json()["model"], "m");
}

#[tokio::test]
async fn default_stream_with_usage_sends_chunks_usage_and_done_in_order() {
    let server = Server::builder().stream_chunks(3).start().await.unwrap();
    let body = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    let res = roundtrip(&server, "POST", "/v1/chat/completions", body).await;
    assert_eq!(res.status, 200);
    assert!(res.head.contains("content-type: text/event-stream"));
    assert!(res.head.contains("cache-control: no-cache"));

    let mut expected: String = (0..3).map(|i| sse(&fixtures::content_chunk(i, &default_token(i)))).collect();
    expected += &sse(&fixtures::finish_chunk("stop"));
    expected += &sse(&fixtures::usage_chunk());
    expected += "data: [DONE]\n\n";
    assert_eq!(res.body, expected);
    assert!(server.wait_for_open_streams(0, PATIENCE).await);

    // Without include_usage the usage chunk is left out.
    let res = roundtrip(&server, "POST", "/v1/chat/completions", r#"{"stream":true}"#).await;
    assert!(!res.body.contains(&sse(&fixtures::usage_chunk())));
    assert!(res.body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn default_routes_and_errors() {
    let server = Server::builder().record(false).start().await.unwrap();
    let models = roundtrip(&server, "GET", "/v1/models", "").await;
    assert_eq!((models.status, models.json()), (200, fixtures::models()));
    let embeddings = roundtrip(&server, "POST", "/v1/embeddings", r#"{"input":"x"}"#).await;
    assert_eq!((embeddings.status, embeddings.json()), (200, fixtures::embeddings()));

    let bad = roundtrip(&server, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let missing = roundtrip(&server, "GET", "/v1/nope", "").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]["message"].is_string());

    assert!(server.requests().is_empty(), "recording was off");
}

#[tokio::test]
async fn tool_call_mode_calls_the_tool_until_the_request_ends_with_results() {
    // Given a mock in tool-call mode with three parallel calls
    let server = Server::builder().record(false).tool_calls("lookup", 3).start().await.unwrap();

    // When a conversation has no tool results yet, the answer calls the tool three times
    let first = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let res = roundtrip(&server, "POST", "/v1/chat/completions", first).await;
    assert_eq!((res.status, res.json()), (200, fixtures::tool_call_completion("lookup", 3)));
    let calls = res.json()["choices"][0]["message"]["tool_calls"].clone();
    let args: Vec<&str> = (0..3).map(|i| calls[i]["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(args, [r#"{"q":"item-0"}"#, r#"{"q":"item-1"}"#, r#"{"q":"item-2"}"#]);
    assert_eq!(calls[2]["id"], "call_mock_2");

    // And streamed, the same calls arrive as deltas, then usage and [DONE]
    let streamed = r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user"}]}"#;
    let res = roundtrip(&server, "POST", "/v1/chat/completions", streamed).await;
    let mut expected: String = fixtures::tool_call_completion_chunks("lookup", 3).iter().map(sse).collect();
    expected += &sse(&fixtures::usage_chunk());
    expected += "data: [DONE]\n\n";
    assert_eq!(res.body, expected);

    // Then once the last message is a tool result, the normal answer follows
    let second = r#"{"model":"m","messages":[{"role":"user","content":"hi"},
        {"role":"assistant","content":null,"tool_calls":[]},{"role":"tool","tool_call_id":"call_mock_0","content":"x"}]}"#;
    let res = roundtrip(&server, "POST", "/v1/chat/completions", second).await;
    assert_eq!(res.json(), fixtures::completion(DEFAULT_CONTENT));

    // And the stand-in tool endpoint answers any POST under /tools/
    let tool = roundtrip(&server, "POST", "/tools/lookup", r#"{"q":"item-0"}"#).await;
    assert_eq!((tool.status, tool.json()), (200, fixtures::tool_result()));
}

#[tokio::test]
async fn tool_call_mode_is_off_by_default_and_with_zero_calls() {
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    for server in [
        Server::builder().start().await.unwrap(),
        Server::builder().tool_calls("lookup", 0).start().await.unwrap(),
    ] {
        let res = roundtrip(&server, "POST", "/v1/chat/completions", body).await;
        assert_eq!(res.json(), fixtures::completion(DEFAULT_CONTENT));
    }
}

#[tokio::test]
async fn scripted_replies_are_fifo_then_default() {
    let server = Server::builder().fail(429).chat(json!({"id": "scripted"})).start().await.unwrap();
    server.push(Reply::json(201, json!({"n": 3})).header("x-mock", "yes"));

    let first = roundtrip(&server, "POST", "/v1/chat/completions", "{}").await;
    assert_eq!(first.status, 429);
    assert_eq!(first.json()["error"]["type"], "rate_limit_error");
    assert_eq!(first.json()["error"]["message"], "mock failure 429");
    // Scripted replies go to any path.
    let second = roundtrip(&server, "GET", "/anything", "").await;
    assert_eq!((second.status, second.json()), (200, json!({"id": "scripted"})));
    let third = roundtrip(&server, "POST", "/v1/embeddings", "{}").await;
    assert_eq!(third.status, 201);
    assert!(third.head.contains("x-mock: yes"));
    let fourth = roundtrip(&server, "POST", "/v1/chat/completions", "{}").await;
    assert_eq!(fourth.json(), fixtures::completion(DEFAULT_CONTENT));

    let paths: Vec<_> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/chat/completions", "/anything", "/v1/embeddings", "/v1/chat/completions"]);
}

#[tokio::test]
async fn latency_and_reply_delay_hold_the_headers() {
    let server = Server::builder()
        .latency(Duration::from_millis(20))
        .reply(Reply::error(500).delay(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(roundtrip(&server, "GET", "/v1/models", "").await.status, 500);
    assert!(started.elapsed() >= Duration::from_millis(40));
    let started = Instant::now();
    assert_eq!(roundtrip(&server, "GET", "/v1/models", "").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn gate_holds_chunk_two_while_chunk_one_is_readable() {
    let gate = Gate::new();
    let server = Server::builder()
        .stream(vec![
            Chunk::Data("one".into()),
            Chunk::Wait(gate.clone()),
            Chunk::Raw(Bytes::from_static(b"data: two\n\n")),
            Chunk::done(),
        ])
        .start()
        .await
        .unwrap();
    let mut s = send(&server, "POST", "/v1/chat/completions", "{}").await;
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, "data: one\n\n").await;
    assert_eq!(server.open_streams(), 1);

    // Give a buffering implementation a moment to (wrongly) let chunk two through.
    let _ =
        timeout(Duration::from_millis(50), async { while s.read_buf(&mut buf).await.unwrap() > 0 {} }).await;
    assert!(!text(&buf).contains("two"), "gate leaked: {}", text(&buf));

    gate.open();
    read_until(&mut s, &mut buf, "data: [DONE]\n\n").await;
    assert!(text(&buf).contains("data: two\n\n"));
    assert!(server.wait_for_open_streams(0, PATIENCE).await);
}

#[tokio::test]
async fn open_streams_drops_to_zero_when_the_client_leaves_a_parked_stream() {
    let parks = [Chunk::Wait(Gate::new()), Chunk::Delay(Duration::from_secs(3600))];
    let server = Server::builder().start().await.unwrap();
    for park in parks {
        server.push(Reply::sse(vec![Chunk::Data("one".into()), park, Chunk::done()]));
        let mut s = send(&server, "POST", "/v1/chat/completions", "{}").await;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, "data: one\n\n").await;
        assert_eq!(server.open_streams(), 1);
        drop(s);
        assert!(server.wait_for_open_streams(0, PATIENCE).await, "stream still open");
    }
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = Server::builder().stream_chunks(2).start().await.unwrap();
    let stream = TcpStream::connect(server.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("{}/chat/completions", server.base_url()))
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    let body = timeout(PATIENCE, res.into_body().collect()).await.unwrap().unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.starts_with(&sse(&fixtures::content_chunk(0, &default_token(0)))));
    assert!(body.ends_with("data: [DONE]\n\n"));
    conn.abort();
}
