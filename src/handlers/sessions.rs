//! The sessions API: inspect and delete sessions, lock goals, replay a turn's stream, resume an
//! interrupted turn. The session protocol itself is [`crate::session`]'s; this module maps it
//! to HTTP.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response};
use http_body::Frame;
use serde_json::{json, Value};

use crate::auth::scope_credential;
use crate::body::{Body, ChannelBody, FrameSender};
use crate::chat::resume;
use crate::error::GatewayError;
use crate::headers;
use crate::http_util::{json_response, read_body};
use crate::openai::sse;
use crate::session::checkpoint::now_ms;
use crate::session::events::{follow, parse_event_id, start_of, Followed};
use crate::session::{Admitted, GoalLock, InFlight, Lease, OnGoalConflict, SessionKey, UsageTotals};
use crate::tools::record::ToolRecord;
use crate::AppState;

/// `GET`/`DELETE /v1/sessions/{id}`, `GET /v1/sessions/{id}/messages`, `.../tasks`,
/// `GET`/`PUT`/`DELETE /v1/sessions/{id}/goal`, `GET /v1/sessions/{id}/stream` and
/// `POST /v1/sessions/{id}/resume`.
pub(crate) async fn api(
    state: Arc<AppState>,
    request: http::Request<Body>,
) -> Result<Response<Body>, GatewayError> {
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
    let credential = scope_credential(&parts.headers, &parts.extensions);
    if credential.is_empty() {
        return Err(GatewayError::SessionNeedsCredential);
    }
    let key = SessionKey::new(&credential, id);
    let sessions = &state.sessions;
    let missing = || GatewayError::SessionNotFound { id: id.to_string() };
    let no_goal = || GatewayError::GoalNotSet { id: id.to_string() };
    match (&parts.method, sub) {
        (&Method::GET, None) => {
            let stored = sessions.load(&key).await?.ok_or_else(missing)?;
            let cp = &stored.checkpoint;
            Ok(json_response(&SessionView {
                id,
                object: "session",
                version: stored.version,
                messages: cp.transcript.len(),
                usage: &cp.usage,
                goal: cp.goal.as_ref(),
                in_flight: cp.in_flight.as_ref(),
                history_rewrites: cp.history_rewrites,
                created_at_ms: cp.created_ms,
                updated_at_ms: cp.updated_ms,
            }))
        }
        (&Method::GET, Some("tasks")) => {
            let stored = sessions.load(&key).await?.ok_or_else(missing)?;
            let record = ToolRecord::from_raw(stored.checkpoint.tools.as_deref());
            Ok(json_response(&List { object: "list", data: &record.tasks }))
        }
        (&Method::GET, Some("messages")) => {
            let stored = sessions.load(&key).await?.ok_or_else(missing)?;
            Ok(json_response(&List { object: "list", data: &stored.checkpoint.transcript }))
        }
        (&Method::DELETE, None) => {
            if sessions.delete(&key).await? {
                Ok(json_response(&json!({"id": id, "object": "session.deleted", "deleted": true})))
            } else {
                Err(missing())
            }
        }
        (&Method::GET, Some("goal")) => {
            let stored = sessions.load(&key).await?.ok_or_else(missing)?;
            let goal = stored.checkpoint.goal.ok_or_else(no_goal)?;
            Ok(json_response(&goal_json(id, &goal)))
        }
        (&Method::PUT, Some("goal")) => {
            let request = read_goal(body, sessions.config.max_goal_bytes.get()).await?;
            let mut lease = admit_for_update(&state, &key, &parts.headers).await?;
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
            lease.set_goal(Some(goal));
            lease.finish(None).await.map_err(|_| GatewayError::SessionBusy { id: id.to_string() })?;
            Ok(json_response(&rendered))
        }
        (&Method::DELETE, Some("goal")) => {
            let mut lease = admit_for_update(&state, &key, &parts.headers).await?;
            let had = lease.set_goal(None).is_some();
            lease.finish(None).await.map_err(|_| GatewayError::SessionBusy { id: id.to_string() })?;
            if had {
                Ok(json_response(&json!({"id": id, "object": "session.goal.deleted", "deleted": true})))
            } else {
                Err(no_goal())
            }
        }
        (&Method::GET, Some("stream")) => {
            let last = parts
                .headers
                .get(&headers::LAST_EVENT_ID)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_event_id);
            replay(state.clone(), key, id, last, parts.headers.clone()).await
        }
        (&Method::POST, Some("resume")) => {
            let stored = sessions.load(&key).await?.ok_or_else(missing)?;
            let now = now_ms();
            let state_json = match &stored.checkpoint.in_flight {
                None => json!({"id": id, "object": "session.resume", "resumed": false, "state": "idle"}),
                Some(f) if !sessions.lapsed(f, now) => {
                    json!({"id": id, "object": "session.resume", "resumed": false, "state": "in_progress", "turn": f.turn})
                }
                Some(f) if f.request.is_none() => {
                    json!({"id": id, "object": "session.resume", "resumed": false, "state": "abandoned", "turn": f.turn})
                }
                Some(_) => match resume(&state, key, parts.headers.clone(), stored).await? {
                    Some(turn) => {
                        let mut response = json_response(
                            &json!({"id": id, "object": "session.resume", "resumed": true, "state": "in_progress", "turn": turn}),
                        );
                        *response.status_mut() = http::StatusCode::ACCEPTED;
                        return Ok(response);
                    }
                    None => {
                        json!({"id": id, "object": "session.resume", "resumed": false, "state": "in_progress"})
                    }
                },
            };
            Ok(json_response(&state_json))
        }
        (_, None | Some("messages" | "goal" | "stream" | "resume" | "tasks")) => {
            Err(GatewayError::MethodNotAllowed { method: parts.method.to_string(), path: path.to_string() })
        }
        _ => Err(not_found()),
    }
}

