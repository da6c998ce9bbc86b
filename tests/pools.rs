//! Upstream pools: one upstream served by three mock endpoints. A conversation (a session, or a
//! stateless client's prefix) keeps its endpoint, spills when that one is busy and comes back,
//! an endpoint that fails is ejected and returns, and DNS answers change the endpoints while the
//! gateway runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctxgate::config::{PoolConfig, ToolConfig, UpstreamConfig};
use ctxgate::upstream::Resolver;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::{chunks, Gate, Harness, Reply};

const ENDPOINT: &str = "x-ctxgate-upstream-endpoint";

/// A gateway whose one upstream, `pool`, has the mocks as its endpoints (affinity on unless
/// `pool` says otherwise).
async fn pool_of(
    mocks: Vec<mock_upstream::Builder>,
    pool: impl FnOnce(&mut PoolConfig) + Send + 'static,
) -> Harness {
    let mut builder = Harness::builder();
    for mock in mocks {
        builder = builder.upstream(mock);
    }
    builder
        .config(move |config| {
            let endpoints = config.upstreams.iter().map(|u| u.base_url.clone()).collect();
            let mut pool_config = PoolConfig { endpoints, affinity: true, ..PoolConfig::default() };
            pool(&mut pool_config);
            config.upstreams = vec![UpstreamConfig {
                name: "pool".into(),
                first_byte_timeout: Duration::from_secs(10),
                pool: Some(pool_config),
                ..UpstreamConfig::default()
            }];
            config.routes.clear();
        })
        .start()
        .await
}

fn three() -> Vec<mock_upstream::Builder> {
    vec![Server::builder(), Server::builder(), Server::builder()]
}

/// Which mock an endpoint name (`127.0.0.1:PORT`) is.
fn mock_index(h: &Harness, endpoint: &str) -> usize {
    (0..3)
        .find(|&i| h.upstream(i).addr().to_string() == endpoint)
        .unwrap_or_else(|| panic!("no mock at {endpoint}"))
}

fn endpoint_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(ENDPOINT)
        .expect("a pooled response names its endpoint")
        .to_str()
        .unwrap()
        .to_string()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// A conversation's body at turn `turn` (0-based): a system prompt, the first question, and
/// `turn` more exchanges.
fn conversation(system: &str, turn: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": system}), user("first question")];
    for t in 0..turn {
        messages.push(assistant(&format!("answer {t}")));
        messages.push(user(&format!("follow-up {t}")));
    }
    json!({"model": "mock-model", "messages": messages})
}

