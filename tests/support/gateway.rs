//! A ctxgate binary run as a child process, for tests that kill it and start another.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The client credential tests send; sessions are scoped to it.
pub const AUTH: &str = "Bearer sk-test-client";

/// `GET url` with the test credential; its JSON body, `Null` when the body is not JSON (a
/// gateway that is still starting).
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = client.get(url).header("authorization", AUTH).send().await.unwrap();
    response.json().await.unwrap_or_default()
}

/// A ctxgate binary run as a child process, SIGKILLed on drop.
pub struct Gateway {
    child: Child,
    pub base: String,
    _config: tempfile::NamedTempFile,
}

/// How a [`Gateway`] is started beyond its upstream and store.
pub struct Options<'a> {
    /// `sessions.lease`.
    pub lease: &'a str,
    /// TOML appended to the config.
    pub extra: &'a str,
    /// Environment variables of the process (an upstream's `api_key_env`).
    pub env: &'a [(&'a str, &'a str)],
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self { lease: "1s", extra: "", env: &[] }
    }
}

impl Gateway {
    pub async fn start(upstream: &str, store: &str) -> Gateway {
        Self::start_with(upstream, store, "").await
    }

    /// With `extra` TOML appended to the config.
    pub async fn start_with(upstream: &str, store: &str, extra: &str) -> Gateway {
        Self::start_opts(upstream, store, Options { extra, ..Options::default() }).await
    }

    pub async fn start_opts(upstream: &str, store: &str, options: Options<'_>) -> Gateway {
        let Options { lease, extra, env } = options;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut config = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write;
        write!(
            config,
            "[telemetry]\nlog_level = \"warn\"\n[sessions]\nstore = {store:?}\nlease = {lease:?}\nbusy_timeout = \"10s\"\n[[upstreams]]\nname = \"mock\"\nbase_url = {upstream:?}\n{extra}"
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ctxgate"))
            .args(["serve", "--config"])
            .arg(config.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let gateway = Gateway { child, base: format!("http://127.0.0.1:{port}"), _config: config };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while client.get(format!("{}/healthz", gateway.base)).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "ctxgate did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gateway
    }

    /// A chat request on `session`, as the session's owner.
    pub fn chat(&self, client: &reqwest::Client, session: &str) -> reqwest::RequestBuilder {
        client
            .post(format!("{}/v1/chat/completions", self.base))
            .header("authorization", AUTH)
            .header("x-session-id", session)
    }

    /// Polls `POST /v1/sessions/{session}/resume` until this replica takes the interrupted
    /// turn over (202), as it may once the dead owner's lease has run out; panics after
    /// `within`. Until then the session must say its turn is in progress.
    pub async fn resume_after_lease(&self, client: &reqwest::Client, session: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let resumed = client
                .post(format!("{}/v1/sessions/{session}/resume", self.base))
                .header("authorization", AUTH)
                .send()
                .await
                .unwrap();
            let status = resumed.status().as_u16();
            let body: serde_json::Value = resumed.json().await.unwrap_or_default();
            if status == 202 {
                assert_eq!(body["resumed"], true, "{body}");
                return;
            }
            assert_eq!(body["state"], "in_progress", "{status} {body}");
            assert!(tokio::time::Instant::now() < deadline, "the turn was never taken over: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
