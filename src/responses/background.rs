//! Background responses (`background: true`): the request returns at once with the response
//! `queued`, and the turn runs detached from it, as every session turn already does (a chain
//! of stored responses is a session: its lease, checkpoint and takeover apply). The response is
//! stored as it starts and again as it ends (`completed`, `incomplete`, `failed` or
//! `cancelled`), so `GET /v1/responses/{id}` shows where it is. With `stream`, its events go to
//! the creating client while it is there and to the response's own event log, from which
//! [`super::replay`] serves `GET /v1/responses/{id}?stream=true&starting_after=N`.
//!
//! The turn's in-flight marker names the response (its origin), so a turn taken over after its
//! process died is finished here too ([`resumed`]): the re-issued answer is translated, logged
//! after the events the dead process logged, and stored.
//!
//! Cancel (`POST /v1/responses/{id}/cancel`): the process running the response drops the
//! upstream call and releases the session without a commit, so nothing of the turn reaches
//! the conversation; the response is stored `cancelled`, with its input and no output (a turn
//! that committed before the cancel reached it stays `completed`, as its session says). A cancel
//! on another replica (Redis) is written into the response's record, which its owner reads
//! every [`REMOTE_CANCEL_POLL`]; the cancel call waits for the outcome.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::over_chat::{stream_error, translate_stream, Events, Turn};
use super::response::{self, Base, Status};
use super::store::{self, Chain, New, Record};
use super::stream::{Finished, Translator};
use super::{collect, send};
use crate::body::{Body, ChannelBody};
use crate::chat::{self, ChatContext, FrontEnd, FrontEndPart};
use crate::error::GatewayError;
use crate::http_util::json_response;
use crate::session::checkpoint::now_ms;
use crate::session::{SessionKey, Stored};
use crate::AppState;

/// How often the owner of a running background response looks for a cancel written by
/// another replica (shared stores only).
const REMOTE_CANCEL_POLL: Duration = Duration::from_millis(200);

/// What a background response's turn records as its origin in its in-flight marker, before
/// the response's id.
const ORIGIN: &str = "responses:";

fn origin(id: &str) -> String {
    format!("{ORIGIN}{id}")
}

/// Background responses running in this process, by response key: how to cancel each, and a
/// way to wait for its end.
#[derive(Debug, Default)]
pub(crate) struct Running {
    jobs: Mutex<HashMap<String, (CancellationToken, watch::Receiver<()>)>>,
}

/// Holds a response's place in [`Running`]; dropping it ends the place and wakes the waiters.
pub(super) struct Registration {
    app: Arc<AppState>,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut jobs = self.app.background.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.remove(&self.key);
    }
}

impl Running {
    fn register(app: &Arc<AppState>, scope: &str, id: &str, cancel: CancellationToken) -> Registration {
        let key = format!("{scope}:{id}");
        let (done, ended) = watch::channel(());
        let mut jobs = app.background.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.insert(key.clone(), (cancel, ended));
        Registration { app: app.clone(), key, _done: done }
    }

    fn contains(&self, scope: &str, id: &str) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.contains_key(&format!("{scope}:{id}"))
    }

    /// Cancels the response if it runs here; the receiver closes when it has ended.
    fn cancel(&self, scope: &str, id: &str) -> Option<watch::Receiver<()>> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let (cancel, ended) = jobs.get(&format!("{scope}:{id}"))?;
        cancel.cancel();
        Some(ended.clone())
    }
}

