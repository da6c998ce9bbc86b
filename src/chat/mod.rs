//! `POST /v1/chat/completions`: the one pipeline every chat request takes, in this order:
//!
//! 1. **read** ([`context`]): the body is validated and parsed once into a
//!    [`ChatRequest`](crate::openai::ChatRequest), gateway tools are injected, the session id is
//!    checked and the caller's tokens are charged.
//! 2. **prepare**: on a session the turn is admitted under a [`Lease`] and composed from the
//!    checkpoint ([`compose`]); then compressed ([`compression`]).
//! 3. **send**: along the model's route, with retries and failover before the first byte.
//! 4. **relay** ([`relay`], [`tool_loop`]): the answer is read and passed on (SSE or JSON),
//!    with the gateway's tool rounds in between.
//! 5. **finish**: on a session the turn is committed, before the client's stream ends.
//!
//! How a request relates to a session is the one thing that varies, and it varies in
//! [`Mode`] only: stateless (answered on the client's connection), a session turn (detached
//! from the connection, renewed, committed) or degraded (a session request served without its
//! store). A stateless request without gateway tools streams the upstream's body straight
//! through.
//!
//! A second front-end protocol plugs in at step 1: an adapter that turns its request into a
//! [`ChatContext`] and the relay's answer back into its own shape.

pub(crate) mod compose;
pub(crate) mod compression;
mod context;
mod relay;
pub(crate) mod takeover;
pub(crate) mod tool_loop;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::compose::GoalConflict;
use self::compression::Compaction;
pub(crate) use self::context::ChatContext;
use self::relay::{Limits, Relay};
use self::tool_loop::{Originals, Outcome, ToolLoop};
use crate::body::{Body, ChannelBody};
use crate::compress::{Plan, SessionRecord};
use crate::config::OnStoreError;
use crate::error::GatewayError;
use crate::headers;
use crate::openai::ChatRequest;
use crate::session::lease::Amendment;
use crate::session::{Admitted, Checkpoint, GoalLock, Identity, Lease, SessionKey, Stored, StoredRequest};
use crate::telemetry::OutcomeLabel;
use crate::tools::record::{TaskEntry, ToolRecord};
use crate::tools::tasks::TaskLog;
use crate::AppState;

/// The handler.
pub(crate) async fn completions(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let ctx = ChatContext::read(&app, request).await?;
    answer(app, ctx).await
}

/// Runs a read request through the pipeline: stateless, or as a turn of the session it names.
/// Front-end protocols other than Chat Completions enter here with a context of their own.
pub(crate) async fn answer(app: Arc<AppState>, mut ctx: ChatContext) -> Result<Response<Body>, GatewayError> {
    match ctx.session.take() {
        None => {
            let upstream = compression::stateless(&app, &mut ctx).await?;
            let turn = Turn { ctx, upstream, conversation: Vec::new(), mode: Mode::Stateless };
            turn.run(app).await
        }
        Some(session) => {
            let (reply, response) = oneshot::channel();
            let detached = app.clone();
            // Detached on purpose: the turn must finish and commit even if the client goes away.
            app.spawn(async move {
                let result = match Turn::on_session(&detached, ctx, session).await {
                    Ok(turn) => turn.run(detached).await,
                    Err(err) => Err(err),
                };
                let _ = reply.send(result);
            });
            response.await.unwrap_or_else(|_| {
                Err(GatewayError::Internal("the session turn ended without a response".into()))
            })
        }
    }
}

/// How a turn relates to a session: the one place the paths differ.
enum Mode {
    /// No session: answered on the client's connection; a client that leaves ends the turn.
    Stateless,
    /// On a session, under its lease: detached from the client, committed at the end.
    Session(Box<SessionTurn>),
    /// A session request served without its session (`on_store_error = "fail_open"`).
    Degraded,
}

struct SessionTurn {
    lease: Lease,
    /// Where the turn's tool tasks are recorded.
    tasks: Arc<TaskLog>,
}

