//! Request paths are normalised at the edge: no dot segment, in any spelling, reaches an
//! upstream. Requests go over a raw TCP stream, since HTTP clients normalise paths themselves.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `method target` as written and returns the response's status code.
async fn raw_status(h: &Harness, method: &str, target: &str, body: &str) -> u16 {
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let response = String::from_utf8_lossy(&response);
    let status = response.split(' ').nth(1).unwrap_or_else(|| panic!("no status line: {response}"));
    status.parse().unwrap()
}

#[tokio::test]
async fn dot_segments_never_reach_the_upstream() {
    // Given a gateway in front of a recording upstream
    let h = Harness::start().await;

    // When paths climbing out of /v1 are sent as written, in every spelling
    let climbing = [
        "/v1/../admin/secret",
        "/v1/%2e%2e/admin/secret",
        "/v1/%2E%2e/admin/secret",
        "/v1/.%2E/admin/secret",
        "/v1//../admin/secret",
        "/v1/./../admin/secret",
        "/v1/models/../../admin/secret?x=1",
    ];
    let mut statuses = Vec::new();
    for target in climbing {
        statuses.push((target, raw_status(&h, "GET", target, "").await));
    }
    // and a dot segment behind an encoded separator, which cannot be resolved safely
    let hidden =
        ["/v1/..%2fadmin/secret", "/v1/%2e%2e%2Fadmin/secret", "/v1/x%2F..%2F..%2Fadmin", "/v1/..%5Cadmin"];
    for target in hidden {
        statuses.push((target, raw_status(&h, "GET", target, "").await));
    }
    // and a dot segment that stays inside /v1
    let inside = raw_status(&h, "POST", "/v1/files/%2e%2e/embeddings", r#"{"model":"m","input":"x"}"#).await;

    // Then the climbing paths resolve outside /v1 (404 at the gateway), the hidden ones are
    // refused, and the upstream saw only the one normalised path
    for (target, status) in &statuses {
        let expected = if hidden.contains(target) { 400 } else { 404 };
        assert_eq!(*status, expected, "{target}");
    }
    assert_eq!(inside, 200);
    let paths: Vec<String> = h.upstream(0).requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/embeddings"], "the upstream saw: {paths:?}");
}

#[tokio::test]
async fn a_normalised_path_is_routed_and_authenticated_as_its_normal_form() {
    // Given gateway keys
    let h = Harness::builder()
        .config(|c| {
            // The mock upstream takes no credential.
            c.upstreams.iter_mut().for_each(|u| u.keyless = true);
            c.auth.keys = vec![ctxgate::config::KeyConfig {
                name: "k".into(),
                sha256: ctxgate::auth::hash_key(b"sk-k"),
                models: Vec::new(),
                requests_per_minute: None,
                burst: None,
                tokens_per_minute: None,
                max_concurrent: None,
            }]
        })
        .start()
        .await;

    // When a probe path is used to smuggle a /v1 request past the key check
    let status = raw_status(&h, "POST", "/healthz/../v1/embeddings", r#"{"model":"m","input":"x"}"#).await;

    // Then it is a /v1 request like any other: no key, 401, nothing upstream
    assert_eq!(status, 401);
    assert!(h.upstream(0).requests().is_empty());
}
