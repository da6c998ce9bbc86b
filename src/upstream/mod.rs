//! Transport to upstream LLM APIs: one pooled client per upstream, request building (path
//! mapping, auth, hop-by-hop filtering), retries with backoff and failover along a model's
//! route, and response bodies streamed back without buffering.
//!
//! An upstream is one base URL or a [`Pool`] of endpoints (replicas): each attempt on a pool
//! leases one endpoint (by affinity key or balancer), and an attempt that fails on one endpoint
//! moves to another of the pool at once, before the route's next upstream.
//!
//! What is sent again: a request that never reached an upstream (a connect error) always; one
//! the upstream answered with 429/5xx only when sending it twice is harmless (an idempotent
//! method, or an inference path of `retry.inference_paths`), and only within a retry budget
//! (tower's [`TpsBudget`]: a share of recent requests plus a small floor), so a failing upstream
//! is not hit with every request times the attempts.
//!
//! Retries and failover happen only before any response byte has gone to the client: once
//! [`Forwarded`] is turned into a response, the stream belongs to the client. The transport
//! reports each answer's `usage` to whoever the caller named ([`UsageSink`]); it knows nothing
//! of sessions, billing or the chat pipeline.

pub mod affinity;
mod balance;
mod body;
pub mod discovery;
mod health;
pub mod pool;
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
use tokio::sync::watch;
use tokio::time::error::Elapsed;
use tower::retry::budget::{Budget, TpsBudget};

pub use affinity::{AffinityKey, Choice};
pub use body::UpstreamBody;
pub use discovery::{Resolver, SystemResolver};
pub use pool::{Endpoint, Lease, Pool};
pub use route::ModelRouter;

use crate::body::{self as gw_body, Body, BoxError};
use crate::config::{Config, ConfigError, EnvSource, RetryConfig, UpstreamConfig, CREDENTIAL_HEADERS};
use crate::error::GatewayError;
use crate::openai::UsageObserver;
use crate::retry;
use crate::telemetry::{Metrics, RetryLabel, UpstreamMetrics};

pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// The response header naming the pool endpoint that answered.
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-upstream-endpoint");

/// Where a base URL points: scheme, `host:port` and path prefix.
#[derive(Clone, Debug)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1`.
    base_path: String,
}

impl Origin {
    fn parse(base_url: &str) -> Result<Self, String> {
        let uri: Uri = base_url.parse().map_err(|e| format!("base_url: {e}"))?;
        let parts = uri.into_parts();
        let scheme = parts.scheme.ok_or("base_url has no scheme")?;
        let authority = parts.authority.ok_or("base_url has no host")?;
        let base_path =
            parts.path_and_query.map(|p| p.path().trim_end_matches('/').to_string()).unwrap_or_default();
        Ok(Self { scheme, authority, base_path })
    }

