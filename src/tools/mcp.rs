//! The MCP backend: tools on MCP servers over streamable HTTP, through the official SDK
//! (`rmcp`). One MCP session per server, opened on first use and shared by every call and tool
//! on that server; a session that fails is dropped and the next attempt opens a new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientInfo, ClientRequest, GetTaskParams,
    GetTaskPayloadParams, GetTaskPayloadRequest, GetTaskRequest, ServerResult, TaskMetadata, TaskStatus,
    TaskSupport,
};
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
pub(super) struct Servers {
    by_url: HashMap<String, Arc<Server>>,
}

impl Servers {
    /// A tool on the server `config` names; results past `max_result_bytes` are failures.
    pub(super) fn tool(
        &mut self,
        config: &McpBackend,
        env: &dyn EnvSource,
        remote: &str,
        max_result_bytes: usize,
    ) -> McpTool {
        let bearer = config.bearer_env.as_deref().and_then(|var| env.var(var));
        let server = self
            .by_url
            .entry(config.url.clone())
            .or_insert_with(|| {
                Arc::new(Server {
                    url: config.url.clone(),
                    bearer,
                    session: Mutex::new(None),
                    task_support: Mutex::new(None),
                })
            })
            .clone();
        McpTool { server, name: remote.to_string(), max_result_bytes }
    }
}

pub(super) struct Server {
    url: String,
    bearer: Option<String>,
    session: Mutex<Option<Arc<Session>>>,
    /// Each tool's `execution.taskSupport`, read once from `tools/list`.
    task_support: Mutex<Option<HashMap<String, TaskSupport>>>,
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

impl Server {
    async fn task_support(&self, session: &Session, name: &str) -> Result<TaskSupport, String> {
        let mut cached = self.task_support.lock().await;
        if cached.is_none() {
            let tools = session.list_all_tools().await.map_err(|e| format!("MCP tools/list: {e}"))?;
            let support = tools
                .into_iter()
                .map(|t| {
                    let support = t.execution.and_then(|e| e.task_support).unwrap_or_default();
                    (t.name.to_string(), support)
                })
                .collect();
            *cached = Some(support);
        }
        Ok(cached.as_ref().and_then(|m| m.get(name).copied()).unwrap_or_default())
    }
}

fn client_info() -> ClientInfo {
    let mut info = ClientInfo::default();
    info.client_info.name = "ctxgate".into();
    info.client_info.version = env!("CARGO_PKG_VERSION").into();
    info
}

/// A tool on an MCP server.
pub(super) struct McpTool {
    server: Arc<Server>,
    name: String,
    /// `tool_loop.max_response_bytes`, as for HTTP tools: the result goes into the model's
    /// context (and a session's checkpoint) whole.
    max_result_bytes: usize,
}

impl McpTool {
    pub(super) async fn call(&self, arguments: &Value) -> Attempt {
        let session = match self.server.session().await {
            Ok(session) => session,
            Err(message) => return Attempt::Retry { message, retry_after: None },
        };
        let mut params = CallToolRequestParams::new(self.name.clone());
        if let Some(object) = arguments.as_object() {
            params = params.with_arguments(object.clone());
        }
        match session.call_tool(params).await {
            Ok(result) => done(result, self.max_result_bytes),
            Err(err) => self.failed(&session, err).await,
        }
    }

    /// Whether the server runs this tool as a task (`execution.taskSupport` optional or
    /// required). A server that cannot say is treated as not supporting tasks.
    pub(super) async fn supports_tasks(&self) -> bool {
        let Ok(session) = self.server.session().await else { return false };
        matches!(
            self.server.task_support(&session, &self.name).await,
            Ok(TaskSupport::Optional | TaskSupport::Required)
        )
    }

