//! One round of gateway tool calls: all at once on a `JoinSet`, each bounded by the global and
//! its tool's concurrency limit, validated first, with a deadline covering its retries.
//! Whatever happens, every call gets a result in call order: failures become structured
//! errors (`{"error", "kind"}`) the model can read, and the turn goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinSet;

use super::record::TaskEntry;
use super::tasks::TaskLog;
use super::{Backend, Call, Registry, Tool};
use crate::telemetry::{ToolLabel, ToolOutcomeLabel};

/// What a call produced: the content of its `tool` message, and how it ran.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub call: Call,
    pub content: String,
    pub run: ToolRun,
}

/// The record of one call, returned to clients under `ctxgate.tool_runs`.
#[derive(Clone, Debug, Serialize)]
pub struct ToolRun {
    pub tool: String,
    pub tool_call_id: String,
    /// When it started running, after the round began (time spent waiting for a permit).
    pub started_after_ms: u64,
    pub duration_ms: u64,
    pub attempts: u32,
    /// `ok`, `tool_error` (the tool answered with an error), `timeout`, `invalid_arguments`,
    /// `upstream_error` (unreachable, an error status, or a response too large).
    pub outcome: &'static str,
}

/// Why a call produced no result.
#[derive(Debug)]
pub(super) struct Failure {
    pub kind: Kind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Timeout,
    InvalidArguments,
    Upstream,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::Timeout => "timeout",
            Kind::InvalidArguments => "invalid_arguments",
            Kind::Upstream => "upstream_error",
        }
    }
}

/// One attempt's result, as the backends report it.
pub(super) enum Attempt {
    /// The tool's answer. `is_error` marks an answer the tool itself flagged as an error (MCP
    /// `isError`): returned to the model as it is, but counted as `tool_error`.
    Done { content: String, is_error: bool },
    /// Worth another attempt (connect error, 5xx, 429), after `retry_after` if the tool said.
    Retry { message: String, retry_after: Option<Duration> },
    /// Final (4xx, a response too large, a protocol error).
    Fail(String),
}

impl Registry {
    /// Runs every call concurrently and returns their outcomes in the order of `calls`.
    pub async fn run_all(&self, calls: Vec<Call>, tasks: Option<Arc<TaskLog>>) -> Vec<Outcome> {
        let round = Instant::now();
        let mut set = JoinSet::new();
        let count = calls.len();
        for (index, call) in calls.into_iter().enumerate() {
            let tool = self.tools.get(&call.name).cloned();
            let global = self.permits.clone();
            let tasks = tasks.clone();
            let limits = self.limits.clone();
            let in_flight = self.metrics.tools.tasks_in_flight.clone();
            set.spawn(async move {
                let context =
                    TaskContext { log: tasks.as_deref(), poll: limits.task_poll_interval, in_flight };
                let outcome = match tool {
                    Some(tool) => run_one(&tool, &global, call, round, context).await,
                    None => unknown(call),
                };
                (index, outcome)
            });
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
        while let Some(joined) = set.join_next().await {
            if let Ok((index, outcome)) = joined {
                outcomes[index] = Some(outcome);
            }
        }
        let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
        for outcome in &outcomes {
            self.observe(&outcome.run);
        }
        outcomes
    }

    fn observe(&self, run: &ToolRun) {
        let tools = &self.metrics.tools;
        let outcome = ToolOutcomeLabel { tool: self.label(&run.tool), outcome: run.outcome };
        tools.calls.get_or_create(&outcome).inc();
        let label = ToolLabel { tool: self.label(&run.tool) };
        tools.duration.get_or_create(&label).observe(run.duration_ms as f64 / 1000.0);
        tools.attempts.get_or_create(&label).observe(f64::from(run.attempts));
    }

    /// Metric label: configured names only, so a model inventing names cannot grow the series.
    fn label(&self, name: &str) -> String {
        if self.tools.contains_key(name) {
            name.to_string()
        } else {
            "unknown".into()
        }
    }
}

/// A structured error as a tool message's content.
pub(super) fn error_content(kind: Kind, message: &str) -> String {
    serde_json::json!({"error": message, "kind": kind.as_str()}).to_string()
}

fn unknown(call: Call) -> Outcome {
    let content = error_content(Kind::InvalidArguments, &format!("no gateway tool is named `{}`", call.name));
    let run = ToolRun {
        tool: call.name.clone(),
        tool_call_id: call.id.clone(),
        started_after_ms: 0,
        duration_ms: 0,
        attempts: 0,
        outcome: Kind::InvalidArguments.as_str(),
    };
    Outcome { call, content, run }
}

/// Where a call that runs as a task reports its state.
struct TaskContext<'a> {
    log: Option<&'a TaskLog>,
    poll: Duration,
    in_flight: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
}

