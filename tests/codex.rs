//! Codex CLI (`codex exec`, the real binary) through ctxgate to a Chat-Completions-only
//! upstream, two ways: a custom model provider whose `base_url` is the gateway
//! (`wire_api = "responses"` over HTTP, the key from `env_key`), and the built-in OpenAI
//! provider with `openai_base_url` at the gateway (the Responses API's WebSocket mode, the key
//! from `codex login --with-api-key`). The scripted model calls Codex's shell tool once, Codex
//! runs it and sends the output back, and the model answers. Only the model is faked.
//!
//! A third run has the gateway close Codex's socket while a slow command runs: Codex connects
//! again and finishes.
//!
//! Over HTTP, a recording proxy between Codex and the gateway shows what Codex sent and what it
//! got back; over the WebSocket, the gateway's metrics show how Codex connected.
//! Codex runs with its own home in a temp dir, every proxy variable pointing at a closed port
//! (so nothing but loopback is reachable), and a hard timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use ctxgate::config::CompressionMode;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::recorder::Recorder;
use support::{chunks, fixtures, stores, Chunk, Harness, Reply};

const KEY: &str = "sk-codex-test";
const PROMPT: &str = "Print the answer with the shell, then tell me what it printed.";
/// The command the model asks for; only a shell that ran it prints [`PRINTED`].
const COMMAND: &str = "echo ctxgate-codex-$((6*7))";
const PRINTED: &str = "ctxgate-codex-42";
const ANSWER: &str = "The command printed ctxgate-codex-42.";

/// A streamed chat answer calling Codex's `exec_command` tool with `command`.
fn shell_call(command: &str) -> Vec<Chunk> {
    let call = json!({
        "index": 0,
        "id": "call_codex_1",
        "type": "function",
        "function": {"name": "exec_command", "arguments": json!({"cmd": command}).to_string()}
    });
    let delta = json!({
        "object": "chat.completion.chunk",
        "model": "mock-model",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": null}]
    });
    vec![Chunk::json(delta), Chunk::json(fixtures::finish_chunk("tool_calls")), Chunk::done()]
}

/// What every run sets: built-in tools a chat upstream cannot serve (web search, the sub-agent
/// namespace) are off; analytics and update checks would reach for the network. Top-level keys
/// go before it.
const OFFLINE: &str = r#"web_search = "disabled"
check_for_update_on_startup = false

[analytics]
enabled = false

[agents]
enabled = false
"#;

/// A custom provider whose `base_url` is the gateway, speaking Responses over HTTP.
fn codex_config(base_url: &str) -> String {
    format!(
        r#"model = "mock-model"
model_provider = "ctxgate"
{OFFLINE}
[model_providers.ctxgate]
name = "ctxgate"
base_url = "{base_url}/v1"
wire_api = "responses"
env_key = "CTXGATE_API_KEY"
"#
    )
}

/// Where one Codex run keeps its files.
struct CodexHome<'a> {
    home: &'a std::path::Path,
    codex_home: &'a std::path::Path,
    workdir: &'a std::path::Path,
}

