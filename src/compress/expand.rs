//! `ctxgate_expand`: the gateway tool that returns what a marker elided. A request that carries
//! a marker offers it after the client's own tools (fixed bytes, so the prefix stays stable);
//! when the model calls it, the gateway answers in its own tool loop and the client never sees
//! the call. This module holds the tool's definition and its answer; finding the original
//! (the conversation as sent, the session's transcript, or the store) is the caller's part.

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::marker::{self, EXPAND_TOOL};
use crate::openai::message::Info;

/// The tool's definition, always the same bytes.
pub(crate) fn definition() -> Box<RawValue> {
    let value = serde_json::json!({
        "type": "function",
        "function": {
            "name": EXPAND_TOOL,
            "description": "Read a part of this conversation that was shortened to save space. \
                Pass the id from a [ctxgate:elided id=...] marker to get the original back; with a \
                query, get only the passages that mention it.",
            "parameters": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "description": "The id in the marker."},
                    "query": {"type": "string", "description": "Words to look for; omit to read it all."},
                },
                "required": ["id"],
            },
        },
    });
    // A literal object always serialises.
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[derive(Deserialize)]
struct Arguments {
    id: String,
    #[serde(default)]
    query: Option<String>,
}

/// The original `id` names in `conversation` (its messages as the client sent them): a message,
/// or for a state sheet's range id, the index of the messages it replaced (as a message whose
/// content is the index).
pub(crate) fn resolve(conversation: &[Box<RawValue>], id: &str) -> Option<Box<RawValue>> {
    if id.contains(marker::RUN) {
        return run(conversation, id).map(joined);
    }
    if let Some(found) = conversation.iter().find(|m| marker::id_of(m) == id) {
        return Some(found.clone());
    }
    // Range ids hash `conversation[lead..end]`; every end is tried, incrementally.
    let lead = conversation
        .iter()
        .take_while(|m| Info::parse(m.get()).role == crate::openai::message::Role::System)
        .count();
    let mut hasher = Sha256::new();
    for (end, m) in conversation.iter().enumerate().skip(lead) {
        hasher.update((m.get().len() as u64).to_le_bytes());
        hasher.update(m.get().as_bytes());
        let digest = hasher.clone().finalize();
        let hex: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
        if hex == id {
            let index = marker::index(&conversation[lead..=end]);
            return serde_json::value::to_raw_value(&serde_json::json!({"role": "index", "content": index}))
                .ok();
        }
    }
    None
}

/// The messages a run id (`first..last`) names in `conversation`, in order.
pub(crate) fn run<'a>(conversation: &'a [Box<RawValue>], id: &str) -> Option<&'a [Box<RawValue>]> {
    let (first, last) = id.split_once(marker::RUN)?;
    let start = conversation.iter().position(|m| marker::id_of(m) == first)?;
    let len = conversation[start..].iter().position(|m| marker::id_of(m) == last)?;
    Some(&conversation[start..=start + len])
}

/// A run's messages as one message to answer from: each one's id and what it is, then its text.
pub(crate) fn joined(run: &[Box<RawValue>]) -> Box<RawValue> {
    let infos: Vec<Info> = run.iter().map(|m| Info::parse(m.get())).collect();
    let mut text = String::new();
    for (m, info) in run.iter().zip(&infos) {
        let call = info
            .tool_call_id
            .as_deref()
            .and_then(|id| infos.iter().flat_map(|i| &i.calls).find(|c| c.id == id));
        text.push_str(&format!("[id={} {}]\n", marker::id_of(m), marker::describe(info, call)));
        if let Some(own) = info.text.as_deref().filter(|t| !t.is_empty()) {
            text.push_str(own);
            text.push('\n');
        }
    }
    let value = serde_json::json!({"role": "run", "content": text});
    // A literal object always serialises.
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// The tool's answer to `arguments`: the original's text (or the passages matching the query),
/// within `max_bytes`. `find` looks an original up by its id.
pub(crate) fn answer(
    arguments: &str,
    max_bytes: usize,
    find: impl Fn(&str) -> Option<Box<RawValue>>,
) -> String {
    let Ok(args) = serde_json::from_str::<Arguments>(arguments) else {
        return r#"{"error":"pass the id of a [ctxgate:elided id=...] marker","kind":"invalid_arguments"}"#
            .into();
    };
    let id = args.id.trim().trim_start_matches("id=");
    let Some(original) = find(id) else {
        return serde_json::json!({"error": format!("no elided original has the id {id}"), "kind": "not_found"})
            .to_string();
    };
    let info = Info::parse(original.get());
    let text = info.text.unwrap_or_else(|| original.get().to_string());
    let what = match id.contains(marker::RUN) {
        true => format!("{} messages", text.matches("\n[id=").count() + 1),
        false => marker::describe(&Info::parse(original.get()), None),
    };
    let body = match args.query.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        Some(query) => passages(&text, query),
        None => text,
    };
    let header = format!("[ctxgate: original of {id}, {what}]\n");
    if header.len() + body.len() <= max_bytes {
        return header + &body;
    }
    let mut end = max_bytes.saturating_sub(header.len() + 80);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{header}{}\n[ctxgate: {} more bytes; ask again with a query to find a passage]",
        &body[..end],
        body.len() - end
    )
}

