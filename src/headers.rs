//! Every header name ctxgate reads or writes itself: the public header contract. Clients,
//! dashboards and tests rely on these names; change one only with the README.
//!
//! The session headers' names are configurable (`sessions.header`, default [`SESSION_ID`] then
//! [`CODEX_THREAD_ID`]).

use http::HeaderName;

/// Request: names the session (default name; `sessions.header` may rename it).
pub(crate) const SESSION_ID: &str = "x-session-id";
/// Request: Codex CLI's id of the conversation (its thread), the same on every turn of it; a
/// default fallback session header.
pub(crate) const CODEX_THREAD_ID: &str = "thread-id";
/// Request: `append` when the client sends only new messages.
pub(crate) const SESSION_MODE: HeaderName = HeaderName::from_static("x-session-mode");
/// Response: on a non-streamed answer, the session version it was committed at; on a stream,
/// the version that admitted it (the answer commits after the stream ends).
pub(crate) const SESSION_VERSION: HeaderName = HeaderName::from_static("x-ctxgate-session-version");
/// Response: `degraded` when a session request was served without its session.
pub(crate) const SESSION_STATE: HeaderName = HeaderName::from_static("x-ctxgate-session");
/// Request: `off` sends the request uncompressed. Response: what compression did (`none`,
/// `rules`, `hybrid`, or `off`).
pub(crate) const COMPRESSION: HeaderName = HeaderName::from_static("x-ctxgate-compression");
/// Response: the request's prompt tokens before and after compression.
pub(crate) const TOKENS_BEFORE: HeaderName = HeaderName::from_static("x-ctxgate-tokens-before");
pub(crate) const TOKENS_AFTER: HeaderName = HeaderName::from_static("x-ctxgate-tokens-after");
/// Response: rounds of gateway tool runs a non-streamed answer took.
pub(crate) const TOOL_ROUNDS: HeaderName = HeaderName::from_static("x-ctxgate-tool-rounds");
/// Request and response: the request id, kept from the client or generated; sent upstream.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Request (sessions stream endpoint): resume a replay after this `TURN-SEQ` event id.
pub(crate) const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