    /// Maps a client path under `/v1` onto this base URL, keeping the query.
    fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let rest = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, rest))
            .build()
    }

    /// A path from the server's root (health checks), ignoring the base path.
    fn root_uri(&self, path: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

/// Where an upstream's requests go.
#[derive(Debug)]
enum Target {
    Url(Origin),
    Pool(Arc<Pool>),
}

/// The endpoint an attempt goes to.
enum Attempt<'a> {
    Url(&'a Origin),
    Pool(&'a Pool, Lease),
}

impl Attempt<'_> {
    fn origin(&self) -> &Origin {
        match self {
            Attempt::Url(origin) => origin,
            Attempt::Pool(_, lease) => &lease.endpoint.origin,
        }
    }

    /// Feeds the attempt's outcome to the endpoint's latency estimate and health.
    fn record<T>(
        &self,
        outcome: &Result<Result<Response<T>, hyper_util::client::legacy::Error>, Elapsed>,
        latency: Duration,
    ) {
        let Attempt::Pool(pool, lease) = self else { return };
        let (latency, failure) = match outcome {
            Err(_) => (None, Some(pool::Failure::Timeout)),
            Ok(Err(err)) if err.is_connect() => (None, Some(pool::Failure::Connect)),
            Ok(Err(_)) => (None, Some(pool::Failure::Transport)),
            Ok(Ok(response)) if response.status().is_server_error() => {
                (Some(latency), Some(pool::Failure::Status))
            }
            Ok(Ok(_)) => (Some(latency), None),
        };
        pool.record(lease, latency, failure);
    }

    /// Another endpoint of the pool to try at once, after this one failed.
    fn another_endpoint(&self, tried: &mut Vec<u64>) -> bool {
        let Attempt::Pool(pool, lease) = self else { return false };
        tried.push(lease.endpoint.hash);
        pool.has_untried(tried)
    }

    fn into_lease(self) -> Option<Lease> {
        match self {
            Attempt::Url(_) => None,
            Attempt::Pool(_, lease) => Some(lease),
        }
    }
}

/// One configured upstream: a base URL or a pool of endpoints, and its connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    target: Target,
    /// `Bearer <key>` when the gateway holds the key; `None` passes the client's through.
    authorization: Option<HeaderValue>,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    pub models: Vec<String>,
    /// Set `prompt_cache_key` on compressed requests that carry none.
    pub prompt_cache_key: bool,
    /// What `POST /v1/responses` is sent to it as.
    pub api: crate::config::UpstreamApi,
    pub metrics: UpstreamMetrics,
    client: HttpClient,
    /// HTTP/1.1 only, for upgrades.
    upgrade_client: HttpClient,
}

impl Upstream {
    /// An upstream whose DNS pool (if any) resolves through the system resolver.
    pub fn new(
        config: &UpstreamConfig,
        api_key: Option<String>,
        metrics: UpstreamMetrics,
    ) -> Result<Self, String> {
        let (_never_replaced, resolvers) = watch::channel(Arc::new(SystemResolver) as Arc<dyn Resolver>);
        Self::build(config, api_key, metrics, &resolvers)
    }

    /// The upstream; a pool's DNS refresh and health checks start here.
    fn build(
        config: &UpstreamConfig,
        api_key: Option<String>,
        metrics: UpstreamMetrics,
        resolvers: &discovery::Resolvers,
    ) -> Result<Self, String> {
        let target = match &config.pool {
            None => Target::Url(Origin::parse(&config.base_url)?),
            Some(pool) => Target::Pool(Arc::new(Pool::new(&config.name, pool, metrics.pool.clone())?)),
        };
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
        let upgrade_client = crate::http_client::http1_only(config.connect_timeout);

        let upstream = Self {
            name: config.name.clone(),
            target,
            authorization,
            extra_headers,
            first_byte_timeout: config.first_byte_timeout,
            idle_timeout: config.idle_timeout,
            models: config.models.clone(),
            prompt_cache_key: config.prompt_cache_key,
            api: config.api(),
            metrics,
            client,
            upgrade_client,
        };
        upstream.start_pool_tasks(resolvers)?;
        Ok(upstream)
    }

