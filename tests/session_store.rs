//! The session store contract, run against every backend: the embedded redb file in a temp
//! dir, a real `redis-server` started on its own loopback port per test, and a real
//! three-master Redis Cluster per test.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use ctxgate::session::checkpoint::Encoded;
use ctxgate::session::embedded::EmbeddedStore;
use ctxgate::session::redis::RedisStore;
use ctxgate::session::{Checkpoint, Commit, SessionKey, SessionStore, StoreError};
use serde_json::value::RawValue;
use support::cluster::RedisCluster;
use support::redis::RedisServer;

const TTL: Duration = Duration::from_secs(3600);

/// A backend under test, with whatever must live as long as it.
struct Backend {
    store: Arc<dyn SessionStore>,
    _dir: Option<tempfile::TempDir>,
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("sessions.redb"), TTL).unwrap();
    Backend { store: Arc::new(store), _dir: Some(dir), redis: None, cluster: None }
}

async fn redis() -> Backend {
    let server = RedisServer::start().await;
    let store =
        RedisStore::connect(&server.url(), "ctxgate:", TTL, Duration::from_millis(500)).await.unwrap();
    Backend { store: Arc::new(store), _dir: None, redis: Some(server), cluster: None }
}

async fn cluster() -> Backend {
    let cluster = RedisCluster::start().await;
    let store =
        RedisStore::connect(&cluster.url(), "ctxgate:", TTL, Duration::from_millis(500)).await.unwrap();
    Backend { store: Arc::new(store), _dir: None, redis: None, cluster: Some(cluster) }
}

fn checkpoint(messages: &[&str]) -> Encoded {
    let mut cp = Checkpoint::new(ctxgate::session::checkpoint::now_ms());
    cp.transcript = messages.iter().map(|m| RawValue::from_string(m.to_string()).unwrap()).collect();
    cp.encode()
}

fn key(id: &str) -> SessionKey {
    SessionKey::new(b"Bearer sk-owner", id)
}

/// Every contract case, in order, on one backend.
async fn contract(backend: Backend) {
    let store = backend.store.clone();

    // A missing session loads as None
    assert!(store.load(&key("s1")).await.unwrap().is_none());

    // The first commit expects version 0 and creates version 1, message bytes intact
    let user = r#"{"role":"user","content":"hi","x":{"b":1,"a":2}}"#;
    assert_eq!(store.commit(&key("s1"), 0, &checkpoint(&[user])).await.unwrap(), Commit::Committed(1));
    let loaded = store.load(&key("s1")).await.unwrap().unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.checkpoint.transcript[0].get(), user);

    // A stale writer conflicts and changes nothing
    let answer = r#"{"role":"assistant","content":"hello"}"#;
    assert_eq!(store.commit(&key("s1"), 0, &checkpoint(&["{}"])).await.unwrap(), Commit::Conflict(1));
    assert_eq!(
        store.commit(&key("s1"), 1, &checkpoint(&[user, answer])).await.unwrap(),
        Commit::Committed(2)
    );
    assert_eq!(store.load(&key("s1")).await.unwrap().unwrap().checkpoint.transcript.len(), 2);

    // Another caller's key with the same id sees nothing
    let other = SessionKey::new(b"Bearer sk-intruder", "s1");
    assert!(store.load(&other).await.unwrap().is_none());

    // 50 writers racing from the same version: exactly one wins
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = store.clone();
        racers.spawn(async move {
            let cp = checkpoint(&[&format!(r#"{{"role":"user","content":"racer {i}"}}"#)]);
            store.commit(&key("s1"), 2, &cp).await.unwrap()
        });
    }
    let outcomes = racers.join_all().await;
    let winners = outcomes.iter().filter(|c| matches!(c, Commit::Committed(3))).count();
    assert_eq!(winners, 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|c| matches!(c, Commit::Committed(3) | Commit::Conflict(3))));
    let after = store.load(&key("s1")).await.unwrap().unwrap();
    assert_eq!(after.version, 3);
    assert_eq!(after.checkpoint.transcript.len(), 1, "the winner's document, whole");

    // The event log: ordered reads after a sequence number, a limit, one turn at a time
    let ev = |s: &str| bytes::Bytes::from(s.to_string());
    store.append_events(&key("s1"), 5, 1, &[ev("a"), ev("b")]).await.unwrap();
    store.append_events(&key("s1"), 5, 3, &[ev("c")]).await.unwrap();
    let all = store.read_events(&key("s1"), 5, 0, 100).await.unwrap();
    assert_eq!(all, [(1, ev("a")), (2, ev("b")), (3, ev("c"))]);
    assert_eq!(store.read_events(&key("s1"), 5, 1, 1).await.unwrap(), [(2, ev("b"))]);
    assert!(store.read_events(&key("s1"), 5, 3, 100).await.unwrap().is_empty());
    assert!(store.read_events(&other, 5, 0, 100).await.unwrap().is_empty());
    store.append_events(&key("s1"), 7, 1, &[ev("new turn")]).await.unwrap();
    assert!(store.read_events(&key("s1"), 5, 0, 100).await.unwrap().is_empty(), "a new turn clears the log");
    assert_eq!(store.read_events(&key("s1"), 7, 0, 100).await.unwrap(), [(1, ev("new turn"))]);

    // Delete removes it; a second delete finds nothing
    assert!(store.delete(&key("s1")).await.unwrap());
    assert!(store.load(&key("s1")).await.unwrap().is_none());
    assert!(store.read_events(&key("s1"), 7, 0, 100).await.unwrap().is_empty());
    assert!(!store.delete(&key("s1")).await.unwrap());
    // A writer from before the delete (at version 3) conflicts; a new session numbers on past
    // the deleted one's versions, so that writer can never match it either
    assert_eq!(store.commit(&key("s1"), 3, &checkpoint(&["{}"])).await.unwrap(), Commit::Conflict(4));
    assert_eq!(store.commit(&key("s1"), 0, &checkpoint(&[user])).await.unwrap(), Commit::Committed(5));
    assert_eq!(store.commit(&key("s1"), 3, &checkpoint(&["{}"])).await.unwrap(), Commit::Conflict(5));
    assert_eq!(store.load(&key("s1")).await.unwrap().unwrap().checkpoint.transcript[0].get(), user);
    drop(backend);
}

