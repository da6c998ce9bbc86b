//! MCP tools against a real MCP server (the Python SDK's FastMCP over streamable HTTP): plain
//! calls, a tool error, a tool that runs as an MCP task, and a task that outlives the gateway
//! process that started it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use ctxgate::config::{McpBackend, ToolConfig};
use serde_json::{json, Value};
use support::gateway::{get_json, Gateway, AUTH};
use support::mcp::McpServer;
use support::stores::Store;
use support::{fixtures, Harness, Reply};

fn mcp_tool(name: &str, url: &str, parameters: Value) -> ToolConfig {
    ToolConfig {
        name: name.into(),
        description: String::new(),
        parameters,
        inject: true,
        timeout: Duration::from_secs(30),
        retries: 2,
        max_concurrency: 16,
        run_as_task: false,
        http: None,
        mcp: Some(McpBackend { url: url.into(), tool: None, bearer_env: None }),
    }
}

fn calling(calls: &[(&str, &str, Value)]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}))
        .collect();
    json!({
        "id": "chatcmpl-mcp", "object": "chat.completion", "created": 1, "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls"}],
    })
}

fn ask() -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "Use the tools."}]})
}

fn two_numbers() -> Value {
    json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]})
}

fn report_schema() -> Value {
    json!({"type": "object", "properties": {"topic": {"type": "string"}, "seconds": {"type": "number"}}, "required": ["topic", "seconds"]})
}

