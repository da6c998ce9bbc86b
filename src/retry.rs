//! When an outbound attempt (an upstream call, a gateway tool call) is retried, which answered
//! requests may be sent again at all, and how long to wait first: jittered exponential
//! backoff, or the server's own `Retry-After` / `retry-after-ms` when it sends one.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};

use crate::config::RetryConfig;

/// 429 and the 5xx statuses that signal a transient fault. 501 and 505 will not change on retry.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// Whether a request the upstream has answered (with a retryable status) may be sent again:
/// it was received, so only a request that is harmless twice is. Idempotent methods are, and
/// so are the `inference_paths` (client paths, no query), which create nothing upstream.
/// A request that never reached the upstream (a connect error) may always be sent again.
pub(crate) fn may_resend_answered(method: &Method, path_and_query: &str, inference_paths: &[String]) -> bool {
    let path = path_and_query.split('?').next().unwrap_or_default();
    method.is_idempotent() || inference_paths.iter().any(|p| p == path)
}

/// Delay before retry number `retry` (0-based): "equal jitter", half fixed and half random, so
/// replicas retrying together spread out but never retry immediately.
pub(crate) fn backoff(config: &RetryConfig, retry: u32) -> Duration {
    let exp = config.base_delay.saturating_mul(2u32.saturating_pow(retry)).min(config.max_delay);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The upstream's requested wait: OpenAI's `retry-after-ms`, else `Retry-After` in seconds.
/// (The HTTP-date form is not used by LLM APIs and is ignored.)
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let read = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = read("retry-after-ms").filter(|v| v.is_finite() && *v >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    read("retry-after").filter(|v| v.is_finite() && *v >= 0.0).map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for s in [429, 500, 502, 503, 504, 529] {
            assert!(is_retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 400, 401, 404, 413, 501, 505] {
            assert!(!is_retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    #[test]
    fn answered_requests_are_resent_only_when_harmless_twice() {
        let inference = RetryConfig::default().inference_paths;
        let resend = |method: Method, path: &str| may_resend_answered(&method, path, &inference);
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert!(resend(method.clone(), "/v1/files/f"), "{method}");
        }
        assert!(resend(Method::POST, "/v1/chat/completions"));
        assert!(resend(Method::POST, "/v1/embeddings?api-version=1"));
        assert!(!resend(Method::POST, "/v1/batches"));
        assert!(!resend(Method::POST, "/v1/files"));
        assert!(!resend(Method::PATCH, "/v1/chat/completions/x"));
        assert!(!resend(Method::POST, "/v1/chat/completions/extra"));
    }

    #[test]
    fn backoff_grows_within_bounds() {
        let config = RetryConfig {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
            ..RetryConfig::default()
        };
        for _ in 0..100 {
            let d0 = backoff(&config, 0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100), "{d0:?}");
            let d1 = backoff(&config, 1);
            assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(200), "{d1:?}");
            let d9 = backoff(&config, 9);
            assert!(d9 >= Duration::from_millis(175) && d9 <= Duration::from_millis(350), "{d9:?}");
        }
    }

    #[test]
    fn reads_retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
