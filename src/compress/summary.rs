//! The hybrid state sheet: the request of the one LLM call that summarises the span before the
//! recent turns, and the sheet message made from its answer.
//!
//! The call sends the same prefix as the conversation's own requests (system messages, goal
//! block, earlier sheet, compacted span, same `tools`), then one instruction, so on a server
//! with a prompt cache the call itself is mostly a cache hit. Making the call and keeping the
//! sheet until an epoch places it is the chat pipeline's part (`chat::compression`).

use bytes::Bytes;
use serde_json::value::RawValue;

use super::plan::SummaryRequest;

/// The sheet's headings, in order.
pub(crate) const HEADINGS: [&str; 9] = [
    "Active Task",
    "Goal",
    "Constraints",
    "Completed Actions",
    "Active State",
    "In Progress",
    "Blocked",
    "Key Decisions",
    "Resolved Questions",
];

const INSTRUCTION: &str = "Write a state sheet of the conversation above, so that the work can continue \
from it alone once the earlier messages are gone. Use exactly these Markdown headings, in this order: \
## Active Task, ## Goal, ## Constraints, ## Completed Actions, ## Active State, ## In Progress, \
## Blocked, ## Key Decisions, ## Resolved Questions. Keep every fact the user stated, every name, number, \
identifier, file path and value verbatim. Under a heading with nothing to record, write None. \
Do not call tools; answer with the sheet only.";

/// The request body of a summary call to `model`, with the conversation's `tools` (canonical,
/// so the call's prefix matches the conversation's).
pub(crate) fn request_body(
    request: &SummaryRequest,
    model: &str,
    tools: Option<&RawValue>,
    max_tokens: u32,
) -> Result<Bytes, serde_json::Error> {
    let mut messages = request.messages.clone();
    messages
        .push(serde_json::value::to_raw_value(&serde_json::json!({"role": "user", "content": INSTRUCTION}))?);
    let mut body = serde_json::Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), serde_json::to_value(&messages)?);
    if let Some(tools) = tools {
        body.insert("tools".into(), serde_json::from_str(tools.get())?);
    }
    body.insert("stream".into(), false.into());
    body.insert("max_tokens".into(), max_tokens.into());
    body.insert("temperature".into(), 0.into());
    // Key order matters to prefix caches only inside `messages` and `tools`, which keep theirs.
    serde_json::to_vec(&body).map(Bytes::from)
}

/// The sheet message from the model's answer: every heading present, in order, and a first
/// line saying what it replaces.
pub(crate) fn sheet_message(
    answer: &str,
    role: &str,
    epoch: u32,
    range: &str,
    replaced: usize,
) -> Option<Box<RawValue>> {
    let answer = answer.trim();
    if answer.is_empty() || repetitive(answer) {
        return None;
    }
    // The replaced originals stay recoverable: the header names their index as a marker does.
    let mut content = format!(
        "[ctxgate state sheet, epoch {epoch}: replaces {replaced} earlier messages] {}\n",
        super::marker::naming(&[range.to_string()], "an index of the messages this sheet replaces")
    );
    content.push_str(answer);
    for heading in HEADINGS {
        if !answer.contains(&format!("## {heading}")) {
            content.push_str(&format!("\n\n## {heading}\nNone"));
        }
    }
    serde_json::value::to_raw_value(&serde_json::json!({"role": role, "content": content})).ok()
}

/// A small model can loop on one line until `max_tokens` (`## Constraints` forty times): such
/// a sheet holds nothing and is not placed.
fn repetitive(answer: &str) -> bool {
    let lines: Vec<&str> = answer.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let distinct: std::collections::HashSet<&str> = lines.iter().copied().collect();
    lines.len() >= 8 && distinct.len() * 2 < lines.len()
}

/// The text of a non-streamed chat answer.
pub(crate) fn answer_text(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.pointer("/choices/0/message/content")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sheet_always_has_every_heading_in_order() {
        let answer = "## Active Task\nfix the build\n## Goal\nship v2\n## Key Decisions\nuse redb";
        let message = sheet_message(answer, "system", 2, "0123456789", 30).unwrap();
        let value: serde_json::Value = serde_json::from_str(message.get()).unwrap();
        let content = value["content"].as_str().unwrap();
        assert!(content
            .starts_with("[ctxgate state sheet, epoch 2: replaces 30 earlier messages] [ctxgate:elided id="));
        assert_eq!(
            super::super::marker::ids_in(content),
            ["0123456789"],
            "the replaced originals' index is named"
        );
        assert!(content.contains("]\n## Active Task"));
        let positions: Vec<usize> =
            HEADINGS.iter().map(|h| content.find(&format!("## {h}")).unwrap()).collect();
        assert!(positions.iter().all(|p| *p > 0));
        assert!(content.contains("use redb"));
        assert!(sheet_message("  ", "system", 1, "0123456789", 1).is_none());
        let looping = "## Active Task\nx\n".to_string() + &"## Constraints\n".repeat(40);
        assert!(
            sheet_message(&looping, "system", 1, "0123456789", 1).is_none(),
            "a repetition loop is no sheet"
        );
    }
}
