//! What a session keeps of gateway tool runs, in the checkpoint's `tools` field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Expansions kept per session: a client that echoes an answer from further back than this
/// has rewritten its history anyway.
const MAX_EXPANSIONS: usize = 32;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ToolRecord {
    /// Answers that mixed gateway and client calls: the client got only its own calls; the
    /// next turn sends the model the whole answer with the gateway's results first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expansions: Vec<Expansion>,
    /// Durable tool tasks, newest last; finished ones are kept for `GET .../tasks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskEntry>,
}

/// A tool call run as a task. A turn re-issued after a restart finds its call here by tool and
/// arguments, and polls the same task (or takes its result) instead of starting another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// The request (turn) that started it: a resumed turn keeps its request id, a new turn
    /// that happens to make the same call does not reuse the task.
    pub request_id: String,
    pub tool_call_id: String,
    pub tool: String,
    /// The arguments as canonical JSON.
    pub arguments: String,
    /// The MCP server's task id; `None` for a task ctxgate runs itself (an `async` HTTP
    /// tool), which a restart runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// `working`, `input_required`, `completed`, `failed`, `cancelled`, or `timeout`.
    pub state: String,
    pub attempts: u32,
    pub created_ms: u64,
    pub deadline_ms: u64,
    pub updated_ms: u64,
    /// The tool message content, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default)]
    pub is_error: bool,
}

impl TaskEntry {
    pub fn is_finished(&self) -> bool {
        !matches!(self.state.as_str(), "working" | "input_required")
    }
}

/// Finished tasks kept per session.
const MAX_TASKS: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Expansion {
    /// The ids of the calls the client got, in order: how its echo of the answer is found.
    pub client_call_ids: Vec<String>,
    /// The assistant message as the model wrote it.
    pub full: Box<RawValue>,
    /// The gateway's `tool` messages, in call order.
    pub results: Vec<Box<RawValue>>,
}

impl ToolRecord {
    pub(crate) fn from_raw(raw: Option<&RawValue>) -> Self {
        raw.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
    }

    /// Keeps an expansion; the oldest go first past [`MAX_EXPANSIONS`].
    pub(crate) fn remember(&mut self, expansion: Expansion) {
        self.expansions.push(expansion);
        if self.expansions.len() > MAX_EXPANSIONS {
            self.expansions.remove(0);
        }
    }

    /// Records a task's new state (by tool call id, tool and arguments).
    pub(crate) fn upsert(&mut self, entry: TaskEntry) {
        let same = |t: &TaskEntry| {
            t.tool == entry.tool && t.arguments == entry.arguments && t.created_ms == entry.created_ms
        };
        match self.tasks.iter_mut().find(|t| same(t)) {
            Some(slot) => *slot = entry,
            None => self.tasks.push(entry),
        }
        while self.tasks.len() > MAX_TASKS {
            match self.tasks.iter().position(TaskEntry::is_finished) {
                Some(i) => {
                    self.tasks.remove(i);
                }
                None => break,
            }
        }
    }

    /// The client's messages with each echoed partial answer replaced by the whole answer and
    /// the gateway's results; `None` when none is found.
    pub(crate) fn expand(&self, messages: &[Box<RawValue>]) -> Option<Vec<Box<RawValue>>> {
        if self.expansions.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(messages.len() + 4);
        let mut changed = false;
        for message in messages {
            let found =
                call_ids(message).and_then(|ids| self.expansions.iter().find(|e| e.client_call_ids == ids));
            match found {
                Some(expansion) => {
                    out.push(expansion.full.clone());
                    out.extend(expansion.results.iter().cloned());
                    changed = true;
                }
                None => out.push(message.clone()),
            }
        }
        changed.then_some(out)
    }

    pub(crate) fn to_raw(&self) -> Option<Box<RawValue>> {
        if self.expansions.is_empty() && self.tasks.is_empty() {
            return None;
        }
        serde_json::value::to_raw_value(self).ok()
    }
}

/// The tool-call ids of an assistant message that has calls.
fn call_ids(message: &RawValue) -> Option<Vec<String>> {
    if !message.get().contains("\"tool_calls\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(message.get()).ok()?;
    if value.get("role").and_then(|r| r.as_str()) != Some("assistant") {
        return None;
    }
    let calls = value.get("tool_calls")?.as_array()?;
    let ids: Vec<String> =
        calls.iter().filter_map(|c| c.get("id").and_then(|i| i.as_str()).map(str::to_string)).collect();
    (!ids.is_empty()).then_some(ids)
}
