//! The hybrid state sheet: one LLM call that summarises the span before the recent turns.
//!
//! The call sends the same prefix as the conversation's own requests (system messages, goal
//! block, earlier sheet, compacted span, same `tools`), then one instruction, so on a server
//! with a prompt cache the call itself is mostly a cache hit. It runs in the background from
//! the pre-compaction mark; the result is stored (`sum:{conversation}`) for the epoch that
//! places it, on this replica or another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use serde_json::value::RawValue;

use super::plan::{Summary, SummaryRequest};
use crate::upstream::{Outgoing, OutgoingBody};
use crate::AppState;

/// The sheet's headings, in order.
pub const HEADINGS: [&str; 9] = [
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

/// Where and as whom the summary call goes.
pub struct Call {
    pub model: String,
    pub route_upstream: Option<String>,
    /// The client's `Authorization`, for upstreams that take the caller's key.
    pub authorization: Option<HeaderValue>,
    /// The request's `tools`, canonical, so the call's prefix matches the conversation's.
    pub tools: Option<Box<RawValue>>,
}

/// The request body of a summary call.
pub fn request_body(
    request: &SummaryRequest,
    call: &Call,
    max_tokens: u32,
) -> Result<Bytes, serde_json::Error> {
    let mut messages = request.messages.clone();
    messages
        .push(serde_json::value::to_raw_value(&serde_json::json!({"role": "user", "content": INSTRUCTION}))?);
    let mut body = serde_json::Map::new();
    body.insert("model".into(), call.model.clone().into());
    body.insert("messages".into(), serde_json::to_value(&messages)?);
    if let Some(tools) = &call.tools {
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
pub fn sheet_message(answer: &str, role: &str, epoch: u32, replaced: usize) -> Option<Box<RawValue>> {
    let answer = answer.trim();
    if answer.is_empty() || repetitive(answer) {
        return None;
    }
    let mut content = format!("[ctxgate state sheet, epoch {epoch}: replaces {replaced} earlier messages]\n");
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
fn answer_text(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.pointer("/choices/0/message/content")?.as_str().map(str::to_string)
}

/// Writes the sheet for `request` and stores it under `sum:{key}`. Failures are counted and
/// logged; the conversation keeps going on rules.
pub async fn write(state: Arc<AppState>, key: String, request: SummaryRequest, call: Call) {
    let compression = &state.config.compression;
    let config = &compression.summarizer;
    let metrics = &state.metrics;
    let started = Instant::now();
    let outcome = tokio::time::timeout(config.timeout, summarize(&state, &request, &call)).await;
    metrics.summarizer_duration.observe(started.elapsed().as_secs_f64());
    let message = match outcome {
        Ok(Ok(message)) => message,
        Ok(Err(reason)) => {
            metrics.summarizer_failures.get_or_create(&crate::telemetry::ReasonLabel { reason }).inc();
            tracing::warn!(reason, "state sheet not written");
            return;
        }
        Err(_) => {
            let reason = "timeout";
            metrics.summarizer_failures.get_or_create(&crate::telemetry::ReasonLabel { reason }).inc();
            tracing::warn!(timeout = ?config.timeout, "state sheet not written in time");
            return;
        }
    };
    let summary = Summary { start: request.start, end: request.end, covered: request.covered, message };
    let Ok(bytes) = serde_json::to_vec(&summary) else { return };
    if let Err(err) = state.sessions.store.put_blob(&format!("sum:{key}"), Bytes::from(bytes)).await {
        metrics.summarizer_failures.get_or_create(&crate::telemetry::ReasonLabel { reason: "store" }).inc();
        tracing::warn!(error = %err, "cannot store a state sheet");
    }
}

async fn summarize(
    state: &AppState,
    request: &SummaryRequest,
    call: &Call,
) -> Result<Box<RawValue>, &'static str> {
    let config = &state.config.compression.summarizer;
    let body = request_body(request, call, config.max_tokens).map_err(|_| "encode")?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(auth) = &call.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let route = match &call.route_upstream {
        Some(name) => state.upstreams.router.named(name).ok_or("no_upstream")?,
        None => state.upstreams.router.route(Some(&call.model)),
    };
    let outgoing = Outgoing {
        method: Method::POST,
        path_and_query: "/v1/chat/completions".into(),
        headers,
        body: OutgoingBody::Replayable(body),
        affinity: None,
    };
    let forwarded = state.upstreams.forward(route, outgoing).await.map_err(|_| "upstream")?;
    let response = forwarded.into_response();
    if !response.status().is_success() {
        return Err("upstream_status");
    }
    let bytes = response.into_body().collect().await.map_err(|_| "upstream_body")?.to_bytes();
    let text = answer_text(&bytes).ok_or("no_text")?;
    let replaced = request.end - request.start;
    sheet_message(&text, &config.role, request.epoch, replaced).ok_or("unusable")
}

/// Sleeps at most `bound` for a sheet being written for `key` to land in the store.
pub async fn wait_for(state: &AppState, key: &str, bound: Duration) -> Option<Summary> {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(bytes)) = state.sessions.store.get_blob(&format!("sum:{key}")).await {
            if let Ok(summary) = serde_json::from_slice::<Summary>(&bytes) {
                return Some(summary);
            }
        }
        if Instant::now() >= deadline || !state.compressor.writing(key) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20).min(bound)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sheet_always_has_every_heading_in_order() {
        let answer = "## Active Task\nfix the build\n## Goal\nship v2\n## Key Decisions\nuse redb";
        let message = sheet_message(answer, "system", 2, 30).unwrap();
        let value: serde_json::Value = serde_json::from_str(message.get()).unwrap();
        let content = value["content"].as_str().unwrap();
        assert!(content
            .starts_with("[ctxgate state sheet, epoch 2: replaces 30 earlier messages]\n## Active Task"));
        let positions: Vec<usize> =
            HEADINGS.iter().map(|h| content.find(&format!("## {h}")).unwrap()).collect();
        assert!(positions.iter().all(|p| *p > 0));
        assert!(content.contains("use redb"));
        assert!(sheet_message("  ", "system", 1, 1).is_none());
        let looping = "## Active Task\nx\n".to_string() + &"## Constraints\n".repeat(40);
        assert!(sheet_message(&looping, "system", 1, 1).is_none(), "a repetition loop is no sheet");
    }
}
