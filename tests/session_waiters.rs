//! Requests waiting for a busy session: they read nothing while they wait (no checkpoint
//! loads), and are woken promptly when the turn holding the session ends, in this process or,
//! on Redis, on another replica.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use mock_upstream::Server;
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{fixtures, Chunk, Gate, Harness};

const LOADS: &str = r#"ctxgate_session_store_duration_seconds_count{op="load"}"#;

fn held_stream(gate: &Gate) -> mock_upstream::Builder {
    Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "held")),
        Chunk::Wait(gate.clone()),
        Chunk::json(fixtures::finish_chunk("stop")),
        Chunk::done(),
    ])
}

fn ask(text: &str, stream: bool) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": text}], "stream": stream})
}

fn append(h: &Harness, session: &str, text: &str) -> reqwest::RequestBuilder {
    h.chat().header("x-session-id", session).header("x-session-mode", "append").json(&ask(text, false))
}

/// Checkpoint loads on `h` over 500 ms, once what was started has settled (300 ms): what waiting
/// costs. (Time has to pass: what is measured is that nothing happens in it.)
async fn loads_while_waiting(h: &Harness) -> f64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = h.metric(LOADS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.metric(LOADS).await - before
}

/// A follower's body: the held turn, whole, to `[DONE]`.
fn assert_whole_turn(body: &str) {
    assert!(body.contains("held"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

#[tokio::test]
async fn waiters_on_a_busy_session_read_nothing_and_wake_when_it_is_released() {
    // Given a session held by a streamed turn, and 20 requests waiting for it
    let gate = Gate::new();
    let h = Harness::builder()
        .upstream(held_stream(&gate))
        .config(|c| c.sessions.busy_timeout = Duration::from_secs(30))
        .start()
        .await;
    let held = h.chat().header("x-session-id", "w").json(&ask("first", true)).send().await.unwrap();
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..20 {
        let request = append(&h, "w", &format!("m{i}"));
        waiters.spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), Instant::now())
        });
    }

    // When they wait
    // Then they read no checkpoint meanwhile (polling read one every 10-20 ms each)
    assert_eq!(loads_while_waiting(&h).await, 0.0, "checkpoint loads while waiting");

    // And once the turn ends they are all served, one turn at a time, promptly
    let released = Instant::now();
    gate.open();
    held.text().await.unwrap();
    let done = waiters.join_all().await;
    assert!(done.iter().all(|(status, _)| *status == 200), "{done:?}");
    let first = done.iter().map(|(_, at)| at.duration_since(released)).min().unwrap();
    assert!(first < Duration::from_millis(500), "first waiter served {first:?} after the release");
    let messages = support::stores::transcript(&h.client, &h.url, "w", "Bearer sk-test-client").await;
    assert_eq!(messages.len(), 42);
}

#[tokio::test]
async fn a_waiter_on_another_replica_is_woken_when_the_turn_ends_without_loading() {
    // Given two gateways on one Redis, A holding a session with a streamed turn
    let redis = RedisServer::start().await;
    let gate = Gate::new();
    let url = redis.url();
    let a =
        Harness::builder().upstream(held_stream(&gate)).config(move |c| c.sessions.store = url).start().await;
    let url = redis.url();
    let b = Harness::builder()
        .config(move |c| {
            c.sessions.store = url;
            c.sessions.busy_timeout = Duration::from_secs(30);
        })
        .start()
        .await;
    let held = a.chat().header("x-session-id", "r").json(&ask("first", true)).send().await.unwrap();

    // When a request on B waits for it
    let request = append(&b, "r", "second");
    let waiter = tokio::spawn(async move {
        let response = request.send().await.unwrap();
        (response.status().as_u16(), Instant::now())
    });

    // Then B reads no checkpoint while it waits
    assert_eq!(loads_while_waiting(&b).await, 0.0, "checkpoint loads on B while waiting");
    assert!(!waiter.is_finished());

    // And once A's turn ends, B's request is served within a bounded time
    gate.open();
    held.text().await.unwrap();
    let released = Instant::now();
    let (status, at) = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    assert_eq!(status, 200);
    let after = at.duration_since(released);
    assert!(after < Duration::from_secs(1), "served {after:?} after A's turn ended");
    let messages = support::stores::transcript(&b.client, &b.url, "r", "Bearer sk-test-client").await;
    assert_eq!(messages.len(), 4);
}

