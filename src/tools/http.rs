//! The HTTP backend: a call is one request to the tool's configured URL, with the arguments as
//! the JSON body (`POST`, `PUT`) or as query parameters (`GET`). The response body, up to the
//! size limit, is the tool's result.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::Value;

use super::call::Attempt;
use crate::config::{EnvSource, HttpBackend};
use crate::retry::{is_retryable_status, retry_after};

pub(super) type ToolClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One pooled client shared by every HTTP tool.
pub(super) fn client() -> ToolClient {
    crate::http_client::pooled(Duration::from_secs(5))
}

pub(super) struct HttpTool {
    uri: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_response_bytes: usize,
    client: ToolClient,
}

impl HttpTool {
    pub(super) fn new(
        config: &HttpBackend,
        env: &dyn EnvSource,
        client: ToolClient,
        max_response_bytes: usize,
    ) -> Result<Self, String> {
        let uri: Uri = config.url.parse().map_err(|e| format!("url: {e}"))?;
        let method = Method::from_bytes(config.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            headers.push(header(name, value.clone())?);
        }
        for (name, var) in &config.headers_env {
            let value = env.var(var).ok_or_else(|| format!("environment variable {var} is not set"))?;
            let (name, mut value) = header(name, value)?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        Ok(Self { uri, method, headers, max_response_bytes, client })
    }

    pub(super) async fn call(&self, arguments: &Value) -> Attempt {
        let request = match self.request(arguments) {
            Ok(request) => request,
            Err(message) => return Attempt::Fail(message),
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                return Attempt::Retry {
                    message: format!("tool endpoint unreachable: {err}"),
                    retry_after: None,
                }
            }
        };
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = match Limited::new(response.into_body(), self.max_response_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                return Attempt::Fail(format!("tool response larger than {} bytes", self.max_response_bytes))
            }
            Err(err) => {
                return Attempt::Retry { message: format!("tool response cut: {err}"), retry_after: None }
            }
        };
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            return Attempt::Done { content: text, is_error: false };
        }
        let message = format!("tool endpoint answered {}: {}", status.as_u16(), truncate(&text, 512));
        if is_retryable_status(status) {
            Attempt::Retry { message, retry_after: wait }
        } else {
            Attempt::Fail(message)
        }
    }

    fn request(&self, arguments: &Value) -> Result<Request<Full<Bytes>>, String> {
        let (uri, body) = if self.method == Method::GET {
            (with_query(&self.uri, arguments)?, Bytes::new())
        } else {
            (self.uri.clone(), Bytes::from(arguments.to_string()))
        };
        let mut builder = Request::builder().method(self.method.clone()).uri(uri);
        if self.method != Method::GET {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let mut request = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// Top-level arguments as query parameters (strings as they are, other values as JSON).
fn with_query(uri: &Uri, arguments: &Value) -> Result<Uri, String> {
    let mut query = uri.query().map(str::to_string).unwrap_or_default();
    if let Some(object) = arguments.as_object() {
        for (key, value) in object {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(&encode(key));
            query.push('=');
            query.push_str(&encode(&text));
        }
    }
    let path_and_query = format!("{}?{}", uri.path(), query);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|e| format!("query: {e}"))?);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn header(name: &str, value: String) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::try_from(name).map_err(|e| format!("header `{name}`: {e}"))?;
    let value = HeaderValue::try_from(value).map_err(|e| format!("header `{name}`: {e}"))?;
    Ok((name, value))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_arguments_become_query_parameters() {
        let uri: Uri = "http://tools.local/search?v=1".parse().unwrap();
        let args = serde_json::json!({"q": "a b&c", "n": 3});
        let out = with_query(&uri, &args).unwrap();
        assert_eq!(out.to_string(), "http://tools.local/search?v=1&n=3&q=a%20b%26c");
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