/// Starts a background response: stores it `queued`, runs its turn detached, and answers with
/// the queued Response object, or with a stream of its events.
pub(super) async fn start(turn: Turn, mut ctx: ChatContext) -> Result<Response<Body>, GatewayError> {
    let app = turn.app.clone();
    let queued = turn.base.object(Status::Queued, Vec::new(), Value::Null, Value::Null);
    let new = New {
        id: &turn.base.id,
        response: queued.clone(),
        input_items: turn.parsed.input_items.clone(),
        previous: turn.previous.as_ref(),
        items: turn.parsed.items.clone(),
        session: turn.session.clone(),
        streamed: turn.parsed.stream,
    };
    // Registered first: a reader that finds the record running finds it here too.
    let cancel = CancellationToken::new();
    let registration = Running::register(&app, &turn.scope, &turn.base.id, cancel.clone());
    store::save_running(&app.sessions, &turn.scope, new).await?;
    ctx.cancel = cancel.clone();
    ctx.origin = Some(origin(&turn.base.id));
    let job = Job {
        app: app.clone(),
        scope: turn.scope,
        base: turn.base,
        input: turn.parsed.items,
        previous: turn.previous,
        session: turn.session,
        streamed: turn.parsed.stream,
        queued: true,
        cancel,
        _registration: registration,
    };
    let answer = chat::answer(app.clone(), ctx);
    if !job.streamed {
        app.spawn(job.run(answer, None));
        return Ok(json_response(&queued));
    }
    let (frames, body) = ChannelBody::channel(32);
    let mut translator = Translator::new(job.base.clone());
    let log = app.sessions.event_log(store::log_key(&job.scope, &job.base.id), 0, 1);
    let mut events = Events { client: Some(frames), log: Some(log) };
    events.send(vec![translator.created(Status::Queued), translator.queued()]).await;
    app.spawn(job.run(answer, Some((translator, events))));
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The front end of a background response's turn resumed after a takeover (see
/// [`chat::Resumer`]; `None` for an origin that is not a background response's): finishes
/// the response with the re-issued answer. A response stored as
/// finished meanwhile (cancelled while no process ran it), or one that cannot be read (the
/// store failing), cancels the turn at once: nothing is committed, and a later read of the
/// response finds no one running it and stores it failed.
pub(super) fn resumed(
    app: Arc<AppState>,
    session: SessionKey,
    origin: String,
) -> chat::BoxFuture<Option<FrontEndPart>> {
    Box::pin(async move { finish_resumed(app, session, origin).await.map(FrontEndPart::Finish) })
}

async fn finish_resumed(app: Arc<AppState>, session: SessionKey, origin: String) -> Option<FrontEnd> {
    let id = origin.strip_prefix(ORIGIN)?.to_string();
    let scope = session.scope;
    let record = match store::load(&app.sessions, &scope, &id).await {
        Ok(record) => record,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read a resumed background response");
            None
        }
    };
    let cancel = CancellationToken::new();
    let Some(record) = record.filter(Record::running) else {
        cancel.cancel();
        return Some(FrontEnd { cancel, finish: Box::new(|_| Box::pin(async {})) });
    };
    let registration = Running::register(&app, &scope, &id, cancel.clone());
    let owner = app.sessions.owner.clone();
    if let Err(err) = store::update(&app.sessions, &scope, &id, |r| r.owner = Some(owner)).await {
        tracing::warn!(error = %err, "cannot claim a resumed background response");
    }
    let (input, previous_id) = record.pending_parts();
    let previous = match previous_id {
        Some(previous) => store::chain(&app.sessions, &scope, &previous).await.ok().flatten(),
        None => None,
    };
    let base = Base::from_object(&record.response);
    let mut stream = None;
    if record.streamed {
        let log_key = store::log_key(&scope, &id);
        let next = last_logged(&app, &log_key).await;
        let log = app.sessions.event_log(log_key, 0, next + 1);
        // The re-issued answer's events go on from the last one the dead process logged.
        let translator = Translator::numbered_from(base.clone(), next);
        stream = Some((translator, Events { client: None, log: Some(log) }));
    }
    let job = Job {
        app: app.clone(),
        scope,
        base,
        input,
        previous,
        session: record.session.clone(),
        streamed: record.streamed,
        queued: record.response["status"] == "queued",
        cancel: cancel.clone(),
        _registration: registration,
    };
    let finish: chat::Finish = Box::new(move |answer| Box::pin(job.run(async { answer }, stream)));
    Some(FrontEnd { cancel, finish })
}

/// How many events a log holds (its events are numbered from 1, without gaps).
async fn last_logged(app: &AppState, key: &SessionKey) -> u64 {
    let mut last = 0;
    while let Ok(events) = app.sessions.events_after(key, 0, last, 256).await {
        match events.last() {
            Some((seq, _)) => last = *seq,
            None => break,
        }
    }
    last
}

/// One background response being run: what it needs to store it finished.
struct Job {
    app: Arc<AppState>,
    scope: String,
    base: Base,
    /// Its input items.
    input: Vec<Value>,
    /// The conversation before it.
    previous: Option<Chain>,
    session: Option<String>,
    streamed: bool,
    /// Still stored `queued` (not yet `in_progress`).
    queued: bool,
    cancel: CancellationToken,
    _registration: Registration,
}

