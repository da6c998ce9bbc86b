//! A Chat Completions stream as Responses API events: `response.created` and
//! `response.in_progress` first, then for each output item `response.output_item.added`, its
//! deltas (`response.output_text.delta` inside a `content_part`, or
//! `response.function_call_arguments.delta`) and its `.done` events, and last
//! `response.completed` (or `response.incomplete`) with the whole Response object. Every event
//! carries a `sequence_number`, from 0. A failure becomes an `error` event and
//! `response.failed`. Pure: chunks in, SSE events out.

use bytes::Bytes;
use serde_json::{json, Value};

use super::response::{
    function_call_item, message_item, output_text, reasoning_item, reasoning_of, usage, Base, Status,
};

/// The translation of one stream.
pub(crate) struct Translator {
    base: Base,
    seq: u64,
    next_index: usize,
    /// The message item being written: its output index, id and text so far.
    text: Option<(usize, String, String)>,
    /// The reasoning item being written, likewise.
    reasoning: Option<(usize, String, String)>,
    /// Function calls by their chat index, in the order they started.
    calls: Vec<Call>,
    /// Finished items by output index.
    done: Vec<(usize, Value)>,
    finish_reason: Option<String>,
    usage: Option<Value>,
}

struct Call {
    chat_index: u64,
    output_index: usize,
    id: String,
    call_id: String,
    name: String,
    arguments: String,
}

/// How the stream ended, once [`Translator::finish`] closed its items.
pub(crate) struct Finished {
    /// The Response object `response.completed` (or `.incomplete`) carries.
    pub(crate) response: Value,
    pub(crate) output: Vec<Value>,
    pub(crate) status: Status,
}

impl Translator {
    pub(crate) fn new(base: Base) -> Self {
        Self::numbered_from(base, 0)
    }

    /// A translation whose events are numbered from `seq` on: a background response's answer
    /// re-issued after a takeover goes on from the last event its stream logged.
    pub(crate) fn numbered_from(base: Base, seq: u64) -> Self {
        Self {
            base,
            seq,
            next_index: 0,
            text: None,
            reasoning: None,
            calls: Vec::new(),
            done: Vec::new(),
            finish_reason: None,
            usage: None,
        }
    }

