//! Composing a turn: what goes upstream and what the transcript records, from the stored
//! checkpoint and the client's messages (full history or append), with the goal lock applied.
//! Pure functions over JSON bytes; no I/O.

use serde_json::value::RawValue;
use serde_json::Value;

use crate::openai::ChatRequest;
use crate::session::{Checkpoint, GoalLock, OnGoalConflict};
use crate::tools::record::ToolRecord;

/// A composed turn.
pub(crate) struct Composed {
    /// The conversation as the transcript records it (without the goal block).
    pub(crate) conversation: Vec<Box<RawValue>>,
    /// The request to send upstream, when it is not the client's as sent.
    pub(crate) upstream: Option<ChatRequest>,
    /// The client's earlier messages differed from the transcript.
    pub(crate) rewrote_history: bool,
}

/// Builds the upstream request: full-history requests without a goal go byte for byte;
/// otherwise only the `messages` array is replaced.
pub(crate) fn compose(
    checkpoint: &mut Checkpoint,
    request: &ChatRequest,
    append: bool,
) -> Result<Composed, GoalConflict> {
    let messages = request.messages();
    let mut rewrote_history = false;
    // A partial answer the client echoes back becomes the whole answer plus the gateway's
    // tool results (see `tools::record`); the body is then rebuilt like an append body.
    let expanded = ToolRecord::from_raw(checkpoint.tools.as_deref()).expand(messages);
    let messages = expanded.as_deref().unwrap_or(messages);
    let splice = append || expanded.is_some();
    let conversation = if append {
        let mut all = checkpoint.transcript.clone();
        all.extend(messages.iter().cloned());
        all
    } else {
        rewrote_history = !is_prefix(&checkpoint.transcript, messages);
        messages.to_vec()
    };
    let (conversation, with_goal) = apply_goal(checkpoint.goal.as_mut(), conversation)?;
    let upstream = match (with_goal, splice) {
        (Some(upstream), _) => Some(request.with_messages(upstream)),
        (None, true) => Some(request.with_messages(conversation.clone())),
        (None, false) => None,
    };
    Ok(Composed { conversation, upstream, rewrote_history })
}

/// The conversation a stored upstream request carried: its messages without the goal block.
pub(crate) fn conversation_of(request: &ChatRequest, goal: Option<&GoalLock>) -> Vec<Box<RawValue>> {
    let block = goal.map(GoalLock::block);
    request.messages().iter().filter(|m| block.as_ref().is_none_or(|b| b.get() != m.get())).cloned().collect()
}

/// The request changes the system prompt a goal lock guards.
pub(crate) struct GoalConflict;

/// With a locked goal: checks (or, on the first request after locking, captures) the leading
/// system messages, and places the goal block right after them. Returns the conversation as
/// the transcript records it (without the block) and, under a goal, the messages to send.
#[allow(clippy::type_complexity)]
pub(crate) fn apply_goal(
    goal: Option<&mut GoalLock>,
    mut conversation: Vec<Box<RawValue>>,
) -> Result<(Vec<Box<RawValue>>, Option<Vec<Box<RawValue>>>), GoalConflict> {
    let Some(goal) = goal else {
        return Ok((conversation, None));
    };
    let leading = conversation.iter().take_while(|m| is_system(m)).count();
    match &goal.system {
        None => goal.system = Some(conversation[..leading].to_vec()),
        Some(locked) => {
            let same =
                locked.len() == leading && locked.iter().zip(&conversation).all(|(a, b)| same_message(a, b));
            if !same {
                match goal.on_conflict {
                    OnGoalConflict::Reject => return Err(GoalConflict),
                    OnGoalConflict::Keep => {
                        conversation.splice(..leading, locked.iter().cloned());
                    }
                }
            }
        }
    }
    let leading = goal.system.as_ref().map_or(0, Vec::len);
    let mut upstream = Vec::with_capacity(conversation.len() + 1);
    upstream.extend_from_slice(&conversation[..leading]);
    upstream.push(goal.block());
    upstream.extend_from_slice(&conversation[leading..]);
    Ok((conversation, Some(upstream)))
}

fn is_system(message: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Role<'_>>(message.get())
        .is_ok_and(|r| matches!(r.role.as_deref(), Some("system" | "developer")))
}

/// Whether the stored transcript is the start of what the client sent: byte-identical, or
/// equal as JSON (a client may re-serialise with other spacing or key order).
pub(crate) fn is_prefix(transcript: &[Box<RawValue>], sent: &[Box<RawValue>]) -> bool {
    transcript.len() <= sent.len() && transcript.iter().zip(sent).all(|(a, b)| same_message(a, b))
}

pub(crate) fn same_message(a: &RawValue, b: &RawValue) -> bool {
    a.get() == b.get()
        || matches!(
            (serde_json::from_str::<Value>(a.get()), serde_json::from_str::<Value>(b.get())),
            (Ok(x), Ok(y)) if x == y
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn prefix_matching_tolerates_reserialisation() {
        let stored = [raw(r#"{"role":"user","content":"hi"}"#)];
        let same = [raw(r#"{ "content": "hi", "role": "user" }"#), raw(r#"{"role":"user"}"#)];
        let edited = [raw(r#"{"role":"user","content":"HI"}"#), raw(r#"{"role":"user"}"#)];
        assert!(is_prefix(&stored, &same));
        assert!(!is_prefix(&stored, &edited));
        assert!(!is_prefix(&stored, &[]));
        assert!(is_prefix(&[], &edited));
    }

    #[test]
    fn the_goal_block_is_removed_from_a_stored_request() {
        let goal = GoalLock {
            goal: "g".into(),
            strategy: None,
            constraints: vec![],
            locked_ms: 0,
            on_conflict: OnGoalConflict::Reject,
            block: None,
            system: None,
        };
        let block = goal.block();
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"s"}},{},{{"role":"user"}}]}}"#,
            block.get()
        );
        let request = ChatRequest::parse(bytes::Bytes::from(body)).unwrap();
        let conversation = conversation_of(&request, Some(&goal));
        assert_eq!(conversation.len(), 2);
        assert_eq!(conversation[1].get(), r#"{"role":"user"}"#);
    }
}
