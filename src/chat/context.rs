//! [`ChatContext`]: one chat request as every phase of the pipeline sees it, built once. It
//! holds the request parsed once, the caller and its token charge, the route's model, where
//! the answer's `usage` goes, and the response headers the phases add.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, HeaderMap, Method};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, scope_credential, Caller};
use crate::body::Body;
use crate::compress::marker::EXPAND_TOOL;
use crate::error::GatewayError;
use crate::headers;
use crate::http_util::{read_body, require_json};
use crate::openai::message::{Info, Role};
use crate::openai::request::check_nesting;
use crate::openai::ChatRequest;
use crate::session::{Identity, SessionKey};
use crate::upstream::{AffinityKey, Forwarded, Outgoing, OutgoingBody, Upstream, UsageSink};
use crate::AppState;

pub(crate) struct ChatContext {
    /// Method, path, the headers that go upstream, and the extensions the stack set (the
    /// [`Caller`]).
    pub(crate) parts: request::Parts,
    /// The body parsed once (after gateway tools were injected).
    pub(crate) request: ChatRequest,
    /// The session the request runs on, if any.
    pub(crate) session: Option<Identity>,
    /// Who learns each upstream answer's `usage`: the per-model counters, the caller's charge.
    pub(crate) usage: UsageSink,
    /// Response headers the phases add (what compression did).
    pub(crate) annotations: HeaderMap,
    /// The turn runs the gateway's tool loop.
    pub(crate) tools_engaged: bool,
    /// The upstream request offers `ctxgate_expand` (its messages carry markers).
    pub(crate) expand: bool,
    /// Which pool endpoint the conversation belongs on (its session, or its stable prefix),
    /// for every upstream call of the turn.
    pub(crate) affinity: Option<AffinityKey>,
    /// Set by a front end that finishes the turn's work itself after a takeover (recorded in
    /// the in-flight marker, see [`crate::session::StoredRequest::origin`]).
    pub(crate) origin: Option<String>,
    /// Cancels the turn (a background response's cancel): the upstream call is dropped and the
    /// session released without a commit.
    pub(crate) cancel: CancellationToken,
}

impl ChatContext {
    /// Reads, validates and parses the request once, injects gateway tools, checks the session
    /// id, and charges the caller.
    pub(crate) async fn read(app: &AppState, request: http::Request<Body>) -> Result<Self, GatewayError> {
        let (parts, body) = request.into_parts();
        require_json(&parts.headers)?;
        let bytes = read_body(body).await?;
        check_nesting(&bytes, app.config.server.max_json_depth.get())?;
        Self::from_body(app, parts, bytes).await
    }

    /// [`Self::read`] from a body already read and checked (another front-end protocol's,
    /// translated into a chat request).
    pub(crate) async fn from_body(
        app: &AppState,
        mut parts: request::Parts,
        bytes: Bytes,
    ) -> Result<Self, GatewayError> {
        let request = app.tools.inject(ChatRequest::parse(bytes)?)?;
        let scoped = !scope_credential(&parts.headers, &parts.extensions).is_empty();
        let session = app.sessions.identify(&parts.headers, request.prompt_cache_key.as_deref(), scoped)?;
        let caller = parts.extensions.get::<Caller>();
        let counter = app.compressor.counter_for(&request.model);
        let charge =
            app.auth.charge(caller, &request.model, || auth::count_prompt_tokens(counter, &request)).await?;
        let usage = usage_sink(app, &request.model, charge);
        // The body is rewritten on most paths; the client's framing never goes upstream.
        parts.headers.remove(header::CONTENT_LENGTH);
        let tools_engaged = app.tools.engaged_by(&request);
        let mut ctx = Self {
            parts,
            request,
            session,
            usage,
            annotations: HeaderMap::new(),
            tools_engaged,
            expand: false,
            affinity: None,
            origin: None,
            cancel: CancellationToken::new(),
        };
        ctx.affinity = ctx.affinity_key(app);
        if ctx.compression_opted_out() {
            // Said back, so a client can tell its opt-out was seen.
            ctx.annotations.insert(headers::COMPRESSION, http::HeaderValue::from_static("off"));
        }
        Ok(ctx)
    }

    /// A context for re-issuing a stored upstream request (a turn resumed after its owner
    /// died): no charge, no annotations, the resuming caller's headers.
    pub(crate) fn resumed(
        app: &AppState,
        headers: HeaderMap,
        path: &str,
        request: ChatRequest,
    ) -> Result<Self, GatewayError> {
        let mut builder = http::Request::builder().method(Method::POST).uri(path);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let (parts, ()) = builder.body(()).map_err(|e| GatewayError::Internal(e.into()))?.into_parts();
        // A stored request that offered `ctxgate_expand` still answers it.
        let expand = request.tools().is_some_and(|t| t.get().contains(&format!("\"{EXPAND_TOOL}\"")));
        let tools_engaged = app.tools.engaged_by(&request) || expand;
        Ok(Self {
            affinity: None,
            expand,
            usage: usage_sink(app, &request.model, None),
            parts,
            request,
            session: None,
            annotations: HeaderMap::new(),
            tools_engaged,
            origin: None,
            cancel: CancellationToken::new(),
        })
    }