/// One chat turn, prepared: what to send, what a session commits, and its mode.
struct Turn {
    ctx: ChatContext,
    /// The request to send upstream when it is not the client's as sent (composed, compacted).
    upstream: Option<ChatRequest>,
    /// What a session turn commits before the answer (its conversation without the goal block).
    conversation: Vec<Box<RawValue>>,
    mode: Mode,
}

impl Turn {
    /// Admits the turn on its session: composes it from the checkpoint, compresses it, and
    /// marks the session in flight with the upstream request, in one compare-and-set. A dead
    /// owner's interrupted turn is resumed first. With the store down and `fail_open`, the turn
    /// goes on degraded. A session the request did not name on purpose never fails it: busy or
    /// with its store down, the turn runs as a stateless one, marked degraded.
    async fn on_session(
        app: &Arc<AppState>,
        mut ctx: ChatContext,
        session: Identity,
    ) -> Result<Turn, GatewayError> {
        let id = session.id;
        let key = ctx.session_key(&id);
        let compaction =
            Compaction::begin(app, &ctx, format!("s:{}", key.storage_key()), ctx.request.messages(), true)
                .await;
        let admitted = loop {
            let prepare =
                |checkpoint: &mut Checkpoint| prepare(app, &ctx, compaction.as_ref(), checkpoint, &id);
            match Lease::admit(app.sessions.clone(), key.clone(), ctx.request_id(), prepare).await {
                Ok(Admitted::Turn(lease, prepared)) => break Ok((lease, prepared)),
                Ok(Admitted::Interrupted(stored)) => {
                    // Finish the dead owner's turn first; this request then waits its turn.
                    if let Err(err) = resume(app, key.clone(), ctx.headers().clone(), stored).await {
                        break Err(err);
                    }
                }
                Err(err) => break Err(err),
            }
        };
        let (lease, prepared) = match admitted {
            Ok(admitted) => admitted,
            Err(GatewayError::SessionStore(err))
                if app.sessions.config.on_store_error == OnStoreError::FailOpen =>
            {
                tracing::warn!(error = %err, "session store unavailable; serving without the session");
                return Ok(Turn { ctx, upstream: None, conversation: Vec::new(), mode: Mode::Degraded });
            }
            Err(err @ (GatewayError::SessionStore(_) | GatewayError::SessionBusy { .. }))
                if session.implicit =>
            {
                tracing::warn!(error = %err, "an implicit session cannot take the turn; serving it statelessly");
                let upstream = compression::stateless(app, &mut ctx).await?;
                return Ok(Turn { ctx, upstream, conversation: Vec::new(), mode: Mode::Degraded });
            }
            Err(err) => return Err(err),
        };
        if prepared.rewrote_history {
            app.metrics.session_history_rewrites.inc();
        }
        if let (Some(compaction), Some((mut plan, shared))) = (&compaction, prepared.plan) {
            compaction.count_prefix(app, shared);
            compaction.finish(app, &mut ctx, &mut plan, prepared.conversation.len());
        }
        let tasks = task_log(&lease);
        let mode = Mode::Session(Box::new(SessionTurn { lease, tasks }));
        Ok(Turn { ctx, upstream: prepared.upstream, conversation: prepared.conversation, mode })
    }

