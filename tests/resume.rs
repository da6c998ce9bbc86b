//! Resuming streams: replay after `Last-Event-ID` following a client disconnect, and a turn
//! re-issued by a fresh process after the gateway that served it was SIGKILLed. Each on both
//! stores, asserting the exact transcript afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::gateway::{Gateway, AUTH};
use support::stores::{self, Store};
use support::{chunks, fixtures, sse_data, Gate, Harness};

/// `(id, data)` of each event in an SSE text.
fn events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let id = e.lines().find_map(|l| l.strip_prefix("id: ")).unwrap_or("").to_string();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("").to_string();
            (id, data)
        })
        .collect()
}

fn content(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from))
        .unwrap_or_default()
}

async fn replay(client: &reqwest::Client, base: &str, id: &str, last: Option<&str>) -> String {
    let mut request = client.get(format!("{base}/v1/sessions/{id}/stream")).header("authorization", AUTH);
    if let Some(last) = last {
        request = request.header("last-event-id", last);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), response.text()).await.unwrap().unwrap()
}

async fn messages(client: &reqwest::Client, base: &str, id: &str) -> Vec<Value> {
    stores::transcript(client, base, id, AUTH).await
}

fn request(stream: bool) -> Value {
    json!({"model": "mock-model", "stream": stream, "messages": [{"role": "user", "content": "count"}]})
}