    fn event(&mut self, kind: &str, mut data: Value) -> Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    }

    /// `response.created` and `response.in_progress`.
    pub(crate) fn start(&mut self) -> Vec<Bytes> {
        vec![self.created(Status::InProgress), self.in_progress()]
    }

    /// `response.created`, the response `status` (a background response is `queued` until
    /// its upstream call answers).
    pub(crate) fn created(&mut self, status: Status) -> Bytes {
        let response = self.base.object(status, Vec::new(), Value::Null, Value::Null);
        self.event("response.created", json!({"response": response}))
    }

    /// `response.queued`: a background response waits for its turn.
    pub(crate) fn queued(&mut self) -> Bytes {
        let response = self.base.object(Status::Queued, Vec::new(), Value::Null, Value::Null);
        self.event("response.queued", json!({"response": response}))
    }

    pub(crate) fn in_progress(&mut self) -> Bytes {
        let response = self.base.object(Status::InProgress, Vec::new(), Value::Null, Value::Null);
        self.event("response.in_progress", json!({"response": response}))
    }

    /// `response.cancelled` with the Response object `cancelled` (see
    /// [`super::background`]): a background response's stream ends with it when it is
    /// cancelled.
    pub(crate) fn cancelled(&mut self, cancelled: &Value) -> Bytes {
        self.event("response.cancelled", json!({"response": cancelled}))
    }

    /// The events one chat chunk (a `data:` payload) makes. A chunk that is an error (a
    /// gateway or upstream failure after the first byte) is returned as `Err`.
    pub(crate) fn chunk(&mut self, chunk: &Value) -> Result<Vec<Bytes>, Value> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(error.clone());
        }
        if let Some(model) = chunk["model"].as_str().filter(|m| !m.is_empty()) {
            self.base.model = model.to_string();
        }
        if chunk.get("usage").is_some_and(Value::is_object) {
            self.usage = chunk.get("usage").cloned();
        }
        let mut events = Vec::new();
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else { return Ok(events) };
        let delta = &choice["delta"];
        if let Some(reasoning) = reasoning_of(delta) {
            self.reasoning_delta(reasoning, &mut events);
        }
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.text_delta(text, &mut events);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            self.call_delta(call, &mut events);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
        }
        Ok(events)
    }

    fn reasoning_delta(&mut self, text: &str, events: &mut Vec<Bytes>) {
        if self.reasoning.is_none() {
            self.close_text(events);
            let index = self.next_index;
            self.next_index += 1;
            let id = super::new_id("rs");
            let mut item = reasoning_item(&id, "", "in_progress");
            item["content"] = json!([]);
            events
                .push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
            let part = json!({"type": "reasoning_text", "text": ""});
            events.push(self.event(
                "response.content_part.added",
                json!({"output_index": index, "item_id": id, "content_index": 0, "part": part}),
            ));
            self.reasoning = Some((index, id, String::new()));
        }
        let Some((index, id, so_far)) = &mut self.reasoning else { return };
        so_far.push_str(text);
        let data = json!({"output_index": *index, "item_id": id, "content_index": 0, "delta": text});
        events.push(self.event("response.reasoning_text.delta", data));
    }

    fn close_reasoning(&mut self, events: &mut Vec<Bytes>) {
        let Some((index, id, text)) = self.reasoning.take() else { return };
        let data = json!({"output_index": index, "item_id": id, "content_index": 0, "text": text});
        events.push(self.event("response.reasoning_text.done", data));
        let part = json!({"type": "reasoning_text", "text": text});
        let data = json!({"output_index": index, "item_id": id, "content_index": 0, "part": part});
        events.push(self.event("response.content_part.done", data));
        let item = reasoning_item(&id, &text, "completed");
        events.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
        self.done.push((index, item));
    }

    fn text_delta(&mut self, text: &str, events: &mut Vec<Bytes>) {
        if self.text.is_none() {
            // Items are written one after another: the reasoning before the text is done.
            self.close_reasoning(events);
            let index = self.next_index;
            self.next_index += 1;
            let id = super::new_id("msg");
            let mut item = message_item(&id, "", "in_progress");
            item["content"] = json!([]);
            events
                .push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
            events.push(self.event(
                "response.content_part.added",
                json!({"output_index": index, "item_id": id, "content_index": 0, "part": output_text("")}),
            ));
            self.text = Some((index, id, String::new()));
        }
        let Some((index, id, so_far)) = &mut self.text else { return };
        so_far.push_str(text);
        let data =
            json!({"output_index": *index, "item_id": id, "content_index": 0, "delta": text, "logprobs": []});
        events.push(self.event("response.output_text.delta", data));
    }

    fn call_delta(&mut self, delta: &Value, events: &mut Vec<Bytes>) {
        let chat_index = delta["index"].as_u64().unwrap_or(0);
        if !self.calls.iter().any(|c| c.chat_index == chat_index) {
            // Items are written one after another: what came before a call is done.
            self.close_reasoning(events);
            self.close_text(events);
            let output_index = self.next_index;
            self.next_index += 1;
            let call = Call {
                chat_index,
                output_index,
                id: super::new_id("fc"),
                call_id: delta["id"].as_str().map_or_else(|| super::new_id("call"), str::to_string),
                name: delta.pointer("/function/name").and_then(Value::as_str).unwrap_or("").to_string(),
                arguments: String::new(),
            };
            let item = function_call_item(&call.id, &call.call_id, &call.name, "", "in_progress");
            events.push(
                self.event("response.output_item.added", json!({"output_index": output_index, "item": item})),
            );
            self.calls.push(call);
        }
        let Some(arguments) =
            delta.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty())
        else {
            return;
        };
        let Some(call) = self.calls.iter_mut().find(|c| c.chat_index == chat_index) else { return };
        call.arguments.push_str(arguments);
        let data = json!({"output_index": call.output_index, "item_id": call.id, "delta": arguments});
        events.push(self.event("response.function_call_arguments.delta", data));
    }

    fn close_text(&mut self, events: &mut Vec<Bytes>) {
        let Some((index, id, text)) = self.text.take() else { return };
        let data =
            json!({"output_index": index, "item_id": id, "content_index": 0, "text": text, "logprobs": []});
        events.push(self.event("response.output_text.done", data));
        let part =
            json!({"output_index": index, "item_id": id, "content_index": 0, "part": output_text(&text)});
        events.push(self.event("response.content_part.done", part));
        let item = message_item(&id, &text, "completed");
        events.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
        self.done.push((index, item));
    }

    /// Closes every open item; the caller sends the events, then [`Self::completed`] once the
    /// response is stored.
    pub(crate) fn finish(&mut self) -> (Vec<Bytes>, Finished) {
        let mut events = Vec::new();
        self.close_reasoning(&mut events);
        self.close_text(&mut events);
        for call in std::mem::take(&mut self.calls) {
            let data = json!({"output_index": call.output_index, "item_id": call.id, "name": call.name, "arguments": call.arguments});
            events.push(self.event("response.function_call_arguments.done", data));
            let item = function_call_item(&call.id, &call.call_id, &call.name, &call.arguments, "completed");
            let data = json!({"output_index": call.output_index, "item": item});
            events.push(self.event("response.output_item.done", data));
            self.done.push((call.output_index, item));
        }
        self.done.sort_by_key(|(index, _)| *index);
        let output: Vec<Value> = self.done.iter().map(|(_, item)| item.clone()).collect();
        let status = Status::of_finish(self.finish_reason.as_deref());
        let response = self.base.object(status, output.clone(), usage(self.usage.as_ref()), Value::Null);
        (events, Finished { response, output, status })
    }

    /// `response.completed` (or `response.incomplete`) with the finished response.
    pub(crate) fn completed(&mut self, finished: &Finished) -> Bytes {
        let kind = match finished.status {
            Status::Incomplete => "response.incomplete",
            _ => "response.completed",
        };
        self.event(kind, json!({"response": finished.response}))
    }

    /// A failure: an `error` event and `response.failed`, from an OpenAI error object.
    pub(crate) fn failed(&mut self, error: &Value) -> Vec<Bytes> {
        let response = self.failure(error);
        let (code, message) = code_and_message(error);
        vec![
            self.event("error", json!({"code": code, "message": message, "param": error["param"]})),
            self.event("response.failed", json!({"response": response})),
        ]
    }

    /// The failed Response object [`Self::failed`] sends, with the items done so far.
    pub(crate) fn failure(&self, error: &Value) -> Value {
        let (code, message) = code_and_message(error);
        let output: Vec<Value> = self.done.iter().map(|(_, item)| item.clone()).collect();
        // A Response's `error.code` is one of OpenAI's list; the `error` event says which.
        let kind = if code == "rate_limit_exceeded" { "rate_limit_exceeded" } else { "server_error" };
        self.base.object(
            Status::Failed,
            output,
            usage(self.usage.as_ref()),
            json!({"code": kind, "message": message}),
        )
    }
}

