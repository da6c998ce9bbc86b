//! A Chat Completions answer as a Responses API `Response` object: its message as a `message`
//! output item with `output_text`, its tool calls as `function_call` items, its `usage` in the
//! Responses shape, and the request's fields echoed as OpenAI does. Pure: no I/O.

use serde_json::{json, Value};

use super::request::Echo;

/// What every Response object of one request shares: its id, creation time, model and the
/// echoed request fields.
#[derive(Clone, Debug)]
pub(crate) struct Base {
    pub(crate) id: String,
    pub(crate) created_at: u64,
    pub(crate) model: String,
    pub(crate) echo: Echo,
}

/// How a response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// A background response not started yet.
    Queued,
    InProgress,
    Completed,
    /// Cut at `max_output_tokens` (chat's `finish_reason: "length"`).
    Incomplete,
    Failed,
    /// A background response cancelled while it ran.
    Cancelled,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete => "incomplete",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether a Response object with this `status` is still running.
    pub(crate) fn running(status: &str) -> bool {
        matches!(status, "queued" | "in_progress")
    }

    /// The status a chat `finish_reason` means.
    pub(crate) fn of_finish(reason: Option<&str>) -> Self {
        match reason {
            Some("length") => Self::Incomplete,
            _ => Self::Completed,
        }
    }
}

impl Base {
    /// The base of a stored Response object (a background response resumed after a takeover):
    /// its fields as the object echoes them.
    pub(crate) fn from_object(object: &Value) -> Self {
        let get = |name: &str| object.get(name).cloned().unwrap_or(Value::Null);
        let echo = Echo {
            instructions: get("instructions"),
            max_output_tokens: get("max_output_tokens"),
            metadata: get("metadata"),
            parallel_tool_calls: get("parallel_tool_calls"),
            previous_response_id: get("previous_response_id"),
            reasoning: get("reasoning"),
            store: object["store"].as_bool().unwrap_or(true),
            background: object["background"].as_bool().unwrap_or(false),
            temperature: get("temperature"),
            text: get("text"),
            tool_choice: get("tool_choice"),
            tools: get("tools"),
            top_p: get("top_p"),
            truncation: get("truncation"),
            user: get("user"),
            prompt_cache_key: get("prompt_cache_key"),
        };
        Self {
            id: object["id"].as_str().unwrap_or_default().to_string(),
            created_at: object["created_at"].as_u64().unwrap_or(0),
            model: object["model"].as_str().unwrap_or_default().to_string(),
            echo,
        }
    }

    /// The Response object with `status`, `output` and `usage` (`error` when failed).
    pub(crate) fn object(&self, status: Status, output: Vec<Value>, usage: Value, error: Value) -> Value {
        let echo = &self.echo;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status.as_str(),
            "completed_at": if status == Status::Completed { json!(super::now_secs()) } else { Value::Null },
            "background": echo.background,
            "error": error,
            "incomplete_details": if status == Status::Incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": echo.instructions,
            "max_output_tokens": echo.max_output_tokens,
            "metadata": echo.metadata,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": echo.parallel_tool_calls,
            "previous_response_id": echo.previous_response_id,
            "prompt_cache_key": echo.prompt_cache_key,
            "reasoning": echo.reasoning,
            "store": echo.store,
            "temperature": echo.temperature,
            "text": echo.text,
            "tool_choice": echo.tool_choice,
            "tools": echo.tools,
            "top_p": echo.top_p,
            "truncation": echo.truncation,
            "usage": usage,
            "user": echo.user,
        })
    }
}

/// A `message` output item holding `text`.
pub(crate) fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    })
}

/// A `reasoning` output item holding a model's reasoning text (llama-server's and vLLM's
/// `reasoning_content`).
pub(crate) fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    })
}

/// The reasoning text a chat message or delta carries: `reasoning_content`, or `reasoning`.
pub(crate) fn reasoning_of(message: &Value) -> Option<&str> {
    ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|field| message[*field].as_str())
        .filter(|text| !text.is_empty())
}

/// An `output_text` content part.
pub(crate) fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A `function_call` output item.
pub(crate) fn function_call_item(
    id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    })
}

