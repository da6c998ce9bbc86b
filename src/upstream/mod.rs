//! Transport to upstream LLM APIs: one pooled client per upstream, request building (path
//! mapping, auth, hop-by-hop filtering), retries with backoff and failover along a model's
//! route, and response bodies streamed back without buffering.
//!
//! Retries and failover happen only before any response byte has gone to the client: once
//! [`Forwarded`] is turned into a response, the stream belongs to the client. The transport
//! reports each answer's `usage` to whoever the caller named ([`UsageSink`]); it knows nothing
//! of sessions, billing or the chat pipeline.

mod body;
mod route;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

pub use body::UpstreamBody;
pub use route::ModelRouter;

use crate::body::{self as gw_body, Body, BoxError};
use crate::config::{Config, ConfigError, EnvSource, RetryConfig, UpstreamConfig};
use crate::error::GatewayError;
use crate::openai::UsageObserver;
use crate::retry;
use crate::telemetry::{Metrics, RetryLabel, UpstreamMetrics};

type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// One configured upstream and its connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1`.
    base_path: String,
    /// `Bearer <key>` when the gateway holds the key; `None` passes the client's through.
    authorization: Option<HeaderValue>,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    pub models: Vec<String>,
    /// Set `prompt_cache_key` on compressed requests that carry none.
    pub prompt_cache_key: bool,
    pub metrics: UpstreamMetrics,
    client: HttpClient,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        api_key: Option<String>,
        metrics: UpstreamMetrics,
    ) -> Result<Self, String> {
        let uri: Uri = config.base_url.parse().map_err(|e| format!("base_url: {e}"))?;
        let parts = uri.into_parts();
        let scheme = parts.scheme.ok_or("base_url has no scheme")?;
        let authority = parts.authority.ok_or("base_url has no host")?;
        let base_path =
            parts.path_and_query.map(|p| p.path().trim_end_matches('/').to_string()).unwrap_or_default();
        let authorization = api_key
            .map(|key| {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| "the API key is not a valid header value".to_string())?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let extra_headers = config
            .headers
            .iter()
            .map(|(k, v)| Ok((HeaderName::try_from(k.as_str())?, HeaderValue::try_from(v.as_str())?)))
            .collect::<Result<_, http::Error>>()
            .map_err(|e| format!("headers: {e}"))?;

        let client = crate::http_client::pooled(config.connect_timeout);

        Ok(Self {
            name: config.name.clone(),
            scheme,
            authority,
            base_path,
            authorization,
            extra_headers,
            first_byte_timeout: config.first_byte_timeout,
            idle_timeout: config.idle_timeout,
            models: config.models.clone(),
            prompt_cache_key: config.prompt_cache_key,
            metrics,
            client,
        })
    }

    /// Maps a client path under `/v1` onto this upstream's base URL, keeping the query.
    fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let rest = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, rest))
            .build()
    }

    fn build_request(
        &self,
        method: &Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        body: Body,
    ) -> Result<Request<Body>, GatewayError> {
        let uri = self.uri_for(path_and_query).map_err(|e| GatewayError::Internal(e.into()))?;
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        copy_end_to_end(client_headers, headers);
        headers.remove(header::HOST);
        if let Some(auth) = &self.authorization {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        for (name, value) in &self.extra_headers {
            headers.insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// A request to send upstream, as the client sent it.
pub struct Outgoing {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: OutgoingBody,
}

pub enum OutgoingBody {
    /// Buffered: can be sent again on retry or failover.
    Replayable(Bytes),
    /// Streamed from the client: one attempt only.
    Stream(Body),
}

/// Who learns a response's `usage` when its body ends (per-model token counters, a caller's
/// token charge, a turn's running total): the transport reports, it does not know to whom.
#[derive(Clone, Debug, Default)]
pub struct UsageSink {
    observers: Vec<Arc<dyn UsageObserver>>,
}

impl UsageSink {
    pub fn with(mut self, observer: Arc<dyn UsageObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    pub fn record(&self, usage: &crate::openai::Usage) {
        for observer in &self.observers {
            observer.record(usage);
        }
    }
}

/// A response received from an upstream, before any byte of it went to the client.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub upstream: Arc<Upstream>,
    /// Time spent waiting on upstreams (every attempt and backoff) until these headers.
    pub upstream_wait: Duration,
    /// Per-model token counters to update from the response's `usage`.
    pub usage_sink: UsageSink,
    sent_at: Instant,
}

/// Response extension: upstream waiting time, so the metrics layer can compute the gateway's
/// own overhead.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamWait(pub Duration);

/// All upstreams, the model routes over them, and the retry policy.
#[derive(Debug)]
pub struct Upstreams {
    pub router: ModelRouter,
    retry: RetryConfig,
    metrics: Arc<Metrics>,
}

impl Upstreams {
    /// The upstreams and routes of a validated config. The checks are `check-config`'s; a
    /// failure here names its key all the same.
    pub fn from_config(
        config: &Config,
        env: &dyn EnvSource,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let key = u.api_key_env.as_deref().and_then(|var| env.var(var));
                Upstream::new(u, key, metrics.for_upstream(&u.name))
                    .map(Arc::new)
                    .map_err(|e| ConfigError::single(&format!("upstreams[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let router = ModelRouter::new(&config.routes, &upstreams)
            .map_err(|e| ConfigError::single("routes", e.to_string()))?;
        Ok(Self { router, retry: config.retry.clone(), metrics })
    }

    /// Sends `outgoing` along `route`: retries each upstream on connect errors, 429 and 5xx,
    /// then fails over to the next. The last upstream's error response, if every attempt
    /// failed with one, is returned as the upstream sent it.
    pub async fn forward(
        &self,
        route: &[Arc<Upstream>],
        outgoing: Outgoing,
    ) -> Result<Forwarded, GatewayError> {
        let Outgoing { method, path_and_query, headers, body } = outgoing;
        // A buffered body can be sent as often as the policy allows; a streamed one only once.
        let (replay, mut once) = match body {
            OutgoingBody::Replayable(bytes) => (Some(bytes), None),
            OutgoingBody::Stream(body) => (None, Some(body)),
        };
        let mut waited = Duration::ZERO;
        let mut last_error = None;

        for (u, upstream) in route.iter().enumerate() {
            let last_upstream = u + 1 == route.len();
            for retry in 0.. {
                let body = match (&replay, once.take()) {
                    (Some(bytes), _) => gw_body::full(bytes.clone()),
                    (None, Some(body)) => body,
                    (None, None) => break,
                };
                let request = upstream.build_request(&method, &path_and_query, &headers, body)?;
                let sent_at = Instant::now();
                let attempt =
                    tokio::time::timeout(upstream.first_byte_timeout, upstream.client.request(request)).await;
                waited += sent_at.elapsed();
                let may_retry = replay.is_some() && retry < self.retry.max_retries;
                let forwarded = |response| Forwarded {
                    response,
                    upstream: upstream.clone(),
                    upstream_wait: waited,
                    usage_sink: UsageSink::default(),
                    sent_at,
                };

                let (reason, delay) = match attempt {
                    // A slow upstream is not retried: another attempt would double the wait.
                    Err(_elapsed) => {
                        return Err(GatewayError::UpstreamTimeout {
                            upstream: upstream.name.clone(),
                            after: upstream.first_byte_timeout,
                        })
                    }
                    Ok(Err(err)) => {
                        let is_connect = err.is_connect();
                        let err = GatewayError::UpstreamUnreachable {
                            upstream: upstream.name.clone(),
                            source: classify_send_error(err)?,
                        };
                        if !is_connect || replay.is_none() {
                            return Err(err);
                        }
                        last_error = Some(err);
                        ("connect_error", Some(retry::backoff(&self.retry, retry)))
                    }
                    Ok(Ok(response))
                        if replay.is_none() || !retry::is_retryable_status(response.status()) =>
                    {
                        return Ok(forwarded(response))
                    }
                    Ok(Ok(response)) => {
                        let wanted = retry::retry_after(response.headers());
                        let too_long = wanted.is_some_and(|d| d > self.retry.max_retry_after);
                        if last_upstream && (!may_retry || too_long) {
                            // Nowhere left to go: the client gets the upstream's own answer.
                            return Ok(forwarded(response));
                        }
                        let reason = if response.status() == StatusCode::TOO_MANY_REQUESTS {
                            "rate_limited"
                        } else {
                            "server_error"
                        };
                        (
                            reason,
                            (!too_long).then(|| wanted.unwrap_or_else(|| retry::backoff(&self.retry, retry))),
                        )
                    }
                };

                let Some(delay) = delay.filter(|_| may_retry) else { break };
                self.metrics
                    .upstream_retries
                    .get_or_create(&RetryLabel { upstream: upstream.name.clone(), reason })
                    .inc();
                tracing::debug!(upstream = %upstream.name, reason, ?delay, "retrying upstream");
                tokio::time::sleep(delay).await;
                waited += delay;
            }
            if !last_upstream {
                upstream.metrics.failovers.inc();
                tracing::info!(upstream = %upstream.name, "failing over to the next upstream");
            }
        }
        Err(last_error
            .unwrap_or_else(|| GatewayError::Internal("no upstream is configured for this route".into())))
    }
}

impl Forwarded {
    /// The response for the client: end-to-end headers and the upstream body, streamed.
    pub fn into_response(self) -> Response<Body> {
        let (parts, incoming) = self.response.into_parts();
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let scanner = crate::openai::UsageScanner::for_response(
            content_type,
            parts.headers.contains_key(header::CONTENT_ENCODING),
        );
        let body = UpstreamBody::new(incoming, self.upstream, self.sent_at, scanner, self.usage_sink);
        let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(body));
        *response.status_mut() = parts.status;
        copy_end_to_end(&parts.headers, response.headers_mut());
        response.extensions_mut().insert(UpstreamWait(self.upstream_wait));
        response
    }
}

/// Splits out the one send failure that is the client's fault: a streamed body over the limit.
fn classify_send_error(err: hyper_util::client::legacy::Error) -> Result<BoxError, GatewayError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(limit) = e.downcast_ref::<crate::body::BodyTooLarge>() {
            return Err(GatewayError::PayloadTooLarge { limit: limit.0 });
        }
        source = e.source();
    }
    Ok(Box::new(err))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Copies every header except hop-by-hop ones and those the `Connection` header names.
pub fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    let named_by_connection: Vec<HeaderName> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    to.reserve(from.len());
    for (name, value) in from {
        if HOP_BY_HOP.contains(name) || named_by_connection.contains(name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_onto_the_base_url() {
        let config =
            UpstreamConfig { base_url: "http://up.test:9000/openai/v1/".into(), ..UpstreamConfig::default() };
        let upstream = Upstream::new(&config, None, Metrics::new().for_upstream("t")).unwrap();
        assert_eq!(
            upstream.uri_for("/v1/chat/completions?x=1").unwrap().to_string(),
            "http://up.test:9000/openai/v1/chat/completions?x=1"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert("connection", "keep-alive, x-private".parse().unwrap());
        from.insert("x-private", "1".parse().unwrap());
        from.insert("transfer-encoding", "chunked".parse().unwrap());
        from.insert("x-custom", "kept".parse().unwrap());
        from.append("x-multi", "a".parse().unwrap());
        from.append("x-multi", "b".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 3);
        assert_eq!(to["x-custom"], "kept");
        assert_eq!(to.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn gateway_key_replaces_client_authorization() {
        let config = UpstreamConfig { base_url: "http://up.test/v1".into(), ..UpstreamConfig::default() };
        let upstream =
            Upstream::new(&config, Some("sk-gateway".into()), Metrics::new().for_upstream("t")).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer sk-client".parse().unwrap());
        headers.insert(header::HOST, "gateway.test".parse().unwrap());
        let outgoing = Outgoing {
            method: Method::POST,
            path_and_query: "/v1/chat/completions".into(),
            headers,
            body: OutgoingBody::Replayable(Bytes::new()),
        };
        let request = upstream
            .build_request(&outgoing.method, &outgoing.path_and_query, &outgoing.headers, gw_body::empty())
            .unwrap();
        assert_eq!(request.headers()[header::AUTHORIZATION], "Bearer sk-gateway");
        assert!(request.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(!request.headers().contains_key(header::HOST));
    }
}