#[tokio::test]
async fn mcp_tools_answer_and_fail_as_tool_results() {
    let mcp = McpServer::start().await;
    let url = mcp.url.clone();
    let replies = [
        Reply::json(
            200,
            calling(&[
                ("c0", "add", json!({"a": 2, "b": 3})),
                ("c1", "fail", json!({"message": "boom"})),
                ("c2", "add", json!({"a": 40, "b": 2})),
            ]),
        ),
        Reply::json(200, fixtures::completion("done")),
    ];
    let mut mock = mock_upstream::Server::builder();
    for r in replies {
        mock = mock.reply(r);
    }
    let h = Harness::builder()
        .upstream(mock)
        .config(move |c| {
            c.tools = vec![
                mcp_tool("add", &url, two_numbers()),
                mcp_tool(
                    "fail",
                    &url,
                    json!({"type": "object", "properties": {"message": {"type": "string"}}}),
                ),
            ];
        })
        .start()
        .await;
    let body: Value = h.chat().json(&ask()).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "done");
    let runs = body["ctxgate"]["tool_runs"].as_array().unwrap();
    let outcomes: Vec<&str> = runs.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["ok", "tool_error", "ok"]);

    let second = h.upstream(0).requests()[1].json();
    // Injected: the model saw both definitions.
    let names: Vec<&str> =
        second["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["add", "fail"]);
    let results: Vec<&Value> =
        second["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(results[0]["content"], "5");
    assert!(results[1]["content"].as_str().unwrap().contains("boom"));
    assert_eq!(results[2]["content"], "42");
}

#[tokio::test]
async fn an_mcp_result_past_the_limit_reaches_the_model_as_an_error_result() {
    // Given an MCP tool that echoes its text, and a result limit of 1 KiB
    let mcp = McpServer::start().await;
    let url = mcp.url.clone();
    let echo =
        json!({"type": "object", "properties": {"text": {"type": "string"}, "seconds": {"type": "number"}}});
    let mut mock = mock_upstream::Server::builder();
    for r in [
        Reply::json(
            200,
            calling(&[
                ("e0", "sleep_echo", json!({"text": "x".repeat(4096), "seconds": 0})),
                ("e1", "sleep_echo", json!({"text": "fits", "seconds": 0})),
            ]),
        ),
        Reply::json(200, fixtures::completion("done")),
    ] {
        mock = mock.reply(r);
    }
    let h = Harness::builder()
        .upstream(mock)
        .config(move |c| {
            c.tool_loop.max_response_bytes = 1024;
            c.tools = vec![mcp_tool("sleep_echo", &url, echo)];
        })
        .start()
        .await;

    // When the model calls it with a result past the limit
    let body: Value = h.chat().json(&ask()).send().await.unwrap().json().await.unwrap();

    // Then that call is a tool error saying so, the other call's result goes through
    assert_eq!(body["choices"][0]["message"]["content"], "done");
    let outcomes: Vec<&str> = body["ctxgate"]["tool_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["upstream_error", "ok"]);
    let second = h.upstream(0).requests()[1].json();
    let results: Vec<&Value> =
        second["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    let refused = results[0]["content"].as_str().unwrap();
    assert!(refused.contains("larger than 1024 bytes"), "{refused}");
    assert!(!refused.contains("xxxx"), "the result itself is not passed on");
    assert_eq!(results[1]["content"], "fits");
}

#[tokio::test]
async fn an_mcp_task_is_polled_to_its_result_without_a_session() {
    let mcp = McpServer::start().await;
    let url = mcp.url.clone();
    let mut mock = mock_upstream::Server::builder();
    for r in [
        Reply::json(
            200,
            calling(&[
                ("t0", "slow_report", json!({"topic": "rust", "seconds": 1.0})),
                ("t1", "add", json!({"a": 1, "b": 1})),
            ]),
        ),
        Reply::json(200, fixtures::completion("reported")),
    ] {
        mock = mock.reply(r);
    }
    let h = Harness::builder()
        .upstream(mock)
        .config(move |c| {
            c.tool_loop.task_poll_interval = Duration::from_millis(100);
            c.tools =
                vec![mcp_tool("slow_report", &url, report_schema()), mcp_tool("add", &url, two_numbers())];
        })
        .start()
        .await;
    let started = Instant::now();
    let body: Value = h.chat().json(&ask()).send().await.unwrap().json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(body["choices"][0]["message"]["content"], "reported");
    let second = h.upstream(0).requests()[1].json();
    let results: Vec<&Value> =
        second["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(results[0]["content"], "report on rust");
    assert_eq!(results[1]["content"], "2");
    assert_eq!(h.metric("ctxgate_tool_tasks_in_flight").await, 0.0);
}

async fn a_pending_task_survives_a_gateway_restart(store: Store) {
    let mcp = McpServer::start().await;
    let store = store.url().await;
    let call =
        || Reply::json(200, calling(&[("r0", "slow_report", json!({"topic": "restarts", "seconds": 4.0}))]));
    let upstream = mock_upstream::Server::builder()
        .reply(call())
        .reply(call())
        .reply(Reply::json(200, fixtures::completion("finished after the restart")))
        .start()
        .await
        .unwrap();
    let tools = slow_report_toml(&mcp.url);
    let mut first = Gateway::start_with(&upstream.base_url(), &store.url, &tools).await;
    let client = reqwest::Client::new();
    let pending = tokio::spawn(first.chat(&client, "tasks-1").json(&ask()).send());

    // The task is recorded with the MCP server's id while it runs; then the gateway dies.
    let recorded = recorded_task(&client, &first.base, "tasks-1").await;
    first.kill();
    assert!(pending.await.unwrap().is_err(), "the client's connection died with the gateway");

    // A fresh process takes the turn over and finishes the same task.
    let second = Gateway::start_with(&upstream.base_url(), &store.url, &tools).await;
    // The dead owner's lease (1 s) has to run out before the turn can be taken over.
    second.resume_after_lease(&client, "tasks-1", Duration::from_secs(10)).await;
    let transcript = committed(&client, &second.base, "tasks-1", 4).await;
    assert_eq!(transcript[0], ask()["messages"][0]);
    assert_eq!(transcript[1]["tool_calls"][0]["function"]["name"], "slow_report");
    assert_eq!(transcript[2], json!({"role": "tool", "tool_call_id": "r0", "content": "report on restarts"}));
    assert_eq!(transcript[3]["content"], "finished after the restart");

    finished_once(&client, &second.base, "tasks-1", &recorded).await;
    assert_eq!(upstream.requests().len(), 3);
}

on_both_stores!(a_pending_task_survives_a_gateway_restart);

/// The `slow_report` tool as TOML, with its MCP server at `url`.
fn slow_report_toml(url: &str) -> String {
    format!(
        "[tool_loop]\ntask_poll_interval = \"100ms\"\n[[tools]]\nname = \"slow_report\"\ninject = true\ntimeout = \"60s\"\nparameters = {{ type = \"object\", properties = {{ topic = {{ type = \"string\" }}, seconds = {{ type = \"number\" }} }} }}\n[tools.mcp]\nurl = {url:?}\n"
    )
}

/// The session's first task once it is recorded with the MCP server's id, running.
async fn recorded_task(client: &reqwest::Client, base: &str, session: &str) -> Value {
    let tasks_url = format!("{base}/v1/sessions/{session}/tasks");
    let deadline = Instant::now() + Duration::from_secs(15);
    let recorded = loop {
        let listing = get_json(client, &tasks_url).await;
        if let Some(task) =
            listing["data"].as_array().and_then(|d| d.first()).filter(|t| t["remote_id"].is_string())
        {
            break task.clone();
        }
        assert!(Instant::now() < deadline, "no task recorded: {listing}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(recorded["state"], "working");
    assert_eq!(recorded["tool"], "slow_report");
    recorded
}

/// The session's transcript once the resumed turn has committed (at least `messages` long).
async fn committed(client: &reqwest::Client, base: &str, session: &str, messages: usize) -> Vec<Value> {
    let messages_url = format!("{base}/v1/sessions/{session}/messages");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = get_json(client, &messages_url).await;
        let data = listing["data"].as_array().cloned().unwrap_or_default();
        if data.len() >= messages {
            return data;
        }
        assert!(Instant::now() < deadline, "the resumed turn did not commit: {listing}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the session ran one task, `recorded`, to its end (polled by the second process).
async fn finished_once(client: &reqwest::Client, base: &str, session: &str, recorded: &Value) {
    let listing = get_json(client, &format!("{base}/v1/sessions/{session}/tasks")).await;
    let tasks = listing["data"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "one task, not a second one started after the restart: {listing}");
    assert_eq!(tasks[0]["remote_id"], recorded["remote_id"]);
    assert_eq!(tasks[0]["state"], "completed");
    assert_eq!(tasks[0]["attempts"], 2);
    assert_eq!(tasks[0]["result"], "report on restarts");
}

#[tokio::test]
async fn a_pending_task_of_a_responses_turn_survives_a_gateway_restart() {
    let mcp = McpServer::start().await;
    let store = Store::Embedded.url().await;
    let arguments = json!({"topic": "restarts", "seconds": 4.0}).to_string();
    let call = || {
        let item = json!({"type": "function_call", "id": "fc_1", "call_id": "r0", "name": "slow_report",
                          "arguments": arguments, "status": "completed"});
        Reply::json(200, fixtures::response("resp_call", json!([item])))
    };
    let upstream = mock_upstream::Server::builder()
        .reply(call())
        .reply(call())
        .reply(Reply::json(200, fixtures::response_text("resp_done", "finished after the restart")))
        .start()
        .await
        .unwrap();
    let config = format!("api = \"responses\"\n{}", slow_report_toml(&mcp.url));
    let client = reqwest::Client::new();

    // Given a session turn to an upstream with the Responses API whose model called an MCP
    // tool that runs as a task, and the gateway killed while the task runs
    let mut first = Gateway::start_with(&upstream.base_url(), &store.url, &config).await;
    let ask = json!({"model": "mock-model", "input": "Use the tools."});
    let post = client
        .post(format!("{}/v1/responses", first.base))
        .header("authorization", AUTH)
        .header("x-session-id", "tasks-native")
        .json(&ask);
    let pending = tokio::spawn(post.send());
    let recorded = recorded_task(&client, &first.base, "tasks-native").await;
    first.kill();
    assert!(pending.await.unwrap().is_err(), "the client's connection died with the gateway");

    // When a fresh process takes the turn over
    let second = Gateway::start_with(&upstream.base_url(), &store.url, &config).await;
    second.resume_after_lease(&client, "tasks-native", Duration::from_secs(10)).await;

    // Then the turn is re-issued, the same task is polled to its result, and the answer is
    // committed
    let transcript = committed(&client, &second.base, "tasks-native", 1).await;
    assert_eq!(transcript.last().unwrap()["content"], "finished after the restart");
    finished_once(&client, &second.base, "tasks-native", &recorded).await;
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[1].body, requests[0].body, "re-issued as sent");
    let results: Vec<Value> = requests[2].json()["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .cloned()
        .collect();
    assert_eq!(
        results,
        [json!({"type": "function_call_output", "call_id": "r0", "output": "report on restarts"})]
    );
}
