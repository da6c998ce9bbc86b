//! Three ctxgate processes sharing one Redis, as replicas behind a load balancer would: a
//! session moves between them turn by turn, and a replica SIGKILLed mid-stream has its turn
//! resumed by another. Each scenario runs on a single `redis-server` and on a three-master
//! Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::gateway::{Gateway, AUTH};
use support::stores::{self, Store};
use support::{chunks, fixtures, Gate};

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

async fn replicas(upstream: &str, store: &str) -> [Gateway; 3] {
    let (a, b, c) = tokio::join!(
        Gateway::start(upstream, store),
        Gateway::start(upstream, store),
        Gateway::start(upstream, store)
    );
    [a, b, c]
}

async fn session(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let response =
        client.get(format!("{base}/v1/sessions/{id}")).header("authorization", AUTH).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The text a streamed response carried, from its `data:` payloads.
fn streamed_text(body: &str) -> String {
    support::sse_data(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect()
}

async fn a_session_moves_from_replica_to_replica_between_turns(store: Store) {
    let store = store.url().await;
    let upstream = Server::builder()
        .chat(fixtures::completion("answer one"))
        .stream(chunks(&["answer ", "two"], None))
        .chat(fixtures::completion("answer three"))
        .start()
        .await
        .unwrap();
    let gateways = replicas(&upstream.base_url(), &store.url).await;
    let client = reqwest::Client::new();

    // Given an append-mode client whose turns land on replica A, then B (streamed), then C
    let questions = ["first?", "second?", "third?"];
    for (turn, (gateway, question)) in gateways.iter().zip(questions).enumerate() {
        let stream = turn == 1;
        let response = gateway
            .chat(&client, "roaming")
            .header("x-session-mode", "append")
            .json(&json!({"model": "mock-model", "stream": stream, "messages": [user(question)]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "turn {} on replica {turn}", turn + 1);
        let text = response.text().await.unwrap();
        if stream {
            assert_eq!(streamed_text(&text), "answer two");
        }
    }

    // Then each turn's upstream call carried the whole conversation so far, from the shared store
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    let expected = [
        vec![user("first?")],
        vec![user("first?"), assistant("answer one"), user("second?")],
        vec![
            user("first?"),
            assistant("answer one"),
            user("second?"),
            assistant("answer two"),
            user("third?"),
        ],
    ];
    for (request, messages) in requests.iter().zip(&expected) {
        assert_eq!(request.json()["messages"], json!(messages));
        assert_eq!(request.headers["authorization"], AUTH);
    }

    // And every replica reads the same complete transcript, in order
    let mut full = expected[2].clone();
    full.push(assistant("answer three"));
    for gateway in &gateways {
        assert_eq!(stores::transcript(&client, &gateway.base, "roaming", AUTH).await, full);
        let info = session(&client, &gateway.base, "roaming").await;
        assert_eq!(info["messages"], 6);
        assert_eq!(info["in_flight"], Value::Null);
    }
}

async fn a_replica_killed_mid_stream_has_its_turn_resumed_by_another(store: Store) {
    let store = store.url().await;
    let gate = Gate::new();
    // The first attempt hangs after two events; the re-issued one answers in full.
    let upstream = Server::builder()
        .stream(chunks(&["partial ", "answer ", "lost"], Some((2, &gate))))
        .stream(chunks(&["full ", "answer"], None))
        .chat(fixtures::completion("after the crash"))
        .start()
        .await
        .unwrap();
    let [mut a, b, c] = replicas(&upstream.base_url(), &store.url).await;
    let client = reqwest::Client::new();

    // Given a streamed turn in flight on replica A
    let question = json!({"model": "mock-model", "stream": true, "messages": [user("count")]});
    let response = a.chat(&client, "crash").json(&question).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let head = stream.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&head).unwrap().contains("partial"));

    // When A is SIGKILLed mid-stream
    a.kill();
    drop(stream);

    // Then once A's lease runs out, replica B resumes the turn
    b.resume_after_lease(&client, "crash", Duration::from_secs(15)).await;

    // And replica C replays the re-issued answer from the shared event log
    let replay = client
        .get(format!("{}/v1/sessions/crash/stream", c.base))
        .header("authorization", AUTH)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    let replayed = tokio::time::timeout(Duration::from_secs(10), replay.text()).await.unwrap().unwrap();
    assert_eq!(streamed_text(&replayed), "full answer");
    assert!(replayed.ends_with("data: [DONE]\n\n"), "{replayed}");

    // And the committed transcript has the whole answer exactly once
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let transcript = loop {
        let m = stores::transcript(&client, &c.base, "crash", AUTH).await;
        if !m.is_empty() || tokio::time::Instant::now() >= deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(transcript, [user("count"), assistant("full answer")]);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "the interrupted call was re-issued once");
    assert_eq!(requests[1].body, requests[0].body, "byte for byte");

    // And the conversation carries on from any surviving replica
    let next = c
        .chat(&client, "crash")
        .header("x-session-mode", "append")
        .json(&json!({"model": "mock-model", "messages": [user("and then?")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(
        stores::transcript(&client, &b.base, "crash", AUTH).await,
        [user("count"), assistant("full answer"), user("and then?"), assistant("after the crash")]
    );
    let _ = gate;
}

on_redis_and_cluster!(
    a_session_moves_from_replica_to_replica_between_turns,
    a_replica_killed_mid_stream_has_its_turn_resumed_by_another,
);
