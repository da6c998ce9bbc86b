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

/// Whether the body is `multipart/form-data`.
pub(crate) fn is_form(headers: &HeaderMap) -> bool {
    form_boundary(headers).is_some()
}

fn form_boundary(headers: &HeaderMap) -> Option<&str> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"'))
    })
}

/// The values of a `multipart/form-data` body's fields called `name`; `None` when the form
/// cannot be read with certainty (no boundary, no final delimiter, a part without headers, or
/// an RFC 2231 `name*` this reader does not decode), since an upstream might then read a field
/// this reader missed.
pub(crate) fn form_fields<'a>(headers: &HeaderMap, body: &'a [u8], name: &str) -> Option<Vec<&'a [u8]>> {
    let boundary = form_boundary(headers).filter(|b| !b.is_empty())?;
    let delimiter = format!("--{boundary}");
    let starts: Vec<usize> = memchr::memmem::find_iter(body, delimiter.as_bytes()).collect();
    let mut values = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let part = &body[start + delimiter.len()..];
        if part.starts_with(b"--") {
            return Some(values);
        }
        let end = starts.get(i + 1).map(|next| next - start - delimiter.len())?;
        let part = part[..end].strip_prefix(b"\r\n")?;
        let split = memchr::memmem::find(part, b"\r\n\r\n")?;
        let content = &part[split + 4..];
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        for line in part[..split].split(|&b| b == b'\n') {
            let line = std::str::from_utf8(line).ok()?.trim();
            let Some((header, value)) = line.split_once(':') else { continue };
            if !header.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in value.split(';').skip(1) {
                let (key, field) = param.split_once('=')?;
                let key = key.trim();
                if key.starts_with("name*") {
                    return None;
                }
                if key.eq_ignore_ascii_case("name") && field.trim().trim_matches('"') == name {
                    values.push(content);
                }
            }
        }
    }
    // No closing delimiter.
    None
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
    fn form_fields_are_read_by_name() {
        let headers = headers("multipart/form-data; boundary=\"XyZ\"");
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF--X\r\n\
            --XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        assert_eq!(form_fields(&headers, body, "model"), Some(vec![&b"whisper-1"[..]]));
        assert_eq!(form_fields(&headers, body, "language"), Some(vec![]));
        let twice = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--XyZ--";
        assert_eq!(form_fields(&headers, twice, "model").map(|v| v.len()), Some(2));
        let encoded = b"--XyZ\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\na\r\n--XyZ--";
        assert_eq!(form_fields(&headers, encoded, "model"), None);
        let unterminated = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na";
        assert_eq!(form_fields(&headers, unterminated, "model"), None);
        assert!(!is_form(&self::headers("application/json")));
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
