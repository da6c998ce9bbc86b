//! Background responses over a Chat-Completions-only upstream (`background: true`): queued at
//! once and finished detached, read back by polling, their stream resumed after a disconnect
//! (`GET /v1/responses/{id}?stream=true&starting_after=N`) and after a gateway crash, and
//! cancelled (`POST /v1/responses/{id}/cancel`), on the embedded store and on Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::{Chunk, Server};
use serde_json::{json, Value};
use support::gateway::{Gateway, AUTH};
use support::stores::{self, Store, StoreUrl};
use support::{chunks, fixtures, Gate, Harness, HarnessBuilder, Reply};

async fn start(store: Store, builder: HarnessBuilder) -> (Harness, StoreUrl) {
    let store = store.url().await;
    let url = store.url.clone();
    (builder.config(move |c| c.sessions.store = url).start().await, store)
}

fn create(client: &reqwest::Client, base: &str, body: Value) -> reqwest::RequestBuilder {
    client.post(format!("{base}/v1/responses")).header("authorization", AUTH).json(&body)
}

async fn get(client: &reqwest::Client, base: &str, path: &str) -> reqwest::Response {
    client.get(format!("{base}/v1/responses/{path}")).header("authorization", AUTH).send().await.unwrap()
}

async fn cancel(client: &reqwest::Client, base: &str, id: &str) -> reqwest::Response {
    client
        .post(format!("{base}/v1/responses/{id}/cancel"))
        .header("authorization", AUTH)
        .send()
        .await
        .unwrap()
}

/// Polls `GET /v1/responses/{id}` until the response is no longer queued or in progress;
/// returns every status seen and the final object.
async fn poll_until_finished(client: &reqwest::Client, base: &str, id: &str) -> (Vec<String>, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let object: Value = get(client, base, id).await.json().await.unwrap();
        let status = object["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status != "queued" && status != "in_progress" {
            return (seen, object);
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads whole SSE events from `body` until `until` holds for one (or the body ends); returns
/// their raw bytes, in order.
async fn read_events(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buffer: &mut Vec<u8>,
    until: impl Fn(&Value) -> bool,
) -> Vec<String> {
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let event = String::from_utf8(event).unwrap();
            let done = until(&data(&event));
            events.push(event);
            if done {
                return events;
            }
        }
        match body.next().await {
            Some(chunk) => buffer.extend_from_slice(&chunk.unwrap()),
            None => return events,
        }
    }
}

/// An event's `data:` payload.
fn data(event: &str) -> Value {
    serde_json::from_str(event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap()
}

fn numbers(events: &[String]) -> Vec<u64> {
    events.iter().map(|e| data(e)["sequence_number"].as_u64().unwrap()).collect()
}

async fn a_background_response_is_queued_then_completed_by_polling(store: Store) {
    // Given an upstream that takes a moment to answer
    let upstream = Server::builder()
        .reply(Reply::json(200, fixtures::completion("Done.")).delay(Duration::from_millis(500)));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;

    // When a background response is created
    let created =
        create(&h.client, &h.url, json!({"model": "mock-model", "input": "Work.", "background": true}))
            .send()
            .await
            .unwrap();

    // Then it returns at once, queued, and polling sees it run and complete
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["status"], "queued", "{created}");
    assert_eq!(created["background"], true);
    let id = created["id"].as_str().unwrap();
    let (seen, done) = poll_until_finished(&h.client, &h.url, id).await;
    assert!(seen[0] == "queued" || seen[0] == "in_progress", "{seen:?}");
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["background"], true);
    assert_eq!(done["output"][0]["content"][0]["text"], "Done.");
    // And its turn is committed to the chain's session, so the chain continues from it
    let transcript = stores::transcript(&h.client, &h.url, id, AUTH).await;
    assert_eq!(
        transcript,
        [json!({"role": "user", "content": "Work."}), json!({"role": "assistant", "content": "Done."})]
    );
    let items: Value = get(&h.client, &h.url, &format!("{id}/input_items")).await.json().await.unwrap();
    assert_eq!(items["data"][0]["content"][0]["text"], "Work.", "{items}");
}

