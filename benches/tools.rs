//! What gateway tools cost: the wall time of a turn whose model calls several slow tools, and
//! the per-call overhead of ctxgate's fan-out when a round holds many instant ones.
//!
//! Everything runs in-process on real loopback sockets: ctxgate through [`ctxgate::serve`]
//! (embedded session store in a tempdir), `mock-upstream` as the model, and a minimal hyper
//! tool server defined below that sleeps per path and records when each request arrives and
//! when its answer is handed back.
//!
//! 1. `five_tool_turn`: a non-streamed chat request whose first model answer calls five HTTP
//!    tools taking 1, 1.5, 2, 2.5 and 3 s; the second answer is final. The tools run at once,
//!    so the turn should take the slowest tool (3 s, the floor), not the sum (10 s). Target:
//!    wall within 20 ms of the slowest tool. One unmeasured warm-up turn, then 10 measured
//!    turns (each ~3 s, so a plain loop, not criterion's sampling). Overhead = wall − 3 s; it
//!    is split at the slowest tool, on the tool server's clock (this process's): *before* its
//!    request arrives (first model call, validation, fan-out), its own time beyond 3 s (sleep
//!    overshoot, not ctxgate's), and *after* it answers (results, second model call, reply).
//!    The same turn then runs twice through a second gateway with `tool_loop.max_concurrency
//!    = 1` (tools forced sequential), to show the 10 s contrast in the same run.
//! 2. `fanout_200`: `Registry::run_all` called directly with 200 calls to an instant tool (tool
//!    and global limits 256), against a baseline of the same 200 requests sent straight to the
//!    tool server by a pooled hyper client spawned on a `JoinSet` (what `run_all` does, minus
//!    ctxgate's lookup, permits, schema validation and result handling). Rounds alternate
//!    gateway/direct in ABBA order, so drift hits both. `run_all` reports durations in whole
//!    milliseconds, too coarse here, so calls are timed from outside:
//!    - *arrival*: for each call, when its request reached the tool server, relative to the
//!      start of the round: the fan-out latency. p50/p99 over all calls of all rounds.
//!    - *round wall*: start → every result back; ÷ 200 gives the amortised cost per call (on 2
//!      cores the round is CPU-bound, so this is the per-call work, not latency).
//!    - *single call*: a round of 1 call against 1 direct request, p50/p99 over many rounds:
//!      the latency one call gains by going through ctxgate when nothing else is running.
//!
//!    Added = gateway − direct, per percentile (a difference of percentiles, so p99 carries
//!    both tails' noise). The first round of each side opens 200 connections and is reported
//!    separately as *cold*.
//!
//! `cargo bench --bench tools` runs both (about 75 s after compiling). A filter argument
//! selects a pass by name (`five_tool_turn`, `fanout_200`). Without `--bench` (e.g. `cargo test
//! --benches`) each pass runs once at a tiny size, with tool delays ÷ 10, as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ctxgate::config::{Config, ToolConfig, UpstreamConfig};
use ctxgate::tools::Call;
use ctxgate::AppState;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_upstream::{fixtures, Reply};
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// The five tools' delays, in ms.
const DELAYS_MS: [u64; 5] = [1000, 1500, 2000, 2500, 3000];
const TARGET: Duration = Duration::from_millis(20);
const FANOUT: usize = 200;

// === the tool server ===

/// One request as the tool server saw it.
#[derive(Clone, Copy)]
struct Hit {
    /// Index into the server's paths, `usize::MAX` for an unknown path.
    path: usize,
    arrived: Instant,
    answered: Instant,
}

/// A minimal HTTP/1 tool endpoint: `POST /<path>` sleeps that path's delay and answers a small
/// JSON body. Every request is recorded (path, arrival, answer); recording is one mutex push.
#[derive(Clone)]
struct ToolServer {
    addr: SocketAddr,
    paths: Arc<Vec<(String, Duration)>>,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl ToolServer {
    async fn start(paths: Vec<(String, Duration)>) -> ToolServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ToolServer {
            addr: listener.local_addr().unwrap(),
            paths: Arc::new(paths),
            hits: Arc::new(Mutex::new(Vec::with_capacity(4096))),
        };
        let accept = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let _ = stream.set_nodelay(true);
                let server = accept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let arrived = Instant::now();
        let index = self.paths.iter().position(|(p, _)| p == request.uri().path()).unwrap_or(usize::MAX);
        let _ = request.into_body().collect().await;
        if let Some((_, delay)) = self.paths.get(index) {
            if !delay.is_zero() {
                tokio::time::sleep(*delay).await;
            }
        }
        let answered = Instant::now();
        self.hits.lock().unwrap().push(Hit { path: index, arrived, answered });
        Response::new(Full::new(Bytes::from_static(b"{\"ok\":true,\"rows\":[1,2,3]}")))
    }

