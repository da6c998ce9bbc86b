//! Gateway tools: tools ctxgate runs itself when a model calls them.
//!
//! - [`Registry`]: the configured tools, their schemas, backends and concurrency limits. Only
//!   the endpoints named here are ever called.
//! - [`call`]: one round of calls, run concurrently with deadlines and retries; failures become
//!   structured tool results so the model can react.
//! - [`http`], [`mcp`]: the two backends.
//! - [`record`]: what a session keeps of tool runs (results owed to the next turn, tasks).
//! - [`tasks`]: the link between a running task and the checkpoint that records it.
//!
//! The loop around the upstream (answer → run the gateway's calls → ask again) belongs to the
//! chat pipeline (`chat::tool_loop`); this module runs calls and knows nothing of upstreams,
//! sessions or the client.

mod call;
mod http;
mod mcp;
pub(crate) mod record;
pub(crate) mod tasks;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Semaphore;

pub use crate::openai::message::Call;
pub use call::{Outcome, ToolRun};

use crate::config::{Config, ConfigError, EnvSource, ToolConfig, ToolLoopConfig};
use crate::error::GatewayError;
use crate::openai::ChatRequest;
use crate::telemetry::Metrics;

/// One configured tool, ready to run.
pub struct Tool {
    pub config: ToolConfig,
    validator: jsonschema::Validator,
    backend: Backend,
    /// Bounds this tool's calls across requests.
    permits: Semaphore,
}

enum Backend {
    Http(Box<http::HttpTool>),
    Mcp(mcp::McpTool),
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool").field("name", &self.config.name).finish_non_exhaustive()
    }
}

/// Every gateway tool, by name.
#[derive(Debug)]
pub struct Registry {
    tools: HashMap<String, Arc<Tool>>,
    /// Definitions added to requests (`inject = true`), sorted by name so the bytes never change.
    injected: Vec<(String, Box<RawValue>)>,
    pub limits: ToolLoopConfig,
    /// Bounds all tool calls at once.
    permits: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
}

impl Registry {
    /// The tools of a validated config. The checks are `check-config`'s; a failure here names
    /// its key all the same.
    pub fn from_config(
        config: &Config,
        env: &dyn EnvSource,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let client = http::client();
        let mut servers = mcp::Servers::default();
        let mut tools = HashMap::new();
        let mut injected = Vec::new();
        for (i, tool) in config.tools.iter().enumerate() {
            let at = |key: &str| format!("tools[{i}]{key}");
            let validator = jsonschema::validator_for(&tool.parameters)
                .map_err(|e| ConfigError::single(&at(".parameters"), format!("invalid JSON Schema: {e}")))?;
            let backend = match (&tool.http, &tool.mcp) {
                (Some(backend), None) => Backend::Http(Box::new(
                    http::HttpTool::new(backend, env, client.clone(), config.tool_loop.max_response_bytes)
                        .map_err(|e| ConfigError::single(&at(".http"), e))?,
                )),
                (None, Some(backend)) => Backend::Mcp(servers.tool(
                    backend,
                    env,
                    tool.remote_name(),
                    config.tool_loop.max_response_bytes,
                )),
                _ => return Err(ConfigError::single(&at(""), "needs exactly one backend: `http` or `mcp`")),
            };
            if tool.inject {
                injected.push((tool.name.clone(), definition(tool)));
            }
            let permits = Semaphore::new(tool.max_concurrency.max(1));
            tools.insert(
                tool.name.clone(),
                Arc::new(Tool { config: tool.clone(), validator, backend, permits }),
            );
        }
        injected.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            tools,
            injected,
            limits: config.tool_loop.clone(),
            permits: Arc::new(Semaphore::new(config.tool_loop.max_concurrency.max(1))),
            metrics,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tool>> {
        self.tools.get(name)
    }

    /// Adds the injected definitions the request does not declare itself to its `tools`, after
    /// the client's own. Returns the request unchanged when nothing is added.
    pub fn inject(&self, request: ChatRequest) -> Result<ChatRequest, GatewayError> {
        if self.injected.is_empty() {
            return Ok(request);
        }
        let mut tools: Vec<Box<RawValue>> = match request.tools() {
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
                GatewayError::invalid("`tools` must be an array.", Some("tools"), "invalid_type")
            })?,
            None => Vec::new(),
        };
        let declared: Vec<String> = tools.iter().filter_map(|t| declared_name(t)).collect();
        let (missing, _) = self.offer(&declared);
        if missing.is_empty() {
            return Ok(request);
        }
        tools.extend(missing.into_iter().map(ToOwned::to_owned));
        Ok(request.with_tools(&tools))
    }

    /// True when the request can reach a gateway tool: one is injected, or the request
    /// declares one by name.
    pub fn engaged_by(&self, request: &ChatRequest) -> bool {
        let declared: Vec<String> = match request.tools() {
            Some(raw) if !self.tools.is_empty() && self.injected.is_empty() => {
                let tools: Vec<Box<RawValue>> = serde_json::from_str(raw.get()).unwrap_or_default();
                tools.iter().filter_map(|t| declared_name(t)).collect()
            }
            _ => Vec::new(),
        };
        self.offer(&declared).1
    }

    /// For a request whose tools are named `declared` (in any front end's shape): the injected
    /// definitions (chat's shape) it does not declare itself, in order, and whether it can reach
    /// a gateway tool at all (one is injected, or it declares one by name).
    pub fn offer(&self, declared: &[String]) -> (Vec<&RawValue>, bool) {
        let missing =
            self.injected.iter().filter(|(name, _)| !declared.contains(name)).map(|(_, d)| &**d).collect();
        let reachable =
            !self.injected.is_empty() || declared.iter().any(|name| self.tools.contains_key(name));
        (missing, reachable && !self.tools.is_empty())
    }
}

/// The OpenAI function definition of a gateway tool.
fn definition(tool: &ToolConfig) -> Box<RawValue> {
    let value = serde_json::json!({
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        }
    });
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

fn declared_name(tool: &RawValue) -> Option<String> {
    let value: Value = serde_json::from_str(tool.get()).ok()?;
    value.pointer("/function/name").and_then(Value::as_str).map(str::to_string)
}