/// How a background response ended.
enum Outcome {
    /// Finished: its Response object (`completed` or `incomplete`), its output, and for a
    /// stream the closing events to send before the final one.
    Done {
        response: Value,
        output: Vec<Value>,
        closing: Vec<Bytes>,
        status: Status,
    },
    Failed(Value),
    Cancelled,
}

impl Job {
    /// Waits for the turn's answer, reads it to its end, and stores the response finished.
    ///
    /// A cancel (here, or through its record by another replica) goes to the chat turn, which
    /// drops its upstream call and releases the session, and ends its answer with the error:
    /// the turn alone knows whether it committed first, so its answer, not the cancel, says
    /// how the response ended. Only a turn still waiting for its session (another turn of the
    /// chain in flight) sees the cancel once admitted.
    async fn run(
        mut self,
        answer: impl Future<Output = Result<Response<Body>, GatewayError>>,
        mut stream: Option<(Translator, Events)>,
    ) {
        let cancel = self.cancel.clone();
        let (app, scope, id) = (self.app.clone(), self.scope.clone(), self.base.id.clone());
        let outcome = tokio::select! {
            outcome = self.answer(answer, stream.as_mut()) => outcome,
            never = remote_cancel(&app, &scope, &id, &cancel), if app.sessions.shared() => match never {},
        };
        let outcome = match outcome {
            // The turn stopped because it was cancelled, not because it failed.
            Outcome::Failed(_) if cancel.is_cancelled() => Outcome::Cancelled,
            outcome => outcome,
        };
        self.end(outcome, stream).await;
    }

    async fn answer(
        &mut self,
        answer: impl Future<Output = Result<Response<Body>, GatewayError>>,
        stream: Option<&mut (Translator, Events)>,
    ) -> Outcome {
        let limit = self.app.config.server.max_answer_bytes.get();
        let response = match answer.await {
            Ok(response) => response,
            Err(err) => return Outcome::Failed(err.to_json()["error"].clone()),
        };
        if !response.status().is_success() {
            // The upstream's error, in OpenAI's shape when it has one.
            let status = response.status();
            let body = collect(response.into_body(), limit).await.unwrap_or_default();
            let error = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").filter(|e| e.is_object()).cloned())
                .unwrap_or_else(|| stream_error(&format!("The upstream answered {status}.")));
            return Outcome::Failed(error);
        }
        let was_queued = self.queued;
        self.started().await;
        let Some((translator, events)) = stream else {
            let body = match collect(response.into_body(), limit).await {
                Ok(body) => body,
                Err(err) => return Outcome::Failed(err.to_json()["error"].clone()),
            };
            let Ok(completion) = serde_json::from_slice::<Value>(&body) else {
                return Outcome::Failed(stream_error("The upstream answer is not JSON."));
            };
            let (response, output) = response::from_completion(&self.base, &completion);
            let status =
                if response["status"] == "incomplete" { Status::Incomplete } else { Status::Completed };
            return Outcome::Done { response, output, closing: Vec::new(), status };
        };
        if was_queued {
            events.send(vec![translator.in_progress()]).await;
        }
        let limit = self.app.config.server.max_sse_event_bytes.get();
        if let Err(error) = translate_stream(response.into_body(), limit, translator, events).await {
            return Outcome::Failed(error);
        }
        let (closing, finished) = translator.finish();
        Outcome::Done {
            response: finished.response,
            output: finished.output,
            closing,
            status: finished.status,
        }
    }

