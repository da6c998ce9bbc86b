//! Composing a turn: what goes upstream and what the transcript records, from the stored
//! checkpoint and the client's messages (full history or append), with the goal lock applied.
//! Pure functions over JSON bytes; no I/O.

use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::session::{Checkpoint, GoalLock, OnGoalConflict};

/// A composed turn.
pub struct Composed {
    /// The conversation as the transcript records it (without the goal block).
    pub conversation: Vec<Box<RawValue>>,
    /// The body to send upstream.
    pub body: Bytes,
    /// The client's earlier messages differed from the transcript.
    pub rewrote_history: bool,
}

/// Builds the upstream body: full-history requests without a goal go byte for byte; otherwise
/// only the `messages` array is replaced.
pub fn compose(
    checkpoint: &mut Checkpoint,
    body: &Bytes,
    messages: &[Box<RawValue>],
    span: Range<usize>,
    append: bool,
) -> Result<Composed, GoalConflict> {
    let mut rewrote_history = false;
    // A partial answer the client echoes back becomes the whole answer plus the gateway's
    // tool results (see `tools::record`); the body is then rebuilt like an append body.
    let expanded = crate::tools::record::ToolRecord::from_raw(checkpoint.tools.as_deref()).expand(messages);
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
    let body = match (&with_goal, splice) {
        (Some(upstream), _) => splice_messages(body, span, upstream),
        (None, true) => splice_messages(body, span, &conversation),
        (None, false) => body.clone(),
    };
    Ok(Composed { conversation, body, rewrote_history })
}

/// The conversation a stored upstream request carried: its messages without the goal block.
pub fn conversation_of(body: &[u8], goal: Option<&GoalLock>) -> Option<Vec<Box<RawValue>>> {
    let (_, messages) = crate::openai::ChatRequestHead::parse_with_messages(body).ok()?;
    let block = goal.map(GoalLock::block);
    Some(
        messages
            .items
            .iter()
            .filter(|m| block.as_ref().is_none_or(|b| b.get() != m.get()))
            .map(|m| (*m).to_owned())
            .collect(),
    )
}

/// Replaces the `messages` array at `span` with `messages`, leaving every other byte as sent.
pub fn splice_messages(body: &[u8], span: Range<usize>, messages: &[Box<RawValue>]) -> Bytes {
    let len: usize = messages.iter().map(|m| m.get().len() + 1).sum();
    let mut out = Vec::with_capacity(body.len() - span.len() + len + 2);
    out.extend_from_slice(&body[..span.start]);
    out.push(b'[');
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(message.get().as_bytes());
    }
    out.push(b']');
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// The request changes the system prompt a goal lock guards.
pub struct GoalConflict;

/// With a locked goal: checks (or, on the first request after locking, captures) the leading
/// system messages, and places the goal block right after them. Returns the conversation as
/// the transcript records it (without the block) and, under a goal, the messages to send.
#[allow(clippy::type_complexity)]
fn apply_goal(
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
pub fn is_prefix(transcript: &[Box<RawValue>], sent: &[Box<RawValue>]) -> bool {
    transcript.len() <= sent.len() && transcript.iter().zip(sent).all(|(a, b)| same_message(a, b))
}

pub fn same_message(a: &RawValue, b: &RawValue) -> bool {
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
    fn splicing_replaces_only_the_messages_array() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#;
        let start = body.windows(12).position(|w| w == b"[{\"role\":\"us").unwrap();
        let end = start + br#"[{"role":"user","content":"new"}]"#.len();
        let messages = [raw(r#"{"role":"user","content":"old"}"#), raw(r#"{"role":"user","content":"new"}"#)];
        let out = splice_messages(body, start..end, &messages);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"old"},{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#
        );
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
        let conversation = conversation_of(body.as_bytes(), Some(&goal)).unwrap();
        assert_eq!(conversation.len(), 2);
        assert_eq!(conversation[1].get(), r#"{"role":"user"}"#);
    }
}