    /// Spawns a pool's DNS refresh and active checks; they stop when the pool is dropped.
    fn start_pool_tasks(&self, resolvers: &discovery::Resolvers) -> Result<(), String> {
        let Target::Pool(pool) = &self.target else { return Ok(()) };
        let checks = pool.health.check_path.clone();
        if pool.dns.is_none() && checks.is_none() {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "a pool with dns or health checks needs the async runtime".to_string())?;
        if pool.dns.is_some() {
            let task = runtime.spawn(discovery::run(Arc::downgrade(pool), resolvers.clone()));
            pool.add_task(task.abort_handle());
        }
        if let Some(path) = checks {
            let mut headers = HeaderMap::new();
            if let Some(auth) = &self.authorization {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
            for (name, value) in &self.extra_headers {
                headers.insert(name.clone(), value.clone());
            }
            let check = health::Check { path, headers, client: self.client.clone() };
            let task = runtime.spawn(health::run_checks(Arc::downgrade(pool), check));
            pool.add_task(task.abort_handle());
        }
        Ok(())
    }

    /// The pool behind this upstream, if it is one.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        match &self.target {
            Target::Pool(pool) => Some(pool),
            Target::Url(_) => None,
        }
    }

    /// Whether the gateway holds this upstream's credential (`api_key_env`, or a credential
    /// header in `headers`), so a request needs none of the caller's.
    pub fn holds_credential(&self) -> bool {
        self.authorization.is_some()
            || self.extra_headers.iter().any(|(name, _)| CREDENTIAL_HEADERS.contains(&name.as_str()))
    }

    /// Whether requests routed here should carry an affinity key.
    pub fn wants_affinity(&self) -> bool {
        self.pool().is_some_and(|p| p.wants_affinity())
    }

    /// The endpoint for the next attempt; `None` when a pool has no endpoint.
    async fn attempt(&self, affinity: Option<AffinityKey>, tried: &[u64]) -> Option<Attempt<'_>> {
        match &self.target {
            Target::Url(origin) => Some(Attempt::Url(origin)),
            Target::Pool(pool) => {
                let lease = pool.lease(affinity, tried, self.first_byte_timeout).await?;
                Some(Attempt::Pool(pool, lease))
            }
        }
    }

    fn build_request(
        &self,
        origin: &Origin,
        method: &Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        body: Body,
    ) -> Result<Request<Body>, GatewayError> {
        let uri = origin.uri_for(path_and_query).map_err(|e| GatewayError::Internal(e.into()))?;
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
    /// Which pool endpoint the request belongs on (a session, or a stateless prefix); ignored
    /// by single-URL upstreams and by pools without affinity.
    pub affinity: Option<AffinityKey>,
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
    /// The pool endpoint that answered, held as in flight until the body ends.
    pub endpoint: Option<Lease>,
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
    /// Shared by every request: re-sends after an upstream answer withdraw from it.
    budget: TpsBudget,
    metrics: Arc<Metrics>,
    /// How DNS pools resolve their names.
    resolver: watch::Sender<Arc<dyn Resolver>>,
}