fn code_and_message(error: &Value) -> (&str, &str) {
    let code = error["code"].as_str().or(error["type"].as_str()).unwrap_or("server_error");
    (code, error["message"].as_str().unwrap_or("The response failed."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responses::request::Echo;

    fn translator() -> Translator {
        Translator::new(Base { id: "resp_1".into(), created_at: 1, model: "m".into(), echo: Echo::default() })
    }

    fn events(bytes: &[Bytes]) -> Vec<Value> {
        bytes
            .iter()
            .map(|b| {
                let text = std::str::from_utf8(b).unwrap();
                let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                serde_json::from_str(data).unwrap()
            })
            .collect()
    }

    #[test]
    fn text_then_a_tool_call_are_two_items_in_order_numbered_from_zero() {
        let mut t = translator();
        let mut all = t.start();
        for chunk in [
            json!({"choices": [{"delta": {"role": "assistant", "content": "Let me "}}]}),
            json!({"choices": [{"delta": {"content": "check."}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        ] {
            all.extend(t.chunk(&chunk).unwrap());
        }
        let (closing, finished) = t.finish();
        all.extend(closing);
        all.push(t.completed(&finished));
        let events = events(&all);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
        let done = &events[14]["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Let me check.");
        assert_eq!(done["output"][1]["arguments"], "{\"x\":1}");
        assert_eq!(done["output"][1]["call_id"], "call_a");
        assert_eq!(done["usage"]["total_tokens"], 5);
    }

    #[test]
    fn reasoning_comes_first_as_its_own_item() {
        let mut t = translator();
        let mut all = t.start();
        for chunk in [
            json!({"choices": [{"delta": {"role": "assistant", "reasoning_content": "Two and "}}]}),
            json!({"choices": [{"delta": {"reasoning_content": "two."}}]}),
            json!({"choices": [{"delta": {"content": "4"}, "finish_reason": "stop"}]}),
        ] {
            all.extend(t.chunk(&chunk).unwrap());
        }
        let (closing, finished) = t.finish();
        all.extend(closing);
        let events = events(&all);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds[2..10],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
            ]
        );
        assert_eq!(events[6]["text"], "Two and two.");
        assert_eq!(finished.output[0]["type"], "reasoning");
        assert_eq!(finished.output[0]["content"][0]["text"], "Two and two.");
        assert_eq!(finished.output[1]["content"][0]["text"], "4");
    }

    #[test]
    fn an_error_chunk_fails_the_response() {
        let mut t = translator();
        t.start();
        let error = t.chunk(
            &json!({"error": {"message": "boom", "type": "server_error", "code": "upstream_timeout"}}),
        );
        let failed = events(&t.failed(&error.unwrap_err()));
        assert_eq!(failed[0]["type"], "error");
        assert_eq!(failed[0]["code"], "upstream_timeout");
        assert_eq!(failed[1]["type"], "response.failed");
        assert_eq!(failed[1]["response"]["status"], "failed");
        assert_eq!(failed[1]["response"]["error"], json!({"code": "server_error", "message": "boom"}));
    }
}
