//! What a session keeps of gateway tool runs, in the checkpoint's `tools` field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Expansions kept per session: a client that echoes an answer from further back than this
/// has rewritten its history anyway.
const MAX_EXPANSIONS: usize = 32;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ToolRecord {
    /// Answers that mixed gateway and client calls: the client got only its own calls; the
    /// next turn sends the model the whole answer with the gateway's results first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expansions: Vec<Expansion>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Expansion {
    /// The ids of the calls the client got, in order: how its echo of the answer is found.
    pub client_call_ids: Vec<String>,
    /// The assistant message as the model wrote it.
    pub full: Box<RawValue>,
    /// The gateway's `tool` messages, in call order.
    pub results: Vec<Box<RawValue>>,
}

impl ToolRecord {
    pub fn from_raw(raw: Option<&RawValue>) -> Self {
        raw.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
    }

    /// Keeps an expansion; the oldest go first past [`MAX_EXPANSIONS`].
    pub fn remember(&mut self, expansion: Expansion) {
        self.expansions.push(expansion);
        if self.expansions.len() > MAX_EXPANSIONS {
            self.expansions.remove(0);
        }
    }

    /// The client's messages with each echoed partial answer replaced by the whole answer and
    /// the gateway's results; `None` when none is found.
    pub fn expand(&self, messages: &[Box<RawValue>]) -> Option<Vec<Box<RawValue>>> {
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

    pub fn to_raw(&self) -> Option<Box<RawValue>> {
        if self.expansions.is_empty() {
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