async fn send_session(h: &Harness, session: &str, turn: usize) -> reqwest::Response {
    let response =
        h.chat().header("x-session-id", session).json(&conversation("Be terse.", turn)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response
}

/// Polls `check` until it holds; panics after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn endpoint_sample(metric: &str, endpoint: &str, extra: &str) -> String {
    format!(r#"{metric}{{upstream="pool",endpoint="{endpoint}"{extra}}}"#)
}

#[tokio::test]
async fn each_session_keeps_its_endpoint_and_sessions_spread_over_the_pool() {
    // Given a pool of three endpoints with affinity
    let h = pool_of(three(), |_| {}).await;

    // When 24 sessions take three turns each
    let mut homes: HashMap<String, String> = HashMap::new();
    for turn in 0..3 {
        for s in 0..24 {
            let session = format!("session-{s}");
            let endpoint = endpoint_of(&send_session(&h, &session, turn).await);
            // Then every turn of a session lands where its first did
            let home = homes.entry(session.clone()).or_insert_with(|| endpoint.clone());
            assert_eq!(&endpoint, home, "{session} moved at turn {turn}");
        }
    }

    // And the sessions use every endpoint, each mock serving exactly its sessions' turns
    let per_endpoint = homes.values().fold(HashMap::<&str, usize>::new(), |mut m, e| {
        *m.entry(e).or_default() += 1;
        m
    });
    assert_eq!(per_endpoint.len(), 3, "{per_endpoint:?}");
    for (endpoint, sessions) in &per_endpoint {
        assert_eq!(h.upstream(mock_index(&h, endpoint)).requests().len(), sessions * 3);
        let home = h
            .metric(&endpoint_sample(
                "ctxgate_upstream_endpoint_requests_total",
                endpoint,
                r#",choice="home""#,
            ))
            .await;
        assert_eq!(home, (sessions * 3) as f64);
    }
}

#[tokio::test]
async fn a_stateless_conversation_keeps_its_endpoint_by_its_prefix() {
    // Given a pool with affinity and clients that resend their whole history, without sessions
    let h = pool_of(three(), |_| {}).await;

    // When 24 conversations (each its own system prompt) grow over three turns
    let mut homes: HashMap<usize, String> = HashMap::new();
    for turn in 0..3 {
        for c in 0..24 {
            let body = conversation(&format!("You are agent {c}."), turn);
            let response = h.chat().json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let endpoint = endpoint_of(&response);
            // Then each stays on one endpoint, though the later messages change every turn
            let home = homes.entry(c).or_insert_with(|| endpoint.clone());
            assert_eq!(&endpoint, home, "conversation {c} moved at turn {turn}");
        }
    }
    // And different prefixes spread over the pool
    assert_eq!(homes.values().collect::<HashSet<_>>().len(), 3);
}

#[tokio::test]
async fn every_round_of_a_gateway_tool_loop_goes_to_the_conversations_endpoint() {
    // Given endpoints that call the gateway tool `lookup` until they see its results, and the
    // tool served by another server
    let tool = Server::builder().start().await.unwrap();
    let tool_url = format!("http://{}/tools/lookup", tool.addr());
    let calling = || Server::builder().tool_calls("lookup", 2);
    let mut builder = Harness::builder();
    for mock in [calling(), calling(), calling()] {
        builder = builder.upstream(mock);
    }
    let h = builder
        .config(move |config| {
            let endpoints = config.upstreams.iter().map(|u| u.base_url.clone()).collect();
            config.upstreams = vec![UpstreamConfig {
                name: "pool".into(),
                pool: Some(PoolConfig { endpoints, affinity: true, ..PoolConfig::default() }),
                ..UpstreamConfig::default()
            }];
            config.routes.clear();
            config.tools =
                vec![ToolConfig { inject: true, ..support::tool_server::http_tool("lookup", tool_url) }];
        })
        .start()
        .await;

    // When 12 stateless conversations each take a turn that runs the tool once
    for c in 0..12 {
        let response = h.chat().json(&conversation(&format!("Tool user {c}."), 0)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let endpoint = endpoint_of(&response);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ctxgate"]["rounds"], 1, "{body}");

        // Then both model calls of the turn went to the endpoint that answered
        let system = format!("Tool user {c}.");
        for i in 0..3 {
            let calls = h
                .upstream(i)
                .requests()
                .iter()
                .filter(|r| r.json()["messages"][0]["content"] == system.as_str())
                .count();
            assert_eq!(
                calls,
                if h.upstream(i).addr().to_string() == endpoint { 2 } else { 0 },
                "conversation {c}"
            );
        }
    }
}

#[tokio::test]
async fn a_busy_home_spills_to_the_next_choice_and_the_conversation_comes_back() {
    // Given endpoints whose streamed answers hold after their headers until a gate opens, and
    // the default load factor (2.0: an endpoint at twice the pool's average is passed over)
    let gate = Gate::new();
    let held = || {
        let mut mock = Server::builder();
        for _ in 0..8 {
            mock = mock.stream(chunks(&["a", "b"], Some((0, &gate))));
        }
        mock
    };
    let h = pool_of(vec![held(), held(), held()], |_| {}).await;
    let body = json!({
        "model": "mock-model",
        "stream": true,
        "messages": [{"role": "system", "content": "One hot prompt."}, user("same question")],
    });

    // When six requests of one conversation are in flight at once
    let mut open = Vec::new();
    let mut landed = Vec::new();
    for _ in 0..6 {
        let response = h.chat().json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        landed.push(endpoint_of(&response));
        open.push(response);
    }

    // Then the first goes home, and the home never holds more than the load bound allows
    // (⌈2 × in flight / 3⌉ counting the new one): the third and the sixth spill.
    let home = landed[0].clone();
    let at_home: Vec<bool> = landed.iter().map(|e| *e == home).collect();
    assert_eq!(at_home, [true, true, false, true, true, false], "{landed:?}");
    let text = h.metrics().await;
    let spills: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("ctxgate_upstream_endpoint_requests_total") && l.contains(r#"choice="spill""#)
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(spills, 2.0);
    assert_eq!(h.metric(&endpoint_sample("ctxgate_upstream_endpoint_in_flight", &home, "")).await, 4.0);

    // When the answers complete
    gate.open();
    for response in open {
        assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    eventually("the leases to be released", Duration::from_secs(5), || async {
        let text = h.metrics().await;
        text.lines()
            .filter(|l| l.starts_with("ctxgate_upstream_endpoint_in_flight"))
            .all(|l| l.ends_with(" 0"))
    })
    .await;

    // Then the conversation is back on its home
    let response = h.chat().json(&body).send().await.unwrap();
    assert_eq!(endpoint_of(&response), home);
    response.text().await.unwrap();
}

#[tokio::test]
async fn an_endpoint_answering_5xx_is_ejected_and_its_sessions_return_after_the_ejection() {
    // Given a pool that ejects after two consecutive failures, for 3 s
    let h = pool_of(three(), |pool| {
        pool.health.eject_after = 2;
        pool.health.ejection = Duration::from_secs(3);
    })
    .await;
    let home = endpoint_of(&send_session(&h, "s", 0).await);
    let home_mock = h.upstream(mock_index(&h, &home));

    // When its home answers 500 twice
    home_mock.push(Reply::error(500));
    home_mock.push(Reply::error(500));
    let mut elsewhere = HashSet::new();
    for turn in 1..=2 {
        // Then each turn still succeeds, on another endpoint of the pool, before any byte
        let response = send_session(&h, "s", turn).await;
        let endpoint = endpoint_of(&response);
        assert_ne!(endpoint, home);
        elsewhere.insert(endpoint);
    }
    assert_eq!(elsewhere.len(), 1, "the session's second choice is one endpoint");
    assert_eq!(home_mock.requests().len(), 3);
    assert_eq!(h.metric(&endpoint_sample("ctxgate_upstream_endpoint_ejections_total", &home, "")).await, 1.0);
    assert_eq!(h.metric(&endpoint_sample("ctxgate_upstream_endpoint_available", &home, "")).await, 0.0);
    let failures = endpoint_sample("ctxgate_upstream_endpoint_failures_total", &home, r#",reason="status""#);
    assert_eq!(h.metric(&failures).await, 2.0);

    // And while ejected the home gets no attempt at all
    let response = send_session(&h, "s", 3).await;
    assert!(elsewhere.contains(&endpoint_of(&response)));
    assert_eq!(home_mock.requests().len(), 3);

    // When the ejection ends, the session is back home
    let mut turn = 4;
    eventually("the session to return home", Duration::from_secs(15), || {
        turn += 1;
        let h = &h;
        let home = home.clone();
        async move { endpoint_of(&send_session(h, "s", turn).await) == home }
    })
    .await;
    assert_eq!(h.metric(&endpoint_sample("ctxgate_upstream_endpoint_available", &home, "")).await, 1.0);
}

#[tokio::test]
async fn a_killed_endpoint_is_ejected_on_connect_errors_and_rejoins_when_it_is_back() {
    // Given a pool that ejects after two consecutive failures, for 2 s
    let mut h = pool_of(three(), |pool| {
        pool.health.eject_after = 2;
        pool.health.ejection = Duration::from_secs(2);
    })
    .await;
    let home = endpoint_of(&send_session(&h, "k", 0).await);
    let index = mock_index(&h, &home);
    let addr = h.upstream(index).addr();

    // When the home replica dies
    h.kill_upstream(index);
    for turn in 1..=3 {
        // Then its session is served by the pool (failover before the first byte)
        let response = send_session(&h, "k", turn).await;
        assert_ne!(endpoint_of(&response), home);
    }
    let connect = endpoint_sample("ctxgate_upstream_endpoint_failures_total", &home, r#",reason="connect""#);
    assert_eq!(h.metric(&connect).await, 2.0, "the third turn skipped the ejected endpoint");
    assert_eq!(h.metric(&endpoint_sample("ctxgate_upstream_endpoint_ejections_total", &home, "")).await, 1.0);

    // When a replica comes back at the same address
    let revived = Server::builder().start_on(addr).await.unwrap();

    // Then, once the ejection is over, the session returns to it
    let mut turn = 3;
    eventually("the session to return to the revived endpoint", Duration::from_secs(15), || {
        turn += 1;
        let h = &h;
        let home = home.clone();
        async move { endpoint_of(&send_session(h, "k", turn).await) == home }
    })
    .await;
    assert!(!revived.requests().is_empty());
}

#[tokio::test]
async fn an_endpoint_failing_its_health_check_is_taken_out_before_any_request_fails() {
    // Given a pool with active checks every 100 ms and passive ejection off
    let mut h = pool_of(three(), |pool| {
        pool.health.eject_after = 0;
        pool.health.check_path = Some("/v1/models".into());
        pool.health.check_interval = Duration::from_millis(100);
    })
    .await;
    let home = endpoint_of(&send_session(&h, "c", 0).await);
    let index = mock_index(&h, &home);
    let addr = h.upstream(index).addr();
    let checked = || h.upstream(index).requests().iter().any(|r| r.method == "GET" && r.path == "/v1/models");
    eventually("a health check", Duration::from_secs(5), || async { checked() }).await;

    // When the home replica dies, with no request in flight
    h.kill_upstream(index);

    // Then its failed check takes it out, and the session's turns go elsewhere without a
    // single failed attempt
    let available = endpoint_sample("ctxgate_upstream_endpoint_available", &home, "");
    eventually("the check to fail", Duration::from_secs(5), || async { h.metric(&available).await == 0.0 })
        .await;
    for turn in 1..=3 {
        assert_ne!(endpoint_of(&send_session(&h, "c", turn).await), home);
    }
    let text = h.metrics().await;
    let failed_attempts: f64 = text
        .lines()
        .filter(|l| l.starts_with("ctxgate_upstream_endpoint_failures_total") && l.contains(&home))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(failed_attempts, 0.0);

    // When it is back, a passing check returns it and the session goes home
    let _revived = Server::builder().start_on(addr).await.unwrap();
    eventually("the check to pass", Duration::from_secs(5), || async { h.metric(&available).await == 1.0 })
        .await;
    assert_eq!(endpoint_of(&send_session(&h, "c", 4).await), home);
}

/// Answers DNS queries from whatever the test last scripted.
#[derive(Debug, Default)]
struct ScriptedDns {
    answer: Mutex<Option<io::Result<Vec<SocketAddr>>>>,
    queries: Mutex<usize>,
}

impl ScriptedDns {
    fn answer(&self, answer: io::Result<Vec<SocketAddr>>) {
        *self.answer.lock().unwrap() = Some(answer);
    }
}

impl Resolver for ScriptedDns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        assert_eq!((host, port), ("localhost", 9), "the pool resolves its configured name");
        *self.queries.lock().unwrap() += 1;
        let answer = match &*self.answer.lock().unwrap() {
            Some(Ok(addresses)) => Ok(addresses.clone()),
            Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Err(io::Error::other("nothing scripted yet")),
        };
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn dns_answers_add_and_remove_endpoints_while_the_gateway_runs() {
    // Given a pool found in DNS (the name is localhost, so the system resolver never leaves the
    // machine before the scripted one takes over), refreshed every 50 ms
    let h = pool_of(three(), |pool| {
        pool.endpoints.clear();
        pool.dns = Some("http://localhost:9/v1".into());
        pool.dns_interval = Duration::from_millis(50);
    })
    .await;
    let dns = Arc::new(ScriptedDns::default());
    h.state.upstreams().set_resolver(dns.clone());
    let mock = |i: usize| h.upstream(i).addr();
    let pool = h.state.upstreams().router.route(None)[0].pool().expect("a pool").clone();
    let endpoints_are = |expected: Vec<SocketAddr>| {
        let pool = pool.clone();
        async move {
            let mut names: Vec<String> = pool.endpoints().iter().map(|e| e.name.clone()).collect();
            let mut expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
            names.sort();
            expected.sort();
            names == expected
        }
    };
    let sessions = 40;
    let turn = |round: usize| {
        let h = &h;
        async move {
            let mut at = HashMap::new();
            for s in 0..sessions {
                let endpoint = endpoint_of(&send_session(h, &format!("dns-{s}"), round).await);
                at.insert(s, mock_index(h, &endpoint));
            }
            at
        }
    };

    // When DNS answers with two replicas
    dns.answer(Ok(vec![mock(0), mock(1)]));
    eventually("two endpoints", Duration::from_secs(5), || endpoints_are(vec![mock(0), mock(1)])).await;
    let first = turn(0).await;
    // Then only those serve
    assert!(first.values().all(|&i| i < 2), "{first:?}");

    // When a third replica appears
    dns.answer(Ok(vec![mock(0), mock(1), mock(2)]));
    eventually("three endpoints", Duration::from_secs(5), || endpoints_are(vec![mock(0), mock(1), mock(2)]))
        .await;
    let second = turn(1).await;
    // Then it takes some sessions, and every session that moved moved to it
    let moved: Vec<usize> = (0..sessions).filter(|s| first[s] != second[s]).collect();
    assert!(!moved.is_empty(), "the new endpoint took no session");
    assert!(moved.iter().all(|s| second[s] == 2), "{first:?} -> {second:?}");

    // When the first replica leaves
    dns.answer(Ok(vec![mock(1), mock(2)]));
    eventually("mock 0 to leave", Duration::from_secs(5), || endpoints_are(vec![mock(1), mock(2)])).await;
    let third = turn(2).await;
    // Then only its sessions move
    for s in 0..sessions {
        if second[&s] == 0 {
            assert_ne!(third[&s], 0);
        } else {
            assert_eq!(third[&s], second[&s], "session {s} moved though its endpoint stayed");
        }
    }
    let gone = mock(0).to_string();
    assert!(
        !h.metrics().await.contains(&format!(r#"endpoint="{gone}""#)),
        "a departed endpoint's series are removed"
    );

    // When DNS fails, the pool keeps serving from its last answer
    dns.answer(Err(io::Error::other("SERVFAIL")));
    let failed = r#"ctxgate_upstream_pool_resolutions_total{upstream="pool",outcome="error"}"#;
    let before = h.metric(failed).await;
    eventually("a failed resolution", Duration::from_secs(5), || async { h.metric(failed).await > before })
        .await;
    assert!(endpoints_are(vec![mock(1), mock(2)]).await);
    assert_eq!(turn(3).await, third);
    assert!(*dns.queries.lock().unwrap() >= 4);
}

#[tokio::test]
async fn a_single_url_upstream_names_no_endpoint() {
    // Given a plain upstream
    let h = Harness::start().await;
    let response = h.chat().json(&support::chat_body(false)).send().await.unwrap();
    // Then nothing about pools shows
    assert_eq!(response.status(), 200);
    assert!(response.headers().get(ENDPOINT).is_none());
    assert!(!h.metrics().await.contains("upstream_endpoint_requests_total{"));
}