async fn a_background_stream_resumes_after_a_disconnect_with_exactly_the_rest(store: Store) {
    // Given an upstream whose stream holds after two words until the test lets it go
    let gate = Gate::new();
    let upstream = Server::builder().stream(chunks(&["one ", "two ", "three ", "four"], Some((2, &gate))));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;

    // When a client creates a streamed background response and leaves after the second delta
    let response = create(
        &h.client,
        &h.url,
        json!({"model": "mock-model", "input": "Count.", "background": true, "stream": true}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let first = read_events(&mut body, &mut buffer, |e| e["delta"] == "two ").await;
    drop(body);
    let created = data(&first[0]);
    assert_eq!(created["type"], "response.created");
    assert_eq!(created["response"]["status"], "queued");
    let id = created["response"]["id"].as_str().unwrap().to_string();
    let last_seen = *numbers(&first).last().unwrap();
    gate.open();

    // Then a resumed stream starting after the last event it saw gets exactly the rest, live,
    // to the final event
    let resumed = get(&h.client, &h.url, &format!("{id}?stream=true&starting_after={last_seen}")).await;
    assert_eq!(resumed.status(), 200);
    let rest = read_events(&mut resumed.bytes_stream(), &mut Vec::new(), |_| false).await;
    let expected: Vec<u64> = (last_seen + 1..last_seen + 1 + rest.len() as u64).collect();
    assert_eq!(numbers(&rest), expected);
    let last = data(rest.last().unwrap());
    assert_eq!(last["type"], "response.completed", "{last}");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "one two three four");
    // And a replay from the start is the same bytes the first client and the resumed one got
    let whole = get(&h.client, &h.url, &format!("{id}?stream=true")).await;
    let whole = read_events(&mut whole.bytes_stream(), &mut Vec::new(), |_| false).await;
    assert_eq!(whole, [first, rest].concat());
    // And the stored response is complete
    let (_, done) = poll_until_finished(&h.client, &h.url, &id).await;
    assert_eq!(done["status"], "completed");
}

async fn cancel_drops_the_upstream_call_and_commits_nothing(store: Store) {
    // Given a streamed background response whose upstream call hangs mid-answer
    let gate = Gate::new();
    let upstream = Server::builder().stream(chunks(&["never ", "finished"], Some((1, &gate))));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let response = create(
        &h.client,
        &h.url,
        json!({"model": "mock-model", "input": "Go.", "background": true, "stream": true}),
    )
    .send()
    .await
    .unwrap();
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let first = read_events(&mut body, &mut buffer, |e| e["type"] == "response.output_text.delta").await;
    let id = data(&first[0])["response"]["id"].as_str().unwrap().to_string();
    assert_eq!(h.upstream(0).open_streams(), 1);

    // When it is cancelled
    let cancelled = cancel(&h.client, &h.url, &id).await;

    // Then the cancel answers with the response cancelled
    assert_eq!(cancelled.status(), 200);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    // And the upstream call is dropped
    assert!(
        h.upstream(0).wait_for_open_streams(0, Duration::from_secs(5)).await,
        "the upstream call is still open"
    );
    // And the creating client's stream ends with the cancellation
    let rest = read_events(&mut body, &mut buffer, |_| false).await;
    let last = data(rest.last().unwrap());
    assert_eq!(last["type"], "response.cancelled", "{rest:?}");
    assert_eq!(last["sequence_number"], numbers(&first).last().unwrap() + rest.len() as u64);
    // And nothing of the turn is in the conversation
    assert_eq!(stores::transcript(&h.client, &h.url, &id, AUTH).await, Vec::<Value>::new());
    // And the stored response says cancelled, as does a second cancel
    let stored: Value = get(&h.client, &h.url, &id).await.json().await.unwrap();
    assert_eq!(stored["status"], "cancelled");
    let again: Value = cancel(&h.client, &h.url, &id).await.json().await.unwrap();
    assert_eq!(again, stored);
    // And its resumed stream ends with the cancellation too
    let replay = get(&h.client, &h.url, &format!("{id}?stream=true&starting_after=0")).await;
    let replay = read_events(&mut replay.bytes_stream(), &mut Vec::new(), |_| false).await;
    assert_eq!(data(replay.last().unwrap())["type"], "response.cancelled");
}

on_both_stores!(
    a_background_response_is_queued_then_completed_by_polling,
    a_background_stream_resumes_after_a_disconnect_with_exactly_the_rest,
    cancel_drops_the_upstream_call_and_commits_nothing,
);

#[tokio::test]
async fn cancel_of_a_finished_or_foreground_response_and_unknown_ids() {
    let upstream =
        Server::builder().chat(fixtures::completion("First.")).chat(fixtures::completion("Second."));
    let h = Harness::builder().upstream(upstream).start().await;

    // A finished background response is returned unchanged
    let created: Value =
        create(&h.client, &h.url, json!({"model": "mock-model", "input": "a", "background": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let id = created["id"].as_str().unwrap();
    let (_, done) = poll_until_finished(&h.client, &h.url, id).await;
    let after: Value = cancel(&h.client, &h.url, id).await.json().await.unwrap();
    assert_eq!(after, done);
    assert_eq!(after["status"], "completed");

    // A response created without background cannot be cancelled, in OpenAI's error shape
    let plain: Value = create(&h.client, &h.url, json!({"model": "mock-model", "input": "b"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refused = cancel(&h.client, &h.url, plain["id"].as_str().unwrap()).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(error["error"]["message"], "Cannot cancel a synchronous response.");
    // Nor streamed again
    let not_streamed =
        get(&h.client, &h.url, &format!("{}?stream=true", plain["id"].as_str().unwrap())).await;
    assert_eq!(not_streamed.status(), 400);

    // Background needs store, as OpenAI's
    let unstored = create(
        &h.client,
        &h.url,
        json!({"model": "mock-model", "input": "c", "background": true, "store": false}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(unstored.status(), 400);
    let error: Value = unstored.json().await.unwrap();
    assert_eq!(error["error"]["param"], "store", "{error}");

    // An unknown id, and another caller's, are 404 for cancel and for a stream
    for (id, authorization) in [("resp_unknown", AUTH), (id, "Bearer sk-someone-else")] {
        let cancelled = h
            .client
            .post(h.v1(&format!("/responses/{id}/cancel")))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(cancelled.status(), 404);
        let error: Value = cancelled.json().await.unwrap();
        assert_eq!(error["error"]["code"], "response_not_found", "{error}");
        let streamed = h
            .client
            .get(h.v1(&format!("/responses/{id}?stream=true&starting_after=0")))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(streamed.status(), 404);
    }
}

#[tokio::test]
async fn a_cancel_on_another_replica_reaches_the_one_running_the_response() {
    // Given two gateways sharing Redis, and a background response running on the first
    let redis = Store::Redis.url().await;
    let gate = Gate::new();
    let upstream =
        Server::builder().stream(chunks(&["never ", "finished"], Some((1, &gate)))).start().await.unwrap();
    let url = upstream.base_url();
    let (a, b) = tokio::join!(Gateway::start(&url, &redis.url), Gateway::start(&url, &redis.url));
    let client = reqwest::Client::new();
    let created: Value =
        create(&client, &a.base, json!({"model": "mock-model", "input": "Go.", "background": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(upstream.wait_for_open_streams(1, Duration::from_secs(5)).await);

    // When the second cancels it
    let cancelled: Value = cancel(&client, &b.base, id).await.json().await.unwrap();

    // Then it is cancelled, and the first dropped its upstream call
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(upstream.wait_for_open_streams(0, Duration::from_secs(5)).await);
    let stored: Value = get(&client, &a.base, id).await.json().await.unwrap();
    assert_eq!(stored["status"], "cancelled");
}

#[tokio::test]
async fn a_background_stream_goes_on_after_a_gateway_crash_on_the_embedded_store() {
    // Given a gateway on the embedded store whose upstream hangs mid-answer, then answers whole
    let store = Store::Embedded.url().await;
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(chunks(&["partial ", "answer ", "lost"], Some((2, &gate))))
        .stream(chunks(&["full ", "answer"], None))
        .start()
        .await
        .unwrap();
    let mut first = Gateway::start(&upstream.base_url(), &store.url).await;
    let client = reqwest::Client::new();
    let response = create(
        &client,
        &first.base,
        json!({"model": "mock-model", "input": "Go.", "background": true, "stream": true}),
    )
    .send()
    .await
    .unwrap();
    let mut body = response.bytes_stream();
    let seen = read_events(&mut body, &mut Vec::new(), |e| e["delta"] == "answer ").await;
    let id = data(&seen[0])["response"]["id"].as_str().unwrap().to_string();
    let last_seen = *numbers(&seen).last().unwrap();
    // (the events the client saw are logged: a replay reaches the last of them)
    let logged =
        get(&client, &first.base, &format!("{id}?stream=true&starting_after={}", last_seen - 1)).await;
    let logged = read_events(&mut logged.bytes_stream(), &mut Vec::new(), |_| true).await;
    assert_eq!(logged, seen[seen.len() - 1..]);

    // When the gateway is killed and another process opens the same file
    first.kill();
    drop(body);
    let second = Gateway::start(&upstream.base_url(), &store.url).await;

    // Then the response's stream goes on from where the client stopped to its final event,
    // numbered on from it, with the re-issued answer
    let resumed = get(&client, &second.base, &format!("{id}?stream=true&starting_after={last_seen}")).await;
    assert_eq!(resumed.status(), 200);
    let rest = read_events(&mut resumed.bytes_stream(), &mut Vec::new(), |_| false).await;
    let expected: Vec<u64> = (last_seen + 1..last_seen + 1 + rest.len() as u64).collect();
    assert_eq!(numbers(&rest), expected);
    let last = data(rest.last().unwrap());
    assert_eq!(last["type"], "response.completed", "{rest:?}");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "full answer");
    // And the stored response and the chain's session hold the re-issued answer once
    let (_, done) = poll_until_finished(&client, &second.base, &id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "full answer");
    let transcript = stores::transcript(&client, &second.base, &id, AUTH).await;
    assert_eq!(transcript.len(), 2, "{transcript:?}");
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_streamed_background_response_can_be_resumed_before_its_first_output() {
    // Given a streamed background response whose upstream has not answered yet
    let gate = Gate::new();
    let mut gated = vec![Chunk::Wait(gate.clone())];
    gated.extend(chunks(&["late"], None));
    let h = Harness::builder().upstream(Server::builder().stream(gated)).start().await;
    let response = create(
        &h.client,
        &h.url,
        json!({"model": "mock-model", "input": "Go.", "background": true, "stream": true}),
    )
    .send()
    .await
    .unwrap();
    let first = read_events(&mut response.bytes_stream(), &mut Vec::new(), |_| true).await;
    let id = data(&first[0])["response"]["id"].as_str().unwrap().to_string();

    // When a follower joins after `response.created` and the answer then comes
    let follower = get(&h.client, &h.url, &format!("{id}?stream=true&starting_after=0")).await;
    gate.open();

    // Then it gets everything after it, to the completed response
    let rest = read_events(&mut follower.bytes_stream(), &mut Vec::new(), |_| false).await;
    assert_eq!(data(&rest[0])["type"], "response.queued");
    assert_eq!(data(&rest[0])["sequence_number"], 1);
    assert_eq!(data(&rest[1])["type"], "response.in_progress");
    assert_eq!(data(rest.last().unwrap())["type"], "response.completed");
}

#[tokio::test]
async fn a_follower_on_a_surviving_replica_takes_a_background_stream_over() {
    // Given two gateways sharing Redis (1 s lease), an upstream that hangs mid-answer and then
    // answers whole, and a streamed background response on the first
    let redis = Store::Redis.url().await;
    let gate = Gate::new();
    let upstream = Server::builder()
        .stream(chunks(&["partial ", "answer ", "lost"], Some((2, &gate))))
        .stream(chunks(&["full ", "answer"], None))
        .start()
        .await
        .unwrap();
    let url = upstream.base_url();
    let (mut a, b) = tokio::join!(Gateway::start(&url, &redis.url), Gateway::start(&url, &redis.url));
    let client = reqwest::Client::new();
    let response = create(
        &client,
        &a.base,
        json!({"model": "mock-model", "input": "Go.", "background": true, "stream": true}),
    )
    .send()
    .await
    .unwrap();
    let mut body = response.bytes_stream();
    let seen = read_events(&mut body, &mut Vec::new(), |e| e["delta"] == "answer ").await;
    let id = data(&seen[0])["response"]["id"].as_str().unwrap().to_string();
    let last_seen = *numbers(&seen).last().unwrap();
    let logged = get(&client, &b.base, &format!("{id}?stream=true&starting_after={}", last_seen - 1)).await;
    let logged = read_events(&mut logged.bytes_stream(), &mut Vec::new(), |_| true).await;
    assert_eq!(logged, seen[seen.len() - 1..]);

    // When the first is killed and a client resumes the stream on the second
    a.kill();
    drop(body);
    let resumed = get(&client, &b.base, &format!("{id}?stream=true&starting_after={last_seen}")).await;

    // Then once the lease lapses the follower's replica takes the turn over, and the stream goes
    // on, numbered on, to the re-issued answer's completion
    let rest = read_events(&mut resumed.bytes_stream(), &mut Vec::new(), |_| false).await;
    let expected: Vec<u64> = (last_seen + 1..last_seen + 1 + rest.len() as u64).collect();
    assert_eq!(numbers(&rest), expected);
    let last = data(rest.last().unwrap());
    assert_eq!(last["type"], "response.completed", "{rest:?}");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "full answer");
    let (_, done) = poll_until_finished(&client, &b.base, &id).await;
    assert_eq!(done["output"][0]["content"][0]["text"], "full answer");
    assert_eq!(stores::transcript(&client, &b.base, &id, AUTH).await.len(), 2);
}