#[tokio::test]
async fn embedded_store_meets_the_contract() {
    contract(embedded().await).await;
}

#[tokio::test]
async fn redis_store_meets_the_contract() {
    contract(redis().await).await;
}

#[tokio::test]
async fn redis_cluster_store_meets_the_contract() {
    contract(cluster().await).await;
}

#[tokio::test]
async fn embedded_checkpoints_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/sessions.redb");
    {
        let store = EmbeddedStore::open(&path, TTL).unwrap();
        store.commit(&key("s"), 0, &checkpoint(&[r#"{"role":"user","content":"persisted"}"#])).await.unwrap();
    }
    let store = EmbeddedStore::open(&path, TTL).unwrap();
    let loaded = store.load(&key("s")).await.unwrap().unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.checkpoint.transcript[0].get(), r#"{"role":"user","content":"persisted"}"#);
}

#[tokio::test]
async fn redis_down_is_an_error_not_a_hang_and_recovery_is_automatic() {
    let mut backend = redis().await;
    let store = backend.store.clone();
    store.commit(&key("s"), 0, &checkpoint(&["{}"])).await.unwrap();

    // When redis-server dies, operations fail fast with Unavailable
    backend.redis.as_mut().unwrap().kill().await;
    let started = std::time::Instant::now();
    let err = store.load(&key("s")).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(store.ping().await.is_err());

    // And once it is back (empty: it keeps nothing on disk), the same store works again
    backend.redis.as_mut().unwrap().restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "store never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.load(&key("s")).await.unwrap().is_none());
    assert_eq!(store.commit(&key("s"), 0, &checkpoint(&["{}"])).await.unwrap(), Commit::Committed(1));
}

#[tokio::test]
async fn redis_keys_share_a_hash_tag_and_carry_a_ttl() {
    let backend = redis().await;
    backend.store.commit(&key("tagged"), 0, &checkpoint(&["{}"])).await.unwrap();
    let server = backend.redis.as_ref().unwrap();
    let keys = server.command(&["KEYS", "*"]).await;
    let k = key("tagged");
    let expected = format!("ctxgate:{{{}}}", k.storage_key());
    assert!(keys.contains(&expected), "{keys}");
    let ttl: i64 = server.command(&["PTTL", &expected]).await.trim().parse().unwrap();
    assert!(ttl > 3_000_000 && ttl <= 3_600_000, "ttl {ttl}");
}

#[tokio::test]
async fn on_a_cluster_a_session_keeps_one_slot_and_sessions_spread_over_the_masters() {
    let backend = cluster().await;
    let cluster = backend.cluster.as_ref().unwrap();
    let ev = |s: &str| bytes::Bytes::from(s.to_string());

    // Given sessions written through the store, each with a checkpoint and an event log
    let mut masters = std::collections::BTreeSet::new();
    for n in 0..50 {
        let k = key(&format!("spread-{n}"));
        backend.store.commit(&k, 0, &checkpoint(&["{}"])).await.unwrap();
        backend.store.append_events(&k, 1, 1, &[ev("e")]).await.unwrap();

        // Then both of a session's keys hash to one slot and sit on the master owning it
        let hash = format!("ctxgate:{{{}}}", k.storage_key());
        let events = format!("{hash}:events");
        assert_eq!(cluster.slot(&hash).await, cluster.slot(&events).await);
        let holder = cluster.holder(&hash).await.unwrap();
        assert_eq!(cluster.holder(&events).await, Some(holder), "{hash}");
        let ttl: i64 = cluster.nodes()[holder].command(&["PTTL", &hash]).await.parse().unwrap();
        assert!(ttl > 3_000_000 && ttl <= 3_600_000, "ttl {ttl}");
        masters.insert(holder);
        if masters.len() == 3 && n >= 9 {
            break;
        }
    }
    // And different sessions land on every master
    assert_eq!(masters.len(), 3, "sessions all landed on {masters:?}");

    // And a delete touching both keys (one script) works within the slot: the log is gone, the
    // session reads as absent (its hash keeps only its version, as a tombstone)
    assert!(backend.store.delete(&key("spread-0")).await.unwrap());
    assert!(backend.store.load(&key("spread-0")).await.unwrap().is_none());
    assert_eq!(cluster.holder(&format!("ctxgate:{{{}}}:events", key("spread-0").storage_key())).await, None);
}

#[tokio::test]
async fn a_redis_connection_debug_never_shows_the_password() {
    let server = RedisServer::start().await;
    assert_eq!(server.command(&["CONFIG", "SET", "requirepass", "s3cret-pw"]).await, "OK");
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/", server.port());
    let conn = ctxgate::redis_conn::connect(&url, Duration::from_secs(2)).await.unwrap();
    let mut c = conn.clone();
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(!format!("{conn:?}").contains("s3cret"), "{conn:?}");
    let store = RedisStore::connect(&url, "ctxgate:", TTL, Duration::from_secs(2)).await.unwrap();
    assert!(!format!("{store:?}").contains("s3cret"));

    // A wrong password fails to connect, without echoing the URL
    let wrong = format!("redis://:nope-pw@127.0.0.1:{}/", server.port());
    let err = ctxgate::redis_conn::connect(&wrong, Duration::from_secs(2)).await.unwrap_err();
    assert!(!err.to_string().contains("nope-pw"), "{err}");
}

#[tokio::test]
async fn a_cluster_master_that_restarts_is_used_again_without_restarting_the_store() {
    let mut backend = cluster().await;
    let store = backend.store.clone();
    let k = key("on-a-master");
    store.commit(&k, 0, &checkpoint(&["{}"])).await.unwrap();
    let hash = format!("ctxgate:{{{}}}", k.storage_key());
    let holder = backend.cluster.as_ref().unwrap().holder(&hash).await.unwrap();

    // When the master holding the session dies, operations on the session fail fast
    backend.cluster.as_mut().unwrap().node_mut(holder).kill().await;
    let started = std::time::Instant::now();
    let err = store.load(&k).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // And once it is back on its port with its nodes.conf (same node, same slots, no data),
    // the same store reconnects to it and the session starts afresh
    backend.cluster.as_mut().unwrap().node_mut(holder).restart().await;
    backend.cluster.as_ref().unwrap().wait_until_ok().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while store.ping().await.is_err() || store.load(&k).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "store never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.load(&k).await.unwrap().is_none());
    assert_eq!(store.commit(&k, 0, &checkpoint(&["{}"])).await.unwrap(), Commit::Committed(1));
    assert_eq!(backend.cluster.as_ref().unwrap().holder(&hash).await, Some(holder));
}
