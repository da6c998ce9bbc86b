//! A read-only view of one chat message (role, text, tool calls), and rewriting its text while
//! every other field keeps its bytes and its place.

use std::borrow::Cow;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
    Other,
}

/// One tool call an assistant message makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// The JSON text of the arguments, as the model wrote it.
    pub arguments: String,
}

/// What the rules need to know about a message.
#[derive(Clone, Debug)]
pub struct Info {
    pub role: Role,
    /// The text of `content` (a string, or the `text` parts of an array), when there is any.
    pub text: Option<String>,
    pub calls: Vec<Call>,
    pub tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    tool_calls: Option<Vec<CallHead>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct CallHead {
    #[serde(default)]
    id: String,
    #[serde(default)]
    function: Option<FunctionHead>,
}

#[derive(Deserialize)]
struct FunctionHead {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: String,
}

impl Info {
    pub fn parse(json: &str) -> Info {
        let Ok(head) = serde_json::from_str::<Head<'_>>(json) else {
            return Info { role: Role::Other, text: None, calls: Vec::new(), tool_call_id: None };
        };
        let role = match head.role.as_deref() {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool" | "function") => Role::Tool,
            _ => Role::Other,
        };
        let calls = head
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let f = c.function.unwrap_or(FunctionHead { name: String::new(), arguments: String::new() });
                Call { id: c.id, name: f.name, arguments: f.arguments }
            })
            .collect();
        Info { role, text: head.content.and_then(content_text), calls, tool_call_id: head.tool_call_id }
    }
}

/// The text of a `content` value: a string, or the `text` of each text part joined by newlines.
fn content_text(content: &RawValue) -> Option<String> {
    match serde_json::from_str::<Value>(content.get()).ok()? {
        Value::String(s) => Some(s),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts.iter().filter_map(|p| p.get("text")?.as_str()).collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// The text a message's tokens are counted over: content plus tool-call names and arguments.
pub(crate) fn countable_text(json: &str) -> String {
    countable(&Info::parse(json)).into_owned()
}

/// [`countable_text`] of a message already parsed: its text as it is when it makes no calls.
pub(crate) fn countable(info: &Info) -> Cow<'_, str> {
    let text = info.text.as_deref().unwrap_or_default();
    if info.calls.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut text = text.to_string();
    for call in &info.calls {
        text.push('\n');
        text.push_str(&call.name);
        text.push('\n');
        text.push_str(&call.arguments);
    }
    Cow::Owned(text)
}

/// The message with its text passed through `edit` (each text part of an array on its own).
/// `None` when nothing changed, so an untouched message keeps its exact bytes.
pub(crate) fn edit_text(json: &str, mut edit: impl FnMut(&str) -> Option<String>) -> Option<Box<RawValue>> {
    let mut fields: IndexMap<String, Box<RawValue>> = serde_json::from_str(json).ok()?;
    let content = fields.get("content")?;
    let new = match serde_json::from_str::<Value>(content.get()).ok()? {
        Value::String(s) => Value::String(edit(&s)?),
        Value::Array(mut parts) => {
            let mut changed = false;
            for part in &mut parts {
                if let Some(Value::String(text)) = part.get_mut("text") {
                    if let Some(new) = edit(text) {
                        *text = new;
                        changed = true;
                    }
                }
            }
            if !changed {
                return None;
            }
            Value::Array(parts)
        }
        _ => return None,
    };
    fields.insert("content".into(), serde_json::value::to_raw_value(&new).ok()?);
    serde_json::value::to_raw_value(&fields).ok()
}

/// The message with its whole content replaced by `text` (a string).
pub(crate) fn replace_text(json: &str, text: &str) -> Option<Box<RawValue>> {
    let mut fields: IndexMap<String, Box<RawValue>> = serde_json::from_str(json).ok()?;
    fields.insert("content".into(), serde_json::value::to_raw_value(text).ok()?);
    serde_json::value::to_raw_value(&fields).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_calls_and_text() {
        let info = Info::parse(
            r#"{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"cat","arguments":"{}"}}]}"#,
        );
        assert_eq!(info.role, Role::Assistant);
        assert_eq!(info.text, None);
        assert_eq!(info.calls[0].name, "cat");
        let parts = Info::parse(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}"#,
        );
        assert_eq!(parts.text.as_deref(), Some("a\nb"));
        assert_eq!(Info::parse("[1]").role, Role::Other);
    }

    #[test]
    fn editing_keeps_other_fields_in_place() {
        let json = r#"{"role":"tool","tool_call_id":"c1","content":"aaa","x-extra":{"z":1,"a":2}}"#;
        let out = edit_text(json, |t| Some(t.replace('a', "b"))).unwrap();
        assert_eq!(
            out.get(),
            r#"{"role":"tool","tool_call_id":"c1","content":"bbb","x-extra":{"z":1,"a":2}}"#
        );
        assert!(edit_text(json, |_| None).is_none());
        let parts = r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"a"}}]}"#;
        let out = edit_text(parts, |t| Some(t.to_uppercase())).unwrap();
        assert!(out.get().contains(r#""text":"A""#) && out.get().contains(r#""url":"a""#), "{}", out.get());
    }
}
