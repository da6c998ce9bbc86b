//! A Responses conversation (items) as the chat messages the compressor reads, and the
//! compressed messages back as items, for upstreams that speak the Responses API.
//!
//! Each chat message stands for a group of items: a message, or an assistant's text and the
//! calls that follow it, or one call's output. It carries the group's index in a field of its
//! own ([`TAG`]), which the compressor's rewrites keep (they replace `content` only), so the
//! way back is exact:
//! - a message the compressor left as it was gives back its items **byte for byte** (ids,
//!   `status`, reasoning with its `encrypted_content`);
//! - a rewritten one gives back its items with the new text in place (a call output's
//!   `output`, a message's `content`), every other field kept;
//! - a message the compressor made (a marker for dropped turns, a state sheet) becomes a new
//!   message item;
//! - a group the compressor dropped is dropped whole, with its reasoning.
//!
//! Reasoning items belong to the group that follows them (the output they led to). Items chat
//! has no shape for (hosted tool calls, item references, a provider's compaction items) are
//! never rewritten: they ride with the group before them, or the first group when none does.
//! Their tokens are not counted against the budget.
//!
//! Pure: no I/O.

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::request::messages_of;

/// The field a chat message carries its group's index in (or [`INSTRUCTIONS`]).
const TAG: &str = "ctxgate_item";
/// The tag of the message `instructions` become (sent as the field, not as an item).
const INSTRUCTIONS: &str = "instructions";

/// A conversation as tagged chat messages, with the items each stands for.
#[derive(Debug)]
pub struct Mapped {
    /// `instructions` (when there are any) as a system message, then one message per group.
    pub messages: Vec<Box<RawValue>>,
    /// The items, as the client (or the store) gave them.
    items: Vec<Value>,
    /// The item indices of each group, in order.
    groups: Vec<Vec<usize>>,
}

/// What one item is to the compressor.
enum Kind {
    /// A message, a call or a call's output: a chat message of its own (a call joins the
    /// assistant message before it).
    Chat(Value),
    /// Reasoning: goes with the group after it.
    Reasoning,
    /// Anything else: kept as it is, with the group before it.
    Opaque,
}

fn kind(item: &Value) -> Kind {
    let chat = |item: &Value| messages_of(std::slice::from_ref(item)).ok().and_then(|mut m| m.pop());
    match item.get("type").and_then(Value::as_str).unwrap_or("message") {
        "reasoning" => Kind::Reasoning,
        "message" | "function_call" | "function_call_output" => chat(item).map_or(Kind::Opaque, Kind::Chat),
        // A freeform tool (Codex's `apply_patch`): a call whose arguments are its `input`.
        "custom_tool_call" => match (item["call_id"].as_str(), item["name"].as_str(), item["input"].as_str())
        {
            (Some(id), Some(name), Some(input)) => Kind::Chat(json!({
                "role": "assistant", "content": null,
                "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": input}}],
            })),
            _ => Kind::Opaque,
        },
        "custom_tool_call_output" => match (item["call_id"].as_str(), &item["output"]) {
            (Some(id), Value::String(output)) => {
                Kind::Chat(json!({"role": "tool", "tool_call_id": id, "content": output}))
            }
            _ => Kind::Opaque,
        },
        _ => Kind::Opaque,
    }
}

/// `items` (after `instructions`) as tagged chat messages; `None` when no item has a chat shape
/// (nothing the compressor could act on).
pub fn map(instructions: Option<&str>, items: Vec<Value>) -> Option<Mapped> {
    let mut chats: Vec<Value> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    // Reasoning and leading opaque items waiting for the group they belong to.
    let mut waiting: Vec<usize> = Vec::new();
    for (at, item) in items.iter().enumerate() {
        match kind(item) {
            Kind::Reasoning => waiting.push(at),
            Kind::Opaque => match groups.last_mut() {
                Some(group) if waiting.is_empty() => group.push(at),
                _ => waiting.push(at),
            },
            Kind::Chat(message) => {
                let joins = message.get("tool_calls").is_some()
                    && message["content"].is_null()
                    && chats.last().is_some_and(|last| last["role"] == "assistant");
                if joins {
                    let (Some(last), Some(group)) = (chats.last_mut(), groups.last_mut()) else { continue };
                    let calls = message["tool_calls"].as_array().cloned().unwrap_or_default();
                    match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(existing) => existing.extend(calls),
                        None => last["tool_calls"] = Value::Array(calls),
                    }
                    group.append(&mut waiting);
                    group.push(at);
                } else {
                    let mut group = std::mem::take(&mut waiting);
                    group.push(at);
                    groups.push(group);
                    chats.push(message);
                }
            }
        }
    }
    let last = groups.last_mut()?;
    last.append(&mut waiting);
    last.sort_unstable();
    let mut messages = Vec::with_capacity(chats.len() + 1);
    if let Some(text) = instructions {
        messages.push(raw(&json!({"role": "system", "content": text, TAG: INSTRUCTIONS}))?);
    }
    for (n, mut chat) in chats.into_iter().enumerate() {
        chat[TAG] = json!(n);
        messages.push(raw(&chat)?);
    }
    Some(Mapped { messages, items, groups })
}

