//! Gateway keys and their limits. With keys configured, every `/v1/*` request must present one
//! as `Authorization: Bearer <key>`; [`layer`] finds its policy, admits the request against
//! the key's request rate and in-flight limit, removes the header (the gateway key never goes
//! upstream: the upstream's own key comes from the gateway's environment) and hands the handlers
//! a [`Caller`]. Handlers check the model and take the prompt tokens ([`Auth::charge`]).
//!
//! Without keys, nothing here runs and the client's `Authorization` passes through as before.

mod keys;
mod limits;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderMap, Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

pub use keys::{hash_key, KeyPolicy, KeyRing};
pub use limits::{Admission, Limiter, TokenCharge};

use crate::body::{Body, Tracked};
use crate::config::Config;
use crate::error::GatewayError;
use crate::openai::ChatRequest;
use crate::redis_conn;
use crate::telemetry::{Metrics, ReasonLabel};
use crate::tokens::TokenCounter;

/// The authenticated caller of a request, as a request extension.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: Arc<KeyPolicy>,
}

impl Caller {
    /// What sessions and conversation state are scoped by: the key's name, so a rotated secret
    /// keeps its sessions and two keys never see each other's.
    pub fn scope_credential(&self) -> Vec<u8> {
        [b"key:".as_slice(), self.key.name.as_bytes()].concat()
    }
}

/// The credential a request's sessions and conversation state are scoped by: the gateway key's
/// name when keys are on, else the `Authorization` header as sent.
pub fn scope_credential(headers: &HeaderMap, extensions: &http::Extensions) -> Vec<u8> {
    match extensions.get::<Caller>() {
        Some(caller) => caller.scope_credential(),
        None => headers.get(header::AUTHORIZATION).map_or(&b""[..], http::HeaderValue::as_bytes).to_vec(),
    }
}

/// Why gateway keys and limits could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot reach the Redis that holds keys and limits: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("invalid gateway keys:\n{0}")]
    Keys(#[from] crate::config::ConfigError),
}

#[derive(Debug)]
pub struct Auth {
    pub keys: KeyRing,
    pub limiter: Arc<Limiter>,
    enabled: bool,
    metrics: Arc<Metrics>,
}

impl Auth {
    pub fn new(keys: KeyRing, limiter: Arc<Limiter>, enabled: bool, metrics: Arc<Metrics>) -> Self {
        Self { keys, limiter, enabled, metrics }
    }

