//! HTTP/1.1 upgrades (WebSocket and any other protocol): which requests are upgrades, the
//! `101 Switching Protocols` handed back to the client, and what runs on the upgraded
//! connection: the byte copy to an upstream's upgraded connection (a tunnel proper, whose
//! bytes are never read), or a handler's own protocol ([`Tunnel::served`], the Responses API's
//! WebSocket mode), which the handler supplies and this module only runs.
//!
//! The handler that accepts the upgrade builds a [`Tunnel`] and puts it in the 101 response's
//! extensions; the connection's owner ([`crate::server`]) takes it out and runs it once hyper
//! has written the 101 and let go of the socket, so a tunnel lives and is limited as the
//! client connection it is (open connections, idle timeout, drain on shutdown), not as a
//! request in flight.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::body::{self, Body, BoxError};

/// The protocol an HTTP/1.1 `GET` asks to switch to (its `Upgrade` header), when it is an
/// upgrade hyper can hand over: `Connection: upgrade` and hyper's upgrade handle present. Only
/// `GET` (what WebSocket uses): an upgrade never carries a body upstream.
pub(crate) fn requested<B>(request: &Request<B>) -> Option<&HeaderValue> {
    if request.method() != Method::GET {
        return None;
    }
    let upgrade = request.headers().get(header::UPGRADE)?;
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let upgradable =
        request.version() == Version::HTTP_11 && request.extensions().get::<OnUpgrade>().is_some();
    (connection_upgrade && upgradable).then_some(upgrade)
}

/// The client's 101: the upstream's end-to-end headers (`Sec-WebSocket-Accept`, the chosen
/// subprotocol) already in `headers`, plus this hop's `Connection` and `Upgrade`, and `tunnel`
/// for the connection's owner to run.
pub(crate) fn switching(mut headers: HeaderMap, protocol: HeaderValue, tunnel: Tunnel) -> Response<Body> {
    // Hop-by-hop, so the transport dropped the upstream's: this hop says them again.
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response.extensions_mut().insert(tunnel);
    response
}

/// Both sides of an accepted upgrade, waiting for their sockets. Cloneable only because
/// response extensions must be; whoever runs it first takes it.
#[derive(Clone)]
pub(crate) struct Tunnel(Arc<Mutex<Option<Ends>>>);

enum Ends {
    /// Bytes copied between the client and an upstream.
    Copied {
        client: OnUpgrade,
        upstream: OnUpgrade,
        /// Held until the tunnel closes (the upstream endpoint's lease: a tunnel is in flight
        /// there).
        hold: Box<dyn Any + Send + Sync>,
    },
    /// The client's connection served by a handler of the gateway's own.
    Served { client: OnUpgrade, serve: Serve },
}

/// A handler's protocol on an upgraded client connection: given the socket and the idle
/// timeout, it runs until the connection ends, and says why it did. The idle timeout is its to
/// keep, since only it knows when the connection is busy.
pub(crate) type Serve =
    Box<dyn FnOnce(TokioIo<Upgraded>, Duration) -> Pin<Box<dyn Future<Output = Closed> + Send>> + Send>;

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnel")
    }
}

/// Why a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    /// One side closed (or failed): the other is closed too.
    Ended,
    /// No byte either way for the idle timeout.
    Idle,
    /// The gateway's drain timeout ran out.
    Shutdown,
}

impl Tunnel {
    pub(crate) fn new(client: OnUpgrade, upstream: OnUpgrade, hold: Box<dyn Any + Send + Sync>) -> Self {
        Self(Arc::new(Mutex::new(Some(Ends::Copied { client, upstream, hold }))))
    }

    /// The client's upgraded connection served by `serve`.
    pub(crate) fn served(client: OnUpgrade, serve: Serve) -> Self {
        Self(Arc::new(Mutex::new(Some(Ends::Served { client, serve }))))
    }

    /// Copies bytes both ways (or serves the connection) until either side closes, nothing
    /// moves for `idle`, or `shutdown` resolves. Returns at once if it was already run.
    pub(crate) async fn run(self, idle: Duration, shutdown: impl Future<Output = ()>) -> Closed {
        let Some(ends) = self.0.lock().ok().and_then(|mut ends| ends.take()) else {
            return Closed::Ended;
        };
        let (client, upstream, _hold) = match ends {
            Ends::Copied { client, upstream, hold } => (client, upstream, hold),
            Ends::Served { client, serve } => {
                let served = async {
                    match client.await {
                        Ok(upgraded) => serve(TokioIo::new(upgraded), idle).await,
                        Err(err) => {
                            tracing::debug!(error = %err, "the upgraded connection was lost");
                            Closed::Ended
                        }
                    }
                };
                return tokio::select! {
                    closed = served => closed,
                    () = shutdown => Closed::Shutdown,
                };
            }
        };
        let last_read = Arc::new(LastRead::new());
        let copy = async {
            let (client, upstream) = tokio::try_join!(client, upstream)?;
            let mut client = Stamped { io: TokioIo::new(client), last_read: last_read.clone() };
            let mut upstream = Stamped { io: TokioIo::new(upstream), last_read: last_read.clone() };
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
            Ok::<_, BoxError>(())
        };
        let idle_out = async {
            loop {
                let due = last_read.at() + idle;
                if due <= Instant::now() {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        tokio::select! {
            copied = copy => {
                if let Err(err) = copied {
                    tracing::debug!(error = %err, "tunnel ended with an error");
                }
                Closed::Ended
            }
            () = idle_out => Closed::Idle,
            () = shutdown => Closed::Shutdown,
        }
    }
}

/// When either side last delivered bytes, as an offset from the tunnel's start.
struct LastRead {
    start: Instant,
    millis: AtomicU64,
}

impl LastRead {
    fn new() -> Self {
        Self { start: Instant::now(), millis: AtomicU64::new(0) }
    }

    fn stamp(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// One side's socket, stamping [`LastRead`] on every read: every byte written to one side
    /// was read from the other, so reads alone say whether the tunnel is idle.
    struct Stamped<IO> {
        #[pin]
        io: IO,
        last_read: Arc<LastRead>,
    }
}

impl<IO: AsyncRead> AsyncRead for Stamped<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last_read.stamp();
        }
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for Stamped<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_needs_a_get_connection_upgrade_http_1_1_and_hyper_s_handle() {
        let request = |connection: &str, version: Version, handle: bool| {
            let mut request = Request::builder()
                .method(Method::GET)
                .version(version)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, connection)
                .body(())
                .unwrap();
            if handle {
                request.extensions_mut().insert(hyper::upgrade::on(Response::new(())));
            }
            request
        };
        assert_eq!(requested(&request("keep-alive, Upgrade", Version::HTTP_11, true)).unwrap(), "websocket");
        assert!(requested(&request("keep-alive", Version::HTTP_11, true)).is_none());
        assert!(requested(&request("upgrade", Version::HTTP_2, true)).is_none());
        assert!(requested(&request("upgrade", Version::HTTP_11, false)).is_none());
        let mut post = request("upgrade", Version::HTTP_11, true);
        *post.method_mut() = Method::POST;
        assert!(requested(&post).is_none());
    }
}