async fn run_one(
    tool: &Tool,
    global: &tokio::sync::Semaphore,
    call: Call,
    round: Instant,
    context: TaskContext<'_>,
) -> Outcome {
    // Permits are held for the whole call; the deadline starts once they are granted, so a
    // queued call is not timed out by the calls ahead of it.
    let _tool_permit = tool.permits.acquire().await;
    let _global_permit = global.acquire().await;
    let started = Instant::now();
    let started_after_ms = millis(started - round);
    let (result, attempts) = match validate(tool, &call.arguments) {
        Err(message) => (Err(Failure { kind: Kind::InvalidArguments, message }), 0),
        Ok(arguments) => {
            if runs_as_task(tool).await {
                run_task(tool, &call, arguments, &context).await
            } else {
                execute(tool, arguments).await
            }
        }
    };
    let (content, outcome) = match result {
        Ok((content, false)) => (content, "ok"),
        Ok((content, true)) => (content, "tool_error"),
        Err(failure) => (error_content(failure.kind, &failure.message), failure.kind.as_str()),
    };
    let run = ToolRun {
        tool: call.name.clone(),
        tool_call_id: call.id.clone(),
        started_after_ms,
        duration_ms: millis(started.elapsed()),
        attempts,
        outcome,
    };
    Outcome { call, content, run }
}

/// Parses and validates the arguments against the tool's schema; the message lists every
/// violation with its JSON pointer.
fn validate(tool: &Tool, arguments: &str) -> Result<Value, String> {
    let text = if arguments.trim().is_empty() { "{}" } else { arguments };
    let value: Value = serde_json::from_str(text).map_err(|e| format!("arguments are not JSON: {e}"))?;
    let errors: Vec<String> = tool
        .validator
        .iter_errors(&value)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(errors.join("; "))
    }
}