    /// The upstream answered: the response is `in_progress` from here.
    async fn started(&mut self) {
        if !std::mem::take(&mut self.queued) {
            return;
        }
        let result = store::update(&self.app.sessions, &self.scope, &self.base.id, |record| {
            if record.running() {
                record.response["status"] = json!(Status::InProgress.as_str());
            }
        })
        .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "cannot mark a background response in progress");
        }
    }

    /// Stores the response finished, then ends its stream: the last event is logged only once
    /// the record says the same, so a reader never finds a final event the record lacks.
    async fn end(self, outcome: Outcome, stream: Option<(Translator, Events)>) {
        let (object, output, closing, last) = match outcome {
            Outcome::Done { response, output, closing, status } => {
                (response, output, closing, Last::Finished(status))
            }
            Outcome::Failed(error) => {
                let object = match &stream {
                    Some((translator, _)) => translator.failure(&error),
                    None => self.base.object(Status::Failed, Vec::new(), Value::Null, failure(&error)),
                };
                (object, Vec::new(), Vec::new(), Last::Failed(error))
            }
            Outcome::Cancelled => {
                let object = self.base.object(Status::Cancelled, Vec::new(), Value::Null, Value::Null);
                (object, Vec::new(), Vec::new(), Last::Cancelled)
            }
        };
        let new = New {
            id: &self.base.id,
            response: object.clone(),
            input_items: Vec::new(),
            previous: self.previous.as_ref(),
            items: self.input.iter().chain(&output).cloned().collect(),
            session: self.session.clone(),
            streamed: self.streamed,
        };
        // The input items as listed were stored when the response started; keep them.
        let saved = save_keeping_inputs(&self.app, &self.scope, new).await;
        if let Err(err) = &saved {
            tracing::warn!(error = %err, "cannot store a finished background response");
        }
        let Some((mut translator, mut events)) = stream else { return };
        events.send(closing).await;
        let last = match (last, saved) {
            (_, Err(err)) => translator.failed(&err.to_json()["error"]),
            (Last::Finished(status), Ok(())) => {
                vec![translator.completed(&Finished { response: object, output, status })]
            }
            (Last::Failed(error), Ok(())) => translator.failed(&error),
            (Last::Cancelled, Ok(())) => vec![translator.cancelled(&object)],
        };
        let client = events.client.take();
        events.send(last.clone()).await;
        events.close_log().await;
        let mut client = client;
        send(&mut client, last).await;
    }
}

/// How a background response's stream ends.
enum Last {
    Finished(Status),
    Failed(Value),
    Cancelled,
}

/// A Response object's `error` for an OpenAI error body.
fn failure(error: &Value) -> Value {
    let code = if error["code"] == "rate_limit_exceeded" { "rate_limit_exceeded" } else { "server_error" };
    json!({"code": code, "message": error["message"].as_str().unwrap_or("The response failed.")})
}

/// [`store::save`], keeping the input items the record was started with.
async fn save_keeping_inputs(app: &AppState, scope: &str, mut new: New<'_>) -> Result<(), GatewayError> {
    if let Some(record) = store::load(&app.sessions, scope, new.id).await? {
        new.input_items = record.input_items;
    }
    store::save(&app.sessions, scope, new).await
}

/// Cancels the response once a cancel is written into its record (by another replica); never
/// resolves.
async fn remote_cancel(app: &AppState, scope: &str, id: &str, cancel: &CancellationToken) -> Infallible {
    while !cancel.is_cancelled() {
        tokio::time::sleep(REMOTE_CANCEL_POLL).await;
        if let Ok(Some(record)) = store::load(&app.sessions, scope, id).await {
            if record.cancel_requested {
                cancel.cancel();
            }
        }
    }
    std::future::pending().await
}

/// Where a running background response is being run.
pub(super) enum Liveness {
    /// In this process.
    Here,
    /// By another replica, as far as can be told.
    Elsewhere,
    /// Its turn's process died and the turn is marked in flight: it can be taken over.
    Lapsed(Box<(SessionKey, Stored)>),
    /// Nowhere: its process died without a turn to take over (before its turn was admitted,
    /// or after it was committed).
    Dead,
}

/// Finds where the running response `record` runs.
pub(super) async fn liveness(
    app: &AppState,
    scope: &str,
    id: &str,
    record: &Record,
) -> Result<Liveness, GatewayError> {
    if app.background.contains(scope, id) {
        return Ok(Liveness::Here);
    }
    let now = now_ms();
    if let Some(session) = &record.session {
        let key = SessionKey { scope: scope.to_string(), id: session.clone() };
        if let Some(stored) = app.sessions.load(&key).await? {
            let ours = |f: &&crate::session::InFlight| {
                f.request.as_ref().and_then(|r| r.origin.as_deref()) == Some(origin(id).as_str())
            };
            if let Some(f) = stored.checkpoint.in_flight.as_ref().filter(ours) {
                if app.sessions.lapsed(f, now) {
                    return Ok(Liveness::Lapsed(Box::new((key, stored))));
                }
                return Ok(Liveness::Elsewhere);
            }
        }
    }
    // Not in flight: this process's job ended without storing it, or (the embedded store) a
    // dead predecessor's; on a shared store another replica may still be at it (waiting for
    // the session, or storing it), for at most a busy wait and a lease.
    let own = record.owner.as_deref() == Some(app.sessions.owner.as_str());
    let config = &app.sessions.config;
    let grace = (config.busy_timeout + config.lease * 2).as_millis() as u64;
    if own || !app.sessions.shared() || now.saturating_sub(record.written_ms()) > grace {
        return Ok(Liveness::Dead);
    }
    Ok(Liveness::Elsewhere)
}

