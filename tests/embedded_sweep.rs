//! The embedded store removes expired sessions from its file: with a short TTL and sweep
//! interval, the keys of sessions past their TTL (checkpoints and event logs) are gone from the
//! redb file, and a fresh session stays.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::json;
use support::Harness;

const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
const EVENTS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("events");

fn ask(stream: bool) -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

#[tokio::test]
async fn expired_sessions_are_removed_from_the_file() {
    // Given a gateway whose sessions expire after 2 s, swept every 100 ms
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sweep.redb");
    let store = format!("embedded:{}", path.display());
    let mut h = Harness::builder()
        .config(move |c| {
            c.sessions.store = store;
            c.sessions.ttl = Duration::from_secs(2);
            c.sessions.sweep_interval = Duration::from_millis(100);
        })
        .start()
        .await;

    // And three sessions (one with a streamed turn's event log) left to expire, then a fresh one
    for (id, stream) in [("old-1", false), ("old-2", false), ("old-3", true)] {
        let response = h.chat().header("x-session-id", id).json(&ask(stream)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let fresh = h.chat().header("x-session-id", "fresh").json(&ask(true)).send().await.unwrap();
    fresh.text().await.unwrap();

    // When a sweep has run since
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.begin_shutdown();
    h.join().await;
    drop(h);

    // Then the file holds only the fresh session's keys
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let checkpoints: Vec<String> = txn
        .open_table(CHECKPOINTS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| e.unwrap().0.value().to_string())
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(checkpoints[0].ends_with(":fresh"), "{checkpoints:?}");
    let events: Vec<String> =
        txn.open_table(EVENTS).unwrap().iter().unwrap().map(|e| e.unwrap().0.value().0.to_string()).collect();
    assert!(!events.is_empty());
    assert!(events.iter().all(|k| k.ends_with(":fresh")), "{events:?}");
}
