//! The link between tool tasks and the session that owns them: a running call reports each
//! state change here, and the owner writes it into the checkpoint, so a restart finds the task
//! by tool and arguments and finishes it instead of starting it again.

use std::sync::Mutex;

use super::record::TaskEntry;

/// Where a task's state changes go (the session's checkpoint).
pub(crate) type TaskSink = Box<dyn Fn(TaskEntry) + Send + Sync>;

pub struct TaskLog {
    pub request_id: String,
    known: Mutex<Vec<TaskEntry>>,
    updates: TaskSink,
}

impl std::fmt::Debug for TaskLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskLog").field("request_id", &self.request_id).finish_non_exhaustive()
    }
}

impl TaskLog {
    /// A log over the tasks the checkpoint holds (those of `request_id`); each update also goes
    /// to `updates`.
    pub fn new(request_id: &str, mut known: Vec<TaskEntry>, updates: TaskSink) -> Self {
        known.retain(|t| t.request_id == request_id);
        Self { request_id: request_id.to_string(), known: Mutex::new(known), updates }
    }

    /// A task for this call that did not fail: still running, or finished with a result.
    pub fn find(&self, tool: &str, arguments: &str) -> Option<TaskEntry> {
        let known = self.known.lock().ok()?;
        known
            .iter()
            .rev()
            .find(|t| {
                t.tool == tool
                    && t.arguments == arguments
                    && (!t.is_finished() || (t.state == "completed" && t.result.is_some()))
            })
            .cloned()
    }

    pub fn update(&self, entry: TaskEntry) {
        if let Ok(mut known) = self.known.lock() {
            match known.iter_mut().find(|t| {
                t.tool == entry.tool && t.arguments == entry.arguments && t.created_ms == entry.created_ms
            }) {
                Some(slot) => *slot = entry.clone(),
                None => known.push(entry.clone()),
            }
        }
        (self.updates)(entry);
    }
}
