//! The accept loop and the limits on connections: HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! listener, `TCP_NODELAY` for streamed tokens, and graceful shutdown that stops accepting, then
//! lets in-flight requests and streams finish within the drain timeout. No layers are added
//! here; limits on requests are in [`crate::stack`].
//!
//! A client cannot hold the gateway's file descriptors: connections past
//! `server.max_connections` get a 503 and are closed (the accept loop never waits on them); a
//! head must complete within `server.header_read_timeout` of its first byte and stay under
//! `server.max_header_bytes` (431); a connection with nothing in flight closes after
//! `server.idle_timeout` ([`watchdog`]).
//!
//! A connection whose request was answered with `101 Switching Protocols` becomes a
//! [`Tunnel`]: once hyper lets go of the socket, the connection's task runs the tunnel, so it
//! still counts as an open connection (and holds its `max_connections` slot), closes after
//! `server.idle_timeout` with no byte either way, and on shutdown lives through the drain and
//! is cut when the drain timeout ends.

mod watchdog;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::body::{BoxError, Tracked};
use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::stack::GatewayService;
use crate::telemetry::{Metrics, ReasonLabel};
use crate::tunnel::{self, Tunnel};
use watchdog::{Activity, Timeouts, Watched};

/// Refused connections being answered at once; past this they are closed without a word, so
/// refusing never costs more than this many descriptors.
const MAX_REFUSALS: usize = 64;
/// How long a refused connection may take to send its head, and then to receive its 503 and
/// close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Serves until `shutdown` resolves, then drains for at most `server.shutdown_timeout`.
pub(crate) async fn run(
    listener: TcpListener,
    service: GatewayService,
    shutdown: impl Future<Output = ()>,
    config: &ServerConfig,
    metrics: Arc<Metrics>,
) {
    let open_files = open_files_limit();
    let max_connections =
        config.max_connections.map_or_else(|| default_max_connections(open_files), |n| n.get());
    if open_files.is_some_and(|limit| max_connections as u64 >= limit) {
        tracing::warn!(
            max_connections,
            open_files,
            "server.max_connections is not below the open-files limit: descriptors run out before the cap"
        );
    }
    tracing::info!(max_connections, "accepting connections");
    let builder = builder(config);
    let timeouts = Timeouts { header_read: config.header_read_timeout, idle: config.idle_timeout };
    let permits = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    // Cancelled when the drain timeout ends: tunnels are cut then (requests are not).
    let drained = CancellationToken::new();
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connections.closed.get_or_create(&ReasonLabel { reason: "refused" }).inc();
            refuse(stream, &refusals);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = TokioIo::new(Watched::new(stream, activity.clone()));
        let upgraded = UpgradeSlot::default();
        let service = ConnectionService {
            inner: service.clone(),
            activity: activity.clone(),
            upgraded: upgraded.clone(),
        };
        let connection = builder.serve_connection_with_upgrades(io, service).into_owned();
        let draining = draining.clone();
        let drained = drained.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            metrics.connections.open.inc();
            if let Some(expiry) = drive(connection, &activity, timeouts, draining).await {
                tracing::debug!(%peer, reason = expiry.reason(), "connection closed");
                metrics.connections.closed.get_or_create(&ReasonLabel { reason: expiry.reason() }).inc();
            }
            if let Some(tunnel) = upgraded.take() {
                metrics.connections.tunnels.inc();
                let closed = tunnel.run(timeouts.idle, drained.cancelled_owned()).await;
                metrics.connections.tunnels.dec();
                let reason = match closed {
                    tunnel::Closed::Ended => None,
                    tunnel::Closed::Idle => Some("idle_timeout"),
                    tunnel::Closed::Shutdown => Some("shutdown"),
                };
                if let Some(reason) = reason {
                    tracing::debug!(%peer, reason, "tunnel closed");
                    metrics.connections.closed.get_or_create(&ReasonLabel { reason }).inc();
                }
            }
            metrics.connections.open.dec();
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    draining.cancel();
    connections.close();
    let drain = config.shutdown_timeout;
    tokio::select! {
        () = connections.wait() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain timeout reached; closing remaining connections");
            drained.cancel();
        }
    }
}

fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let max_header_bytes = config.max_header_bytes.get();
    // The limit itself is checked per request in the stack (a 431 with an error body); hyper's
    // caps are twice it. A head that does not fit hyper's HTTP/1 read buffer gets hyper's own
    // 431 (no body: there is no request yet to answer) and the connection closes. The floor is
    // hyper's minimum buffer, which validation enforces too.
    let hard_cap = max_header_bytes.saturating_mul(2);
    builder.http1().header_read_timeout(None).max_buf_size(hard_cap.max(crate::config::MIN_HEADER_BYTES));
    // HTTP/2 counts a header list as RFC 9113 does (each field plus 32 bytes); over it, h2
    // answers the stream with 431.
    builder.http2().max_header_list_size(u32::try_from(hard_cap).unwrap_or(u32::MAX));
    builder
}

/// Serves one connection until it ends, is shut down for draining, or its watchdog closes it;
/// returns why the watchdog did.
async fn drive<C>(
    connection: C,
    activity: &Activity,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> Option<watchdog::Expiry>
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut phase = activity.subscribe();
    let mut draining = false;
    let mut closed_by = None;
    loop {
        let deadline = watchdog::deadline(*phase.borrow_and_update(), timeouts, draining);
        let expired = async {
            match deadline {
                Some((at, expiry)) => {
                    tokio::time::sleep_until(at).await;
                    expiry
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return closed_by;
            }
            () = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            // The sender lives in `activity`, borrowed for this whole loop: this never errors.
            _ = phase.changed() => {}
            expiry = expired => match expiry {
                // A stalled head has no request to finish: dropping closes the socket.
                watchdog::Expiry::Head => return Some(expiry),
                watchdog::Expiry::Idle => {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                    closed_by = Some(expiry);
                }
            },
        }
    }
}

/// The gateway service as one connection's hyper service: marks the connection busy from a
/// request's head to its response's last byte, and keeps a 101's tunnel for the connection's
/// task.
#[derive(Clone)]
struct ConnectionService {
    inner: GatewayService,
    activity: Arc<Activity>,
    upgraded: UpgradeSlot,
}

/// Where a connection's service leaves the tunnel of the 101 it answered.
#[derive(Clone, Default)]
struct UpgradeSlot(Arc<std::sync::Mutex<Option<Tunnel>>>);

impl UpgradeSlot {
    fn put(&self, tunnel: Tunnel) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(tunnel);
        }
    }

    fn take(&self) -> Option<Tunnel> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

type ConnectionBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<ConnectionBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ConnectionBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let busy = self.activity.begin();
        let call = self.inner.clone().oneshot(request);
        let upgraded = self.upgraded.clone();
        Box::pin(async move {
            let mut response = call.await?;
            if let Some(tunnel) = response.extensions_mut().remove::<Tunnel>() {
                upgraded.put(tunnel);
            }
            Ok(response.map(|body| {
                Tracked::new(body, std::time::Instant::now(), move |_| drop(busy)).boxed_unsync()
            }))
        })
    }
}

/// Answers a connection past the cap with a 503 in the OpenAI shape and closes it, on a task
/// of its own so the accept loop goes on at once; past [`MAX_REFUSALS`] it is closed unanswered.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut sink = [0u8; 4096];
        // The answer waits for the request head (briefly): an HTTP client reads a response
        // that comes before its request as a broken connection, not as a 503.
        let head = async {
            let mut tail = Vec::new();
            while !tail.windows(4).any(|w| w == b"\r\n\r\n") && tail.len() < 64 * 1024 {
                let n = stream.read(&mut sink).await?;
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&sink[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        if !matches!(tokio::time::timeout(REFUSAL_LINGER, head).await, Ok(Ok(()))) {
            return;
        }
        let answered = async {
            stream.write_all(&overloaded_response()).await?;
            stream.shutdown().await?;
            // Read what else the client sent until it closes: closing a socket with unread
            // input resets the connection, and the client could lose the 503 with it.
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, answered).await;
    });
}

fn overloaded_response() -> Vec<u8> {
    let body = GatewayError::Overloaded.to_json().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Half the soft open-files limit: the other half stays for upstream connections (about one per
/// request in flight), the session store, tools and logs.
fn default_max_connections(open_files: Option<u64>) -> usize {
    const UNLIMITED: usize = 65_536;
    open_files.map_or(UNLIMITED, |n| usize::try_from(n / 2).unwrap_or(UNLIMITED).clamp(16, UNLIMITED))
}

/// The soft `RLIMIT_NOFILE`; `None` when unlimited or unknown.
fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_half_the_descriptors() {
        assert_eq!(default_max_connections(Some(1024)), 512);
        assert_eq!(default_max_connections(Some(10)), 16);
        assert_eq!(default_max_connections(None), 65_536);
    }

    #[test]
    fn the_refusal_is_an_openai_error_over_http_1_1() {
        let response = String::from_utf8(overloaded_response()).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "overloaded");
    }
}