/// A request's whole conversation as items (a stored chain's, then the request's), copied and
/// mapped to chat messages only when something reads them (compression, a session, a body that
/// must carry them), once.
pub(crate) struct ItemConversation<'a> {
    previous: &'a [Value],
    input: &'a [Value],
    instructions: Option<String>,
    mapped: std::sync::OnceLock<Option<Mapped>>,
}

impl<'a> ItemConversation<'a> {
    pub(crate) fn new(instructions: Option<String>, previous: &'a [Value], input: &'a [Value]) -> Self {
        Self { previous, input, instructions, mapped: std::sync::OnceLock::new() }
    }

    /// The items, in order.
    pub(crate) fn items(&self) -> Vec<Value> {
        self.previous.iter().chain(self.input).cloned().collect()
    }

    /// The conversation [`map`]ped (`None` when no item has a chat shape).
    pub(crate) fn mapped(&self) -> Option<&Mapped> {
        self.mapped.get_or_init(|| map(self.instructions.as_deref(), self.items())).as_ref()
    }
}

fn raw(value: &Value) -> Option<Box<RawValue>> {
    serde_json::value::to_raw_value(value).ok()
}

impl Mapped {
    /// [`Self::messages`] without their tags: the conversation as a chat transcript holds it.
    pub(crate) fn untagged(&self) -> Vec<Box<RawValue>> {
        self.messages
            .iter()
            .filter_map(|m| {
                let mut message: Map<String, Value> = serde_json::from_str(m.get()).ok()?;
                message.remove(TAG);
                serde_json::value::to_raw_value(&message).ok()
            })
            .collect()
    }

    /// The items `compressed` (the compressor's messages for [`Self::messages`]) stand for.
    pub fn rebuild(&self, compressed: &[Box<RawValue>]) -> Vec<Value> {
        // Group `n`'s message, as mapped, follows the instructions' (when there are any).
        let lead = self.messages.len() - self.groups.len();
        let mut out = Vec::with_capacity(self.items.len());
        for message in compressed {
            let Ok(chat) = serde_json::from_str::<Map<String, Value>>(message.get()) else { continue };
            match chat.get(TAG) {
                Some(Value::String(tag)) if tag == INSTRUCTIONS => {}
                Some(tag) => {
                    let Some(n) = tag.as_u64().map(|n| n as usize).filter(|&n| n < self.groups.len()) else {
                        continue;
                    };
                    let items = self.groups[n].iter().map(|&i| &self.items[i]);
                    if self.messages[lead + n].get() == message.get() {
                        out.extend(items.cloned());
                    } else {
                        out.extend(items.filter_map(|item| rewritten(item, &chat)));
                    }
                }
                // Made by the compressor: a marker standing for dropped turns, a state sheet.
                None => out.push(json!({
                    "type": "message",
                    "role": chat.get("role").and_then(Value::as_str).unwrap_or("user"),
                    "content": text_of(chat.get("content")),
                })),
            }
        }
        out
    }
}

/// `item` with what the compressor made of its chat message `chat` in place; `None` when
/// nothing of it is left (text cut to nothing, a call gone).
fn rewritten(item: &Value, chat: &Map<String, Value>) -> Option<Value> {
    let mut item = item.clone();
    let text = text_of(chat.get("content"));
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
    match kind.as_str() {
        "function_call_output" | "custom_tool_call_output" => item["output"] = json!(text),
        "function_call" | "custom_tool_call" => {
            let id = item["call_id"].as_str()?;
            let calls = chat.get("tool_calls")?.as_array()?;
            let call = calls.iter().find(|c| c["id"].as_str() == Some(id))?;
            let arguments = call.pointer("/function/arguments").cloned().unwrap_or(json!(""));
            item[if kind == "function_call" { "arguments" } else { "input" }] = arguments;
        }
        "message" => {
            let assistant = item["role"] == "assistant";
            if assistant && text.is_empty() {
                return None;
            }
            item["content"] = match (&item["content"], chat.get("content")) {
                (Value::String(_), _) => json!(text),
                (_, _) if assistant => json!([{"type": "output_text", "text": text, "annotations": []}]),
                (_, Some(Value::Array(parts))) => Value::Array(parts.iter().filter_map(input_part).collect()),
                _ => json!([{"type": "input_text", "text": text}]),
            };
        }
        // Reasoning and items chat has no shape for are never rewritten.
        _ => {}
    }
    Some(item)
}

/// A chat content part as a Responses input part.
fn input_part(part: &Value) -> Option<Value> {
    match part["type"].as_str() {
        Some("image_url") => {
            let mut image = json!({"type": "input_image", "image_url": part["image_url"]["url"]});
            if let Some(detail) = part["image_url"].get("detail") {
                image["detail"] = detail.clone();
            }
            Some(image)
        }
        _ => part["text"].as_str().map(|text| json!({"type": "input_text", "text": text})),
    }
}