    /// The conversation's affinity key, when its route has a pool that keeps conversations on
    /// one endpoint: the session's (its scope and id), else the hash of its stable prefix (the
    /// leading system messages, the tools and the first other message, as sent).
    fn affinity_key(&self, app: &AppState) -> Option<AffinityKey> {
        if !self.route(app).iter().any(|u| u.wants_affinity()) {
            return None;
        }
        if let Some(session) = &self.session {
            let key = self.session_key(&session.id);
            return Some(AffinityKey::session(&key.scope, &key.id));
        }
        let messages = self.request.messages();
        let lead = messages.iter().take_while(|m| Info::parse(m.get()).role == Role::System).count();
        let system: Vec<&[u8]> = messages[..lead].iter().map(|m| m.get().as_bytes()).collect();
        let tools = self.request.tools().map(|t| t.get().as_bytes());
        let first = messages.get(lead).map(|m| m.get().as_bytes());
        Some(AffinityKey::prefix(&system, tools, None, first))
    }

    /// Runs the request on `session`, chosen by a front end rather than read from the request
    /// (a chain of stored responses); a pool keeps it on the session's endpoint.
    pub(crate) fn on_session(&mut self, app: &AppState, session: Identity) {
        self.session = Some(session);
        self.affinity = self.affinity_key(app);
    }

    /// Keeps a resumed turn on its session's endpoint.
    pub(crate) fn with_session_affinity(mut self, app: &AppState, key: &SessionKey) -> Self {
        if self.route(app).iter().any(|u| u.wants_affinity()) {
            self.affinity = Some(AffinityKey::session(&key.scope, &key.id));
        }
        self
    }

    pub(crate) fn path(&self) -> &str {
        self.parts.uri.path_and_query().map_or("/v1/chat/completions", |p| p.as_str())
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    /// The session key for `id`: under the caller's gateway key when keys are on, else under
    /// its `Authorization` header.
    pub(crate) fn session_key(&self, id: &str) -> SessionKey {
        SessionKey::new(&self.scope_credential(), id)
    }

    /// What sessions and stateless conversation state are scoped by.
    pub(crate) fn scope_credential(&self) -> Vec<u8> {
        scope_credential(&self.parts.headers, &self.parts.extensions)
    }

    /// Marks the request as offering `ctxgate_expand`, answered in the gateway's tool loop.
    pub(crate) fn offer_expand(&mut self) {
        self.expand = true;
        self.tools_engaged = true;
    }

    /// The stateless scope: what sessions and conversation state are keyed under without a
    /// session id.
    pub(crate) fn scope(&self) -> String {
        SessionKey::new(&self.scope_credential(), "").scope
    }

    /// The headers that go upstream: the client's, without ctxgate's own request headers (a
    /// client's own conversation ids, the other session headers, go as sent).
    pub(crate) fn strip_gateway_headers(&mut self, session_header: &str) {
        let headers = &mut self.parts.headers;
        headers.remove(session_header);
        headers.remove(&headers::SESSION_MODE);
        headers.remove(&headers::COMPRESSION);
    }

    /// Whether the client opted this request out of compression.
    pub(crate) fn compression_opted_out(&self) -> bool {
        self.parts
            .headers
            .get(&headers::COMPRESSION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off"))
    }

    /// Whether the client sends only new messages (`X-Session-Mode: append`).
    pub(crate) fn append_mode(&self) -> bool {
        self.parts
            .headers
            .get(&headers::SESSION_MODE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"append"))
    }

    pub(crate) fn request_id(&self) -> &str {
        self.parts.headers.get(&headers::REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The route of the request's model, in failover order.
    pub(crate) fn route<'a>(&self, app: &'a AppState) -> &'a [Arc<Upstream>] {
        app.upstreams.router.route(Some(&self.request.model))
    }

    /// Sends `body` upstream along the model's route (retries and failover before the first
    /// byte); the answer's `usage` goes to this context's sink.
    pub(crate) async fn send(&self, app: &AppState, body: Bytes) -> Result<Forwarded, GatewayError> {
        self.send_with(app, body, self.parts.headers.clone()).await
    }

    /// [`Self::send`] with `headers` (the context's, taken when nothing sends again).
    pub(crate) async fn send_with(
        &self,
        app: &AppState,
        body: Bytes,
        headers: HeaderMap,
    ) -> Result<Forwarded, GatewayError> {
        let outgoing = Outgoing {
            method: Method::POST,
            path_and_query: self.path().to_string(),
            headers,
            body: OutgoingBody::Replayable(body),
            affinity: self.affinity,
        };
        let mut forwarded = app.upstreams.forward(self.route(app), outgoing).await?;
        forwarded.usage_sink = self.usage.clone();
        Ok(forwarded)
    }
}

/// Who learns the `usage` of a request's answers: the per-model counters on compressed routes,
/// and the caller's token charge.
fn usage_sink(app: &AppState, model: &str, charge: Option<auth::TokenCharge>) -> UsageSink {
    let mut usage = UsageSink::default();
    if app.compressor.active(model).is_some() {
        usage = usage.with(Arc::new(app.metrics.for_model(&app.model_labels.label(model))));
    }
    if let Some(charge) = charge {
        usage = usage.with(Arc::new(charge));
    }
    usage
}