/// Chat `usage` in the Responses shape; `null` when the answer had none.
pub(crate) fn usage(chat: Option<&Value>) -> Value {
    let Some(chat) = chat.filter(|u| u.is_object()) else { return Value::Null };
    let number = |pointer: &str| chat.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let input = number("/prompt_tokens");
    let output = number("/completion_tokens");
    let total = chat.get("total_tokens").and_then(Value::as_u64).unwrap_or(input + output);
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": number("/prompt_tokens_details/cached_tokens"),
            // Chat usage says nothing of cache writes (OpenAI's caching has no write cost).
            "cache_write_tokens": number("/prompt_tokens_details/cache_write_tokens"),
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": number("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": total,
    })
}

/// The output items of a chat answer's message: its reasoning, its text, then its tool calls.
pub(crate) fn output_of(message: &Value) -> Vec<Value> {
    let mut output = Vec::new();
    if let Some(reasoning) = reasoning_of(message) {
        output.push(reasoning_item(&super::new_id("rs"), reasoning, "completed"));
    }
    let text = match &message["content"] {
        Value::String(text) => text.clone(),
        // Some servers answer in parts.
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    };
    if !text.is_empty() {
        output.push(message_item(&super::new_id("msg"), &text, "completed"));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let call_id = call["id"].as_str().map_or_else(|| super::new_id("call"), str::to_string);
        output.push(function_call_item(
            &super::new_id("fc"),
            &call_id,
            call.pointer("/function/name").and_then(Value::as_str).unwrap_or(""),
            call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or(""),
            "completed",
        ));
    }
    output
}

/// The Response object of a whole chat completion, and its status.
pub(crate) fn from_completion(base: &Base, completion: &Value) -> (Value, Vec<Value>) {
    let choice = &completion["choices"][0];
    let output = output_of(&choice["message"]);
    let status = Status::of_finish(choice["finish_reason"].as_str());
    let mut base = base.clone();
    if let Some(model) = completion["model"].as_str().filter(|m| !m.is_empty()) {
        base.model = model.to_string();
    }
    (base.object(status, output.clone(), usage(completion.get("usage")), Value::Null), output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Base {
        Base { id: "resp_1".into(), created_at: 7, model: "m".into(), echo: Echo::default() }
    }

    #[test]
    fn a_completion_with_text_tool_calls_and_usage() {
        let completion = json!({
            "model": "m-2024",
            "choices": [{"finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Checking.",
                "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
            }}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}
        });
        let (object, output) = from_completion(&base(), &completion);
        assert_eq!(object["status"], "completed");
        assert_eq!(object["model"], "m-2024");
        assert_eq!(object["output"][0]["content"][0]["text"], "Checking.");
        assert_eq!(object["output"][1]["call_id"], "call_a");
        assert_eq!(
            object["usage"],
            json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0}, "output_tokens": 5,
                   "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 17})
        );
        assert_eq!(output.len(), 2);
    }

    #[test]
    fn reasoning_content_is_a_reasoning_item_before_the_message() {
        let completion = json!({"choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": "4", "reasoning_content": "2 + 2 is 4."
        }}]});
        let (object, _) = from_completion(&base(), &completion);
        assert_eq!(object["output"][0]["type"], "reasoning");
        assert_eq!(
            object["output"][0]["content"],
            json!([{"type": "reasoning_text", "text": "2 + 2 is 4."}])
        );
        assert_eq!(object["output"][1]["content"][0]["text"], "4");
    }

    #[test]
    fn a_stored_object_gives_back_its_base() {
        let mut base = base();
        base.echo.background = true;
        base.echo.metadata = json!({"k": "v"});
        let queued = base.object(Status::Queued, Vec::new(), Value::Null, Value::Null);
        let again = Base::from_object(&queued).object(Status::Queued, Vec::new(), Value::Null, Value::Null);
        assert_eq!(again, queued);
        assert_eq!(again["status"], "queued");
        assert_eq!(again["background"], true);
    }

    #[test]
    fn a_length_cut_is_incomplete() {
        let completion = json!({"choices": [{"finish_reason": "length", "message": {"content": "partial"}}]});
        let (object, _) = from_completion(&base(), &completion);
        assert_eq!(object["status"], "incomplete");
        assert_eq!(object["incomplete_details"]["reason"], "max_output_tokens");
        assert!(object["usage"].is_null());
    }
}