    /// Sends the turn, relays the answer and finishes the turn. Returns the client's response
    /// as soon as its head is known; a stream is relayed by a task from there.
    async fn run(self, app: Arc<AppState>) -> Result<Response<Body>, GatewayError> {
        let Turn { mut ctx, upstream, conversation, mut mode } = self;
        ctx.strip_gateway_headers(app.sessions.config.header.primary());
        let sent = upstream.as_ref().unwrap_or(&ctx.request).body().clone();
        let headers = if mode.streams_straight(&ctx) {
            // Nothing reads this request again: its headers go as they are.
            std::mem::take(&mut ctx.parts.headers)
        } else {
            // The gateway reads and rewrites this answer (events numbered, tool rounds, the
            // transcript): it must come unencoded, for every round. Identity is always acceptable.
            ctx.parts.headers.remove(header::ACCEPT_ENCODING);
            ctx.parts.headers.clone()
        };
        let cancel = ctx.cancel.clone();
        let forwarded = mode
            .guard(unless_cancelled(&cancel, ctx.send_with(&app, sent, headers)))
            .await
            .unwrap_or(Err(GatewayError::Cancelled));
        let mut response = match forwarded {
            Ok(forwarded) => forwarded.into_response(),
            Err(err) => {
                let _ = mode.finish(conversation, None).await;
                return Err(err);
            }
        };
        mode.annotate(&ctx, response.headers_mut());
        if !response.status().is_success() {
            // The upstream's error passes through; the turn did not happen.
            let _ = mode.finish(conversation, None).await;
            return Ok(response);
        }
        if mode.streams_straight(&ctx) {
            return Ok(response);
        }
        if ctx.request.stream {
            let (frames, client_body) = ChannelBody::channel(32);
            let upstream_body = std::mem::replace(response.body_mut(), client_body);
            response.headers_mut().remove(header::CONTENT_LENGTH);
            let task = app.clone();
            app.spawn(async move {
                let numbered = mode.lease().map(|lease| (lease.turn(), lease.event_log()));
                let mut relay = Relay::stream(frames, numbered, Limits::of(&task.config.server));
                let sent = upstream.as_ref().unwrap_or(&ctx.request);
                let originals = originals(&ctx, &mode, &conversation);
                let mut rounds = ToolLoop::new(&task, &ctx, sent, mode.is_session(), mode.tasks())
                    .with_originals(originals);
                let streamed =
                    mode.guard(unless_cancelled(&cancel, rounds.stream(upstream_body, &mut relay)));
                if streamed.await.is_none() {
                    // Cancelled: the upstream call is dropped with the rounds, nothing is
                    // committed, and the client's stream ends with the reason.
                    relay.close_log().await;
                    let _ = mode.finish(conversation, None).await;
                    relay.end(Err(&GatewayError::Cancelled)).await;
                    return;
                }
                relay.close_log().await;
                let outcome = rounds.finish();
                let committed = mode.finish(conversation, Some(outcome)).await;
                // `[DONE]`, or the commit's failure, and the end of the client's body come only
                // now: a client that read `[DONE]` can rely on the turn being committed.
                relay.end(committed.as_ref().map(|_| ())).await;
                drop(relay);
            });
            return Ok(response);
        }
        let sent = upstream.as_ref().unwrap_or(&ctx.request);
        let originals = originals(&ctx, &mode, &conversation);
        let mut rounds =
            ToolLoop::new(&app, &ctx, sent, mode.is_session(), mode.tasks()).with_originals(originals);
        let answered = mode
            .guard(unless_cancelled(&cancel, rounds.json(response)))
            .await
            .unwrap_or(Err(GatewayError::Cancelled));
        let outcome = rounds.finish();
        let mut response = match answered {
            Ok(response) => response,
            Err(err) => {
                let _ = mode.finish(conversation, None).await;
                return Err(err);
            }
        };
        // The tool loop's rounds answer with responses of their own: the turn's headers go on
        // the one the client gets.
        mode.annotate(&ctx, response.headers_mut());
        match mode.finish(conversation, Some(outcome)).await {
            Ok(Some(version)) => {
                response.headers_mut().insert(headers::SESSION_VERSION, HeaderValue::from(version));
            }
            Ok(None) => {}
            // The session moved on without this turn (deleted, or taken over): the answer is
            // still the client's, marked as not saved.
            Err(GatewayError::SessionConflict { .. }) => {
                response.headers_mut().insert(headers::SESSION_STATE, HeaderValue::from_static("not_saved"));
            }
            // The store failed: a 200 would claim a turn that may not be saved; the client
            // retries, and the session resumes or re-runs the turn.
            Err(err) => return Err(err),
        }
        Ok(response)
    }
}

/// Runs `future` unless `cancel` fires first: `None` then, and the future is dropped (with it
/// the upstream call it makes).
async fn unless_cancelled<F: std::future::Future>(
    cancel: &CancellationToken,
    future: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        output = future => Some(output),
    }
}

impl Mode {
    fn is_session(&self) -> bool {
        matches!(self, Self::Session(_))
    }