impl Upstreams {
    /// The upstreams and routes of a validated config. The checks are `check-config`'s; a
    /// failure here names its key all the same.
    pub fn from_config(
        config: &Config,
        env: &dyn EnvSource,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let resolver = watch::Sender::new(Arc::new(SystemResolver) as Arc<dyn Resolver>);
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let key = u.api_key_env.as_deref().and_then(|var| env.var(var));
                Upstream::build(u, key, metrics.for_upstream(&u.name), &resolver.subscribe())
                    .map(Arc::new)
                    .map_err(|e| ConfigError::single(&format!("upstreams[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let router = ModelRouter::new(&config.routes, &upstreams)
            .map_err(|e| ConfigError::single("routes", e.to_string()))?;
        let retry = &config.retry;
        let budget = TpsBudget::new(retry.budget_window, retry.budget_min_per_second, retry.budget_ratio);
        Ok(Self { router, retry: retry.clone(), budget, metrics, resolver })
    }

    /// Resolves DNS pools' names with `resolver` from now on (each resolves again at once).
    /// The gateway uses the system resolver; tests script one.
    pub fn set_resolver(&self, resolver: Arc<dyn Resolver>) {
        self.resolver.send_replace(resolver);
    }

    /// Sends `outgoing` along `route`: retries each upstream on connect errors, and on 429 and
    /// 5xx when [`retry::may_resend_answered`] and the budget allow, then fails over to the next.
    /// On a pool, a failed attempt moves to another endpoint at once while one is left
    /// untried; the retries (with backoff) come after. The last error response, when it may
    /// not or cannot be sent again, is returned as the upstream sent it.
    pub async fn forward(
        &self,
        route: &[Arc<Upstream>],
        outgoing: Outgoing,
    ) -> Result<Forwarded, GatewayError> {
        self.send(route, outgoing, None).await
    }

    /// Sends an HTTP/1.1 upgrade (`Upgrade: protocol`) along `route`, over HTTP/1.1 whatever the
    /// upstream offers. Only a request that never reached an upstream is sent again (connect
    /// errors, failover): once one has seen it, its answer (a 101 or not) is the client's.
    pub(crate) async fn forward_upgrade(
        &self,
        route: &[Arc<Upstream>],
        outgoing: Outgoing,
        protocol: HeaderValue,
    ) -> Result<Forwarded, GatewayError> {
        self.send(route, outgoing, Some(protocol)).await
    }

    async fn send(
        &self,
        route: &[Arc<Upstream>],
        outgoing: Outgoing,
        upgrade: Option<HeaderValue>,
    ) -> Result<Forwarded, GatewayError> {
        let Outgoing { method, path_and_query, headers, body, affinity } = outgoing;
        let resend_on_status =
            retry::may_resend_answered(&method, &path_and_query, &self.retry.inference_paths);
        self.budget.deposit();
        // A buffered body can be sent as often as the policy allows; a streamed one only once.
        let (replay, mut once) = match body {
            OutgoingBody::Replayable(bytes) => (Some(bytes), None),
            OutgoingBody::Stream(body) => (None, Some(body)),
        };
        let mut waited = Duration::ZERO;
        let mut last_error = None;

        for (u, upstream) in route.iter().enumerate() {
            let last_upstream = u + 1 == route.len();
            // Pool endpoints this request failed on since its last backoff.
            let mut tried = Vec::new();
            let mut retry = 0;
            loop {
                let body = match (&replay, once.take()) {
                    (Some(bytes), _) => gw_body::full(bytes.clone()),
                    (None, Some(body)) => body,
                    (None, None) => break,
                };
                let Some(attempt) = upstream.attempt(affinity, &tried).await else {
                    last_error = Some(GatewayError::UpstreamUnreachable {
                        upstream: upstream.name.clone(),
                        source: "the pool has no endpoints".into(),
                    });
                    break;
                };
                let mut request =
                    upstream.build_request(attempt.origin(), &method, &path_and_query, &headers, body)?;
                let client = match &upgrade {
                    Some(protocol) => {
                        // Hop-by-hop, so dropped with the client's: this hop asks again.
                        let headers = request.headers_mut();
                        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        headers.insert(header::UPGRADE, protocol.clone());
                        *request.version_mut() = http::Version::HTTP_11;
                        &upstream.upgrade_client
                    }
                    None => &upstream.client,
                };
                let sent_at = Instant::now();
                let outcome =
                    tokio::time::timeout(upstream.first_byte_timeout, client.request(request)).await;
                let elapsed = sent_at.elapsed();
                waited += elapsed;
                attempt.record(&outcome, elapsed);
                let may_retry = replay.is_some() && retry < self.retry.max_retries;
                let forwarded = |response, attempt: Attempt<'_>| Forwarded {
                    response,
                    upstream: upstream.clone(),
                    upstream_wait: waited,
                    usage_sink: UsageSink::default(),
                    endpoint: attempt.into_lease(),
                    sent_at,
                };

                let (reason, delay, next_endpoint) = match outcome {
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
                        let next = attempt.another_endpoint(&mut tried);
                        ("connect_error", Some(retry::backoff(&self.retry, retry)), next)
                    }
                    Ok(Ok(response))
                        if replay.is_none()
                            || upgrade.is_some()
                            || !retry::is_retryable_status(response.status()) =>
                    {
                        return Ok(forwarded(response, attempt))
                    }
                    Ok(Ok(response)) => {
                        let wanted = retry::retry_after(response.headers());
                        let too_long = wanted.is_some_and(|d| d > self.retry.max_retry_after);
                        let next = attempt.another_endpoint(&mut tried);
                        let can_resend = next || (may_retry && !too_long) || !last_upstream;
                        let withheld = match (can_resend, resend_on_status) {
                            (false, _) => None,
                            (true, false) => Some("not_idempotent"),
                            (true, true) => (!self.budget.withdraw()).then_some("budget"),
                        };
                        if !can_resend || withheld.is_some() {
                            // Nowhere left to go, not safe to send twice, or over the budget:
                            // the client gets the upstream's own answer.
                            if let Some(reason) = withheld {
                                let label = RetryLabel { upstream: upstream.name.clone(), reason };
                                self.metrics.upstream_retries_withheld.get_or_create(&label).inc();
                                tracing::debug!(upstream = %upstream.name, reason, "retry withheld");
                            }
                            return Ok(forwarded(response, attempt));
                        }
                        let reason = if response.status() == StatusCode::TOO_MANY_REQUESTS {
                            "rate_limited"
                        } else {
                            "server_error"
                        };
                        (
                            reason,
                            (!too_long).then(|| wanted.unwrap_or_else(|| retry::backoff(&self.retry, retry))),
                            next,
                        )
                    }
                };
                drop(attempt);

                let retried = RetryLabel { upstream: upstream.name.clone(), reason };
                // Another endpoint of the pool is another server: no backoff, no retry spent.
                if next_endpoint {
                    self.metrics.upstream_retries.get_or_create(&retried).inc();
                    tracing::debug!(upstream = %upstream.name, reason, "trying another endpoint of the pool");
                    continue;
                }
                let Some(delay) = delay.filter(|_| may_retry) else { break };
                self.metrics.upstream_retries.get_or_create(&retried).inc();
                tracing::debug!(upstream = %upstream.name, reason, ?delay, "retrying upstream");
                tokio::time::sleep(delay).await;
                waited += delay;
                retry += 1;
                tried.clear();
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
    /// The [`ENDPOINT_HEADER`] value naming the pool endpoint that answered, if any.
    pub(crate) fn endpoint_header(&self) -> Option<HeaderValue> {
        self.endpoint.as_ref().map(|lease| lease.endpoint.header.clone())
    }

    /// The response for the client: end-to-end headers and the upstream body, streamed.
    pub fn into_response(self) -> Response<Body> {
        let endpoint = self.endpoint_header();
        let (parts, incoming) = self.response.into_parts();
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let scanner = crate::openai::UsageScanner::for_response(
            content_type,
            parts.headers.contains_key(header::CONTENT_ENCODING),
        );
        let body =
            UpstreamBody::new(incoming, self.upstream, self.sent_at, scanner, self.usage_sink, self.endpoint);
        let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(body));
        *response.status_mut() = parts.status;
        copy_end_to_end(&parts.headers, response.headers_mut());
        if let Some(endpoint) = endpoint {
            response.headers_mut().insert(ENDPOINT_HEADER, endpoint);
        }
        response.extensions_mut().insert(UpstreamWait(self.upstream_wait));
        response
    }
}

/// Splits out the send failures that are the client's fault: a streamed body over the limit,
/// or one that did not arrive within the body read timeout.
fn classify_send_error(err: hyper_util::client::legacy::Error) -> Result<BoxError, GatewayError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(limit) = e.downcast_ref::<crate::body::BodyTooLarge>() {
            return Err(GatewayError::PayloadTooLarge { limit: limit.0 });
        }
        if let Some(timed_out) = e.downcast_ref::<crate::body::BodyTimedOut>() {
            return Err(GatewayError::RequestBodyTimeout { after: timed_out.0 });
        }
        source = e.source();
    }
    Ok(Box::new(err))
}

/// Whether `headers` carry a credential an upstream could take.
pub fn carries_credential(headers: &HeaderMap) -> bool {
    CREDENTIAL_HEADERS.iter().any(|name| headers.contains_key(*name))
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
        let Target::Url(origin) = &upstream.target else { panic!("a base URL is not a pool") };
        assert_eq!(
            origin.uri_for("/v1/chat/completions?x=1").unwrap().to_string(),
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
            affinity: None,
        };
        let Target::Url(origin) = &upstream.target else { panic!("a base URL is not a pool") };
        let request = upstream
            .build_request(
                origin,
                &outgoing.method,
                &outgoing.path_and_query,
                &outgoing.headers,
                gw_body::empty(),
            )
            .unwrap();
        assert_eq!(request.headers()[header::AUTHORIZATION], "Bearer sk-gateway");
        assert!(request.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(!request.headers().contains_key(header::HOST));
    }
}
