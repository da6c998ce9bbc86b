//! The sessions API: inspect and delete sessions, lock goals, replay a turn's stream, resume an
//! interrupted turn.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::holder::{timed, Admitted, Holder};
use super::{session_key, with_id, ChannelBody};
use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::openai::events::is_done;
use crate::session::checkpoint::now_ms;
use crate::session::{GoalLock, OnGoalConflict, SessionKey};
use crate::AppState;

/// How often a replay that has caught up looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(25);

/// `GET`/`DELETE /v1/sessions/{id}`, `GET /v1/sessions/{id}/messages`, `.../tasks`,
/// `GET`/`PUT`/`DELETE /v1/sessions/{id}/goal`, `GET /v1/sessions/{id}/stream` and
/// `POST /v1/sessions/{id}/resume`.
pub async fn api(state: Arc<AppState>, request: http::Request<Body>) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let rest = path.trim_start_matches("/v1/sessions/");
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (rest, None),
    };
    let not_found = || GatewayError::NotFound { method: parts.method.to_string(), path: path.to_string() };
    if !crate::session::valid_id(id) {
        return Err(not_found());
    }
    let key = session_key(&parts.headers, &parts.extensions, id);
    let store = &state.sessions.store;
    let metrics = &state.metrics;
    let missing = || GatewayError::SessionNotFound { id: id.to_string() };
    match (&parts.method, sub) {
        (&Method::GET, None) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let cp = &stored.checkpoint;
            Ok(json_response(json!({
                "id": id,
                "object": "session",
                "version": stored.version,
                "messages": cp.transcript.len(),
                "usage": cp.usage,
                "goal": cp.goal,
                "in_flight": cp.in_flight,
                "history_rewrites": cp.history_rewrites,
                "created_at_ms": cp.created_ms,
                "updated_at_ms": cp.updated_ms,
            })))
        }
        (&Method::GET, Some("tasks")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let record = crate::tools::record::ToolRecord::from_raw(stored.checkpoint.tools.as_deref());
            Ok(json_response(json!({"object": "list", "data": record.tasks})))
        }
        (&Method::GET, Some("messages")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            Ok(json_response(json!({"object": "list", "data": stored.checkpoint.transcript})))
        }
        (&Method::DELETE, None) => {
            if timed(metrics, "delete", store.delete(&key)).await? {
                Ok(json_response(json!({"id": id, "object": "session.deleted", "deleted": true})))
            } else {
                Err(missing())
            }
        }
        (&Method::GET, Some("goal")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let goal = stored.checkpoint.goal.ok_or_else(missing)?;
            Ok(json_response(goal_json(id, &goal)))
        }
        (&Method::PUT, Some("goal")) => {
            let request = read_goal(body).await?;
            let mut holder = admit_for_update(&state, &key, &parts.headers).await?;
            let goal = GoalLock {
                goal: request.goal,
                strategy: request.strategy,
                constraints: request.constraints,
                locked_ms: now_ms(),
                on_conflict: request.on_conflict,
                block: None,
                system: None,
            };
            let goal = GoalLock { block: Some(goal.block()), ..goal };
            let rendered = goal_json(id, &goal);
            holder.checkpoint.goal = Some(goal);
            holder.finish(None).await.ok_or_else(|| GatewayError::SessionBusy { id: id.to_string() })?;
            Ok(json_response(rendered))
        }
        (&Method::DELETE, Some("goal")) => {
            let mut holder = admit_for_update(&state, &key, &parts.headers).await?;
            let had = holder.checkpoint.goal.take().is_some();
            holder.finish(None).await.ok_or_else(|| GatewayError::SessionBusy { id: id.to_string() })?;
            if had {
                Ok(json_response(json!({"id": id, "object": "session.goal.deleted", "deleted": true})))
            } else {
                Err(missing())
            }
        }
        (&Method::GET, Some("stream")) => {
            let last =
                parts.headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(parse_event_id);
            replay(state.clone(), key, id, last).await
        }
        (&Method::POST, Some("resume")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let now = crate::session::checkpoint::now_ms();
            let state_json = match &stored.checkpoint.in_flight {
                None => json!({"id": id, "object": "session.resume", "resumed": false, "state": "idle"}),
                Some(f) if f.lease_until_ms > now => {
                    json!({"id": id, "object": "session.resume", "resumed": false, "state": "in_progress", "turn": f.turn})
                }
                Some(f) if f.request.is_none() => {
                    json!({"id": id, "object": "session.resume", "resumed": false, "state": "abandoned", "turn": f.turn})
                }
                Some(_) => match super::resume(&state, key, parts.headers.clone(), stored).await {
                    Some(turn) => {
                        let mut response = json_response(
                            json!({"id": id, "object": "session.resume", "resumed": true, "state": "in_progress", "turn": turn}),
                        );
                        *response.status_mut() = http::StatusCode::ACCEPTED;
                        return Ok(response);
                    }
                    None => {
                        json!({"id": id, "object": "session.resume", "resumed": false, "state": "in_progress"})
                    }
                },
            };
            Ok(json_response(state_json))
        }
        (_, None | Some("messages" | "goal" | "stream" | "resume" | "tasks")) => {
            Err(GatewayError::MethodNotAllowed { method: parts.method.to_string(), path: path.to_string() })
        }
        _ => Err(not_found()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalRequest {
    goal: String,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    constraints: Vec<String>,
    #[serde(default)]
    on_conflict: OnGoalConflict,
}

async fn read_goal(body: Body) -> Result<GoalRequest, GatewayError> {
    let bytes = body
        .collect()
        .await
        .map_err(|e| GatewayError::invalid(e.to_string(), None, "invalid_body"))?
        .to_bytes();
    let request: GoalRequest = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::invalid(format!("Invalid goal: {e}"), Some("goal"), "invalid_goal"))?;
    if request.goal.trim().is_empty() {
        return Err(GatewayError::invalid("Invalid 'goal': empty string.", Some("goal"), "invalid_value"));
    }
    Ok(request)
}

