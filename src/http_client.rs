//! The one HTTP client ctxgate makes outbound requests with (upstreams, gateway tools): pooled
//! HTTP/1.1 and HTTP/2 over rustls with the ring provider and the bundled webpki roots, so
//! HTTPS works in a minimal container without a CA bundle.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A pooled HTTP/1.1 + HTTP/2 client over rustls (ring, webpki roots), for upstreams and for
/// gateway tools.
pub(crate) fn pooled<B>(connect_timeout: Duration) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    build(connect_timeout, true)
}

/// The same client speaking HTTP/1.1 only, for upgrades (WebSocket): an HTTP/2 connection
/// cannot switch protocols, and ALPN would pick HTTP/2 wherever the server offers it.
pub(crate) fn http1_only<B>(connect_timeout: Duration) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    build(connect_timeout, false)
}

fn build<B>(connect_timeout: Duration, http2: bool) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1();
    let https = if http2 { https.enable_http2().wrap_connector(http) } else { https.wrap_connector(http) };
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https)
}