    fn take_hits(&self) -> Vec<Hit> {
        std::mem::take(&mut *self.hits.lock().unwrap())
    }
}

// === the gateway ===

fn http_tool(name: &str, url: String, max_concurrency: usize) -> ToolConfig {
    // Through serde, so fields added later with defaults do not break the bench.
    serde_json::from_value(json!({
        "name": name,
        "description": format!("The {name} tool."),
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        "timeout": "30s",
        "retries": 0,
        "max_concurrency": max_concurrency,
        "http": {"url": url, "method": "POST"},
    }))
    .unwrap()
}

/// ctxgate in front of a scripted mock upstream, with the tool server's tools configured.
struct Gateway {
    url: String,
    state: Arc<AppState>,
    upstream: mock_upstream::Server,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

async fn start_gateway(tools: &ToolServer, global_concurrency: usize) -> Gateway {
    let upstream = mock_upstream::Server::builder().record(false).start().await.unwrap();
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstreams = vec![UpstreamConfig {
        name: "mock".into(),
        base_url: upstream.base_url(),
        first_byte_timeout: Duration::from_secs(10),
        ..UpstreamConfig::default()
    }];
    let data = tempfile::tempdir().unwrap();
    config.sessions.store = format!("embedded:{}", data.path().join("sessions.redb").display());
    config.tools = tools.paths.iter().map(|(path, _)| http_tool(&path[1..], tools.url(path), 256)).collect();
    config.tool_loop.max_concurrency = global_concurrency;
    let env = BTreeMap::<String, String>::new();
    let state = AppState::new(config.validated(&env).unwrap(), &env).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ctxgate::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    Gateway { url, state, upstream, shutdown: Some(tx), task, _data: data }
}

impl Gateway {
    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

// === statistics ===

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn sorted(mut samples: Vec<Duration>) -> Vec<Duration> {
    samples.sort_unstable();
    samples
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// === 1. the five-tool turn ===

/// A completion calling the five tools, then the final answer.
fn script(upstream: &mock_upstream::Server) {
    let calls: Vec<Value> = (0..DELAYS_MS.len())
        .map(|i| {
            json!({"id": format!("c{i}"), "type": "function",
                   "function": {"name": format!("t{i}"), "arguments": json!({"q": i.to_string()}).to_string()}})
        })
        .collect();
    upstream.push(Reply::json(
        200,
        json!({
            "id": "chatcmpl-tools", "object": "chat.completion", "created": 1, "model": "mock-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls},
                         "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }),
    ));
    upstream.push(Reply::json(200, fixtures::completion("done")));
}

/// One turn, split at the slowest tool: `wall = before + slowest + after`.
struct Turn {
    wall: Duration,
    /// Request sent → the slowest tool's request arrived (first model call, fan-out).
    before: Duration,
    /// The slowest tool's own time on the tool server (its delay plus sleep overshoot).
    slowest: Duration,
    /// The slowest tool answered → response received (result handling, second model call,
    /// reply).
    after: Duration,
}

async fn turn(client: &reqwest::Client, gateway: &Gateway, tools: &ToolServer) -> Turn {
    script(&gateway.upstream);
    let tool_defs: Vec<Value> = (0..DELAYS_MS.len())
        .map(|i| json!({"type": "function", "function": {"name": format!("t{i}"), "parameters": {"type": "object"}}}))
        .collect();
    let body = json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Look five things up."}],
        "tools": tool_defs,
    });
    tools.take_hits();
    let sent = Instant::now();
    let response = client
        .post(&gateway.url)
        .header("authorization", "Bearer sk-bench-client")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ctxgate-tool-rounds"], "1");
    let answer: Value = response.json().await.unwrap();
    let received = Instant::now();
    assert_eq!(answer["choices"][0]["message"]["content"], "done");
    let hits = tools.take_hits();
    let mut paths: Vec<usize> = hits.iter().map(|h| h.path).collect();
    paths.sort_unstable();
    assert_eq!(paths, (0..DELAYS_MS.len()).collect::<Vec<_>>(), "every tool called once");
    let slowest = hits.iter().find(|h| h.path == DELAYS_MS.len() - 1).unwrap();
    Turn {
        wall: received - sent,
        before: slowest.arrived - sent,
        slowest: slowest.answered - slowest.arrived,
        after: received - slowest.answered,
    }
}

fn five_tool_turn(rt: &tokio::runtime::Runtime, full: bool) {
    let scale = if full { 1 } else { 10 };
    let delays: Vec<Duration> = DELAYS_MS.iter().map(|d| Duration::from_millis(d / scale)).collect();
    let (measured, sequential) = if full { (10, 2) } else { (1, 1) };
    let floor = *delays.iter().max().unwrap();
    let sum: Duration = delays.iter().sum();

    let (cold, parallel, serial) = rt.block_on(async {
        let paths = delays.iter().enumerate().map(|(i, d)| (format!("/t{i}"), *d)).collect();
        let tools = ToolServer::start(paths).await;
        let client = reqwest::Client::new();
        let gateway = start_gateway(&tools, 256).await;
        let cold = turn(&client, &gateway, &tools).await;
        let mut parallel = Vec::new();
        for _ in 0..measured {
            parallel.push(turn(&client, &gateway, &tools).await);
        }
        gateway.stop().await;
        let gateway = start_gateway(&tools, 1).await;
        let mut serial = Vec::new();
        for _ in 0..sequential {
            serial.push(turn(&client, &gateway, &tools).await);
        }
        gateway.stop().await;
        (cold, parallel, serial)
    });

    let walls = sorted(parallel.iter().map(|t| t.wall).collect());
    let (p50, max) = (pct(&walls, 0.5), *walls.last().unwrap());
    let serial = sorted(serial.iter().map(|t| t.wall).collect());
    let (serial_p50, serial_max) = (pct(&serial, 0.5), *serial.last().unwrap());
    let over = |d: Duration, reference: Duration| ms(d) - ms(reference);
    let verdict = if max <= floor + TARGET {
        "yes (every turn)"
    } else if p50 <= floor + TARGET {
        "p50 only"
    } else {
        "no"
    };
    println!(
        "\n### five_tool_turn: tools of {} ms, one round, non-streamed; ms\n",
        delays.iter().map(|d| d.as_millis().to_string()).collect::<Vec<_>>().join(", ")
    );
    println!(
        "| variant | turns | wall p50 | wall max | reference | wall − reference p50 | max | within {} ms of the slowest tool |",
        TARGET.as_millis()
    );
    println!("|---|---:|---:|---:|---|---:|---:|---|");
    println!(
        "| parallel (tool_loop.max_concurrency 256) | {measured} | {:.1} | {:.1} | floor {:.0} | {:+.1} | {:+.1} | {verdict} |",
        ms(p50),
        ms(max),
        ms(floor),
        over(p50, floor),
        over(max, floor),
    );
    println!(
        "| sequential (tool_loop.max_concurrency 1) | {sequential} | {:.1} | {:.1} | sum {:.0} | {:+.1} | {:+.1} | – |",
        ms(serial_p50),
        ms(serial_max),
        ms(sum),
        over(serial_p50, sum),
        over(serial_max, sum),
    );
    let split = |f: fn(&Turn) -> Duration, minus: Duration| {
        let v = sorted(parallel.iter().map(f).collect());
        format!("{:.2} / {:.2}", ms(pct(&v, 0.5)) - ms(minus), ms(*v.last().unwrap()) - ms(minus))
    };
    println!(
        "\nparallel overhead split, p50 / max in ms: before the slowest tool's request arrives {} \
         (first model call, validation, fan-out); the slowest tool's own time beyond {:.0} ms {} (its \
         sleep overshoot, not ctxgate); after it answers {} (results, second model call, reply). \
         Warm-up turn (new connections, not in the table): wall {:.1} ms.",
        split(|t| t.before, Duration::ZERO),
        ms(floor),
        split(|t| t.slowest, floor),
        split(|t| t.after, Duration::ZERO),
        ms(cold.wall),
    );
}

// === 2. 200 instant tools in one round ===

type DirectClient = Client<HttpConnector, Full<Bytes>>;

/// The baseline client: hyper-util's pooled client, configured like ctxgate's tool client
/// (nodelay, 90 s idle pool) but plain HTTP.
fn direct_client() -> DirectClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(http)
}

fn calls(n: usize) -> Vec<Call> {
    (0..n)
        .map(|i| Call {
            id: format!("call_{i}"),
            name: "instant".into(),
            arguments: format!("{{\"q\":\"{i}\"}}"),
        })
        .collect()
}

/// One round through `Registry::run_all`: its start and wall time.
async fn gateway_round(state: &AppState, n: usize) -> (Instant, Duration) {
    // The inputs are built before the clock starts, here and in `direct_round`.
    let calls = calls(n);
    let start = Instant::now();
    let outcomes = state.tools.run_all(calls, None).await;
    let wall = start.elapsed();
    assert_eq!(outcomes.len(), n);
    assert!(outcomes.iter().all(|o| o.run.outcome == "ok"), "{:?}", outcomes[0].content);
    (start, wall)
}

/// The same round straight to the tool server: `n` requests spawned on a `JoinSet`.
async fn direct_round(client: &DirectClient, uri: &hyper::Uri, n: usize) -> (Instant, Duration) {
    // The bodies ctxgate sends for these arguments.
    let bodies: Vec<Bytes> = (0..n).map(|i| Bytes::from(format!("{{\"q\":\"{i}\"}}"))).collect();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for body in bodies {
        let client = client.clone();
        let uri = uri.clone();
        set.spawn(async move {
            let request = Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert!(response.status().is_success());
            response.into_body().collect().await.unwrap().to_bytes()
        });
    }
    let mut done = 0;
    while let Some(joined) = set.join_next().await {
        joined.unwrap();
        done += 1;
    }
    let wall = start.elapsed();
    assert_eq!(done, n);
    (start, wall)
}

#[derive(Default)]
struct Side {
    walls: Vec<Duration>,
    arrivals: Vec<Duration>,
    singles: Vec<Duration>,
    cold: Duration,
}

fn fanout_200(rt: &tokio::runtime::Runtime, full: bool) {
    let (rounds, singles) = if full { (60, 2_000) } else { (2, 10) };
    let warmup = if full { 5 } else { 1 };
    let (gateway, direct) = rt.block_on(async {
        let tools = ToolServer::start(vec![("/instant".into(), Duration::ZERO)]).await;
        let gw = start_gateway(&tools, 256).await;
        let client = direct_client();
        let uri: hyper::Uri = tools.url("/instant").parse().unwrap();
        let (mut g, mut d) = (Side::default(), Side::default());

        // Cold rounds open the connections; more warm-up rounds let both pools settle.
        g.cold = gateway_round(&gw.state, FANOUT).await.1;
        d.cold = direct_round(&client, &uri, FANOUT).await.1;
        for _ in 1..warmup {
            gateway_round(&gw.state, FANOUT).await;
            direct_round(&client, &uri, FANOUT).await;
        }
        for round in 0..rounds {
            for via_gateway in [round % 2 == 0, round % 2 != 0] {
                tools.take_hits();
                let (start, wall) = if via_gateway {
                    gateway_round(&gw.state, FANOUT).await
                } else {
                    direct_round(&client, &uri, FANOUT).await
                };
                let hits = tools.take_hits();
                assert_eq!(hits.len(), FANOUT);
                let side = if via_gateway { &mut g } else { &mut d };
                side.walls.push(wall);
                side.arrivals.extend(hits.iter().map(|h| h.arrived - start));
            }
        }
        for i in 0..singles {
            if i % 2 == 0 {
                g.singles.push(gateway_round(&gw.state, 1).await.1);
                d.singles.push(direct_round(&client, &uri, 1).await.1);
            } else {
                d.singles.push(direct_round(&client, &uri, 1).await.1);
                g.singles.push(gateway_round(&gw.state, 1).await.1);
            }
        }
        tools.take_hits();
        gw.stop().await;
        (g, d)
    });

    let table = |label: &str, g: Vec<Duration>, d: Vec<Duration>, scale: f64| {
        let (g, d) = (sorted(g), sorted(d));
        let row = |q: f64| {
            let (a, b) = (us(pct(&g, q)) / scale, us(pct(&d, q)) / scale);
            (a, b, a - b)
        };
        let (g50, d50, a50) = row(0.5);
        let (g99, d99, a99) = row(0.99);
        println!(
            "| {label} | {} | {d50:.1} | {d99:.1} | {g50:.1} | {g99:.1} | **{a50:+.1}** | **{a99:+.1}** |",
            g.len()
        );
    };
    println!(
        "\n### fanout_200: {FANOUT} calls to an instant HTTP tool per round, {rounds} rounds per side after \
         {warmup} warm-up, ABBA; {singles} single-call rounds per side; µs\n"
    );
    println!("| measure | samples (per side) | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    table("arrival at the tool after round start (per call)", gateway.arrivals, direct.arrivals, 1.0);
    table(
        &format!("round wall ÷ {FANOUT} (per call, amortised)"),
        gateway.walls.clone(),
        direct.walls.clone(),
        FANOUT as f64,
    );
    table("round wall (200 calls)", gateway.walls, direct.walls, 1.0);
    table("single call, nothing else running", gateway.singles, direct.singles, 1.0);
    println!(
        "\ncold first round (opens {FANOUT} connections): gateway {:.0} µs, direct {:.0} µs.",
        us(gateway.cold),
        us(direct.cold)
    );
}

// === main ===

/// Whether a pass is selected: no filter given, or the filter is part of its name.
fn selected(args: &[String], pass: &str) -> bool {
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    let filters: Vec<&str> =
        args.iter().skip(1).filter(|a| !a.starts_with('-')).map(String::as_str).collect();
    filters.is_empty() || filters.iter().any(|f| pass.contains(f))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) is a smoke test.
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let rt = runtime();
    if selected(&args, "five_tool_turn") {
        five_tool_turn(&rt, full);
    }
    if selected(&args, "fanout_200") {
        fanout_200(&rt, full);
    }
    rt.shutdown_timeout(Duration::from_secs(5));
}
