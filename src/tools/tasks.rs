//! The link between tool tasks and the session that owns them: a running call reports each
//! state change here, and the session holder writes it into the checkpoint, so a restart
//! finds the task by tool and arguments and finishes it instead of starting it again.

use std::sync::Mutex;

use tokio::sync::mpsc;

use super::record::TaskEntry;

#[derive(Debug)]
pub struct TaskLog {
    pub request_id: String,
    known: Mutex<Vec<TaskEntry>>,
    updates: mpsc::UnboundedSender<TaskEntry>,
}

impl TaskLog {
    /// A log over the tasks the checkpoint holds; updates arrive on the receiver.
    pub fn new(request_id: &str, mut known: Vec<TaskEntry>) -> (Self, mpsc::UnboundedReceiver<TaskEntry>) {
        let (updates, receiver) = mpsc::unbounded_channel();
        known.retain(|t| t.request_id == request_id);
        (Self { request_id: request_id.to_string(), known: Mutex::new(known), updates }, receiver)
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
        let _ = self.updates.send(entry);
    }
}
