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
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https)
}