    fn lease(&self) -> Option<&Lease> {
        match self {
            Self::Session(turn) => Some(&turn.lease),
            _ => None,
        }
    }

    fn tasks(&self) -> Option<Arc<TaskLog>> {
        match self {
            Self::Session(turn) => Some(turn.tasks.clone()),
            _ => None,
        }
    }

    /// Whether the upstream's answer goes to the client untouched: nothing observes it (no
    /// session to commit to, no tool loop).
    fn streams_straight(&self, ctx: &ChatContext) -> bool {
        !self.is_session() && !ctx.tools_engaged
    }

    /// Runs `future`; on a session, renewing the lease meanwhile.
    async fn guard<F: std::future::Future>(&mut self, future: F) -> F::Output {
        match self {
            Self::Session(turn) => turn.lease.while_renewing(future).await,
            _ => future.await,
        }
    }

    /// The response headers of the turn: what compression did, and the session's state.
    fn annotate(&self, ctx: &ChatContext, headers: &mut HeaderMap) {
        headers.extend(ctx.annotations.clone());
        match self {
            Self::Degraded => {
                headers.insert(headers::SESSION_STATE, HeaderValue::from_static("degraded"));
            }
            Self::Session(turn) if ctx.request.stream => {
                headers.insert(headers::SESSION_VERSION, HeaderValue::from(turn.lease.version()));
            }
            _ => {}
        }
    }

    /// Ends the turn: on a session, commits the conversation and the answer (or only releases
    /// the session when there is none). Returns the committed version (`None` off a session),
    /// or why it was not committed.
    async fn finish(
        &mut self,
        conversation: Vec<Box<RawValue>>,
        outcome: Option<Outcome>,
    ) -> Result<Option<u64>, GatewayError> {
        let Self::Session(turn) = std::mem::replace(self, Self::Stateless) else { return Ok(None) };
        let SessionTurn { mut lease, .. } = *turn;
        let commit = outcome.and_then(|outcome| {
            let usage = outcome.usage;
            if let Some(held) = &outcome.held {
                let mut record = ToolRecord::from_raw(lease.checkpoint().tools.as_deref());
                record.remember(held.clone());
                lease.set_tools(record.to_raw());
            }
            // The answer moves into the transcript: an answer is held once, not twice.
            let transcript = outcome.into_transcript(conversation)?;
            Some((transcript, usage))
        });
        let id = lease.key().id.clone();
        lease.finish(commit).await.map(Some).map_err(|failure| failure.into_error(&id))
    }
}

/// Where `ctxgate_expand` finds a turn's originals, when the request offers it: a session's
/// conversation (its transcript with this turn's messages), or a stateless request's own
/// messages; then the caller's store of originals (stateless epochs', and those of
/// conversations compacted on request, which a session may have been sent).
fn originals<'a>(
    ctx: &'a ChatContext,
    mode: &Mode,
    conversation: &'a [Box<RawValue>],
) -> Option<Originals<'a>> {
    if !ctx.expand {
        return None;
    }
    let messages = match mode {
        Mode::Session(_) => conversation,
        _ => ctx.request.messages(),
    };
    Some(Originals { messages, scope: ctx.scope() })
}

/// What admission prepared inside its compare-and-set.
struct Prepared {
    conversation: Vec<Box<RawValue>>,
    upstream: Option<ChatRequest>,
    rewrote_history: bool,
    /// The compression plan, and the previous request's bytes and those shared as a prefix.
    plan: Option<(Plan, (u64, u64))>,
}

