//! The MCP backend: tools on MCP servers over streamable HTTP, through the official SDK
//! (`rmcp`). One MCP session per server, opened on first use and shared by every call and tool
//! on that server; a session that fails is dropped and the next attempt opens a new one.

use std::collections::HashMap;
use std::sync::Arc;

use rmcp::model::{CallToolRequestParams, CallToolResult, ClientInfo};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::Value;
use tokio::sync::Mutex;

use super::call::Attempt;
use crate::config::{EnvSource, McpBackend};

type Session = RunningService<RoleClient, ClientInfo>;

/// MCP servers by URL, so tools on one server share its session.
#[derive(Default)]
pub struct Servers {
    by_url: HashMap<String, Arc<Server>>,
}

impl Servers {
    pub fn tool(&mut self, config: &McpBackend, env: &dyn EnvSource, remote: &str) -> McpTool {
        let bearer = config.bearer_env.as_deref().and_then(|var| env.var(var));
        let server = self
            .by_url
            .entry(config.url.clone())
            .or_insert_with(|| {
                Arc::new(Server { url: config.url.clone(), bearer, session: Mutex::new(None) })
            })
            .clone();
        McpTool { server, name: remote.to_string() }
    }
}

pub struct Server {
    url: String,
    bearer: Option<String>,
    session: Mutex<Option<Arc<Session>>>,
}

impl Server {
    /// The open session, or a new one.
    async fn session(&self) -> Result<Arc<Session>, String> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.is_transport_closed()) {
            return Ok(session.clone());
        }
        let mut config = StreamableHttpClientTransportConfig::with_uri(self.url.as_str());
        if let Some(token) = &self.bearer {
            config = config.auth_header(token.clone());
        }
        let transport = StreamableHttpClientTransport::from_config(config);
        let session = client_info()
            .serve(transport)
            .await
            .map_err(|e| format!("cannot open an MCP session with the tool server: {e}"))?;
        let session = Arc::new(session);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Forgets a session that failed, so the next call opens a new one.
    async fn drop_session(&self, failed: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, failed)) {
            *slot = None;
        }
    }
}

fn client_info() -> ClientInfo {
    let mut info = ClientInfo::default();
    info.client_info.name = "ctxgate".into();
    info.client_info.version = env!("CARGO_PKG_VERSION").into();
    info
}

/// A tool on an MCP server.
pub struct McpTool {
    server: Arc<Server>,
    name: String,
}

impl McpTool {
    pub async fn call(&self, arguments: &Value) -> Attempt {
        let session = match self.server.session().await {
            Ok(session) => session,
            Err(message) => return Attempt::Retry { message, retry_after: None },
        };
        let mut params = CallToolRequestParams::new(self.name.clone());
        if let Some(object) = arguments.as_object() {
            params = params.with_arguments(object.clone());
        }
        match session.call_tool(params).await {
            Ok(result) => done(result),
            Err(err) => self.failed(&session, err).await,
        }
    }

    async fn failed(&self, session: &Arc<Session>, err: ServiceError) -> Attempt {
        match err {
            // The server answered with a JSON-RPC error: final.
            ServiceError::McpError(e) => Attempt::Fail(format!("MCP error {}: {}", e.code.0, e.message)),
            other => {
                self.server.drop_session(session).await;
                Attempt::Retry { message: format!("MCP transport: {other}"), retry_after: None }
            }
        }
    }
}

/// A tool result as the `tool` message's content: its text blocks joined, else its structured
/// content as JSON.
pub fn done(result: CallToolResult) -> Attempt {
    let texts: Vec<&str> =
        result.content.iter().filter_map(|c| c.as_text()).map(|t| t.text.as_str()).collect();
    let content = if texts.is_empty() {
        result.structured_content.as_ref().map(Value::to_string).unwrap_or_default()
    } else {
        texts.join("\n")
    };
    Attempt::Done { content, is_error: result.is_error.unwrap_or(false) }
}