    /// Starts the call as a task; returns the server's task id.
    pub(super) async fn start_task(&self, arguments: &Value, ttl: Duration) -> Result<String, Attempt> {
        let session =
            self.server.session().await.map_err(|message| Attempt::Retry { message, retry_after: None })?;
        let mut params = CallToolRequestParams::new(self.name.clone())
            .with_task(TaskMetadata::new().with_ttl(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
        if let Some(object) = arguments.as_object() {
            params = params.with_arguments(object.clone());
        }
        match session.send_request(ClientRequest::CallToolRequest(CallToolRequest::new(params))).await {
            Ok(ServerResult::CreateTaskResult(created)) => Ok(created.task.task_id),
            Ok(ServerResult::CallToolResult(result)) => Err(done(result, self.max_result_bytes)),
            Ok(_) => Err(Attempt::Fail("MCP server answered a task call with something else".into())),
            Err(err) => Err(self.failed(&session, err).await),
        }
    }

    /// Polls a task until it ends, then fetches its result. Runs until cancelled by the
    /// caller's deadline. `on_status` sees every status polled.
    pub(super) async fn finish_task(
        &self,
        task_id: &str,
        poll: Duration,
        mut on_status: impl FnMut(&str),
    ) -> Attempt {
        loop {
            let session = match self.server.session().await {
                Ok(session) => session,
                Err(message) => return Attempt::Retry { message, retry_after: None },
            };
            let request = ClientRequest::GetTaskRequest(GetTaskRequest::new(GetTaskParams::new(task_id)));
            let (status, wait) = match session.send_request(request).await {
                Ok(ServerResult::GetTaskResult(got)) => (got.task.status, got.task.poll_interval),
                Ok(_) => return Attempt::Fail("MCP server answered tasks/get with something else".into()),
                Err(err) => return self.failed(&session, err).await,
            };
            on_status(status_name(&status));
            match status {
                TaskStatus::Working | TaskStatus::InputRequired => {
                    let wait = wait
                        .map_or(poll, Duration::from_millis)
                        .clamp(Duration::from_millis(50), poll.max(Duration::from_millis(50)));
                    tokio::time::sleep(wait).await;
                }
                TaskStatus::Completed | TaskStatus::Failed => {
                    let request = ClientRequest::GetTaskPayloadRequest(GetTaskPayloadRequest::new(
                        GetTaskPayloadParams::new(task_id),
                    ));
                    return match session.send_request(request).await {
                        Ok(ServerResult::CallToolResult(result)) => done(result, self.max_result_bytes),
                        Ok(_) if status == TaskStatus::Failed => Attempt::Fail("the MCP task failed".into()),
                        Ok(_) => Attempt::Fail("MCP server answered tasks/result with something else".into()),
                        Err(err) => self.failed(&session, err).await,
                    };
                }
                TaskStatus::Cancelled => return Attempt::Fail("the MCP task was cancelled".into()),
                _ => return Attempt::Fail(format!("the MCP task is in an unknown state: {status:?}")),
            }
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
/// content as JSON. A result past `max` bytes fails the call, so the model gets an error saying
/// so rather than the result.
pub(super) fn done(result: CallToolResult, max: usize) -> Attempt {
    let texts: Vec<&str> =
        result.content.iter().filter_map(|c| c.as_text()).map(|t| t.text.as_str()).collect();
    let size = texts.iter().map(|t| t.len() + 1).sum::<usize>().saturating_sub(1);
    if size > max {
        return too_large(max);
    }
    let content = if texts.is_empty() {
        result.structured_content.as_ref().map(Value::to_string).unwrap_or_default()
    } else {
        texts.join("\n")
    };
    if content.len() > max {
        return too_large(max);
    }
    Attempt::Done { content, is_error: result.is_error.unwrap_or(false) }
}

fn too_large(max: usize) -> Attempt {
    Attempt::Fail(format!("tool result larger than {max} bytes (tool_loop.max_response_bytes)"))
}

pub(super) fn status_name(status: &TaskStatus) -> &'static str {
    match status {
        TaskStatus::Working => "working",
        TaskStatus::InputRequired => "input_required",
        TaskStatus::Completed => "completed",
        TaskStatus::Failed => "failed",
        TaskStatus::Cancelled => "cancelled",
        _ => "unknown",
    }
}