fn goal_json(id: &str, goal: &GoalLock) -> Value {
    json!({
        "id": id,
        "object": "session.goal",
        "goal": goal.goal,
        "strategy": goal.strategy,
        "constraints": goal.constraints,
        "on_conflict": goal.on_conflict,
        "locked_at_ms": goal.locked_ms,
    })
}

fn json_response(value: Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Admits a session for a change that is not a turn (a goal lock), resuming a dead owner's
/// turn first if there is one.
async fn admit_for_update(
    state: &Arc<AppState>,
    key: &SessionKey,
    headers: &HeaderMap,
) -> Result<Holder, GatewayError> {
    loop {
        let admitted =
            Holder::admit(state.sessions.clone(), state.metrics.clone(), key.clone(), "update", |_| {
                Ok(((), None))
            })
            .await?;
        match admitted {
            Admitted::Turn(holder, ()) => return Ok(holder),
            Admitted::Interrupted(stored) => {
                super::resume(state, key.clone(), headers.clone(), stored).await;
            }
        }
    }
}

/// `TURN-SEQ`.
fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (turn, seq) = id.trim().split_once('-')?;
    Some((turn.parse().ok()?, seq.parse().ok()?))
}

/// Replays the session's last streamed turn after `last` (or from its start), then follows it
/// live until `[DONE]`, the turn's end, or its owner's lease having run out for a lease period.
async fn replay(
    state: Arc<AppState>,
    key: SessionKey,
    id: &str,
    last: Option<(u64, u64)>,
) -> Result<Response<Body>, GatewayError> {
    let store = state.sessions.store.clone();
    let stored = timed(&state.metrics, "load", store.load(&key)).await?;
    let turn = stored
        .and_then(|s| s.checkpoint.stream_turn)
        .ok_or_else(|| GatewayError::SessionNotFound { id: format!("{id} (no streamed turn)") })?;
    let mut after = match last {
        Some((t, seq)) if t == turn => seq,
        _ => 0,
    };
    // A lease a moment past its end is more often a busy owner about to renew than a dead one:
    // the follower gives up only one more lease period after it (a dead owner's turn, resumed,
    // gets a new turn number anyway, which ends this follower at once).
    let grace = state.sessions.config.lease.as_millis() as u64;
    let (tx, receiver) = mpsc::channel::<Result<Frame<Bytes>, crate::error::BoxError>>(32);
    tokio::spawn(async move {
        loop {
            let events = match store.read_events(&key, turn, after, 256).await {
                Ok(events) => events,
                Err(err) => {
                    let _ = tx.send(Err(Box::new(err))).await;
                    return;
                }
            };
            for (seq, event) in &events {
                after = *seq;
                if tx.send(Ok(Frame::data(with_id(turn, *seq, event)))).await.is_err() {
                    return;
                }
                if is_done(event) {
                    return;
                }
            }
            if !events.is_empty() {
                continue;
            }
            // Caught up: go on only while the turn is still being served.
            let live = match store.load(&key).await {
                Ok(Some(s)) => {
                    s.checkpoint.stream_turn == Some(turn)
                        && s.checkpoint
                            .in_flight
                            .as_ref()
                            .is_some_and(|f| f.turn == turn && f.lease_until_ms + grace > now_ms())
                }
                _ => false,
            };
            if !live {
                // One last read: events written between the read and the load.
                if let Ok(rest) = store.read_events(&key, turn, after, 256).await {
                    for (seq, event) in rest {
                        if tx.send(Ok(Frame::data(with_id(turn, seq, &event)))).await.is_err() {
                            return;
                        }
                    }
                }
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                () = tx.closed() => return,
            }
        }
    });
    let mut response = Response::new(ChannelBody { receiver }.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
