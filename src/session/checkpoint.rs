//! The checkpoint document: everything a session needs to continue exactly where it stopped.
//!
//! It is versioned by `schema`. Every field added after schema 1 must be `#[serde(default)]`
//! so that checkpoints written by older versions keep loading; the fixture test below pins the
//! schema-1 shape. Messages are kept as the exact JSON the client sent or the model answered
//! (`RawValue`), so a resumed session re-sends byte-identical history.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The schema this build writes.
pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    pub schema: u32,
    /// The conversation so far, one JSON message each, exactly as sent upstream.
    #[serde(default)]
    pub transcript: Vec<Box<RawValue>>,
    #[serde(default)]
    pub goal: Option<GoalLock>,
    #[serde(default)]
    pub usage: UsageTotals,
    /// Set while a request on the session is being served.
    #[serde(default)]
    pub in_flight: Option<InFlight>,
    /// Context compression state (`compress::SessionRecord`: the frozen epoch, the state sheet,
    /// and the previous request's message hashes), opaque to the session layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Box<RawValue>>,
    /// Reserved for gateway tool and task state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Box<RawValue>>,
    /// Client edits of earlier history that the transcript followed.
    #[serde(default)]
    pub history_rewrites: u64,
    /// The turn whose events the event log holds (the last streamed turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_turn: Option<u64>,
    /// `stream_turn` once it is committed. The log never holds the stream's `[DONE]` (a
    /// follower would see it before the commit): a follower that finds this ends with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_committed: Option<u64>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A locked goal: sent upstream on every request of the session as one fixed system message,
/// and guarded against system-prompt changes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GoalLock {
    pub goal: String,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub constraints: Vec<String>,
    pub locked_ms: u64,
    #[serde(default)]
    pub on_conflict: OnGoalConflict,
    /// The system message carrying the goal, rendered once when locked so its bytes never
    /// change afterwards (not by restarts, nor by later versions of ctxgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<Box<RawValue>>,
    /// The client's leading system messages, captured at the first request after locking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Vec<Box<RawValue>>>,
}

/// What a request that changes the locked system prompt gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnGoalConflict {
    /// 409 `goal_locked`.
    #[default]
    Reject,
    /// Sent with the locked system prompt instead of the client's.
    Keep,
}

