//! A request to an upstream with the Responses API as a turn of a session: the one its session
//! header names, else its stored chain's, else its client's own conversation id (Codex's
//! `session-id`, see [`crate::session::identify`]). The turn is admitted under the session's
//! lease (one turn at a time, `session_busy` past `sessions.busy_timeout`), sent with the
//! session's locked goal as a system message before the input (a request that changes the
//! system prompt the goal guards is refused, as on the chat pipeline), and committed when its
//! answer is complete: the conversation and the answer, as the chat messages the transcript
//! holds (`GET /v1/sessions/{id}/messages`), and the usage.
//!
//! The turn's in-flight marker records the request as sent upstream, with [`ORIGIN`]: a turn
//! whose process died is re-issued by whoever takes it over (the takeover sweep, a resume call,
//! the session's next request) through [`super::native::reissue`], byte for byte, and
//! committed as the dead process would have. The client that sent it is gone; the answer
//! reaches the session's transcript, not a stored response.

use std::sync::Arc;

use bytes::Bytes;
use http::request;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::items::{self, ItemConversation};
use super::store::Chain;
use crate::auth::scope_credential;
use crate::chat::compose::{apply_goal, GoalConflict};
use crate::error::GatewayError;
use crate::headers;
use crate::openai::usage::{PromptTokensDetails, Usage};
use crate::session::{Admitted, Checkpoint, GoalLock, Lease, SessionKey, StoredRequest};
use crate::AppState;

/// A turn admitted on its session.
pub(super) struct SessionTurn {
    lease: Lease,
    /// The conversation the commit records (without the goal block).
    conversation: Vec<Box<RawValue>>,
}

/// What admission adds to the request: the goal block, as the input item that goes first.
pub(super) type GoalItem = Option<Value>;

/// The origin the in-flight marker of such a turn records (see
/// [`crate::session::StoredRequest::origin`]): its request is a Responses request.
pub(super) const ORIGIN: &str = "responses-native";

