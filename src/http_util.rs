//! Small HTTP helpers every handler shares: reading a request body under the body limit, the
//! JSON content-type rule, JSON responses, and a request's path and query.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response};
use http_body_util::BodyExt;

use crate::body::{self, Body, BodyTimedOut, BodyTooLarge, BoxError};
use crate::error::GatewayError;

/// The request target as sent: path and query.
pub(crate) fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string())
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json") || mime.to_ascii_lowercase().ends_with("+json")
        })
}

/// A JSON endpoint takes `application/json`; a request without a `Content-Type` is read as JSON
/// too, as OpenAI's API does.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(_) if is_json(headers) => Ok(()),
        Some(value) => Err(GatewayError::UnsupportedMediaType {
            content_type: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        }),
    }
}

/// The whole request body; 413 past the body limit, 408 past the body read timeout.
pub(crate) async fn read_body(body: Body) -> Result<Bytes, GatewayError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => Err(body_error(err)),
    }
}

/// What a failed request body means for the client: the limits' own errors get their status,
/// anything else (a broken connection) is a 400.
fn body_error(err: BoxError) -> GatewayError {
    if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
        return GatewayError::PayloadTooLarge { limit: too_large.0 };
    }
    if let Some(timed_out) = err.downcast_ref::<BodyTimedOut>() {
        return GatewayError::RequestBodyTimeout { after: timed_out.0 };
    }
    GatewayError::invalid(format!("Could not read the request body: {err}"), None, "invalid_body")
}

pub(crate) fn json_response(value: &impl serde::Serialize) -> Response<Body> {
    // Only maps with non-string keys fail to serialize; no response type here has one.
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(body::full(json));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        h
    }

    #[test]
    fn json_content_types() {
        assert!(require_json(&HeaderMap::new()).is_ok());
        assert!(require_json(&headers("application/json; charset=utf-8")).is_ok());
        assert!(require_json(&headers("Application/JSON")).is_ok());
        assert!(require_json(&headers("application/vnd.api+json")).is_ok());
        let err = require_json(&headers("text/plain")).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