/// Composes and compresses a session turn from `checkpoint` (changing it), and returns the
/// upstream request to record in the in-flight marker.
fn prepare(
    app: &AppState,
    ctx: &ChatContext,
    compaction: Option<&Compaction<'_>>,
    checkpoint: &mut Checkpoint,
    id: &str,
) -> Result<(Prepared, Option<StoredRequest>), GatewayError> {
    let composed = compose::compose(checkpoint, &ctx.request, ctx.append_mode())
        .map_err(|GoalConflict| GatewayError::GoalLocked { id: id.to_string() })?;
    if composed.rewrote_history {
        checkpoint.history_rewrites += 1;
    }
    let (upstream, plan) = match compaction {
        Some(compaction) => {
            let goal = checkpoint.goal.as_ref().map(GoalLock::block);
            let mut record = SessionRecord::from_raw(checkpoint.compression.as_deref());
            let (upstream, plan) = compaction.plan(
                app,
                &ctx.request,
                &composed.conversation,
                goal.as_deref(),
                record.state.take(),
                cold_cache(app, checkpoint),
            )?;
            let shared = record.shared_prefix(upstream.messages());
            record.state = plan.state.clone();
            checkpoint.compression = record.to_raw();
            (Some(upstream), Some((plan, shared)))
        }
        None => (composed.upstream, None),
    };
    let body = upstream.as_ref().unwrap_or(&ctx.request).body();
    let stored = StoredRequest {
        path: ctx.path().to_string(),
        model: ctx.request.model.clone(),
        stream: ctx.request.stream,
        body: raw_json(body)?,
        // The conversation the turn commits, when compression made the body carry less of it.
        conversation: plan
            .as_ref()
            .filter(|(plan, _)| plan.state.is_some())
            .map(|_| composed.conversation.clone()),
        caller_credential: crate::upstream::carries_credential(ctx.headers())
            && ctx.route(app).iter().any(|u| !u.holds_credential()),
        origin: ctx.origin.clone(),
    };
    let prepared = Prepared {
        conversation: composed.conversation,
        upstream,
        rewrote_history: composed.rewrote_history,
        plan,
    };
    Ok((prepared, Some(stored)))
}

/// Whether the session's previous request is older than the provider's cache lifetime.
fn cold_cache(app: &AppState, checkpoint: &Checkpoint) -> bool {
    let lifetime = app.compressor.config.cache_lifetime;
    !lifetime.is_zero()
        && !checkpoint.transcript.is_empty()
        && crate::session::checkpoint::now_ms().saturating_sub(checkpoint.updated_ms)
            > lifetime.as_millis() as u64
}

fn raw_json(body: &Bytes) -> Result<Box<RawValue>, GatewayError> {
    let text = std::str::from_utf8(body).map_err(|e| GatewayError::Internal(e.into()))?;
    RawValue::from_string(text.to_string()).map_err(|e| GatewayError::Internal(e.into()))
}

/// A task log for the lease's turn: each task's state change is written into the checkpoint's
/// tool record while the turn runs (front ends with tool rounds of their own log there too).
pub(crate) fn task_log(lease: &Lease) -> Arc<TaskLog> {
    let known = ToolRecord::from_raw(lease.checkpoint().tools.as_deref()).tasks;
    let amender = lease.amender();
    let sink = Box::new(move |entry: TaskEntry| {
        let amend: Amendment = Box::new(move |checkpoint: &mut Checkpoint| {
            let mut record = ToolRecord::from_raw(checkpoint.tools.as_deref());
            record.upsert(entry);
            checkpoint.tools = record.to_raw();
        });
        let _ = amender.send(amend);
    });
    Arc::new(TaskLog::new(lease.request_id(), known, sink))
}

