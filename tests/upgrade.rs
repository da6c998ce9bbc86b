//! HTTP/1.1 upgrades on passthrough routes: a real WebSocket client through the real gateway to
//! a real WebSocket echo upstream (tokio-tungstenite on both ends), tunnelled both ways with
//! its handshake headers, the gateway key kept back, refusals passed through, the idle timeout
//! and shutdown applied to the tunnel as to the connection it is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ctxgate::config::Config;
use futures_util::{SinkExt, StreamExt};
use support::{key, Harness};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CLIENT_KEY: &str = "sk-client-gateway-key";
const LIMITED_KEY: &str = "sk-limited-gateway-key";
const UPSTREAM_KEY: &str = "sk-upstream-key";
const WAIT: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the echo upstream saw.
#[derive(Debug)]
enum Seen {
    Handshake {
        path: String,
        headers: HeaderMap,
    },
    /// A tunnelled connection ended (closed by either side, or cut).
    Ended,
}

/// A WebSocket upstream: echoes text and binary messages, closes when sent `bye`; with
/// `refuse`, answers every handshake with that status instead.
struct EchoUpstream {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl EchoUpstream {
    async fn start(refuse: Option<StatusCode>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(echo(stream, tx.clone(), refuse));
            }
        });
        Self { addr, seen }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    async fn next(&mut self) -> Seen {
        timeout(WAIT, self.seen.recv()).await.expect("the upstream saw nothing").unwrap()
    }
}

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn echo(stream: TcpStream, seen: mpsc::UnboundedSender<Seen>, refuse: Option<StatusCode>) {
    let record = |request: &Request, mut response: Response| {
        let path = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        let _ = seen.send(Seen::Handshake { path, headers: request.headers().clone() });
        if let Some(status) = refuse {
            let mut refusal = ErrorResponse::new(Some("no such socket".to_string()));
            *refusal.status_mut() = status;
            return Err(refusal);
        }
        // Chooses the client's first subprotocol, as a server does.
        if let Some(first) = request.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()) {
            let first = first.split(',').next().unwrap_or_default().trim();
            response.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(first).unwrap());
        }
        Ok(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else { return };
    while let Some(Ok(message)) = ws.next().await {
        let echoed = match message {
            Message::Text(text) if text.as_str() == "bye" => {
                let _ = ws.close(None).await;
                continue;
            }
            message @ (Message::Text(_) | Message::Binary(_)) => message,
            _ => continue,
        };
        if ws.send(echoed).await.is_err() {
            break;
        }
    }
    let _ = seen.send(Seen::Ended);
}

/// The gateway in front of `upstream`, with gateway keys on and the upstream's own key held by
/// the gateway.
async fn gateway(upstream: &EchoUpstream, config: impl FnOnce(&mut Config) + Send + 'static) -> Harness {
    let base_url = upstream.base_url();
    Harness::builder()
        .config(move |c| {
            c.upstreams[0].base_url = base_url;
            c.upstreams[0].api_key_env = Some("UPSTREAM_KEY".into());
            let mut limited = key("limited", LIMITED_KEY);
            limited.models = vec!["gpt-realtime*".into()];
            c.auth.keys = vec![key("client", CLIENT_KEY), limited];
            config(c);
        })
        .start_with_env([("UPSTREAM_KEY", UPSTREAM_KEY)])
        .await
}

async fn connect(h: &Harness, path: &str, key: Option<&str>) -> Result<Client, WsError> {
    connect_with(h, path, key, &[]).await.map(|(ws, _)| ws)
}

