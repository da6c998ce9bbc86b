//! The shared rate limiter on a real redis-server and a real three-master Redis Cluster: no
//! over-admission when several replicas check the same key at once, and a limit held within 5%
//! across three ctxgate processes; and the fall back to per-replica limits while Redis is down.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use ctxgate::auth::{hash_key, KeyPolicy, Limiter};
use ctxgate::config::KeyConfig;
use ctxgate::error::GatewayError;
use ctxgate::telemetry::Metrics;
use support::gateway::Gateway;
use support::redis::RedisServer;
use support::stores::Store;
use tokio::time::Instant;

fn policy(rpm: Option<u32>, burst: Option<u32>, tpm: Option<u32>) -> Arc<KeyPolicy> {
    let config = KeyConfig {
        name: "team-a".into(),
        sha256: hash_key(b"k"),
        models: Vec::new(),
        requests_per_minute: rpm.and_then(NonZeroU32::new),
        burst: burst.and_then(NonZeroU32::new),
        tokens_per_minute: tpm.and_then(NonZeroU32::new),
        max_concurrent: None,
    };
    Arc::new(KeyPolicy::from_config(&config).unwrap())
}

on_redis_and_cluster!(
    concurrent_checks_on_three_replicas_never_over_admit,
    a_limit_holds_within_five_percent_across_three_gateways
);

/// A limiter as one replica has it: its own connection and metrics, the shared Redis.
async fn replica(url: &str) -> (Arc<Limiter>, Arc<Metrics>) {
    let conn = ctxgate::redis_conn::connect(url, Duration::from_millis(500)).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let limiter = Limiter::new(Some((conn, "ctxgate:".into(), Duration::from_millis(500))), metrics.clone());
    (Arc::new(limiter), metrics)
}

async fn concurrent_checks_on_three_replicas_never_over_admit(store: Store) {
    let redis = store.url().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&redis.url).await);
    }
    let limiters: Vec<Arc<Limiter>> = replicas.iter().map(|r| r.0.clone()).collect();
    // Burst 100 at one request per second: 300 checks at once admit the burst and at most the
    // one or two requests that refill while they run.
    let key = policy(Some(60), Some(100), None);
    let started = Instant::now();
    let mut checks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (limiter, key) = (limiters[i % 3].clone(), key.clone());
        checks.spawn(async move { limiter.admit(&key).await.is_ok() });
    }
    let admitted = checks.join_all().await.into_iter().filter(|ok| *ok).count();
    let refill = started.elapsed().as_secs() as usize + 1;
    assert!((100..=100 + refill).contains(&admitted), "admitted {admitted} of 300 (burst 100)");

    // Tokens: 1000 a minute, 300 charges of 10 at once.
    let key = policy(None, None, Some(1000));
    let started = Instant::now();
    let mut charges = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (limiter, key) = (limiters[i % 3].clone(), key.clone());
        charges.spawn(async move { limiter.charge_tokens(&key, 10).await.map(drop).is_ok() });
    }
    let admitted = charges.join_all().await.into_iter().filter(|ok| *ok).count();
    let refill = (started.elapsed().as_secs_f64() * 1000.0 / 60.0 / 10.0).ceil() as usize;
    assert!((100..=100 + refill).contains(&admitted), "admitted {admitted} charges of 10 (1000 tokens)");
    // Every check was Redis's: none fell back to a replica's own cells (a script over two slots
    // would fail on a Cluster and show up here).
    for (_, metrics) in &replicas {
        assert_eq!(support::sample_value(&metrics.encode(), "ctxgate_rate_limit_fallbacks_total"), 0.0);
    }
}