/// Looks at a running response no one may be running: a lapsed turn is taken over (with the
/// caller's headers, for an upstream that takes the caller's credential), and a dead one is
/// stored `failed`. Returns the record as it now is.
pub(super) async fn settle(
    app: &Arc<AppState>,
    scope: &str,
    id: &str,
    record: Record,
    headers: &HeaderMap,
) -> Result<Record, GatewayError> {
    if !record.running() {
        return Ok(record);
    }
    match liveness(app, scope, id, &record).await? {
        Liveness::Here | Liveness::Elsewhere => Ok(record),
        Liveness::Lapsed(lapsed) => {
            let (key, stored) = *lapsed;
            chat::resume(app, key, headers.clone(), stored).await?;
            Ok(record)
        }
        Liveness::Dead => {
            let base = Base::from_object(&record.response);
            let error = stream_error("The gateway running the response stopped before it finished.");
            let failed = base.object(Status::Failed, Vec::new(), Value::Null, failure(&error));
            let updated = store::update(&app.sessions, scope, id, |r| {
                if r.running() {
                    r.response = failed;
                    r.owner = None;
                }
            })
            .await?;
            Ok(updated.unwrap_or(record))
        }
    }
}

/// `POST /v1/responses/{id}/cancel`: cancels a running background response and returns it
/// as it ended (`cancelled`, or how it finished if it finished first); a finished one as it is.
pub(super) async fn cancel(
    app: &Arc<AppState>,
    scope: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<Value, GatewayError> {
    let not_found = || GatewayError::ResponseNotFound { id: id.to_string() };
    let record = store::load(&app.sessions, scope, id).await?.ok_or_else(not_found)?;
    if !record.background() {
        return Err(GatewayError::invalid("Cannot cancel a synchronous response.", None, "invalid_request"));
    }
    if !record.running() {
        return Ok(record.response);
    }
    if let Some(mut ended) = app.background.cancel(scope, id) {
        // Closed when the job has stored the response.
        while ended.changed().await.is_ok() {}
    } else {
        match liveness(app, scope, id, &record).await? {
            Liveness::Here => {}
            Liveness::Elsewhere => {
                store::update(&app.sessions, scope, id, |r| r.cancel_requested = true).await?;
                wait_until_finished(app, scope, id).await?;
            }
            // No process runs it: it is cancelled here; a takeover of its turn finds it so and
            // stops the turn ([`resumed`]).
            Liveness::Lapsed(_) | Liveness::Dead => {
                let base = Base::from_object(&record.response);
                let cancelled = base.object(Status::Cancelled, Vec::new(), Value::Null, Value::Null);
                store::update(&app.sessions, scope, id, |r| {
                    if r.running() {
                        r.response = cancelled;
                        r.owner = None;
                    }
                })
                .await?;
            }
        }
    }
    let record = store::load(&app.sessions, scope, id).await?.ok_or_else(not_found)?;
    let record = settle(app, scope, id, record, headers).await?;
    Ok(record.response)
}

/// Waits until another replica stores the response finished, for at most a lease and a poll.
async fn wait_until_finished(app: &AppState, scope: &str, id: &str) -> Result<(), GatewayError> {
    let deadline = tokio::time::Instant::now() + app.sessions.config.lease + REMOTE_CANCEL_POLL * 4;
    while tokio::time::Instant::now() < deadline {
        match store::load(&app.sessions, scope, id).await? {
            Some(record) if record.running() => tokio::time::sleep(Duration::from_millis(25)).await,
            _ => return Ok(()),
        }
    }
    Ok(())
}