/// A chat content's text: the string, or its text parts joined.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::message;

    fn conversation() -> Vec<Value> {
        vec![
            json!({"type": "message", "role": "user", "content": "Fix the build."}),
            json!({"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA-opaque"}),
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "run", "arguments": "{\"cmd\":\"make\"}", "status": "completed"}),
            json!({"type": "function_call_output", "call_id": "call_1", "output": "error: line 3\n\n\n\nmissing ;"}),
            json!({"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "rust"}}),
            json!({"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin Patch"}),
            json!({"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done!"}),
            json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "Fixed.", "annotations": []}]}),
        ]
    }

    fn tag(message: &RawValue) -> Value {
        serde_json::from_str::<Value>(message.get()).unwrap()[TAG].clone()
    }

    #[test]
    fn each_group_is_one_tagged_chat_message() {
        let mapped = map(Some("Be terse."), conversation()).unwrap();
        let roles: Vec<String> =
            mapped.messages.iter().map(|m| format!("{:?}", message::Info::parse(m.get()).role)).collect();
        assert_eq!(roles, ["System", "User", "Assistant", "Tool", "Assistant", "Tool", "Assistant"]);
        assert_eq!(tag(&mapped.messages[0]), INSTRUCTIONS);
        assert_eq!(tag(&mapped.messages[3]), 2);
        // The reasoning goes with the call after it; the hosted call with the output before it
        assert_eq!(mapped.groups, vec![vec![0], vec![1, 2], vec![3, 4], vec![5], vec![6], vec![7]]);
        // A freeform call is a call to the compressor, its input the arguments
        let patch = message::Info::parse(mapped.messages[4].get());
        assert_eq!(
            (patch.calls[0].id.as_str(), patch.calls[0].arguments.as_str()),
            ("call_2", "*** Begin Patch")
        );
    }

    #[test]
    fn messages_left_alone_give_back_their_items_byte_for_byte() {
        let items = conversation();
        let mapped = map(Some("Be terse."), items.clone()).unwrap();
        assert_eq!(mapped.rebuild(&mapped.messages), items);
        let bytes = |items: &[Value]| serde_json::to_string(items).unwrap();
        assert_eq!(bytes(&mapped.rebuild(&mapped.messages)), bytes(&items));
    }

    #[test]
    fn a_rewritten_output_keeps_its_call_and_the_rest_of_its_group() {
        let mapped = map(None, conversation()).unwrap();
        let mut compressed = mapped.messages.clone();
        // As the compressor masks a result: its content replaced, its other fields kept
        compressed[2] = message::replace_text(compressed[2].get(), "[ctxgate: elided #ab12]").unwrap();
        let items = mapped.rebuild(&compressed);
        assert_eq!(items.len(), 8);
        assert_eq!(
            items[3],
            json!({"type": "function_call_output", "call_id": "call_1", "output": "[ctxgate: elided #ab12]"})
        );
        assert_eq!(items[4], conversation()[4], "the hosted call rides along unchanged");
        assert_eq!(items[1]["encrypted_content"], "gAAAA-opaque");
    }

    #[test]
    fn a_dropped_group_goes_with_its_reasoning_and_a_marker_becomes_a_message() {
        let mapped = map(None, conversation()).unwrap();
        let marker = raw(&json!({"role": "assistant", "content": "[ctxgate: 2 messages dropped]"})).unwrap();
        let mut compressed = vec![mapped.messages[0].clone(), marker];
        compressed.extend(mapped.messages[3..].iter().cloned());
        let items = mapped.rebuild(&compressed);
        let kinds: Vec<&str> = items.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["message", "message", "custom_tool_call", "custom_tool_call_output", "message"]);
        assert_eq!(
            items[1],
            json!({"type": "message", "role": "assistant", "content": "[ctxgate: 2 messages dropped]"})
        );
        assert!(!items.iter().any(|i| i["type"] == "reasoning"));
    }

    #[test]
    fn rewritten_messages_keep_their_shape() {
        let items = vec![
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a  b"}]}),
            json!({"role": "user", "content": "c   d"}),
            json!({"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": "e  f"}]}),
        ];
        let mapped = map(None, items).unwrap();
        let squeeze = |m: &RawValue| message::edit_text(m.get(), |t| Some(t.replace("  ", " "))).unwrap();
        let compressed: Vec<Box<RawValue>> = mapped.messages.iter().map(|m| squeeze(m)).collect();
        let back = mapped.rebuild(&compressed);
        assert_eq!(back[0]["content"], json!([{"type": "input_text", "text": "a b"}]));
        assert_eq!(back[1]["content"], "c  d");
        assert_eq!(back[2]["id"], "msg_1");
        assert_eq!(back[2]["content"], json!([{"type": "output_text", "text": "e f", "annotations": []}]));
    }

    #[test]
    fn nothing_with_a_chat_shape_is_nothing_to_compress() {
        assert!(map(None, vec![json!({"type": "item_reference", "id": "msg_1"})]).is_none());
        assert!(map(None, Vec::new()).is_none());
    }
}
