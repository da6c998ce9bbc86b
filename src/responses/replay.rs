//! `GET /v1/responses/{id}?stream=true&starting_after=N`: a background response's stream
//! events after sequence number `N` (all of them without it), replayed from its event log as
//! they were first sent, byte for byte, then followed live to the final one
//! (`response.completed`, `.incomplete`, `.failed` or `.cancelled`). Events this process logs
//! wake the follower; another replica's are polled for. A response whose process died is taken
//! over here, as a session follower takes over a session's turn; one that can no longer finish
//! is stored `failed`. The stream always ends with a final event.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response};
use http_body::Frame;
use serde_json::{json, Value};

use super::background::{liveness, settle, Liveness};
use super::store::{self, Record};
use crate::body::{Body, ChannelBody, FrameSender};
use crate::chat;
use crate::error::GatewayError;
use crate::AppState;

/// How often a follower that has caught up looks for events another replica logged.
const POLL: Duration = Duration::from_millis(25);

/// How often a follower that has caught up looks at where the response runs (its record, and
/// its session's in-flight marker), which is more than a look at the log.
const CHECK: Duration = Duration::from_millis(500);

/// How many times one follower takes the response's turn over before giving up.
const MAX_TAKEOVERS: usize = 8;

/// The `starting_after` of a query, if `stream=true` asks for a stream; `Some(None)` without
/// `starting_after`.
pub(super) fn stream_query(query: Option<&str>) -> Result<Option<Option<u64>>, GatewayError> {
    let param = |name: &str| {
        query?.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    };
    if param("stream") != Some("true") {
        return Ok(None);
    }
    match param("starting_after") {
        None => Ok(Some(None)),
        Some(n) => n.parse().map(|n| Some(Some(n))).map_err(|_| {
            GatewayError::invalid(
                "starting_after must be a sequence number.",
                Some("starting_after"),
                "invalid_value",
            )
        }),
    }
}

/// The stream of the caller's response `record`, after sequence number `starting_after`.
pub(super) fn stream(
    app: Arc<AppState>,
    scope: String,
    id: String,
    record: &Record,
    starting_after: Option<u64>,
    headers: HeaderMap,
) -> Result<Response<Body>, GatewayError> {
    if !record.streamed {
        return Err(GatewayError::invalid(
            "This response cannot be streamed: it was not created with background and stream.",
            Some("stream"),
            "invalid_value",
        ));
    }
    let (frames, body) = ChannelBody::channel(32);
    // Event `n` of the stream (its `sequence_number`) is number `n + 1` in the log.
    let after = starting_after.map_or(0, |n| n.saturating_add(1));
    let task = app.clone();
    app.spawn(async move {
        if let Err(err) = follow(&task, &scope, &id, after, &headers, &frames).await {
            let _ = frames.send(Ok(Frame::data(error_event(&err)))).await;
        }
    });
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

async fn follow(
    app: &Arc<AppState>,
    scope: &str,
    id: &str,
    mut after: u64,
    headers: &HeaderMap,
    tx: &FrameSender,
) -> Result<(), GatewayError> {
    let sessions = &app.sessions;
    let key = store::log_key(scope, id);
    let mut watch = sessions.log_watch(&key);
    let mut takeovers = 0;
    // Until when the last look found the response running, here or elsewhere.
    let mut running_until: Option<(tokio::time::Instant, bool)> = None;
    loop {
        watch.seen();
        let events = sessions.events_after(&key, 0, after, 256).await?;
        for (seq, event) in &events {
            after = *seq;
            if tx.send(Ok(Frame::data(event.clone()))).await.is_err() || is_final(event) {
                return Ok(());
            }
        }
        if !events.is_empty() {
            continue;
        }
        if let Some((until, here)) = running_until.filter(|(until, _)| tokio::time::Instant::now() < *until) {
            let poll = if here { until } else { tokio::time::Instant::now() + POLL };
            tokio::select! {
                () = watch.changed() => {}
                () = tokio::time::sleep_until(poll) => {}
                () = tx.closed() => return Ok(()),
            }
            continue;
        }
        let not_found = || GatewayError::ResponseNotFound { id: id.to_string() };
        let record = store::load(sessions, scope, id).await?.ok_or_else(not_found)?;
        if !record.running() {
            // Its final event is logged just after the record is stored: look once more, and
            // without it (the process died in between) make it from the record.
            let rest = sessions.events_after(&key, 0, after, 256).await?;
            if !rest.is_empty() {
                continue;
            }
            let _ = tx.send(Ok(Frame::data(final_event(&record.response, after)))).await;
            return Ok(());
        }
        match liveness(app, scope, id, &record).await? {
            // Logged events wake the follower; the log is polled for another replica's, and
            // the rest is looked at again after a while (a job that ended without logging).
            Liveness::Here => running_until = Some((tokio::time::Instant::now() + CHECK, true)),
            Liveness::Elsewhere => running_until = Some((tokio::time::Instant::now() + CHECK, false)),
            Liveness::Lapsed(lapsed) => {
                takeovers += 1;
                if takeovers > MAX_TAKEOVERS {
                    return Err(GatewayError::TurnIncomplete {
                        id: id.to_string(),
                        reason: "it was interrupted too many times",
                    });
                }
                let (session, stored) = *lapsed;
                chat::resume(app, session, headers.clone(), stored).await?;
            }
            Liveness::Dead => {
                settle(app, scope, id, record, headers).await?;
            }
        }
    }
}

/// Whether `event` ends a response's stream.
fn is_final(event: &[u8]) -> bool {
    let kind = event.strip_prefix(b"event: ").and_then(|rest| rest.split(|b| *b == b'\n').next());
    matches!(
        kind,
        Some(b"response.completed" | b"response.incomplete" | b"response.failed" | b"response.cancelled")
    )
}

/// The final event of a finished response, numbered `seq`.
fn final_event(response: &Value, seq: u64) -> Bytes {
    let kind = match response["status"].as_str() {
        Some("completed") => "response.completed",
        Some("incomplete") => "response.incomplete",
        Some("cancelled") => "response.cancelled",
        _ => "response.failed",
    };
    let data = json!({"type": kind, "response": response, "sequence_number": seq});
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A failure of the follower itself, as the stream's `error` event.
fn error_event(err: &GatewayError) -> Bytes {
    let error = err.to_json()["error"].clone();
    let data =
        json!({"type": "error", "code": error["code"], "message": error["message"], "param": error["param"]});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_asks_for_a_stream_after_a_number() {
        assert_eq!(stream_query(None).unwrap(), None);
        assert_eq!(stream_query(Some("stream=false")).unwrap(), None);
        assert_eq!(stream_query(Some("stream=true")).unwrap(), Some(None));
        assert_eq!(stream_query(Some("starting_after=4&stream=true")).unwrap(), Some(Some(4)));
        assert!(stream_query(Some("stream=true&starting_after=x")).is_err());
    }

    #[test]
    fn final_events_are_told_apart() {
        assert!(is_final(b"event: response.completed\ndata: {}\n\n"));
        assert!(is_final(b"event: response.cancelled\ndata: {}\n\n"));
        assert!(!is_final(b"event: response.output_text.delta\ndata: {}\n\n"));
        let made = final_event(&json!({"status": "cancelled"}), 7);
        assert!(is_final(&made));
        assert!(std::str::from_utf8(&made).unwrap().contains("\"sequence_number\":7"));
    }
}