/// A `codex` command confined to `dirs`: its own home, every proxy variable pointing at a
/// closed port (so nothing but loopback is reachable), killed when dropped.
fn codex_command(dirs: &CodexHome<'_>) -> tokio::process::Command {
    let closed = "http://127.0.0.1:9";
    let mut command = tokio::process::Command::new(support::codex::codex());
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dirs.home)
        .env("CODEX_HOME", dirs.codex_home)
        .env("CTXGATE_API_KEY", KEY)
        .envs(
            ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"]
                .map(|v| (v, closed)),
        )
        .envs(["NO_PROXY", "no_proxy"].map(|v| (v, "127.0.0.1,localhost")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// `codex exec` of [`PROMPT`] in `dirs.workdir`, within 120 s.
async fn run_exec(dirs: &CodexHome<'_>) -> std::process::Output {
    let child = codex_command(dirs)
        .args(["exec", "--skip-git-repo-check", "--color", "never"])
        // The sandbox needs user namespaces, which containers often lack; the command is an
        // `echo` in a temp dir, and the sandbox is not what is under test.
        .args(["--sandbox", "danger-full-access"])
        .arg("--cd")
        .arg(dirs.workdir)
        .arg(PROMPT)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("codex exec did not finish within 120 s")
        .unwrap()
}

/// The gateway, compressing, in front of a Chat-Completions-only model scripted to call the
/// shell once with `command` and then answer; `idle` closes idle sockets.
async fn gateway_to_a_scripted_model(command: &str, idle: Duration) -> Harness {
    let upstream = Server::builder()
        .reply(Reply::sse(shell_call(command)))
        .stream(chunks(&["The command printed ", "ctxgate-codex-42."], None));
    Harness::builder()
        .upstream(upstream)
        .config(move |c| {
            c.compression.policy.mode = CompressionMode::Rules;
            c.server.idle_timeout = idle;
        })
        .start()
        .await
}

/// Codex's home with its built-in OpenAI provider pointed at the gateway `url`, logged in
/// with an API key (the built-in provider prefers the Responses API's WebSocket mode).
async fn built_in_provider_home(url: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let codex_home = home.path().join(".codex");
    std::fs::create_dir_all(&codex_home).unwrap();
    std::fs::create_dir_all(home.path().join("work")).unwrap();
    let config = format!(
        "model = \"mock-model\"\nopenai_base_url = \"{url}/v1\"\ncli_auth_credentials_store = \"file\"\n{OFFLINE}"
    );
    std::fs::write(codex_home.join("config.toml"), config).unwrap();
    let dirs = dirs_in(&home);
    let mut login = codex_command(&dirs.borrow())
        .args(["login", "--with-api-key"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = login.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, KEY.as_bytes()).await.unwrap();
    drop(stdin);
    let logged_in = login.wait_with_output().await.unwrap();
    assert!(logged_in.status.success(), "{}", String::from_utf8_lossy(&logged_in.stderr));
    home
}

/// The directories of a Codex home made in `home`.
fn dirs_in(home: &tempfile::TempDir) -> OwnedHome {
    OwnedHome {
        home: home.path().into(),
        codex_home: home.path().join(".codex"),
        workdir: home.path().join("work"),
    }
}

struct OwnedHome {
    home: std::path::PathBuf,
    codex_home: std::path::PathBuf,
    workdir: std::path::PathBuf,
}

impl OwnedHome {
    fn borrow(&self) -> CodexHome<'_> {
        CodexHome { home: &self.home, codex_home: &self.codex_home, workdir: &self.workdir }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_exec_runs_a_tool_round_through_the_gateway_over_a_chat_only_upstream() {
    // Given a Chat-Completions-only model scripted to call the shell, then answer; the gateway
    // compressing; and Codex configured with the gateway as its provider
    let h = gateway_to_a_scripted_model(COMMAND, Duration::from_secs(60)).await;
    let recorder = Recorder::start(&h.url).await;
    let home = tempfile::tempdir().unwrap();
    let codex_home = home.path().join(".codex");
    let workdir = home.path().join("work");
    std::fs::create_dir_all(&codex_home).unwrap();
    std::fs::create_dir_all(&workdir).unwrap();
    std::fs::write(codex_home.join("config.toml"), codex_config(&recorder.url)).unwrap();

    // When `codex exec` runs the task non-interactively
    let started = Instant::now();
    let output = run_exec(&CodexHome { home: home.path(), codex_home: &codex_home, workdir: &workdir }).await;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Then Codex finished with the scripted answer, having run the command
    assert!(output.status.success(), "codex exec failed ({}):\n{stderr}\n{stdout}", output.status);
    assert!(stdout.contains(ANSWER), "stdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("codex exec took {elapsed:.2?}");

    // And it sent two Responses requests, one per model call: no retry, no fallback, no other call
    let exchanges = recorder.exchanges();
    let sent: Vec<(String, String)> =
        exchanges.iter().map(|e| (e.method.to_string(), e.path.clone())).collect();
    assert_eq!(
        sent,
        [("POST".into(), "/v1/responses".into()), ("POST".into(), "/v1/responses".into())],
        "{stderr}"
    );
    assert!(exchanges.iter().all(|e| e.status == 200), "{exchanges:?}");
    let thread = exchanges[0].headers["thread-id"].to_str().unwrap().to_string();
    for exchange in &exchanges {
        let (headers, body) = (&exchange.headers, exchange.json());
        eprintln!(
            "Codex sent {} {} with headers {:?} and body fields {:?}",
            exchange.method,
            exchange.path,
            headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            body.as_object().unwrap().keys().collect::<Vec<_>>()
        );
        assert_eq!(headers["authorization"], format!("Bearer {KEY}"));
        assert_eq!(headers["thread-id"], thread.as_str(), "one thread throughout");
        assert_eq!(headers["session-id"], thread.as_str());
        assert_eq!(body["prompt_cache_key"], thread.as_str());
        assert_eq!((&body["store"], &body["stream"]), (&json!(false), &json!(true)));
        assert!(body.get("previous_response_id").is_none_or(Value::is_null), "the whole history, every time");
        // What the gateway added: the turn ran on a session, and was measured for compression
        let answered = &exchange.response_headers;
        let shown = ["x-ctxgate-compression", "x-ctxgate-tokens-before", "x-ctxgate-tokens-after"];
        eprintln!("and got {:?}", shown.map(|h| answered.get(h)));
        assert!(answered.contains_key("x-ctxgate-session-version"), "{answered:?}");
        assert!(answered.contains_key("x-ctxgate-compression"), "{answered:?}");
        let before: u64 = answered["x-ctxgate-tokens-before"].to_str().unwrap().parse().unwrap();
        assert!(before > 0 && answered.contains_key("x-ctxgate-tokens-after"), "{answered:?}");
    }
    assert!(stderr.contains(&format!("session id: {thread}")), "Codex's own id names the thread:\n{stderr}");
    let second = exchanges[1].json();
    let items = second["input"].as_array().unwrap();
    let call = items.iter().find(|i| i["type"] == "function_call").expect("the call in the history");
    assert_eq!((&call["name"], &call["call_id"]), (&json!("exec_command"), &json!("call_codex_1")));
    let output = items.iter().find(|i| i["type"] == "function_call_output").expect("its output");
    assert!(output["output"].as_str().unwrap().contains(PRINTED), "{output}");

    // And the model got chat requests, the second with the shell's output as a tool message
    let asked = h.upstream(0).requests();
    assert_eq!(asked.len(), 2);
    assert!(asked.iter().all(|r| r.path == "/v1/chat/completions"), "translated to chat");
    let messages = asked[1].json()["messages"].as_array().unwrap().clone();
    let tool = messages.iter().find(|m| m["role"] == "tool").expect("a tool message");
    assert_eq!(tool["tool_call_id"], "call_codex_1");
    assert!(tool["content"].as_str().unwrap().contains(PRINTED), "{tool}");

    // And the thread is a session holding the whole task, read with Codex's credential
    let transcript = stores::transcript(&h.client, &h.url, &thread, &format!("Bearer {KEY}")).await;
    let user = transcript.iter().find(|m| m["role"] == "user" && m["content"] == PROMPT);
    assert!(user.is_some(), "{transcript:?}");
    assert!(transcript
        .iter()
        .any(|m| m["role"] == "assistant" && m["tool_calls"][0]["id"] == "call_codex_1"));
    assert!(transcript
        .iter()
        .any(|m| m["role"] == "tool" && m["content"].as_str().unwrap().contains(PRINTED)));
    assert_eq!(transcript.last().unwrap(), &json!({"role": "assistant", "content": ANSWER}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_s_built_in_provider_runs_a_tool_round_over_the_gateway_s_websocket() {
    // Given a Chat-Completions-only model scripted to call the shell, then answer; and Codex's
    // built-in OpenAI provider pointed at the gateway, logged in with an API key (the built-in
    // provider prefers the Responses API's WebSocket mode)
    let h = gateway_to_a_scripted_model(COMMAND, Duration::from_secs(60)).await;
    let home = built_in_provider_home(&h.url).await;

    // When `codex exec` runs the task
    let started = Instant::now();
    let output = run_exec(&dirs_in(&home).borrow()).await;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Then Codex finished with the scripted answer, having run the command
    assert!(output.status.success(), "codex exec failed ({}):\n{stderr}\n{stdout}", output.status);
    assert!(stdout.contains(ANSWER), "stdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("codex exec over the WebSocket took {elapsed:.2?}");

    // And it spoke over the gateway's WebSocket only: one upgrade answered, its warm-up
    // (`generate: false`, answered by the gateway) and both model calls as turns on it, and no
    // `POST /v1/responses` fallback
    assert_socket_turns(&h, 1.0).await;

    // And the model got two chat requests, the second with the shell's output as a tool message
    assert_second_request_holds_the_task(&h);

    // And the thread is a session holding the whole task, read with Codex's credential
    let thread = stderr
        .lines()
        .find_map(|l| l.strip_prefix("session id: "))
        .expect("Codex names its thread")
        .trim()
        .to_string();
    let transcript = stores::transcript(&h.client, &h.url, &thread, &format!("Bearer {KEY}")).await;
    assert!(transcript.iter().any(|m| m["role"] == "user" && m["content"] == PROMPT), "{transcript:?}");
    assert!(transcript
        .iter()
        .any(|m| m["role"] == "tool" && m["content"].as_str().unwrap().contains(PRINTED)));
    assert_eq!(transcript.last().unwrap(), &json!({"role": "assistant", "content": ANSWER}));
}

/// Codex keeps its socket open between model calls; the gateway closes one idle for
/// `server.idle_timeout` (a long tool run on Codex's side can outlast it). Codex 0.171 then
/// connects again and sends its whole history, which the gateway serves on the new socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_goes_on_after_the_gateway_closes_its_idle_websocket() {
    // Given the gateway closing sockets idle for 1 s, and a model whose shell command takes 3 s
    let h = gateway_to_a_scripted_model(&format!("sleep 3 && {COMMAND}"), Duration::from_secs(1)).await;
    let home = built_in_provider_home(&h.url).await;

    // When `codex exec` runs the task (the socket closes while the command runs)
    let output = run_exec(&dirs_in(&home).borrow()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Then Codex finished with the scripted answer, having run the command
    assert!(output.status.success(), "codex exec failed ({}):\n{stderr}\n{stdout}", output.status);
    assert!(stdout.contains(ANSWER), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // And it opened a second socket for the call after the close, with no failed turn and no
    // `POST /v1/responses` fallback: the warm-up and the first call on one, the second on the
    // other
    assert_socket_turns(&h, 2.0).await;

    // And the model's second request held the whole task, the shell's output included: the new
    // socket continued the conversation without the first one's memory of it
    assert_second_request_holds_the_task(&h);
}

/// Codex spoke over `connections` of the gateway's WebSockets only: each upgrade answered, its
/// warm-up (`generate: false`, answered by the gateway) and both model calls as turns, none
/// failed, and no `POST /v1/responses` fallback (socket turns count as requests: the two model
/// calls are all of the 200s).
async fn assert_socket_turns(h: &Harness, connections: f64) {
    let metrics = h.metrics().await;
    let sample = |name: &str| support::sample_value(&metrics, name);
    assert_eq!(sample("ctxgate_responses_websocket_connections_total"), connections, "{metrics}");
    assert_eq!(sample(r#"ctxgate_requests_total{route="responses",status="101"}"#), connections, "{metrics}");
    assert_eq!(sample(r#"ctxgate_requests_total{route="responses",status="200"}"#), 2.0, "a POST fallback");
    assert_eq!(sample(r#"ctxgate_responses_websocket_turns_total{outcome="completed"}"#), 3.0, "{metrics}");
    assert_eq!(sample(r#"ctxgate_responses_websocket_turns_total{outcome="error"}"#), 0.0, "{metrics}");
}

/// The model got two chat requests, the second with the whole conversation and the shell's
/// output as a tool message.
fn assert_second_request_holds_the_task(h: &Harness) {
    let asked = h.upstream(0).requests();
    assert_eq!(asked.len(), 2);
    let messages = asked[1].json()["messages"].as_array().unwrap().clone();
    let tool = messages.iter().find(|m| m["role"] == "tool").expect("a tool message");
    assert_eq!(tool["tool_call_id"], "call_codex_1");
    assert!(tool["content"].as_str().unwrap().contains(PRINTED), "{tool}");
    assert!(messages.iter().any(|m| m["role"] == "user" && m["content"] == PROMPT), "the whole conversation");
}
