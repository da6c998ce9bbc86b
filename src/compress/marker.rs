//! Markers: what a lossy rewrite leaves in place of what it removed. Each names the original
//! by a stable id (the first 10 hex digits of SHA-256 over the original message's exact bytes,
//! the same on every replica and every epoch), says what was removed and how many tokens, and
//! points at `ctxgate_expand`, which returns the original.
//!
//! ```text
//! [ctxgate:elided id=3f9a1c07be result of fetch_page({"url":"https://a.test"}); 1843 tokens; ctxgate_expand restores it]
//! ```

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::openai::message::{Info, Role};

/// What every marker starts with; also how a request is found to carry one.
pub const PREFIX: &str = "[ctxgate:elided ";

/// The gateway tool that returns an elided original.
pub const EXPAND_TOOL: &str = "ctxgate_expand";

/// The stable id of an original message.
pub fn id_of(message: &RawValue) -> String {
    let digest = Sha256::digest(message.get().as_bytes());
    digest[..5].iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a span, `messages[lead..end]`, that a state sheet replaces: `ctxgate_expand` of it
/// lists the originals by id.
pub fn range_id(messages: &[Box<RawValue>], lead: usize, end: usize) -> String {
    super::plan::covered(messages, lead, end)[..10].to_string()
}

/// The index a range id names: one line per original, its id and what it is.
pub fn index(messages: &[Box<RawValue>]) -> String {
    let mut out = format!(
        "[ctxgate: the {} messages a state sheet replaces; {EXPAND_TOOL} an id to read one]\n",
        messages.len()
    );
    for m in messages {
        out.push_str(&format!("{PREFIX}id={} {}]\n", id_of(m), describe(&Info::parse(m.get()), None)));
    }
    out
}

/// A marker replacing whole messages (`ids`, in order), described by `what`.
pub fn whole(ids: &[String], what: &str, tokens: u64) -> String {
    naming(ids, &format!("{what}; {tokens} tokens"))
}

/// A marker naming originals (`ids`, in order) that something else stands for (a state sheet).
pub fn naming(ids: &[String], what: &str) -> String {
    let mut out = String::from(PREFIX);
    for id in ids {
        out.push_str("id=");
        out.push_str(id);
        out.push(' ');
    }
    out.push_str(what);
    let restores = if ids.len() > 1 { "restores each" } else { "restores it" };
    out.push_str(&format!("; {EXPAND_TOOL} {restores}]"));
    out
}

/// Joins the first and last ids of a run of consecutive messages into the run's id.
pub const RUN: &str = "..";

/// A marker replacing a run of consecutive messages, from `first` to `last` (by id), whatever
/// its length: one id, so a long run costs no more than a short one.
pub fn run(first: &str, last: &str, what: &str, tokens: u64) -> String {
    format!("{PREFIX}id={first}{RUN}{last} {what}; {tokens} tokens; {EXPAND_TOOL} restores them]")
}

/// A marker inside a kept text, for a part of it removed (the middle of a long output, a blob).
pub fn partial(id: &str, what: &str) -> String {
    format!("{PREFIX}id={id} {what}; {EXPAND_TOOL} restores the whole]")
}

/// The marker ids in `text`, in order.
pub fn ids_in(text: &str) -> Vec<&str> {
    let mut ids = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        rest = &rest[at + PREFIX.len()..];
        let mut words = rest;
        while let Some(id) = words.strip_prefix("id=") {
            let hex = |s: &str| s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
            let mut end = hex(id);
            if let Some(last) = id[end..].strip_prefix(RUN) {
                end += RUN.len() + hex(last);
            }
            ids.push(&id[..end]);
            words = id[end..].trim_start_matches(' ');
        }
    }
    ids
}

/// Whether a message carries a marker.
pub fn carries(message: &RawValue) -> bool {
    message.get().contains(PREFIX)
}

/// A short description of a message for its marker: a tool result by the call it answers, any
/// other message by its role and first words.
pub fn describe(info: &Info, call: Option<&crate::openai::message::Call>) -> String {
    match (info.role, call) {
        (Role::Tool, Some(call)) => format!("result of {}({})", call.name, clip(&call.arguments, 80)),
        (Role::Tool, None) => "tool result".to_string(),
        (role, _) => {
            let text = info.text.as_deref().unwrap_or("");
            let names: Vec<&str> = info.calls.iter().map(|c| c.name.as_str()).collect();
            let role = match role {
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::System => "system",
                _ => "message",
            };
            match (text.trim().is_empty(), names.is_empty()) {
                (true, false) => format!("{role} call to {}", names.join(", ")),
                _ => format!("{role} message \"{}\"", clip(text, 60)),
            }
        }
    }
}

/// The first `max` characters of `text` on one line, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_in_every_marker_shape() {
        let a = RawValue::from_string(r#"{"role":"tool","content":"x"}"#.into()).unwrap();
        let id = id_of(&a);
        assert_eq!(id.len(), 10);
        assert_eq!(id, id_of(&RawValue::from_string(a.get().to_string()).unwrap()), "stable");
        let text = format!(
            "head {} tail and {}",
            partial(&id, "1200 bytes from the middle"),
            whole(&["0123456789".into(), "abcdefabcd".into()], "model step", 40)
        );
        assert_eq!(ids_in(&text), [id.as_str(), "0123456789", "abcdefabcd"]);
        let text = run("0123456789", "abcdefabcd", "model steps calling ping ×40", 900);
        assert_eq!(ids_in(&text), ["0123456789..abcdefabcd"]);
        assert!(ids_in("[ctxgate: something else]").is_empty());
    }

    #[test]
    fn descriptions_name_the_call_or_the_first_words() {
        let info = Info::parse(
            r#"{"role":"user","content":"Remember:   the code is 42 and nothing else matters here"}"#,
        );
        assert_eq!(
            describe(&info, None),
            "user message \"Remember: the code is 42 and nothing else matters here\""
        );
        let info = Info::parse(r#"{"role":"tool","tool_call_id":"c1","content":"x"}"#);
        let call = crate::openai::message::Call {
            id: "c1".into(),
            name: "fetch".into(),
            arguments: "{\"u\":1}".into(),
        };
        assert_eq!(describe(&info, Some(&call)), "result of fetch({\"u\":1})");
    }
}