async fn replay_after_a_client_disconnect(store: Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let gate = Gate::new();
    let upstream = Server::builder().stream(chunks(&["one ", "two ", "three ", "four"], Some((2, &gate))));
    let h = Harness::builder().upstream(upstream).config(move |c| c.sessions.store = url).start().await;

    // Given a client that read two events and left
    let response = h.chat().header("x-session-id", "rp").json(&request(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while events(&seen).len() < 2 {
        seen.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    let first = events(&seen);
    let turn = first[0].0.split_once('-').unwrap().0.to_string();
    assert_eq!(first[0].0, format!("{turn}-1"), "session events carry ids");
    assert_eq!(first[1].0, format!("{turn}-2"));

    // When it reconnects with Last-Event-ID while the upstream still holds the rest (the
    // response headers mean the follower is attached before the gate opens)
    let follower = h
        .client
        .get(h.v1("/sessions/rp/stream"))
        .header("authorization", AUTH)
        .header("last-event-id", &first[1].0)
        .send()
        .await
        .unwrap();
    assert_eq!(follower.status(), 200);
    assert_eq!(follower.headers()["content-type"], "text/event-stream");
    gate.open();

    // Then it gets exactly the events after it, live, to [DONE]
    let rest =
        events(&tokio::time::timeout(Duration::from_secs(10), follower.text()).await.unwrap().unwrap());
    let ids: Vec<&str> = rest.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, [3, 4, 5, 6].map(|s| format!("{turn}-{s}")));
    assert_eq!(content(&rest[0].1) + &content(&rest[1].1), "three four");
    assert_eq!(rest[3].1, "[DONE]");

    // And replays from other points agree, once the turn is over
    let all = events(&replay(&h.client, &h.url, "rp", None).await);
    assert_eq!(all.len(), 6);
    assert_eq!(events(&replay(&h.client, &h.url, "rp", Some(&format!("{turn}-0"))).await), all);
    assert_eq!(events(&replay(&h.client, &h.url, "rp", Some(&format!("{turn}-4"))).await), all[4..]);
    assert_eq!(
        events(&replay(&h.client, &h.url, "rp", Some("0-99")).await),
        all,
        "an older turn's id replays this turn"
    );
    assert!(events(&replay(&h.client, &h.url, "rp", Some(&format!("{turn}-6"))).await).is_empty());

    // And the answer was committed once, whole
    let messages = messages(&h.client, &h.url, "rp").await;
    assert_eq!(
        messages,
        [request(true)["messages"][0].clone(), json!({"role": "assistant", "content": "one two three four"})]
    );
}

/// Sends `request` and SIGKILLs the gateway once the upstream has received it; the client
/// sees its connection die.
async fn kill_while_upstream_holds(
    gateway: &mut Gateway,
    upstream: &Server,
    request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
) {
    let pending = tokio::spawn(request);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.requests().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the upstream never got the request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.kill();
    assert!(pending.await.unwrap().is_err(), "the client saw the connection die");
}

async fn a_turn_interrupted_by_sigkill_is_resumed_by_a_fresh_process(store: Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let gate = Gate::new();
    // The first attempt hangs after two events; the re-issued one answers in full.
    let upstream = Server::builder()
        .stream(chunks(&["partial ", "answer ", "lost"], Some((2, &gate))))
        .stream(chunks(&["full ", "answer"], None))
        .start()
        .await
        .unwrap();
    let client = reqwest::Client::new();

    // Given a streamed turn in flight on a gateway process
    let mut first = Gateway::start(&upstream.base_url(), &url).await;
    let response = first.chat(&client, "crash").json(&request(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let head = stream.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&head).unwrap().contains("partial"));

    // When that process is SIGKILLed mid-stream and a fresh one starts on the same store
    first.kill();
    drop(stream);
    let second = Gateway::start(&upstream.base_url(), &url).await;

    // Then once the dead owner's lease runs out, resume re-issues the turn
    second.resume_after_lease(&client, "crash", Duration::from_secs(15)).await;

    // And the client reads the re-issued answer from the stream endpoint
    let replayed = events(&replay(&client, &second.base, "crash", None).await);
    let text: String = replayed.iter().map(|(_, d)| content(d)).collect();
    assert_eq!(text, "full answer");
    assert_eq!(replayed.last().unwrap().1, "[DONE]");

    // And the transcript ends with exactly one answer to that user message
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let transcript = loop {
        let m = messages(&client, &second.base, "crash").await;
        if !m.is_empty() || tokio::time::Instant::now() >= deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        transcript,
        [request(true)["messages"][0].clone(), json!({"role": "assistant", "content": "full answer"})]
    );
    assert_eq!(upstream.requests().len(), 2, "the interrupted call was re-issued once");
    assert_eq!(upstream.requests()[1].body, upstream.requests()[0].body, "byte for byte");
}

async fn the_next_request_resumes_an_interrupted_turn_first(store: Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(chunks(&["cut"], Some((0, &gate))))
        .chat(fixtures::completion("resumed answer"))
        .chat(fixtures::completion("second answer"))
        .start()
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut first = Gateway::start(&upstream.base_url(), &url).await;
    let response =
        first.chat(&client, "next").header("x-session-mode", "append").json(&request(false)).send();
    // A non-streamed turn: kill the process while the upstream holds it
    kill_while_upstream_holds(&mut first, &upstream, response).await;
    let second = Gateway::start(&upstream.base_url(), &url).await;

    // The next request on the session waits for the resumed turn, then runs after it
    let next = second
        .chat(&client, "next")
        .header("x-session-mode", "append")
        .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "and then?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    let body: Value = next.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "second answer");

    let transcript = messages(&client, &second.base, "next").await;
    let contents: Vec<&str> = transcript.iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(contents, ["count", "resumed answer", "and then?", "second answer"]);
    let _ = gate;
}

/// A compressed turn is stored with its whole conversation: the resumed turn re-sends the
/// same compressed bytes and the transcript records what the client sent, uncompressed.
async fn a_compressed_turn_is_resumed_with_its_full_history(store: Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(chunks(&["cut"], Some((0, &gate))))
        .chat(fixtures::completion("resumed answer"))
        .start()
        .await
        .unwrap();
    let compression = "[compression]\nmode = \"rules\"\ncontext_window = 3000\nkeep_recent_turns = 1\n";
    let mut history = vec![json!({"role": "user", "content": "Fix the build."})];
    for n in 0..8 {
        let id = format!("call_{n}");
        history.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "run", "arguments": "{}"}}]}));
        let output: String =
            (0..60).map(|l| format!("\u{1b}[31mstep {n} line {l}\u{1b}[0m    done\n")).collect();
        history.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
    }
    let body = json!({"model": "mock-model", "messages": history});
    let client = reqwest::Client::new();
    let mut first = Gateway::start_with(&upstream.base_url(), &url, compression).await;
    let request = first.chat(&client, "squeezed").json(&body).send();
    kill_while_upstream_holds(&mut first, &upstream, request).await;
    let second = Gateway::start_with(&upstream.base_url(), &url, compression).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let transcript = loop {
        let _ = client
            .post(format!("{}/v1/sessions/squeezed/resume", second.base))
            .header("authorization", AUTH)
            .send()
            .await
            .unwrap();
        let m = messages(&client, &second.base, "squeezed").await;
        if !m.is_empty() {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut expected = history.clone();
    expected.push(json!({"role": "assistant", "content": "resumed answer"}));
    assert_eq!(transcript, expected, "the transcript keeps what the client sent");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].body, requests[0].body, "the resumed turn re-sends the compressed bytes");
    assert!(!String::from_utf8_lossy(&requests[0].body).contains("\\u001b[31mstep 0"), "it was compressed");
    let _ = gate;
}

on_both_stores!(
    a_compressed_turn_is_resumed_with_its_full_history,
    replay_after_a_client_disconnect,
    a_turn_interrupted_by_sigkill_is_resumed_by_a_fresh_process,
    the_next_request_resumes_an_interrupted_turn_first,
);

#[test]
fn sse_data_helper_agrees_with_events() {
    let text = "id: 1-1\ndata: a\n\nid: 1-2\ndata: [DONE]\n\n";
    assert_eq!(sse_data(text), ["a", "[DONE]"]);
    assert_eq!(events(text)[1], ("1-2".to_string(), "[DONE]".to_string()));
}
