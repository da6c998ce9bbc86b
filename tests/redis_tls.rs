//! Sessions (and with them keys and limits) over `rediss://`: a real redis-server with TLS on,
//! its certificate signed by a CA made for the test, trusted through `SSL_CERT_FILE` as a
//! private CA would be in a container. Without that trust the gateway refuses to start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mock_upstream::Server;
use serde_json::json;
use support::gateway::AUTH;
use support::redis::{reserve_port, RedisServer};

/// A CA and a server certificate for `localhost` / 127.0.0.1 signed by it, in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl on PATH");
        assert!(status.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&status.stderr));
    };
    openssl(
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem"]
            .into_iter()
            .chain(["-days", "2", "-subj", "/CN=ctxgate test CA"])
            .collect::<Vec<_>>(),
    );
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// Starts ctxgate on `store` with `ssl_cert_file` as its trust store; `None` if it exits.
async fn gateway(upstream: &str, store: &str, ssl_cert_file: &Path) -> Option<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[telemetry]\nlog_level = \"warn\"\n[sessions]\nstore = {store:?}\nstore_timeout = \"2s\"\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = {upstream:?}\n"
    );
    let dir = ssl_cert_file.parent().unwrap();
    std::fs::write(dir.join("ctxgate.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ctxgate"))
        .args(["serve", "--config"])
        .arg(dir.join("ctxgate.toml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("SSL_CERT_FILE", ssl_cert_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return Some((child, base));
        }
        assert!(tokio::time::Instant::now() < deadline, "ctxgate neither started nor exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sessions_are_stored_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let tls_port = reserve_port(false).to_string();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let redis = RedisServer::start_with(
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "no",
        ],
        false,
    )
    .await;
    let upstream = Server::builder().start().await.unwrap();
    let store = format!("rediss://localhost:{tls_port}/");

    // A trust store without the test CA: the TLS handshake fails and ctxgate does not start.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(certs.path().join("server.pem"), other.path().join("untrusted.pem")).unwrap();
    assert!(
        gateway(&upstream.base_url(), &store, &other.path().join("untrusted.pem")).await.is_none(),
        "ctxgate started against a Redis whose certificate it cannot verify"
    );

    let (mut child, base) =
        gateway(&upstream.base_url(), &store, &certs.path().join("ca.pem")).await.expect("ctxgate started");
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .header("authorization", AUTH)
        .header("x-session-id", "over-tls")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let transcript = client
        .get(format!("{base}/v1/sessions/over-tls"))
        .header("authorization", AUTH)
        .send()
        .await
        .unwrap();
    assert_eq!(transcript.status(), 200);
    assert_eq!(client.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    // The checkpoint is in this server (read back over its plain port).
    let keys = redis.command(&["KEYS", "ctxgate:*over-tls*"]).await;
    assert!(keys.contains("over-tls"), "{keys}");
    child.kill().unwrap();
    child.wait().unwrap();
}
