//! Which session a request names, if any.
//!
//! The first `sessions.header` names a session on purpose: its id must be valid (else 400), and
//! the request must carry a credential to scope it by (else 401).
//! The other headers, then (with `sessions.prompt_cache_key`) the body's `prompt_cache_key`, are
//! a client's own conversation ids (Codex CLI sends its thread id as both), taken as the
//! session when nothing names one on purpose. Such an implicit id never makes a request fail
//! that would succeed without it: one that cannot be a session (no caller credential to scope it
//! by, not a valid id) is passed over, and the request runs statelessly.

use http::HeaderMap;

use super::valid_id;
use crate::config::SessionConfig;
use crate::error::GatewayError;

/// The session a request runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    /// Taken from a client's own conversation id rather than named on purpose: when the session
    /// cannot serve the turn (busy past `sessions.busy_timeout`, its store down), the request
    /// runs without it instead of failing.
    pub implicit: bool,
}

impl Identity {
    /// A session named on purpose (the primary header, a chain of stored responses).
    pub fn named(id: String) -> Self {
        Self { id, implicit: false }
    }
}

/// The session `headers` (and a body's `prompt_cache_key`) name. `scoped`: the request carries
/// a caller credential that sessions are scoped by; without one only the primary header names
/// a session, as before implicit ids existed.
pub fn identify(
    config: &SessionConfig,
    headers: &HeaderMap,
    prompt_cache_key: Option<&str>,
    scoped: bool,
) -> Result<Option<Identity>, GatewayError> {
    let primary = config.header.primary();
    if let Some(value) = headers.get(primary) {
        return match value.to_str() {
            // Scoped by nothing, the id would be shared by every caller without a credential.
            Ok(id) if valid_id(id) && !scoped => Err(GatewayError::SessionNeedsCredential),
            Ok(id) if valid_id(id) => Ok(Some(Identity::named(id.to_string()))),
            _ => Err(GatewayError::invalid(
                format!("Invalid {primary}: 1 to 128 visible ASCII characters."),
                None,
                "invalid_session_id",
            )),
        };
    }
    if !scoped {
        return Ok(None);
    }
    let from_headers = config.header.names().iter().skip(1).filter_map(|name| headers.get(name.as_str()));
    let from_body = prompt_cache_key.filter(|_| config.prompt_cache_key);
    let implicit = from_headers
        .filter_map(|value| value.to_str().ok())
        .chain(from_body)
        .find(|id| valid_id(id))
        .map(|id| Identity { id: id.to_string(), implicit: true });
    Ok(implicit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SessionHeaders;

    fn config(prompt_cache_key: bool) -> SessionConfig {
        SessionConfig {
            header: SessionHeaders::new(["x-session-id", "thread-id", "session-id"]),
            prompt_cache_key,
            ..SessionConfig::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    fn implicit(id: &str) -> Option<Identity> {
        Some(Identity { id: id.into(), implicit: true })
    }

    #[test]
    fn the_primary_header_wins_and_a_malformed_one_is_refused() {
        let all = headers(&[("x-session-id", "named"), ("thread-id", "t")]);
        assert_eq!(
            identify(&config(true), &all, Some("k"), true).unwrap(),
            Some(Identity::named("named".into()))
        );
        // Named on purpose without a credential to scope it by: refused, not shared.
        assert_eq!(identify(&config(true), &all, None, false).unwrap_err().status(), 401);
        let long = "a".repeat(129);
        let bad = headers(&[("x-session-id", &long)]);
        assert_eq!(identify(&config(true), &bad, None, true).unwrap_err().status(), 400);
    }

    #[test]
    fn fallbacks_are_tried_in_order_and_the_cache_key_last() {
        let c = config(true);
        let both = headers(&[("session-id", "s"), ("thread-id", "t")]);
        assert_eq!(identify(&c, &both, Some("k"), true).unwrap(), implicit("t"));
        let one = headers(&[("session-id", "s")]);
        assert_eq!(identify(&c, &one, Some("k"), true).unwrap(), implicit("s"));
        assert_eq!(identify(&c, &HeaderMap::new(), Some("k"), true).unwrap(), implicit("k"));
        // The cache key only when switched on.
        assert_eq!(identify(&config(false), &HeaderMap::new(), Some("k"), true).unwrap(), None);
    }

    #[test]
    fn an_implicit_id_that_cannot_be_a_session_is_passed_over() {
        let c = config(true);
        let long = "t".repeat(129);
        let invalid = headers(&[("thread-id", &long), ("session-id", "has space")]);
        assert_eq!(identify(&c, &invalid, Some("k"), true).unwrap(), implicit("k"));
        assert_eq!(identify(&c, &invalid, None, true).unwrap(), None);
        // No caller credential to scope it by: no session.
        let fine = headers(&[("thread-id", "t")]);
        assert_eq!(identify(&c, &fine, Some("k"), false).unwrap(), None);
    }
}