impl GoalLock {
    /// The goal's system message. Schema-1 checkpoints have no stored block; it is rendered
    /// from the fields the same way every time.
    pub fn block(&self) -> Box<RawValue> {
        if let Some(block) = &self.block {
            return block.clone();
        }
        let mut text = format!("Locked goal for this session. Keep to it.\nGoal: {}", self.goal);
        if let Some(strategy) = &self.strategy {
            text.push_str(&format!("\nStrategy: {strategy}"));
        }
        if !self.constraints.is_empty() {
            text.push_str("\nConstraints:");
            for c in &self.constraints {
                text.push_str(&format!("\n- {c}"));
            }
        }
        let message = serde_json::json!({"role": "system", "content": text});
        serde_json::value::to_raw_value(&message).unwrap_or_else(|_| RawValue::NULL.to_owned())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

/// The marker of a request in progress: who serves it, until when its lease holds, and the
/// request itself, so another process can re-issue it if the owner dies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InFlight {
    pub request_id: String,
    /// The process serving it (random per process start).
    pub owner: String,
    pub lease_until_ms: u64,
    pub started_ms: u64,
    /// The turn's id: the session version its admission created.
    #[serde(default)]
    pub turn: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<StoredRequest>,
}

/// An upstream request exactly as sent (never its credentials).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredRequest {
    pub path: String,
    pub model: String,
    /// The turn's events are logged for the session's stream endpoint (a streamed chat turn;
    /// a front end that re-issues its own requests records `false`).
    pub stream: bool,
    pub body: Box<RawValue>,
    /// The conversation the turn commits, when compression made `body` carry less of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Vec<Box<RawValue>>>,
    /// The upstream takes the caller's own credential, which is never stored: only a caller
    /// (a follower, a resume call, the next request) can re-issue the turn, not the sweep.
    /// Markers written before this field existed are treated as needing it.
    #[serde(default = "needs_caller")]
    pub caller_credential: bool,
    /// The front end that began the turn, when it has work of its own to finish after a
    /// takeover (a background response: `responses:{id}`); opaque here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

fn needs_caller() -> bool {
    true
}

impl Checkpoint {
    pub fn new(now_ms: u64) -> Self {
        Self {
            schema: SCHEMA,
            transcript: Vec::new(),
            goal: None,
            usage: UsageTotals::default(),
            in_flight: None,
            compression: None,
            tools: None,
            history_rewrites: 0,
            stream_turn: None,
            stream_committed: None,
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising owned, already-valid JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Serialises once for a store's commit; the caller keeps the size for its metrics.
    pub fn encode(&self) -> Encoded {
        let sweepable = self
            .in_flight
            .as_ref()
            .filter(|f| f.request.as_ref().is_some_and(|r| !r.caller_credential))
            .map(|f| f.lease_until_ms);
        let lease_until_ms = self.in_flight.as_ref().map_or(0, |f| f.lease_until_ms);
        Encoded { doc: self.to_bytes().into(), sweepable, lease_until_ms }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A checkpoint serialised for a store; cheap to clone (a blocking-pool write takes its own
/// handle without copying).
#[derive(Clone, Debug)]
pub struct Encoded {
    doc: bytes::Bytes,
    /// The lease end of a turn in flight that any process can re-issue: the store keeps such
    /// sessions in its in-flight index, for the takeover sweep.
    sweepable: Option<u64>,
    /// When the in-flight turn's lease ends (0: no turn), for a store that keeps it beside the
    /// document so waiters can read it alone.
    lease_until_ms: u64,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.doc
    }

    pub fn len(&self) -> usize {
        self.doc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.doc.is_empty()
    }

    /// Where the in-flight index should place this session: its lease end, or `None` to
    /// drop it from the index.
    pub fn sweepable_until(&self) -> Option<u64> {
        self.sweepable
    }

    pub fn lease_until_ms(&self) -> u64 {
        self.lease_until_ms
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint as schema 1 writes it. Never edit this fixture: add a new one per schema.
    const SCHEMA_1: &str = r#"{"schema":1,"transcript":[{"role":"user","content":"hi","x":{"b":1,"a":2}},{"role":"assistant","content":"hello"}],"goal":{"goal":"ship","strategy":null,"constraints":["no deps"],"locked_ms":5,"on_conflict":"reject"},"usage":{"requests":1,"prompt_tokens":12,"completion_tokens":5,"cached_tokens":4},"in_flight":null,"history_rewrites":0,"created_ms":1,"updated_ms":2}"#;

    #[test]
    fn schema_1_documents_load() {
        let cp = Checkpoint::from_bytes(SCHEMA_1.as_bytes()).unwrap();
        assert_eq!(cp.transcript.len(), 2);
        assert_eq!(cp.transcript[0].get(), r#"{"role":"user","content":"hi","x":{"b":1,"a":2}}"#);
        let goal = cp.goal.unwrap();
        assert_eq!(goal.constraints, ["no deps"]);
        assert_eq!(goal.on_conflict, OnGoalConflict::Reject);
        assert_eq!(
            goal.block().get(),
            r#"{"content":"Locked goal for this session. Keep to it.\nGoal: ship\nConstraints:\n- no deps","role":"system"}"#
        );
        assert_eq!(cp.usage.cached_tokens, 4);
    }

    #[test]
    fn round_trip_keeps_message_bytes() {
        let cp = Checkpoint::from_bytes(SCHEMA_1.as_bytes()).unwrap();
        let again = Checkpoint::from_bytes(&cp.to_bytes()).unwrap();
        assert_eq!(again.transcript[0].get(), cp.transcript[0].get());
        assert_eq!(String::from_utf8(cp.to_bytes()).unwrap(), SCHEMA_1);
    }

    #[test]
    fn a_minimal_document_loads_with_defaults() {
        let cp = Checkpoint::from_bytes(br#"{"schema":1,"created_ms":1,"updated_ms":1}"#).unwrap();
        assert!(cp.transcript.is_empty() && cp.goal.is_none() && cp.in_flight.is_none());
    }
}