/// Opens a follower of session `id`'s live stream on `h`.
async fn follow(h: &Harness, id: &str) -> reqwest::Response {
    let response = h
        .client
        .get(h.v1(&format!("/sessions/{id}/stream")))
        .header("authorization", "Bearer sk-test-client")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test]
async fn a_caught_up_follower_reads_no_checkpoint_until_the_turn_moves() {
    // Given a session held by a streamed turn, followed by five clients that have caught up
    let gate = Gate::new();
    let h = Harness::builder().upstream(held_stream(&gate)).start().await;
    let held = h.chat().header("x-session-id", "f").json(&ask("first", true)).send().await.unwrap();
    let mut followers = Vec::new();
    for _ in 0..5 {
        followers.push(follow(&h, "f").await);
    }

    // When they wait for the rest
    // Then they read no checkpoint meanwhile (polling read one every 25 ms each)
    assert_eq!(loads_while_waiting(&h).await, 0.0, "checkpoint loads while following");

    // And each gets the rest of the turn, to [DONE], once it comes
    gate.open();
    held.text().await.unwrap();
    for follower in followers {
        let body = tokio::time::timeout(Duration::from_secs(5), follower.text()).await.unwrap().unwrap();
        assert_whole_turn(&body);
    }
}

#[tokio::test]
async fn a_follower_on_another_replica_polls_the_lease_not_the_checkpoint() {
    // Given two gateways on one Redis, A serving a held streamed turn, B following it
    let redis = RedisServer::start().await;
    let gate = Gate::new();
    let url = redis.url();
    let a =
        Harness::builder().upstream(held_stream(&gate)).config(move |c| c.sessions.store = url).start().await;
    let url = redis.url();
    let b = Harness::builder().config(move |c| c.sessions.store = url).start().await;
    let held = a.chat().header("x-session-id", "fr").json(&ask("first", true)).send().await.unwrap();
    let follower = follow(&b, "fr").await;

    // When it waits for the rest
    // Then B reads no checkpoint meanwhile
    assert_eq!(loads_while_waiting(&b).await, 0.0, "checkpoint loads on B while following");

    // And it gets the rest of the turn from A, to [DONE], promptly
    gate.open();
    held.text().await.unwrap();
    let released = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(5), follower.text()).await.unwrap().unwrap();
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "followed to the end {:?} after A",
        released.elapsed()
    );
    assert_whole_turn(&body);
}

#[tokio::test]
async fn a_follower_that_falls_behind_still_ends_when_the_turn_ends_meanwhile() {
    // Given a session turn whose answer (2 MB of events) is more than the follower's connection
    // holds, with a lease far longer than the test
    let gate = Gate::new();
    let mut chunks = vec![Chunk::json(fixtures::content_chunk(0, "held")), Chunk::Wait(gate.clone())];
    chunks.extend((1..10_000).map(|i| Chunk::json(fixtures::content_chunk(i, &"x".repeat(200)))));
    chunks.extend([Chunk::json(fixtures::finish_chunk("stop")), Chunk::done()]);
    let h = Harness::builder()
        .upstream(Server::builder().stream(chunks))
        .config(|c| c.sessions.lease = Duration::from_secs(30))
        .start()
        .await;
    let live = h.chat().header("x-session-id", "fb").json(&ask("first", true)).send().await.unwrap();

    // And a follower that caught up, then stops reading while the answer streams
    let mut follower = follow(&h, "fb").await.bytes_stream();
    use futures_util::StreamExt;
    let first = follower.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("held"));
    gate.open();

    // When the turn ends (and is committed) while the follower is behind
    let answer = live.text().await.unwrap();
    assert!(answer.trim_end().ends_with("data: [DONE]"));

    // Then the follower, reading again, gets the whole turn and [DONE] at once, not at the
    // lease's end
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rest = Vec::new();
        while let Some(bytes) = follower.next().await {
            rest.extend_from_slice(&bytes.unwrap());
        }
        rest
    })
    .await
    .expect("the follower waited past the turn's end");
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{}", &rest[rest.len().saturating_sub(300)..]);
    assert_eq!(rest.matches("data: ").count(), 10_000 + 1);
}
