//! The request path, normalised once at the edge ([`NormalizePathLayer`]) so that the gateway
//! keys, the route table and the upstream all read the same path. Without it `/v1/../admin`
//! is a `/v1/*` passthrough here and `/admin` to an upstream that resolves dot segments itself.
//!
//! Normalising is RFC 3986's: percent-encoded unreserved characters are decoded (`%2e` is `.`),
//! dot segments are removed (§5.2.4), and empty segments (`//`) are dropped, since an upstream
//! that merges slashes before resolving dots would otherwise see a different path. A dot segment
//! hidden behind an encoded separator (`..%2f`, `%2e%2e%5c`) cannot be resolved without
//! guessing how the upstream decodes, so it is refused with 400. Query strings are untouched.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{Request, Uri};
use tower::{Layer, Service};

use crate::body::BoxError;
use crate::error::GatewayError;

/// `path` with dot segments removed, or an error for a path that cannot be made safe.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, GatewayError> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) or an empty path: nothing to resolve.
        return Ok(Cow::Borrowed(path));
    }
    if !path.contains('%') && !path.contains("/.") && !path.contains("//") {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        if hides_dot_segment(segment) {
            return Err(refused());
        }
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        normalized.push('/');
    }
    Ok(if normalized == path { Cow::Borrowed(path) } else { Cow::Owned(normalized) })
}

/// Decodes `%XX` of unreserved characters and upper-cases the hex of the others (RFC 3986
/// §6.2.2.1-2); a `%` not followed by two hex digits is refused.
fn decode_unreserved(path: &str) -> Result<String, GatewayError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |b: u8| char::from(b).to_digit(16);
        let (Some(hi), Some(lo)) =
            (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(GatewayError::invalid(
                "The request path has a malformed percent-encoding.",
                None,
                "invalid_path",
            ));
        };
        let byte = (hi * 16 + lo) as u8;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte);
        } else {
            out.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
        i += 3;
    }
    // Only ASCII escapes were replaced, by ASCII: the bytes are still UTF-8.
    String::from_utf8(out).map_err(|_| refused())
}

/// A segment that an upstream decoding `%2F` or `%5C` into a separator would split into a dot
/// segment, such as `..%2Fadmin`.
fn hides_dot_segment(segment: &str) -> bool {
    if !segment.contains("%2F") && !segment.contains("%5C") {
        return false;
    }
    segment.split("%2F").flat_map(|s| s.split("%5C")).any(|part| part == "." || part == "..")
}

fn refused() -> GatewayError {
    GatewayError::invalid(
        "The request path has a dot segment behind an encoded separator.",
        None,
        "invalid_path",
    )
}

// === impl NormalizePath ===

/// Rewrites each request's path to its normal form (see the module docs) before any later
/// layer reads it; refuses with 400 what cannot be normalised.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NormalizePathLayer;

impl<S> Layer<S> for NormalizePathLayer {
    type Service = NormalizePath<S>;
    fn layer(&self, inner: S) -> NormalizePath<S> {
        NormalizePath { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct NormalizePath<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for NormalizePath<S>
where
    S: Service<Request<B>>,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match rewrite(request.uri()) {
            Ok(None) => {}
            Ok(Some(uri)) => *request.uri_mut() = uri,
            Err(err) => return Box::pin(std::future::ready(Err(err.into()))),
        }
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

/// The URI with its path normalised; `None` when it already is.
fn rewrite(uri: &Uri) -> Result<Option<Uri>, GatewayError> {
    let Cow::Owned(path) = normalize(uri.path())? else {
        return Ok(None);
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).map_err(|_| refused())?);
    Uri::from_parts(parts).map(Some).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> String {
        normalize(path).unwrap().into_owned()
    }

    #[test]
    fn dot_segments_are_removed_in_any_encoding() {
        assert_eq!(norm("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(norm("/v1/../admin/secret"), "/admin/secret");
        assert_eq!(norm("/v1/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/v1/%2E./admin"), "/admin");
        assert_eq!(norm("/v1/./models"), "/v1/models");
        assert_eq!(norm("/v1//../admin"), "/admin");
        assert_eq!(norm("//v1///models"), "/v1/models");
        assert_eq!(norm("/../../x"), "/x");
        assert_eq!(norm("/v1/models/.."), "/v1/");
        assert_eq!(norm("/v1/models/"), "/v1/models/");
        assert_eq!(norm("/v1/fil%65s"), "/v1/files");
        assert_eq!(norm("/"), "/");
    }

    #[test]
    fn encoded_separators_are_kept_unless_they_hide_a_dot_segment() {
        assert_eq!(norm("/v1/models/org%2fmodel"), "/v1/models/org%2Fmodel");
        for path in ["/v1/..%2fadmin", "/v1/%2e%2e%2Fadmin", "/v1/x%2F..%2F..", "/v1/..%5cadmin"] {
            assert_eq!(normalize(path).unwrap_err().status(), 400, "{path}");
        }
        assert_eq!(normalize("/v1/%zz").unwrap_err().status(), 400);
        assert_eq!(normalize("/v1/%2").unwrap_err().status(), 400);
    }

    #[test]
    fn the_query_is_kept() {
        let uri: Uri = "/v1/x/../models?after=a/../b".parse().unwrap();
        assert_eq!(rewrite(&uri).unwrap().unwrap(), "/v1/models?after=a/../b");
        assert!(rewrite(&"/v1/models?x=1".parse().unwrap()).unwrap().is_none());
    }
}