/// Connects with extra handshake headers; the client and the 101's headers.
async fn connect_with(
    h: &Harness,
    path: &str,
    key: Option<&str>,
    headers: &[(&'static str, &str)],
) -> Result<(Client, HeaderMap), WsError> {
    let mut request = format!("ws://{}{path}", h.addr).into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", HeaderValue::from_str(&format!("Bearer {key}")).unwrap());
    }
    for (name, value) in headers {
        request.headers_mut().insert(*name, HeaderValue::from_str(value).unwrap());
    }
    let (ws, response) =
        timeout(WAIT, tokio_tungstenite::connect_async(request)).await.expect("handshake hung")?;
    Ok((ws, response.headers().clone()))
}

/// The status of a refused handshake.
async fn refused(h: &Harness, path: &str, key: Option<&str>) -> (StatusCode, String) {
    match connect(h, path, key).await {
        Err(WsError::Http(response)) => {
            let body = response.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
            (response.status(), body.unwrap_or_default())
        }
        Ok(_) => panic!("the handshake was accepted"),
        Err(err) => panic!("the handshake failed without an answer: {err}"),
    }
}

async fn next_message(ws: &mut Client) -> Option<Message> {
    match timeout(WAIT, ws.next()).await.expect("no message in time") {
        Some(Ok(message)) => Some(message),
        Some(Err(_)) | None => None,
    }
}

async fn round_trip(ws: &mut Client, message: Message) {
    ws.send(message.clone()).await.unwrap();
    assert_eq!(next_message(ws).await, Some(message));
}

/// Reads until the tunnel closes; whether it did within `within`.
async fn closes_within(ws: &mut Client, within: Duration) -> bool {
    timeout(within, async {
        while let Some(Ok(message)) = ws.next().await {
            assert!(message.is_close(), "unexpected message {message:?}");
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn websocket_messages_flow_both_ways_with_the_handshake_headers_and_without_the_gateway_key() {
    // Given an echo upstream behind a gateway with keys on
    let mut upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, |_| {}).await;

    // When a WebSocket client connects on /v1/realtime with its gateway key and subprotocols
    let (mut ws, switched) = connect_with(
        &h,
        "/v1/realtime?model=x",
        Some(CLIENT_KEY),
        &[("sec-websocket-protocol", "realtime, other")],
    )
    .await
    .unwrap();

    // Then the client's 101 carries the upstream's choice (and its Sec-WebSocket-Accept,
    // which the client checked)
    assert_eq!(switched["sec-websocket-protocol"], "realtime");
    assert_eq!(switched["upgrade"].to_str().unwrap().to_ascii_lowercase(), "websocket");

    // And the upstream got the handshake on its own path, with the upgrade headers, its own
    // key and not the client's
    let Seen::Handshake { path, headers } = upstream.next().await else { panic!("no handshake") };
    assert_eq!(path, "/v1/realtime?model=x");
    assert_eq!(headers["upgrade"].to_str().unwrap().to_ascii_lowercase(), "websocket");
    assert!(headers["connection"].to_str().unwrap().to_ascii_lowercase().contains("upgrade"));
    assert!(headers.contains_key("sec-websocket-key"));
    assert_eq!(headers["sec-websocket-version"], "13");
    assert_eq!(headers["sec-websocket-protocol"], "realtime, other");
    assert_eq!(headers["authorization"], format!("Bearer {UPSTREAM_KEY}").as_str());
    assert!(
        headers.values().all(|v| !v.as_bytes().windows(CLIENT_KEY.len()).any(|w| w == CLIENT_KEY.as_bytes())),
        "the gateway key reached the upstream"
    );
    // And messages go both ways, text and binary, large and small
    round_trip(&mut ws, Message::text("hello")).await;
    round_trip(&mut ws, Message::binary(vec![7u8; 256 * 1024])).await;
    round_trip(&mut ws, Message::text("again")).await;
    // And the tunnel is counted while open
    h.metric_becomes("ctxgate_tunnels_open", 1.0).await;

    // When the client closes
    ws.close(None).await.unwrap();
    // Then the upstream's side ends too, the client sees the connection close, and once the
    // client lets go of its socket the tunnel is no longer counted
    assert!(matches!(upstream.next().await, Seen::Ended));
    assert!(closes_within(&mut ws, WAIT).await);
    drop(ws);
    h.metric_becomes("ctxgate_tunnels_open", 0.0).await;
}

#[tokio::test]
async fn a_close_from_the_upstream_ends_the_tunnel() {
    // Given an open tunnel
    let mut upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, |_| {}).await;
    let mut ws = connect(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await.unwrap();
    round_trip(&mut ws, Message::text("hello")).await;

    // When the upstream closes
    ws.send(Message::text("bye")).await.unwrap();

    // Then the client gets the upstream's close frame and the connection ends
    assert!(next_message(&mut ws).await.is_some_and(|m| m.is_close()));
    assert!(closes_within(&mut ws, WAIT).await);
    drop(ws);
    h.metric_becomes("ctxgate_tunnels_open", 0.0).await;
    assert!(matches!(upstream.next().await, Seen::Handshake { .. }));
    assert!(matches!(upstream.next().await, Seen::Ended));
}

#[tokio::test]
async fn an_upgrade_the_upstream_refuses_gets_the_upstream_s_answer() {
    // Given an upstream that answers every handshake with 404
    let upstream = EchoUpstream::start(Some(StatusCode::NOT_FOUND)).await;
    let h = gateway(&upstream, |_| {}).await;

    // When a client asks to upgrade
    let (status, body) = refused(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await;

    // Then it gets that 404, body included, and no tunnel is open
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such socket"), "{body}");
    assert_eq!(h.metric("ctxgate_tunnels_open").await, 0.0);
}

#[tokio::test]
async fn an_upgrade_the_upstream_answered_is_not_sent_again() {
    // Given an upstream that answers every handshake with 503 (which a plain GET would retry)
    let mut upstream = EchoUpstream::start(Some(StatusCode::SERVICE_UNAVAILABLE)).await;
    let h = gateway(&upstream, |_| {}).await;

    // When a client asks to upgrade
    let (status, _) = refused(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await;

    // Then it gets the 503 from the one attempt the upstream saw
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(upstream.next().await, Seen::Handshake { .. }));
    assert!(upstream.seen.try_recv().is_err(), "the upgrade was sent again");
}

#[tokio::test]
async fn a_tunnel_holds_a_connection_slot_and_no_request_slot() {
    // Given a gateway serving one request and two connections at a time
    let upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, |c| {
        c.server.max_concurrent_requests = std::num::NonZeroUsize::new(1).unwrap();
        c.server.max_connections = std::num::NonZeroUsize::new(2);
    })
    .await;

    // When one tunnel is open, a second one opens too: the first holds no request slot
    let mut first = connect(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await.unwrap();
    let mut second = connect(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await.unwrap();
    round_trip(&mut first, Message::text("one")).await;
    round_trip(&mut second, Message::text("two")).await;

    // Then a third connection is refused: each tunnel is an open connection
    let healthz = format!("{}/healthz", h.url);
    assert_eq!(h.client.get(&healthz).send().await.unwrap().status(), 503);
    // And once a tunnel closes, its slot is free again
    drop(second);
    let deadline = Instant::now() + WAIT;
    while h.client.get(&healthz).send().await.map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(Instant::now() < deadline, "the closed tunnel's slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    round_trip(&mut first, Message::text("still open")).await;
}

#[tokio::test]
async fn gateway_keys_apply_to_the_upgrade_request() {
    // Given a gateway with keys, one limited to gpt-realtime* and one with a token limit
    let upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, |c| {
        let mut metered = key("metered", "sk-metered");
        metered.tokens_per_minute = std::num::NonZeroU32::new(1000);
        c.auth.keys.push(metered);
    })
    .await;

    // Then an upgrade without a key is refused, as any request
    assert_eq!(refused(&h, "/v1/realtime?model=x", None).await.0, StatusCode::UNAUTHORIZED);
    // And a key limited to some models may use only those, named in the query
    assert_eq!(refused(&h, "/v1/realtime?model=x", Some(LIMITED_KEY)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(refused(&h, "/v1/realtime", Some(LIMITED_KEY)).await.0, StatusCode::BAD_REQUEST);
    let mut ws = connect(&h, "/v1/realtime?model=gpt-realtime", Some(LIMITED_KEY)).await.unwrap();
    round_trip(&mut ws, Message::text("allowed")).await;
    // And a key whose tokens are counted cannot open a tunnel, where they could not be
    let (status, body) = refused(&h, "/v1/realtime?model=x", Some("sk-metered")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("upgrade_not_allowed"), "{body}");
}

#[tokio::test]
async fn a_plain_get_on_a_passthrough_route_is_still_passed_through() {
    // Given the default mock upstream, recording requests
    let h = Harness::start().await;

    // When a client sends a GET without upgrade headers
    let response = h.client.get(h.v1("/realtime/sessions?model=x")).send().await.unwrap();

    // Then it is passed through as before (the mock has no such route: its 404 comes back)
    assert_eq!(response.status(), 404);
    let recorded = h.upstream(0).requests();
    let request = recorded.last().unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, "/v1/realtime/sessions?model=x");
    assert!(!request.headers.contains_key("upgrade"));
}

#[tokio::test]
async fn the_idle_timeout_does_not_cut_a_tunnel_while_data_flows_but_closes_a_silent_one() {
    // Given a gateway whose idle timeout is short
    let idle = Duration::from_secs(1);
    let upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, move |c| c.server.idle_timeout = idle).await;
    let mut ws = connect(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await.unwrap();

    // When messages flow every quarter of the idle timeout for over three idle timeouts
    let started = Instant::now();
    let mut pace = tokio::time::interval(idle / 4);
    for i in 0..14 {
        pace.tick().await;
        round_trip(&mut ws, Message::text(format!("tick {i}"))).await;
    }
    // Then the tunnel is still open
    assert!(started.elapsed() > idle * 3);
    round_trip(&mut ws, Message::text("still here")).await;

    // When nothing moves either way
    // Then the gateway closes the tunnel after the idle timeout
    let silent = Instant::now();
    assert!(closes_within(&mut ws, idle + WAIT).await);
    // (The gateway's clock started at its last read, a little before the client's.)
    assert!(silent.elapsed() >= idle * 3 / 4, "closed after {:?}", silent.elapsed());
    h.metric_becomes(r#"ctxgate_connections_closed_total{reason="idle_timeout"}"#, 1.0).await;
}

#[tokio::test]
async fn shutdown_lets_a_tunnel_run_through_the_drain_and_ends_it_at_the_drain_timeout() {
    // Given an open tunnel and a drain timeout of one second
    let drain = Duration::from_secs(1);
    let mut upstream = EchoUpstream::start(None).await;
    let mut h = gateway(&upstream, move |c| c.server.shutdown_timeout = drain).await;
    let mut ws = connect(&h, "/v1/realtime?model=x", Some(CLIENT_KEY)).await.unwrap();
    assert!(matches!(upstream.next().await, Seen::Handshake { .. }));

    // When the gateway shuts down
    let begun = Instant::now();
    h.begin_shutdown();

    // Then the tunnel still carries messages while the gateway drains
    round_trip(&mut ws, Message::text("draining")).await;
    // And it is closed, on both sides, when the drain timeout ends, and the gateway stops
    assert!(closes_within(&mut ws, drain + WAIT).await);
    assert!(begun.elapsed() >= drain, "closed after {:?}", begun.elapsed());
    assert!(matches!(upstream.next().await, Seen::Ended));
    timeout(WAIT, h.join()).await.expect("the gateway did not stop");
}

#[tokio::test]
async fn a_tunnel_through_a_pool_names_its_endpoint_and_counts_in_flight_there_until_it_closes() {
    // Given an upstream that is a pool whose one endpoint is the echo upstream
    let upstream = EchoUpstream::start(None).await;
    let endpoint = upstream.addr.to_string();
    let base_url = upstream.base_url();
    let h = Harness::builder()
        .config(move |c| {
            c.upstreams = vec![ctxgate::config::UpstreamConfig {
                name: "pool".into(),
                pool: Some(ctxgate::config::PoolConfig { endpoints: vec![base_url], ..Default::default() }),
                ..Default::default()
            }];
            c.routes.clear();
        })
        .start()
        .await;
    let in_flight =
        format!(r#"ctxgate_upstream_endpoint_in_flight{{upstream="pool",endpoint="{endpoint}"}}"#);

    // When a tunnel opens
    let (mut ws, switched) = connect_with(&h, "/v1/realtime?model=x", None, &[]).await.unwrap();
    round_trip(&mut ws, Message::text("hello")).await;

    // Then the 101 names the endpoint, which counts the tunnel in flight while it is open
    assert_eq!(switched["x-ctxgate-upstream-endpoint"], endpoint.as_str());
    h.metric_becomes(&in_flight, 1.0).await;
    ws.close(None).await.unwrap();
    assert!(closes_within(&mut ws, WAIT).await);
    drop(ws);
    h.metric_becomes(&in_flight, 0.0).await;
}

#[tokio::test]
async fn the_responses_api_websocket_mode_is_tunnelled_when_configured_so() {
    // Given an echo upstream behind a gateway told to tunnel the Responses API's WebSocket mode
    // (by default the gateway answers it itself: tests/responses_websocket.rs)
    let mut upstream = EchoUpstream::start(None).await;
    let h = gateway(&upstream, |c| c.responses.websocket = ctxgate::config::WebSocketMode::Tunnel).await;

    // When a client opens the Responses API's WebSocket mode, as Codex's built-in provider does
    let mut ws = connect(&h, "/v1/responses", Some(CLIENT_KEY)).await.unwrap();

    // Then it reaches the upstream on its own path, and messages flow both ways
    let Seen::Handshake { path, .. } = upstream.next().await else { panic!("no handshake") };
    assert_eq!(path, "/v1/responses");
    round_trip(&mut ws, Message::text(r#"{"type":"response.create"}"#)).await;
    ws.close(None).await.unwrap();
    assert!(matches!(upstream.next().await, Seen::Ended));
}