#[tokio::test]
async fn redis_down_falls_back_to_per_replica_limits_and_says_so() {
    let mut redis = RedisServer::start().await;
    let (limiter, metrics) = replica(&redis.url()).await;
    let key = policy(Some(60), Some(3), None);
    for _ in 0..3 {
        limiter.admit(&key).await.unwrap();
    }
    assert!(matches!(limiter.admit(&key).await, Err(GatewayError::RateLimited { .. })));

    redis.kill().await;
    // The local pre-check has seen the same four requests: still over, decided locally.
    assert!(matches!(limiter.admit(&key).await, Err(GatewayError::RateLimited { .. })));
    let other = policy(Some(60), Some(2), None);
    let started = Instant::now();
    limiter.admit(&other).await.unwrap();
    limiter.admit(&other).await.unwrap();
    assert!(matches!(limiter.admit(&other).await, Err(GatewayError::RateLimited { .. })));
    // One timed-out check, then a second of local decisions without waiting on Redis.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let text = metrics.encode();
    assert_eq!(support::sample_value(&text, "ctxgate_rate_limit_degraded"), 1.0);
    assert!(support::sample_value(&text, "ctxgate_rate_limit_fallbacks_total") >= 2.0);

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = limiter.admit(&policy(Some(6000), None, None)).await;
        if support::sample_value(&metrics.encode(), "ctxgate_rate_limit_degraded") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the limiter never went back to Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_limit_holds_within_five_percent_across_three_gateways(store: Store) {
    let redis = store.url().await;
    let upstream = mock_upstream::Server::builder().start().await.unwrap();
    // 20 requests a second with a burst of 20, offered far faster through three replicas. The
    // check timeout is generous so a loaded test machine does not trigger the fallback.
    let extra = format!(
        "keyless = true\n[rate_limits]\ntimeout = \"5s\"\n\
         [[auth.keys]]\nname = \"team-a\"\nsha256 = \"{}\"\nrequests_per_minute = 1200\nburst = 20\n",
        hash_key(b"sk-team-a")
    );
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(Gateway::start_with(&upstream.base_url(), &redis.url, &extra).await);
    }
    let bases: Arc<Vec<String>> = Arc::new(gateways.iter().map(|g| g.base.clone()).collect());
    let client = reqwest::Client::new();
    let run_for = Duration::from_secs(5);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for worker in 0..6 {
        let (client, bases) = (client.clone(), bases.clone());
        senders.spawn(async move {
            let (mut admitted, mut refused, mut i) = (0u32, 0u32, worker);
            while started.elapsed() < run_for {
                let response = client
                    .post(format!("{}/v1/chat/completions", bases[i % 3]))
                    .bearer_auth("sk-team-a")
                    .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => admitted += 1,
                    429 => refused += 1,
                    other => panic!("unexpected status {other}"),
                }
                response.bytes().await.unwrap();
                i += 1;
            }
            (admitted, refused)
        });
    }
    let counts = senders.join_all().await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted: u32 = counts.iter().map(|c| c.0).sum();
    let refused: u32 = counts.iter().map(|c| c.1).sum();
    let expected = 20.0 + 20.0 * elapsed;
    let error = (f64::from(admitted) - expected).abs() / expected;
    eprintln!("admitted {admitted}, refused {refused} in {elapsed:.2} s; expected {expected:.1}");
    assert!(
        refused > admitted,
        "the offered rate did not exceed the limit: {admitted} admitted, {refused} refused"
    );
    assert!(
        error <= 0.05,
        "admitted {admitted} in {elapsed:.2} s across three replicas, expected {expected:.0} (off by {:.1}%)",
        error * 100.0
    );
    // Every admitted request, and only those, reached the upstream.
    assert_eq!(upstream.requests().len() as u32, admitted);
    // Every decision was Redis's (a slow check past the timeout would be decided per replica,
    // which is the fallback, not the shared limit under test).
    for base in bases.iter() {
        let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        assert_eq!(support::sample_value(&text, "ctxgate_rate_limit_fallbacks_total"), 0.0, "{base}");
    }
}

#[tokio::test]
async fn a_refunded_request_is_given_back_in_redis_too() {
    // Given two replicas sharing a key's burst of two in Redis, both spent
    let redis = RedisServer::start().await;
    let (a, _) = replica(&redis.url()).await;
    let (b, _) = replica(&redis.url()).await;
    let key = policy(Some(60), Some(2), None);
    let refused_for_its_model = a.admit(&key).await.unwrap();
    b.admit(&key).await.unwrap();
    assert!(matches!(b.admit(&key).await, Err(GatewayError::RateLimited { .. })));

    // When replica a gives its request back (the request was refused for its model)
    a.refund(&key, &refused_for_its_model).await;

    // Then the other replica may use that place, and no more
    b.admit(&key).await.unwrap();
    assert!(matches!(b.admit(&key).await, Err(GatewayError::RateLimited { .. })));
}
