//! The Responses API's WebSocket mode, answered by the gateway: a real WebSocket client
//! (tokio-tungstenite, and the official Python SDK's `responses.connect()`) through the real
//! gateway to a Chat-Completions-only mock. Turns chain on one socket with `store: false`,
//! events are the HTTP stream's, errors are frames the socket lives through, `stream_id` lanes
//! run side by side, the key layer and the bounds apply.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mock_upstream::Server;
use reqwest::Method;
use serde_json::{json, Value};
use support::gateway::AUTH;
use support::{chunks, key, Gate, Harness};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

async fn connect(h: &Harness, authorization: Option<&str>) -> Result<Client, WsError> {
    let mut request = format!("ws://{}/v1/responses", h.addr).into_client_request().unwrap();
    if let Some(authorization) = authorization {
        request.headers_mut().insert("authorization", HeaderValue::from_str(authorization).unwrap());
    }
    let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request)).await.expect("handshake hung")?;
    Ok(ws)
}

async fn send(ws: &mut Client, message: Value) {
    ws.send(Message::text(message.to_string())).await.unwrap();
}

/// The next text frame, as JSON.
async fn next_event(ws: &mut Client) -> Value {
    loop {
        match timeout(WAIT, ws.next()).await.expect("no frame in time") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(text.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Frames up to and including the one that ends the turn (`response.completed`, `.failed`,
/// `.incomplete`, or an error frame).
async fn turn(ws: &mut Client) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next_event(ws).await;
        let kind = event["type"].as_str().unwrap().to_string();
        events.push(event);
        if matches!(kind.as_str(), "response.completed" | "response.failed" | "response.incomplete" | "error")
        {
            return events;
        }
    }
}

fn create(fields: Value) -> Value {
    let mut message = json!({"type": "response.create", "model": "mock-model"});
    message.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    message
}

/// An event's shape: its type and its fields, recursively, without the values that differ
/// between two runs of one answer (ids, times).
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(fields.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        other => other.clone(),
    }
}

#[tokio::test]
async fn two_turns_chain_on_one_socket_without_storing_and_stream_the_http_events() {
    // Given a chat-only model with three answers: one over HTTP, two over one socket
    let upstream = Server::builder()
        .stream(chunks(&["Hello ", "Ada."], None))
        .stream(chunks(&["Hello ", "Ada."], None))
        .stream(chunks(&["Your name is ", "Ada."], None));
    let h = Harness::builder().upstream(upstream).start().await;
    let first = json!({"input": "My name is Ada.", "instructions": "Be terse.", "store": false});
    let over_http = h
        .v1_as_client(Method::POST, "/responses")
        .json(&{
            let mut body = create(first.clone());
            body.as_object_mut().unwrap().remove("type");
            body["stream"] = true.into();
            body
        })
        .send()
        .await
        .unwrap();
    let over_http: Vec<Value> = support::sse_data(&over_http.text().await.unwrap())
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();

    // When a client sends the same turn over a socket, then only its next input with the
    // first response's id, neither stored
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();
    send(&mut ws, create(first)).await;
    let one = turn(&mut ws).await;
    let done = one.last().unwrap();
    assert_eq!(done["type"], "response.completed", "{one:?}");
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Hello Ada.");
    let id = done["response"]["id"].as_str().unwrap().to_string();
    let next = json!({
        "previous_response_id": id,
        "store": false,
        "instructions": "Be terse.",
        "input": [{"role": "user", "content": "What is my name?"}],
    });
    send(&mut ws, create(next)).await;
    let two = turn(&mut ws).await;

    // Then each frame is one event of the HTTP stream, in the same order and shape
    assert_eq!(one.iter().map(shape).collect::<Vec<_>>(), over_http.iter().map(shape).collect::<Vec<_>>());
    let numbers: Vec<u64> = one.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..one.len() as u64).collect::<Vec<_>>());
    let two_done = two.last().unwrap();
    assert_eq!(two_done["type"], "response.completed", "{two:?}");
    assert_eq!(two_done["response"]["output"][0]["content"][0]["text"], "Your name is Ada.");
    assert_eq!(two_done["response"]["previous_response_id"], id.as_str());

    // And the model got the whole conversation on the second turn
    let asked = h.upstream(0).requests();
    assert_eq!(asked.len(), 3);
    assert_eq!(
        asked[2].json()["messages"],
        json!([
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"},
        ])
    );
    // And nothing was stored
    let got = h.v1_as_client(Method::GET, &format!("/responses/{id}")).send().await.unwrap();
    assert_eq!(got.status(), 404);
    // And the socket and its turns are counted
    assert_eq!(h.metric("ctxgate_responses_websocket_connections_total").await, 1.0);
    assert_eq!(h.metric(r#"ctxgate_responses_websocket_turns_total{outcome="completed"}"#).await, 2.0);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn errors_are_frames_and_the_socket_serves_the_next_turn() {
    // Given a gateway in front of a chat-only model with one answer
    let h = Harness::builder().upstream(Server::builder().stream(chunks(&["Fine."], None))).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // When a turn continues a response neither the socket nor the store holds
    send(&mut ws, create(json!({"input": "hi", "previous_response_id": "resp_unknown", "store": false})))
        .await;
    let error = next_event(&mut ws).await;

    // Then it gets OpenAI's error frame for it
    assert_eq!(error["type"], "error");
    assert_eq!(error["status"], 400);
    assert_eq!(error["error"]["code"], "previous_response_not_found", "{error}");
    assert_eq!(error["error"]["param"], "previous_response_id");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    // And background, another message type and a non-object are refused the same way
    send(&mut ws, create(json!({"input": "hi", "background": true}))).await;
    let error = next_event(&mut ws).await;
    assert_eq!((&error["status"], &error["error"]["param"]), (&json!(400), &json!("background")), "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    send(&mut ws, json!({"type": "response.cancel"})).await;
    assert_eq!(next_event(&mut ws).await["error"]["param"], "type");
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(next_event(&mut ws).await["error"]["code"], "invalid_json");

    // And the socket still serves a turn, which alone reached the model
    send(&mut ws, create(json!({"input": "hi", "store": false}))).await;
    let events = turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed", "{events:?}");
    assert_eq!(h.upstream(0).requests().len(), 1);
    assert_eq!(h.metric(r#"ctxgate_responses_websocket_turns_total{outcome="error"}"#).await, 4.0);
}

#[tokio::test]
async fn a_warm_up_answers_without_the_model_and_its_input_starts_the_conversation() {
    // Given a chat-only model with one answer
    let h = Harness::builder().upstream(Server::builder().stream(chunks(&["Hi Ada."], None))).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // When a turn with `generate: false` comes first, as Codex sends one, then the real one
    // with only its new input
    send(&mut ws, create(json!({"input": "My name is Ada.", "store": false, "generate": false}))).await;
    let warm = turn(&mut ws).await;
    let done = &warm.last().unwrap()["response"];
    assert_eq!(warm.last().unwrap()["type"], "response.completed", "{warm:?}");
    assert_eq!(done["output"], json!([]));
    assert_eq!(h.upstream(0).requests().len(), 0, "a warm-up asks no model");
    let id = done["id"].as_str().unwrap();
    send(&mut ws, create(json!({"input": "Greet me.", "store": false, "previous_response_id": id}))).await;
    let events = turn(&mut ws).await;

    // Then the model got the warm-up's input in front of the new one, and no `generate`
    assert_eq!(events.last().unwrap()["type"], "response.completed", "{events:?}");
    let asked = h.upstream(0).requests()[0].json();
    assert_eq!(
        asked["messages"],
        json!([{"role": "user", "content": "My name is Ada."}, {"role": "user", "content": "Greet me."}])
    );
    assert!(asked.get("generate").is_none(), "{asked}");
}

#[tokio::test]
async fn a_stored_response_continues_through_the_store_on_another_socket() {
    // Given a turn stored over one socket
    let upstream =
        Server::builder().stream(chunks(&["Blue."], None)).stream(chunks(&["You said blue."], None));
    let h = Harness::builder().upstream(upstream).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();
    send(&mut ws, create(json!({"input": "My colour is blue."}))).await;
    let id = turn(&mut ws).await.last().unwrap()["response"]["id"].as_str().unwrap().to_string();
    ws.close(None).await.unwrap();

    // When a new socket continues it
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();
    send(&mut ws, create(json!({"input": "What is my colour?", "previous_response_id": id}))).await;
    let events = turn(&mut ws).await;

    // Then the chain held in the store was sent, as over HTTP
    assert_eq!(events.last().unwrap()["type"], "response.completed", "{events:?}");
    let messages = h.upstream(0).requests()[1].json()["messages"].clone();
    assert_eq!(messages[0], json!({"role": "user", "content": "My colour is blue."}));
    assert_eq!(messages.as_array().unwrap().len(), 3, "{messages}");
}

#[tokio::test]
async fn the_upgrade_passes_the_key_layer_and_turns_count_against_the_key() {
    // Given a gateway with keys on
    let h = Harness::builder()
        .upstream(Server::builder().stream(chunks(&["Keyed."], None)))
        .config(|c| {
            c.auth.keys = vec![key("client", "sk-ws-client")];
            c.upstreams[0].keyless = true;
        })
        .start()
        .await;

    // Then no key, or a wrong one, gets 401 before any upgrade
    for authorization in [None, Some("Bearer sk-wrong")] {
        match connect(&h, authorization).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 401);
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            }
            other => panic!("expected a 401, got {:?}", other.map(|_| ())),
        }
    }

    // And the right key opens a socket whose turns run
    let mut ws = connect(&h, Some("Bearer sk-ws-client")).await.unwrap();
    send(&mut ws, create(json!({"input": "hi", "store": false}))).await;
    let events = turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed", "{events:?}");
    // The gateway key stays with the gateway
    assert!(h.upstream(0).requests()[0]
        .headers
        .get("authorization")
        .is_none_or(|v| v != "Bearer sk-ws-client"));
}

#[tokio::test]
async fn a_message_over_the_body_limit_closes_the_socket_with_1009_and_pings_are_answered() {
    // Given a gateway whose request bodies are limited to 64 KiB
    let h = Harness::builder().config(|c| c.server.max_body_bytes = 65_536.try_into().unwrap()).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // When the client pings, then sends a message over the limit
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
    let big = create(json!({"input": "x".repeat(100_000)}));
    ws.send(Message::text(big.to_string())).await.unwrap();

    // Then the socket is closed with 1009 (message too big)
    match timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(h.upstream(0).requests().len(), 0);
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_idle_timeout() {
    // Given a gateway whose connections idle out after 300 ms
    let h = Harness::builder().config(|c| c.server.idle_timeout = Duration::from_millis(300)).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // Then a socket that sends nothing is closed normally
    match timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn turns_are_sequential_and_a_client_leaving_mid_turn_cancels_it() {
    // Given a model whose answer holds after its first word
    let gate = Gate::new();
    let h = Harness::builder()
        .upstream(Server::builder().stream(chunks(&["Slow ", "answer."], Some((1, &gate)))))
        .start()
        .await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();
    send(&mut ws, create(json!({"input": "hi", "store": false}))).await;
    loop {
        if next_event(&mut ws).await["type"] == "response.output_text.delta" {
            break;
        }
    }

    // When another response.create comes while it runs
    send(&mut ws, create(json!({"input": "again", "store": false}))).await;

    // Then it is refused, and the running turn goes on
    let refused = next_event(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "conversation_already_has_active_response");

    // And when the client leaves mid-turn, the turn is cancelled
    drop(ws);
    h.metric_becomes(r#"ctxgate_responses_websocket_turns_total{outcome="cancelled"}"#, 1.0).await;
    gate.open();
    assert_eq!(h.upstream(0).requests().len(), 1);
}

/// The text a lane's turn answered, from its frames.
fn answered(frames: &[Value], lane: &str) -> String {
    frames
        .iter()
        .filter(|f| f["stream_id"] == lane && f["type"] == "response.output_text.delta")
        .map(|f| f["delta"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn stream_id_lanes_run_side_by_side_each_in_order_and_a_lane_forks_from_another() {
    // Given a model whose first answer holds after its first word, then answers at once
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(chunks(&["A1 ", "done."], Some((1, &gate))))
        .stream(chunks(&["B1."], None))
        .stream(chunks(&["A2."], None))
        .stream(chunks(&["C1."], None));
    let h = Harness::builder().upstream(upstream).start().await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // When lane "a" starts a turn that holds, a second message waits on lane "a", and lane "b"
    // starts its own
    send(&mut ws, create(json!({"stream_id": "a", "input": "first", "store": false}))).await;
    let mut frames = Vec::new();
    while frames.last().is_none_or(|f: &Value| f["type"] != "response.output_text.delta") {
        frames.push(next_event(&mut ws).await);
    }
    send(&mut ws, create(json!({"stream_id": "a", "input": "second", "store": false}))).await;
    send(&mut ws, create(json!({"stream_id": "b", "input": "bee", "store": false}))).await;
    let b_done = loop {
        let frame = next_event(&mut ws).await;
        frames.push(frame.clone());
        if frame["type"] == "response.completed" {
            break frame;
        }
    };

    // Then lane "b" finishes while lane "a" holds, and every frame names its lane
    assert_eq!(b_done["stream_id"], "b", "{b_done}");
    assert_eq!(answered(&frames, "b"), "B1.");
    gate.open();
    let mut completed = 0;
    while completed < 2 {
        let frame = next_event(&mut ws).await;
        completed += usize::from(frame["type"] == "response.completed");
        frames.push(frame);
    }
    assert!(frames.iter().all(|f| f["stream_id"] == "a" || f["stream_id"] == "b"), "{frames:?}");
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    // And lane "a" ran its two messages in order, the second after the first was done
    assert_eq!(answered(&frames, "a"), "A1 done.A2.");
    let asked: Vec<Value> = h.upstream(0).requests().iter().map(|r| r.json()["messages"].clone()).collect();
    let last_user = |messages: &Value| messages.as_array().unwrap().last().unwrap()["content"].clone();
    assert_eq!(asked.iter().map(last_user).collect::<Vec<_>>(), ["first", "bee", "second"]);

    // And a new lane continues lane "b"'s unstored response by its id (a fork)
    let b_id = b_done["response"]["id"].as_str().unwrap();
    send(
        &mut ws,
        create(json!({"stream_id": "c", "previous_response_id": b_id, "input": "fork", "store": false})),
    )
    .await;
    let fork = turn(&mut ws).await;
    assert!(fork.iter().all(|f| f["stream_id"] == "c"), "{fork:?}");
    assert_eq!(fork.last().unwrap()["response"]["previous_response_id"], b_id);
    let sent = h.upstream(0).requests()[3].json()["messages"].clone();
    let texts: Vec<&str> = sent.as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(texts, ["bee", "B1.", "fork"], "{sent}");

    // And the four turns counted as completed
    assert_eq!(h.metric(r#"ctxgate_responses_websocket_turns_total{outcome="completed"}"#).await, 4.0);
}

#[tokio::test]
async fn messages_waiting_on_a_socket_are_bounded_by_the_body_limit() {
    // Given a socket with a 4 KiB body limit and a turn holding lane "a"
    let gate = Gate::new();
    let upstream =
        Server::builder().stream(chunks(&["A1 ", "done."], Some((1, &gate)))).stream(chunks(&["A2."], None));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.max_body_bytes = std::num::NonZeroUsize::new(4096).unwrap())
        .start()
        .await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();
    send(&mut ws, create(json!({"stream_id": "a", "input": "first", "store": false}))).await;
    while next_event(&mut ws).await["type"] != "response.output_text.delta" {}

    // When two messages of 2.5 KB each are sent to wait on it
    let padded = |n: usize| {
        create(json!({"stream_id": "a", "input": format!("{n}{}", "x".repeat(2500)), "store": false}))
    };
    send(&mut ws, padded(2)).await;
    send(&mut ws, padded(3)).await;

    // Then the second is refused on its lane (the two would pass 4 KiB), and the first runs in
    // its turn
    let refused = next_event(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "too_many_queued_responses");
    assert_eq!(refused["stream_id"], "a");
    gate.open();
    let mut completed = 0;
    while completed < 2 {
        completed += usize::from(next_event(&mut ws).await["type"] == "response.completed");
    }
    let asked = h.upstream(0).requests();
    assert_eq!(asked.len(), 2);
    assert!(asked[1].json()["messages"].to_string().contains("2xxx"), "the first waiting message ran");
}

#[tokio::test]
async fn official_python_sdk_chains_two_turns_over_responses_connect() {
    // Given a chat-only model with two answers
    let upstream = Server::builder()
        .stream(chunks(&["Noted, ", "Ada."], None))
        .stream(chunks(&["You are ", "Ada."], None));
    let h = Harness::builder().upstream(upstream).start().await;

    // When the SDK opens `client.responses.connect()` and sends two turns, the second with
    // only its new input and the first's id, `store=False` both times
    let seen = support::python::run_script("responses_websocket_sdk.py", &h.v1(""), b"").await;

    // Then its own parsers read every event, and the second turn had the whole conversation
    assert_eq!(seen["first"], "Noted, Ada.", "{seen}");
    assert_eq!(seen["second"], "You are Ada.", "{seen}");
    assert_eq!(seen["types"][0], "response.created", "{seen}");
    let messages = h.upstream(0).requests()[1].json()["messages"].clone();
    assert_eq!(messages.as_array().unwrap().len(), 3, "{messages}");
    assert_eq!(messages[1], json!({"role": "assistant", "content": "Noted, Ada."}));
    assert_eq!(h.metric("ctxgate_responses_websocket_connections_total").await, 1.0);
}

#[tokio::test]
async fn socket_turns_share_the_concurrency_limit_and_count_as_requests() {
    // Given a gateway serving one request at once, and a model whose first two answers hold
    let (gate, second) = (Gate::new(), Gate::new());
    let upstream = Server::builder()
        .stream(chunks(&["Slow ", "answer."], Some((1, &gate))))
        .stream(chunks(&["Second ", "answer."], Some((1, &second))))
        .stream(chunks(&["Third."], None));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.max_concurrent_requests = std::num::NonZeroUsize::new(1).unwrap())
        .start()
        .await;
    let mut ws = connect(&h, Some(AUTH)).await.unwrap();

    // When a socket turn is running, an HTTP request is shed
    send(&mut ws, create(json!({"input": "hi", "store": false}))).await;
    while next_event(&mut ws).await["type"] != "response.output_text.delta" {}
    let shed = h.v1_as_client(Method::POST, "/responses").json(&json!({"model": "mock-model", "input": "x"}));
    let shed = shed.send().await.unwrap();
    assert_eq!(shed.status(), 503);
    gate.open();
    assert_eq!(turn(&mut ws).await.last().unwrap()["type"], "response.completed");

    // And while an HTTP stream holds the permit, a socket turn gets a 503 frame and the socket
    // lives on
    let held = h
        .v1_as_client(Method::POST, "/responses")
        .json(&json!({"model": "mock-model", "input": "x", "stream": true, "store": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    send(&mut ws, create(json!({"input": "again", "store": false}))).await;
    let refused = turn(&mut ws).await;
    let frame = refused.last().unwrap();
    assert_eq!((frame["type"].as_str(), frame["status"].as_u64()), (Some("error"), Some(503)), "{frame}");
    second.open();
    assert!(held.text().await.unwrap().contains("response.completed"));
    send(&mut ws, create(json!({"input": "third", "store": false}))).await;
    assert_eq!(turn(&mut ws).await.last().unwrap()["type"], "response.completed");

    // Then the socket's turns are in the request metrics as HTTP requests are
    let counted = |status: u16| format!(r#"ctxgate_requests_total{{route="responses",status="{status}"}}"#);
    assert_eq!(h.metric(&counted(200)).await, 3.0, "two socket turns and the HTTP stream");
    assert_eq!(h.metric(&counted(503)).await, 2.0, "one shed request, one shed turn");
}