/// `GET /v1/sessions/{id}`. Stored JSON (messages, the in-flight request) is written out as
/// stored: `json!` would re-parse it into a `Value`, which fails (and panics in the macro) on
/// JSON nested past serde_json's recursion limit, so one deep message would make the session
/// unreadable.
#[derive(serde::Serialize)]
struct SessionView<'a> {
    id: &'a str,
    object: &'static str,
    version: u64,
    messages: usize,
    usage: &'a UsageTotals,
    goal: Option<&'a GoalLock>,
    in_flight: Option<&'a InFlight>,
    history_rewrites: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
}

/// `{"object":"list","data":[...]}`, its items serialised as they are (see [`SessionView`]).
#[derive(serde::Serialize)]
struct List<'a, T: serde::Serialize> {
    object: &'static str,
    data: &'a [T],
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

/// The goal lock a request asks for; 400 when it is empty or, with its strategy and
/// constraints, longer than `max` bytes (it is sent with every turn of the session).
async fn read_goal(body: Body, max: usize) -> Result<GoalRequest, GatewayError> {
    let bytes = read_body(body).await?;
    let request: GoalRequest = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::invalid(format!("Invalid goal: {e}"), Some("goal"), "invalid_goal"))?;
    if request.goal.trim().is_empty() {
        return Err(GatewayError::invalid("Invalid 'goal': empty string.", Some("goal"), "invalid_value"));
    }
    let size = request.goal.len()
        + request.strategy.as_ref().map_or(0, String::len)
        + request.constraints.iter().map(String::len).sum::<usize>();
    if size > max {
        return Err(GatewayError::invalid(
            format!(
                "Invalid 'goal': the goal, strategy and constraints are {size} bytes; the limit is {max} (sessions.max_goal_bytes)."
            ),
            Some("goal"),
            "string_above_max_length",
        ));
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

/// Admits a session for a change that is not a turn (a goal lock), resuming a dead owner's
/// turn first if there is one.
async fn admit_for_update(
    state: &Arc<AppState>,
    key: &SessionKey,
    headers: &HeaderMap,
) -> Result<Lease, GatewayError> {
    loop {
        match Lease::admit_update(state.sessions.clone(), key.clone()).await? {
            Admitted::Turn(lease, ()) => return Ok(lease),
            Admitted::Interrupted(stored) => {
                resume(state, key.clone(), headers.clone(), stored).await?;
            }
        }
    }
}

/// Replays the session's last streamed turn after `last` (or from its start), then follows it
/// live (see [`follow`]) to `[DONE]`. A turn whose owner is gone is taken over here, with the
/// follower's credential, and followed on under its new number; a turn that cannot complete
/// ends the stream with an error event. The stream never ends without one or the other.
async fn replay(
    state: Arc<AppState>,
    key: SessionKey,
    id: &str,
    last: Option<(u64, u64)>,
    headers: HeaderMap,
) -> Result<Response<Body>, GatewayError> {
    let stored = state.sessions.load(&key).await?;
    let turn = stored
        .and_then(|s| s.checkpoint.stream_turn)
        .ok_or_else(|| GatewayError::SessionNotFound { id: format!("{id} (no streamed turn)") })?;
    let (frames, body) = ChannelBody::channel(32);
    let app = state.clone();
    let id = id.to_string();
    state.spawn(async move {
        if let Err(err) = follow_to_end(&app, &key, &id, turn, last, headers, &frames).await {
            let _ = frames.send(Ok(Frame::data(err.to_sse_event()))).await;
            let _ = frames.send(Ok(Frame::data(Bytes::from_static(sse::DONE)))).await;
        }
    });
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// How many times one follower moves on to a re-issued turn before giving up (each move is a
/// takeover: a dead owner, or a re-issue that died too).
const MAX_MOVES: usize = 8;

async fn follow_to_end(
    app: &Arc<AppState>,
    key: &SessionKey,
    id: &str,
    mut turn: u64,
    last: Option<(u64, u64)>,
    headers: HeaderMap,
    frames: &FrameSender,
) -> Result<(), GatewayError> {
    let incomplete = |reason| GatewayError::TurnIncomplete { id: id.to_string(), reason };
    let mut after = start_of(turn, last);
    for _ in 0..MAX_MOVES {
        let next = match follow(&app.sessions, key, turn, &mut after, frames).await {
            Followed::Done | Followed::Gone => return Ok(()),
            Followed::Ended(reason) => return Err(incomplete(reason)),
            Followed::Moved(next) => Some(next),
            // `None`: someone else took it over (or it moved on); the next look finds where.
            Followed::Lapsed(stored) => resume(app, key.clone(), headers.clone(), *stored).await?,
        };
        if let Some(next) = next {
            // The re-issued turn is followed from its start: its events carry the new number.
            turn = next;
            after = 0;
        }
    }
    Err(incomplete("it was interrupted too many times"))
}