/// Admits the turn on the session the request names, if it names one, and returns it with the
/// body to send. `conversation` is the whole conversation; `body` makes the request's body with
/// the goal block admission adds (recorded in the in-flight marker). A session the client did
/// not name on purpose (its conversation id) never fails the request: busy, or with its store
/// down, the turn runs without it.
pub(super) async fn admit(
    app: &Arc<AppState>,
    parts: &request::Parts,
    model: &str,
    prompt_cache_key: Option<&str>,
    previous: Option<&Chain>,
    conversation: &ItemConversation<'_>,
    body: &mut (dyn FnMut(GoalItem) -> Result<Bytes, GatewayError> + Send),
) -> Result<Option<(SessionTurn, Bytes)>, GatewayError> {
    let credential = scope_credential(&parts.headers, &parts.extensions);
    let identity = app.sessions.identify(&parts.headers, prompt_cache_key, !credential.is_empty())?;
    let (id, implicit) = match identity {
        Some(named) if !named.implicit => (named.id, false),
        implicit => match (previous.and_then(|p| p.session.clone()), implicit) {
            (Some(chained), _) => (chained, false),
            (None, Some(implicit)) => (implicit.id, true),
            (None, None) => return Ok(None),
        },
    };
    let Some(mapped) = conversation.mapped() else { return Ok(None) };
    let messages = mapped.untagged();
    let key = SessionKey::new(&credential, &id);
    let request_id = parts.headers.get(&headers::REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
    let path = parts.uri.path_and_query().map_or("/v1/responses", |p| p.as_str());
    let caller_credential = crate::upstream::carries_credential(&parts.headers)
        && app.upstreams.router.route(Some(model)).iter().any(|u| !u.holds_credential());
    let admitted = loop {
        let prepare = |checkpoint: &mut Checkpoint| {
            let (recorded, with_goal) = apply_goal(checkpoint.goal.as_mut(), messages.clone())
                .map_err(|GoalConflict| GatewayError::GoalLocked { id: id.clone() })?;
            let goal =
                with_goal.and(checkpoint.goal.as_ref()).map(GoalLock::block).as_deref().and_then(goal_item);
            let sent = body(goal)?;
            let text = std::str::from_utf8(&sent).map_err(|e| GatewayError::Internal(e.into()))?;
            let stored = StoredRequest {
                path: path.to_string(),
                model: model.to_string(),
                // Its events are not logged for the session's stream endpoint (chat events):
                // a re-issue reads the answer to its end, whatever it asks for.
                stream: false,
                body: RawValue::from_string(text.to_string())
                    .map_err(|e| GatewayError::Internal(e.into()))?,
                conversation: Some(recorded.clone()),
                caller_credential,
                origin: Some(ORIGIN.to_string()),
            };
            Ok(((recorded, sent), Some(stored)))
        };
        match Lease::admit(app.sessions.clone(), key.clone(), request_id, prepare).await {
            // A turn of the session whose owner died (a chat turn, or one of these) is finished
            // first, as a chat request's admission does.
            Ok(Admitted::Interrupted(stored)) => {
                if let Err(err) = crate::chat::resume(app, key.clone(), parts.headers.clone(), stored).await {
                    break Err(err);
                }
            }
            other => break other,
        }
    };
    match admitted {
        Ok(Admitted::Turn(lease, (conversation, sent))) => {
            Ok(Some((SessionTurn { lease, conversation }, sent)))
        }
        Ok(Admitted::Interrupted(_)) => Err(GatewayError::SessionBusy { id }),
        Err(err @ (GatewayError::SessionStore(_) | GatewayError::SessionBusy { .. })) if implicit => {
            tracing::warn!(error = %err, "an implicit session cannot take the turn; serving it without");
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// A goal block (a chat system message) as the input item that leads a Responses request.
fn goal_item(block: &RawValue) -> Option<Value> {
    let mut block = serde_json::from_str::<Value>(block.get()).ok()?;
    block["type"] = json!("message");
    Some(block)
}

impl SessionTurn {
    /// A turn taken over after its process died, with the conversation its marker recorded.
    pub(super) fn resumed(lease: Lease, conversation: Vec<Box<RawValue>>) -> Self {
        Self { lease, conversation }
    }

    /// Where the turn's gateway tool tasks are recorded (in its checkpoint).
    pub(super) fn tasks(&self) -> Arc<crate::tools::tasks::TaskLog> {
        crate::chat::task_log(&self.lease)
    }

    /// The session's id.
    pub(super) fn id(&self) -> String {
        self.lease.key().id.clone()
    }

    /// The session's version while the turn runs (a stream's answer carries it).
    pub(super) fn version(&self) -> u64 {
        self.lease.version()
    }

    /// Runs `future` (the upstream call and the relay) while renewing the lease.
    pub(super) async fn during<F: std::future::Future>(&mut self, future: F) -> F::Output {
        self.lease.while_renewing(future).await
    }

    /// Commits the turn with its answer (a finished Response object), or releases the session
    /// without one.
    pub(super) async fn finish(self, answer: Option<&Value>) -> Result<u64, GatewayError> {
        let id = self.lease.key().id.clone();
        let turn = answer.map(|object| {
            let output = object["output"].as_array().cloned().unwrap_or_default();
            let mut transcript = self.conversation;
            if let Some(mapped) = items::map(None, output) {
                transcript.extend(mapped.untagged());
            }
            (transcript, usage_of(&object["usage"]))
        });
        self.lease.finish(turn).await.map_err(|failure| failure.into_error(&id))
    }
}

/// A Response object's `usage` as the session totals count it.
fn usage_of(usage: &Value) -> Option<Usage> {
    let n = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64);
    Some(Usage {
        prompt_tokens: n("/input_tokens")?,
        completion_tokens: n("/output_tokens").unwrap_or(0),
        prompt_tokens_details: n("/input_tokens_details/cached_tokens")
            .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
    })
}