/// The lines of `text` that mention any word of `query` (case-insensitive), each with the line
/// before and after it, in order; gaps are marked.
fn passages(text: &str, query: &str) -> String {
    let words: Vec<String> =
        query.split(|c: char| !c.is_alphanumeric()).filter(|w| w.len() >= 2).map(str::to_lowercase).collect();
    let lines: Vec<&str> = text.lines().collect();
    let hit: Vec<bool> = lines
        .iter()
        .map(|line| {
            let line = line.to_lowercase();
            words.iter().any(|w| line.contains(w.as_str()))
        })
        .collect();
    let keep: Vec<bool> = (0..lines.len())
        .map(|i| hit[i] || (i > 0 && hit[i - 1]) || hit.get(i + 1).copied().unwrap_or(false))
        .collect();
    if !keep.iter().any(|k| *k) {
        return format!("[ctxgate: no line mentions {query:?}; ask without a query to read it all]");
    }
    let mut out = String::new();
    let mut gap = false;
    // A run's text has one section per message, each under its `[id=…]` line: a passage
    // comes with the line of the message it is in.
    let mut section: Option<usize> = None;
    let mut shown: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("[id=") {
            section = Some(i);
        }
        if keep[i] {
            if gap && !out.is_empty() {
                out.push_str("…\n");
            }
            if let Some(head) = section.filter(|&h| h < i && shown != Some(h) && !keep[h]) {
                out.push_str(lines[head]);
                out.push('\n');
            }
            shown = section;
            out.push_str(line);
            out.push('\n');
            gap = false;
        } else {
            gap = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> Box<RawValue> {
        let text = (0..50).map(|i| format!("row {i}: nothing")).collect::<Vec<_>>().join("\n")
            + "\nrow 50: the secret is 4417\nrow 51: nothing";
        serde_json::value::to_raw_value(
            &serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": text}),
        )
        .unwrap()
    }

    #[test]
    fn the_whole_original_or_the_passages_that_match() {
        let m = original();
        let id = marker::id_of(&m);
        let find = |want: &str| (want == id).then(|| m.clone());
        let all = answer(&format!(r#"{{"id":"{id}"}}"#), 100_000, find);
        assert!(all.contains("row 0: nothing") && all.contains("the secret is 4417"));
        let some = answer(&format!(r#"{{"id":"{id}","query":"SECRET"}}"#), 100_000, find);
        assert!(some.contains("row 49: nothing\nrow 50: the secret is 4417\nrow 51: nothing"), "{some}");
        assert!(!some.contains("row 10:"));
        let capped = answer(&format!(r#"{{"id":"{id}"}}"#), 300, find);
        assert!(capped.len() <= 300 && capped.contains("more bytes"), "{capped}");
        assert!(answer(r#"{"id":"0000000000"}"#, 1000, find).contains("not_found"));
        assert!(answer("nope", 1000, find).contains("invalid_arguments"));
    }

    #[test]
    fn a_run_answers_with_every_message_or_the_passages_under_their_ids() {
        let messages: Vec<Box<RawValue>> = [
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]}),
            serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": "host a up\nhost b down\nhost c up"}),
            serde_json::json!({"role": "assistant", "content": "all checked"}),
        ]
        .iter()
        .map(|v| serde_json::value::to_raw_value(v).unwrap())
        .collect();
        let ids: Vec<String> = messages.iter().map(|m| marker::id_of(m)).collect();
        let id = format!("{}..{}", ids[0], ids[2]);
        assert_eq!(run(&messages, &id).map(<[_]>::len), Some(3));
        assert!(
            run(&messages, &format!("{}..{}", ids[2], ids[0])).is_none(),
            "the last comes after the first"
        );
        let find = |want: &str| resolve(&messages, want);
        let all = answer(&format!(r#"{{"id":"{id}"}}"#), 100_000, find);
        assert!(all.contains("3 messages"), "{all}");
        assert!(all.contains(&format!("[id={} result of ping({{}})]\nhost a up", ids[1])), "{all}");
        assert!(all.contains("all checked"));
        let some = answer(&format!(r#"{{"id":"{id}","query":"down"}}"#), 100_000, find);
        assert!(
            some.contains(&format!("[id={} result of ping", ids[1])) && some.contains("host b down"),
            "{some}"
        );
        assert!(!some.contains("all checked"), "{some}");
    }

    #[test]
    fn the_definition_is_fixed_bytes() {
        assert_eq!(definition().get(), definition().get());
        assert!(definition().get().contains(EXPAND_TOOL));
    }
}
