//! `[[tools]]` and `[tool_loop]`: the tools ctxgate runs itself when a model calls them, and
//! the bounds of the loop that runs them.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::{EnvSource, Issues};

/// One gateway tool: what the model sees (`name`, `description`, `parameters`) and where a
/// call goes (`http` or `mcp`, exactly one).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments; calls are validated against it before they run.
    #[serde(default = "empty_object_schema")]
    pub parameters: serde_json::Value,
    /// Add the definition to every chat request's `tools` (after the client's, by name).
    #[serde(default)]
    pub inject: bool,
    /// Deadline of one call, retries included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after the first attempt, on connect errors, 5xx and 429, within the deadline.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Calls of this tool running at once, across requests.
    #[serde(default = "default_tool_concurrency")]
    pub max_concurrency: usize,
    /// Run as a durable task: recorded in the session checkpoint and finished after a restart.
    #[serde(default, rename = "async")]
    pub run_as_task: bool,
    #[serde(default)]
    pub http: Option<HttpBackend>,
    #[serde(default)]
    pub mcp: Option<McpBackend>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpBackend {
    pub url: String,
    /// `POST` (default) or `PUT` send the arguments as the JSON body; `GET` sends top-level
    /// arguments as query parameters.
    #[serde(default = "default_method")]
    pub method: String,
    /// Fixed request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose value is read from an environment variable at start-up (secrets).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpBackend {
    /// The server's streamable HTTP endpoint, e.g. `http://127.0.0.1:9000/mcp`.
    pub url: String,
    /// The tool's name on that server; defaults to the gateway name.
    #[serde(default)]
    pub tool: Option<String>,
    /// Environment variable holding a bearer token for the server.
    #[serde(default)]
    pub bearer_env: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolLoopConfig {
    /// Rounds of gateway tool runs per request; the model's answer after the last round is
    /// requested with `tool_choice: "none"`.
    pub max_rounds: u32,
    /// Tool calls running at once across all requests.
    pub max_concurrency: usize,
    /// Largest tool response body read; a larger one is an `upstream_error`.
    pub max_response_bytes: usize,
    /// SSE comment interval on streamed requests while tools run.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How often a pending task is polled.
    #[serde(with = "humantime_serde")]
    pub task_poll_interval: Duration,
}

impl ToolLoopConfig {
    pub(super) fn validate(&self, issues: &mut Issues) {
        if self.max_concurrency == 0 {
            issues.push("tool_loop.max_concurrency", "must be at least 1");
        }
        issues.positive("tool_loop.keepalive_interval", self.keepalive_interval);
        issues.positive("tool_loop.task_poll_interval", self.task_poll_interval);
    }
}

impl Default for ToolLoopConfig {
    fn default() -> Self {
        Self {
            max_rounds: 4,
            max_concurrency: 256,
            max_response_bytes: 1024 * 1024,
            keepalive_interval: Duration::from_secs(5),
            task_poll_interval: Duration::from_millis(500),
        }
    }
}

impl ToolConfig {
    /// 1 to 64 letters, digits, `_` or `-`, as OpenAI's function names.
    pub(super) fn has_valid_name(&self) -> bool {
        !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    /// The tool's own fields; names are checked for duplicates across tools by the caller.
    pub(super) fn validate(&self, at: &str, env: &dyn EnvSource, issues: &mut Issues) {
        if !self.has_valid_name() {
            issues.push(format!("{at}.name"), "must be 1 to 64 letters, digits, `_` or `-`");
        }
        if !self.parameters.is_object() {
            issues.push(format!("{at}.parameters"), "must be a JSON Schema object");
        } else if let Err(e) = jsonschema::validator_for(&self.parameters) {
            issues.push(format!("{at}.parameters"), format!("invalid JSON Schema: {e}"));
        }
        issues.positive(format!("{at}.timeout"), self.timeout);
        if self.max_concurrency == 0 {
            issues.push(format!("{at}.max_concurrency"), "must be at least 1");
        }
        match (&self.http, &self.mcp) {
            (Some(http), None) => {
                issues.url(format!("{at}.http.url"), &http.url);
                if !["GET", "POST", "PUT"].contains(&http.method.as_str()) {
                    issues.push(format!("{at}.http.method"), "must be GET, POST or PUT");
                }
                for (name, value) in &http.headers {
                    if HeaderName::try_from(name.as_str()).is_err()
                        || HeaderValue::try_from(value.as_str()).is_err()
                    {
                        issues.push(format!("{at}.http.headers"), format!("`{name}` is not a valid header"));
                    }
                }
                for (name, var) in &http.headers_env {
                    if HeaderName::try_from(name.as_str()).is_err() {
                        issues.push(
                            format!("{at}.http.headers_env"),
                            format!("`{name}` is not a valid header name"),
                        );
                    }
                    issues.env_set(format!("{at}.http.headers_env"), env, var);
                }
            }
            (None, Some(mcp)) => {
                issues.url(format!("{at}.mcp.url"), &mcp.url);
                if let Some(var) = &mcp.bearer_env {
                    issues.env_set(format!("{at}.mcp.bearer_env"), env, var);
                }
            }
            _ => issues.push(at, "needs exactly one backend: `http` or `mcp`"),
        }
    }

    /// The name on the backend: the MCP tool name, else the gateway name.
    pub fn remote_name(&self) -> &str {
        self.mcp.as_ref().and_then(|m| m.tool.as_deref()).unwrap_or(&self.name)
    }
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_retries() -> u32 {
    2
}

fn default_tool_concurrency() -> usize {
    16
}

fn default_method() -> String {
    "POST".into()
}