/// Takes over a turn whose owner died and re-issues it in the background, answering no
/// client (readers use the stream endpoint). Returns the new turn id if this call took it,
/// `None` if another process did (or the turn cannot be re-issued and was given up), and the
/// store's error if it could not take the turn over: a caller that loops until the session is
/// free must stop there, or it would retry the takeover without end.
pub(crate) async fn resume(
    app: &Arc<AppState>,
    key: SessionKey,
    headers: HeaderMap,
    stored: Stored,
) -> Result<Option<u64>, GatewayError> {
    let goal = stored.checkpoint.goal.clone();
    let label = |outcome| OutcomeLabel { outcome };
    let resumes = &app.metrics.session_resumes;
    let (lease, request) = match Lease::take_over(app.sessions.clone(), key, stored).await {
        Ok(Some(taken)) => taken,
        Ok(None) => {
            resumes.get_or_create(&label("taken_by_another")).inc();
            return Ok(None);
        }
        Err(err) => {
            resumes.get_or_create(&label("error")).inc();
            return Err(err);
        }
    };
    let part = match request.origin.clone() {
        Some(origin) => (app.resumer)(app.clone(), lease.key().clone(), origin).await,
        None => None,
    };
    let front_end = match part {
        // A turn sent in the front end's own protocol is the front end's to re-issue.
        Some(FrontEndPart::Reissue(reissue)) => {
            let turn_id = resuming(app, &lease);
            app.spawn(reissue(app.clone(), lease, request, headers));
            return Ok(Some(turn_id));
        }
        Some(FrontEndPart::Finish(front_end)) => Some(front_end),
        None => None,
    };
    let parsed = ChatRequest::parse(Bytes::from(request.body.get().to_string()))
        .and_then(|upstream| ChatContext::resumed(app, headers, &request.path, upstream))
        .map(|ctx| ctx.with_session_affinity(app, lease.key()));
    let ctx = match parsed {
        Ok(ctx) => ctx,
        Err(_) => {
            resumes.get_or_create(&label("unreadable")).inc();
            let _ = lease.finish(None).await;
            return Ok(None);
        }
    };
    let mut ctx = ctx;
    if let Some(front_end) = &front_end {
        ctx.cancel = front_end.cancel.clone();
    }
    let conversation =
        request.conversation.unwrap_or_else(|| compose::conversation_of(&ctx.request, goal.as_ref()));
    let turn_id = resuming(app, &lease);
    let tasks = task_log(&lease);
    let turn = Turn {
        ctx,
        upstream: None,
        conversation,
        mode: Mode::Session(Box::new(SessionTurn { lease, tasks })),
    };
    let task = app.clone();
    app.spawn(async move {
        let answer = turn.run(task).await;
        match front_end {
            // The front end that began the turn finishes its part with the answer.
            Some(front_end) => (front_end.finish)(answer).await,
            // No client waits for this answer: a stream is relayed into the event log alone.
            None => {
                if let Ok(response) = answer {
                    drain(response).await;
                }
            }
        }
    });
    Ok(Some(turn_id))
}

/// Logs and counts a turn about to be re-issued; returns its turn id.
fn resuming(app: &AppState, lease: &Lease) -> u64 {
    tracing::info!(session = ?lease.key(), turn = lease.turn(), "resuming an interrupted turn");
    app.metrics.session_resumes.get_or_create(&OutcomeLabel { outcome: "resumed" }).inc();
    lease.turn()
}

/// A front end's part in a turn it began, when the turn is resumed after a takeover.
pub(crate) enum FrontEndPart {
    /// The chat pipeline re-issues the turn; the front end finishes it with the answer.
    Finish(FrontEnd),
    /// The turn's request is in the front end's own protocol (a Responses request to an
    /// upstream with that API): the front end re-issues it under the lease, and commits it.
    Reissue(Reissue),
}

/// How a front end re-issues a turn it sent in its own protocol: under the taken-over lease,
/// with the resuming caller's headers.
pub(crate) type Reissue = fn(Arc<AppState>, Lease, StoredRequest, HeaderMap) -> BoxFuture<()>;

/// How to cancel a resumed turn a front end finishes, and what to do with its answer (a
/// background response translates and stores it).
pub(crate) struct FrontEnd {
    pub(crate) cancel: CancellationToken,
    pub(crate) finish: Finish,
}

/// What a front end does with a resumed turn's answer.
pub(crate) type Finish = Box<dyn FnOnce(Result<Response<Body>, GatewayError>) -> BoxFuture<()> + Send>;

pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Finds the front end of a resumed turn from the origin its marker records (see
/// [`crate::session::StoredRequest::origin`]); `None` when none claims it. Set once at start-up
/// (the front ends sit beside this pipeline, not below it).
pub(crate) type Resumer = fn(Arc<AppState>, SessionKey, String) -> BoxFuture<Option<FrontEndPart>>;

/// Reads a response no client waits for to its end (a resumed stream's relay commits when
/// its body is done).
pub(crate) async fn drain(response: Response<Body>) {
    use http_body_util::BodyExt;
    let mut body = response.into_body();
    while let Some(Ok(_)) = body.frame().await {}
}