/// Attempts the call until it succeeds, fails for good, or the deadline passes. Returns the
/// result and the number of attempts made.
pub(super) async fn execute(tool: &Tool, arguments: Value) -> (Result<(String, bool), Failure>, u32) {
    let deadline = tokio::time::Instant::now() + tool.config.timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = match &tool.backend {
            Backend::Http(http) => tokio::time::timeout_at(deadline, http.call(&arguments)).await,
            Backend::Mcp(mcp) => tokio::time::timeout_at(deadline, mcp.call(&arguments)).await,
        };
        let timeout = || Failure {
            kind: Kind::Timeout,
            message: format!("no answer within {}", humantime::format_duration(tool.config.timeout)),
        };
        match attempt {
            Err(_elapsed) => return (Err(timeout()), attempts),
            Ok(Attempt::Done { content, is_error }) => return (Ok((content, is_error)), attempts),
            Ok(Attempt::Fail(message)) => return (Err(Failure { kind: Kind::Upstream, message }), attempts),
            Ok(Attempt::Retry { message, retry_after }) => {
                if attempts > tool.config.retries {
                    return (Err(Failure { kind: Kind::Upstream, message }), attempts);
                }
                let wait = retry_after.unwrap_or_else(|| backoff(attempts - 1));
                if tokio::time::Instant::now() + wait >= deadline {
                    // Waiting would outlast the deadline: report what the tool said.
                    return (Err(Failure { kind: Kind::Upstream, message }), attempts);
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn runs_as_task(tool: &Tool) -> bool {
    match &tool.backend {
        Backend::Mcp(mcp) => tool.config.run_as_task || mcp.supports_tasks().await,
        Backend::Http(_) => tool.config.run_as_task,
    }
}

/// Runs a call as a task: an MCP task on servers that support them (started once, polled
/// until it ends), otherwise the call itself under a task record. With a session, every state
/// change goes to the checkpoint; a re-issued turn picks the same task up.
async fn run_task(
    tool: &Tool,
    call: &Call,
    arguments: Value,
    context: &TaskContext<'_>,
) -> (Result<(String, bool), Failure>, u32) {
    let canonical = arguments.to_string();
    let now = now_ms();
    let mut entry =
        context.log.and_then(|log| log.find(&tool.config.name, &canonical)).unwrap_or(TaskEntry {
            request_id: context.log.map(|l| l.request_id.clone()).unwrap_or_default(),
            tool_call_id: call.id.clone(),
            tool: tool.config.name.clone(),
            arguments: canonical,
            remote_id: None,
            state: "working".into(),
            attempts: 0,
            created_ms: now,
            deadline_ms: now + millis(tool.config.timeout),
            updated_ms: now,
            result: None,
            is_error: false,
        });
    if let (true, Some(result)) = (entry.state == "completed", entry.result.clone()) {
        return (Ok((result, entry.is_error)), entry.attempts);
    }
    let report = |entry: &TaskEntry| {
        if let Some(log) = context.log {
            log.update(entry.clone());
        }
    };
    entry.attempts += 1;
    entry.tool_call_id = call.id.clone();
    entry.updated_ms = now;
    report(&entry);
    context.in_flight.inc();
    let remaining = Duration::from_millis(entry.deadline_ms.saturating_sub(now));
    let deadline = tokio::time::Instant::now() + remaining;
    let attempt = match &tool.backend {
        Backend::Mcp(mcp) if mcp.supports_tasks().await => {
            let polled = async {
                let task_id = match entry.remote_id.clone() {
                    Some(id) => id,
                    None => match mcp.start_task(&arguments, remaining).await {
                        Ok(id) => {
                            entry.remote_id = Some(id.clone());
                            report(&entry);
                            id
                        }
                        Err(attempt) => return attempt,
                    },
                };
                mcp.finish_task(&task_id, context.poll, |_| {}).await
            };
            tokio::time::timeout_at(deadline, polled).await
        }
        _ => Ok(match execute(tool, arguments).await {
            (Ok((content, is_error)), _) => Attempt::Done { content, is_error },
            (Err(failure), _) if failure.kind == Kind::Timeout => {
                context.in_flight.dec();
                return finish_task(entry, Err(failure), report);
            }
            (Err(failure), _) => Attempt::Fail(failure.message),
        }),
    };
    context.in_flight.dec();
    let result = match attempt {
        Err(_elapsed) => Err(Failure {
            kind: Kind::Timeout,
            message: format!(
                "the task did not finish within {}",
                humantime::format_duration(tool.config.timeout)
            ),
        }),
        Ok(Attempt::Done { content, is_error }) => Ok((content, is_error)),
        Ok(Attempt::Retry { message, .. } | Attempt::Fail(message)) => {
            Err(Failure { kind: Kind::Upstream, message })
        }
    };
    finish_task(entry, result, report)
}

fn finish_task(
    mut entry: TaskEntry,
    result: Result<(String, bool), Failure>,
    report: impl Fn(&TaskEntry),
) -> (Result<(String, bool), Failure>, u32) {
    entry.updated_ms = now_ms();
    match &result {
        Ok((content, is_error)) => {
            entry.state = "completed".into();
            entry.result = Some(content.clone());
            entry.is_error = *is_error;
        }
        Err(failure) => {
            entry.state = if failure.kind == Kind::Timeout { "timeout" } else { "failed" }.into();
            entry.result = Some(error_content(failure.kind, &failure.message));
        }
    }
    report(&entry);
    (result, entry.attempts)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Equal-jitter exponential backoff: 100 ms, 200 ms, 400 ms ... up to 2 s, half of it random.
fn backoff(retry: u32) -> Duration {
    let exp =
        Duration::from_millis(100).saturating_mul(2u32.saturating_pow(retry)).min(Duration::from_secs(2));
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Outcome {
    /// The `tool` message answering the call.
    pub fn message(&self) -> Box<serde_json::value::RawValue> {
        let value =
            serde_json::json!({"role": "tool", "tool_call_id": self.call.id, "content": self.content});
        serde_json::value::to_raw_value(&value)
            .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
    }
}