    /// Keys from config, and the shared Redis (when one is configured) for Redis-held keys and
    /// limits across replicas.
    pub async fn open(config: &Config, metrics: Arc<Metrics>) -> Result<Self, OpenError> {
        let timeout = config.rate_limits.timeout.max(config.sessions.store_timeout);
        let redis = match config.shared_redis_url() {
            Some(url) if config.auth.enabled() => {
                Some(redis_conn::connect(url, timeout).await.map_err(OpenError::Redis)?)
            }
            _ => None,
        };
        let prefix = config.sessions.key_prefix.clone();
        let with_timeout = |t| redis.clone().map(|conn| (conn, prefix.clone(), t));
        let keys = KeyRing::new(&config.auth, with_timeout(config.sessions.store_timeout))?;
        let limiter = Arc::new(Limiter::new(with_timeout(config.rate_limits.timeout), metrics.clone()));
        Ok(Self::new(keys, limiter, config.auth.enabled(), metrics))
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Checks that the caller may use `model` and takes `prompt_tokens` (counted lazily: only
    /// keys with a token limit pay for counting) from its tokens per minute.
    pub async fn charge(
        &self,
        caller: Option<&Caller>,
        model: &str,
        prompt_tokens: impl FnOnce() -> u64,
    ) -> Result<Option<TokenCharge>, GatewayError> {
        let Some(caller) = caller else {
            return Ok(None);
        };
        if !caller.key.allows(model) {
            self.refused("model");
            return Err(GatewayError::ModelNotAllowed { model: model.to_string() });
        }
        if caller.key.limits.tokens_per_minute.is_none() {
            return Ok(None);
        }
        self.limiter.charge_tokens(&caller.key, prompt_tokens()).await
    }

    /// Checks the model alone, for routes without a token charge.
    pub fn check_model(&self, caller: Option<&Caller>, model: &str) -> Result<(), GatewayError> {
        match caller {
            Some(caller) if !caller.key.allows(model) => {
                self.refused("model");
                Err(GatewayError::ModelNotAllowed { model: model.to_string() })
            }
            _ => Ok(()),
        }
    }

    fn refused(&self, reason: &'static str) {
        self.metrics.limits.auth_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<KeyPolicy>, GatewayError> {
        let Some(raw) = bearer(headers) else {
            self.refused("missing");
            return Err(GatewayError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        match self.keys.lookup(raw).await {
            Ok(Some(key)) => Ok(key),
            Ok(None) => {
                self.refused("unknown");
                Err(GatewayError::Unauthorized("Incorrect API key provided."))
            }
            Err(err) => {
                self.refused("store");
                Err(err)
            }
        }
    }
}

/// The key of `Authorization: Bearer <key>`.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, key) = value.split_at_checked(7)?;
    let key = key.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer ") && !key.is_empty()).then_some(key)
}

// === the layer ===

/// The gateway-key layer over `inner` services (the router, or anything answering like it).
pub fn layer<S>(auth: Arc<Auth>) -> impl Layer<S, Service = Authenticate<S>> + Clone {
    tower::layer::layer_fn(move |inner| Authenticate { inner, auth: auth.clone() })
}

/// What the layer wraps: a service answering chat-style requests with a boxed future. With an
/// opaque future, rustc cannot prove `Send` for the admission's async block over every
/// lifetime of the body's boxed error.
pub trait Inner:
    Service<
    Request<Body>,
    Response = Response<Body>,
    Error = GatewayError,
    Future = BoxFuture<Result<Response<Body>, GatewayError>>,
>
{
}

impl<S> Inner for S where
    S: Service<
        Request<Body>,
        Response = Response<Body>,
        Error = GatewayError,
        Future = BoxFuture<Result<Response<Body>, GatewayError>>,
    >
{
}

/// Authenticates `/v1/*` requests and admits them against their key's limits; health and
/// metrics endpoints stay open for probes and scrapers.
#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    auth: Arc<Auth>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S: Inner + Clone + Send + 'static> Service<Request<Body>> for Authenticate<S> {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !self.auth.enabled() || !request.uri().path().starts_with("/v1/") {
            return self.inner.call(request);
        }
        // The inner service was driven ready for this call: take it, leave a clone (tower's
        // `call` contract).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(admit(self.auth.clone(), inner, request))
    }
}

/// The key check and admission, then the inner call with the key's permit tied to the body.
async fn admit<S: Inner>(
    auth: Arc<Auth>,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = request.into_parts();
    let key = auth.authenticate(&parts.headers).await?;
    let admission = auth.limiter.admit(&key).await?;
    parts.headers.remove(header::AUTHORIZATION);
    parts.extensions.insert(Caller { key: key.clone() });
    let response = match inner.call(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(err) => {
            // A model outside the key's list is known only once the handler read the body;
            // such a request must not use up the key's rate.
            if matches!(err, GatewayError::ModelNotAllowed { .. }) {
                auth.limiter.refund(&key, &admission).await;
            }
            return Err(err);
        }
    };
    Ok(match admission.permit {
        Some(permit) => response.map(|body| {
            Tracked::new(body, tokio::time::Instant::now().into_std(), move |_| drop(permit)).boxed_unsync()
        }),
        None => response,
    })
}

/// Prompt tokens for a token charge: every message and the `tools`, with the counter for the
/// request's model (message counts are cached, so a session's history is tokenised once).
pub fn count_prompt_tokens(counter: &TokenCounter, request: &ChatRequest) -> u64 {
    request.messages().iter().map(|m| u64::from(counter.message(m.get()))).sum::<u64>()
        + request.tools().map_or(0, |t| u64::from(counter.json(t.get())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_keys_are_read_case_insensitively() {
        assert_eq!(bearer(&headers("Bearer sk-a")), Some(&b"sk-a"[..]));
        assert_eq!(bearer(&headers("bearer  sk-a ")), Some(&b"sk-a"[..]));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
