//! Compression wired to a chat request, the one copy of it: the policy for the request's model,
//! where the conversation's state lives (a session's checkpoint, or for a stateless client the
//! store keyed by the caller and the conversation's first messages), the plan, the rebuilt
//! body, the response headers and metrics, and the state-sheet calls made in the background.
//!
//! [`crate::compress`] decides (pure); this module does the I/O around it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use serde_json::value::RawValue;

use super::context::ChatContext;
use crate::compress::{self, expand, marker, Acted, Active, Plan, State, Summary, SummaryRequest};
use crate::config::CompressionMode;
use crate::error::GatewayError;
use crate::headers;
use crate::openai::{request, ChatRequest};
use crate::session::BlobKind;
use crate::telemetry::{ModelStage, ReasonLabel};
use crate::upstream::Upstream;
use crate::AppState;

/// State sheets being written in this process: conversation key → messages and request tokens
/// when it was asked for.
#[derive(Debug, Default)]
pub(crate) struct Sheets {
    writing: Mutex<HashMap<String, (usize, u64)>>,
}

impl Sheets {
    fn writing(&self, key: &str) -> bool {
        self.writing.lock().is_ok_and(|w| w.contains_key(key))
    }

    fn writing_since(&self, key: &str) -> Option<(usize, u64)> {
        self.writing.lock().ok()?.get(key).copied()
    }
}

/// One request's compression: its policy, its conversation, and a sheet ready to place.
pub(crate) struct Compaction<'a> {
    active: Active<'a>,
    /// The model as a metric label.
    label: String,
    /// The conversation's key for its state and sheets.
    key: String,
    ready: Option<Summary>,
    /// `prompt_cache_key` for upstreams that take one.
    cache_key: Option<String>,
}

impl<'a> Compaction<'a> {
    /// The compression `ctx` runs under (`None` when it is off for the model or the request
    /// opts out), with the sheet written for `key` since the last request when `look_up`.
    pub(crate) async fn begin(
        app: &'a AppState,
        ctx: &ChatContext,
        key: String,
        messages: &[Box<RawValue>],
        look_up: bool,
    ) -> Option<Self> {
        if ctx.compression_opted_out() {
            return None;
        }
        Self::for_model(app, &ctx.request.model, ctx.route(app), key, messages, look_up).await
    }

    /// The compression `model` runs under, along `route` (`None` when it is off for the model).
    async fn for_model(
        app: &'a AppState,
        model: &str,
        route: &[Arc<Upstream>],
        key: String,
        messages: &[Box<RawValue>],
        look_up: bool,
    ) -> Option<Self> {
        let active = app.compressor.active(model)?;
        let ready = if look_up { ready_sheet(app, &active, &key, messages).await } else { None };
        let cache_key = route.first().filter(|u| u.prompt_cache_key).map(|_| compress::cache_key(&key));
        let label = app.model_labels.label(model);
        Some(Self { active, label, key, ready, cache_key })
    }

    /// Plans `conversation` (as it will be recorded, without the goal block) under `previous`,
    /// the state an earlier epoch froze, and rebuilds `request` around the planned messages.
    pub(crate) fn plan(
        &self,
        app: &AppState,
        request: &ChatRequest,
        conversation: &[Box<RawValue>],
        goal: Option<&RawValue>,
        previous: Option<State>,
        cold: bool,
    ) -> Result<(ChatRequest, Plan), GatewayError> {
        let mut plan = self.run(app, conversation, request.tools(), goal, previous, cold);
        let upstream = self.rebuild(app, request, &mut plan)?;
        Ok((upstream, plan))
    }

    /// The plan for `conversation`, its messages still in it.
    fn run(
        &self,
        app: &AppState,
        conversation: &[Box<RawValue>],
        tools: Option<&RawValue>,
        goal: Option<&RawValue>,
        previous: Option<State>,
        cold: bool,
    ) -> Plan {
        let analysed = compress::analyse(self.active.counter, conversation);
        let turn = compress::Turn {
            messages: conversation,
            analysed: &analysed,
            goal,
            tools,
            previous,
            ready: self.ready.as_ref(),
            cold,
            force: false,
        };
        compress::run(&app.compressor, &self.active, turn)
    }

    /// `request` around `plan`'s messages (which move into it: `plan.messages` is left empty).
    fn rebuild(
        &self,
        app: &AppState,
        request: &ChatRequest,
        plan: &mut Plan,
    ) -> Result<ChatRequest, GatewayError> {
        let messages = std::mem::take(&mut plan.messages);
        let expand = (plan.markers && app.compressor.config.expand).then(compress::expand::definition);
        request.rebuild(messages, self.cache_key.as_deref(), expand.as_deref())
    }

    /// `prompt_cache_key` for upstreams that take one.
    pub(crate) fn cache_key(&self) -> Option<&str> {
        self.cache_key.as_deref()
    }

    /// What follows a decided plan: metrics, the response headers, and the state sheet it asks
    /// for, started in the background.
    pub(crate) fn finish(
        &self,
        app: &Arc<AppState>,
        ctx: &mut ChatContext,
        plan: &mut Plan,
        conversation_len: usize,
    ) {
        let call = SheetCall {
            model: self.sheet_model(app, &ctx.request.model),
            upstream: app.compressor.config.summarizer.upstream.clone(),
            authorization: ctx.headers().get(header::AUTHORIZATION).cloned(),
            tools: ctx.request.tools().and_then(|t| request::canonical(t.get())),
            affinity: ctx.affinity,
        };
        if self.settle(app, &mut ctx.annotations, plan, conversation_len, call) {
            ctx.offer_expand();
        }
    }

    /// [`Self::finish`] for a request that is not a chat request (a Responses request to a
    /// Responses upstream): its sheet call carries no tools, as the request's are not chat's.
    /// Returns whether the messages carry markers `ctxgate_expand` would resolve.
    pub(crate) fn finish_foreign(
        &self,
        app: &Arc<AppState>,
        annotations: &mut HeaderMap,
        plan: &mut Plan,
        conversation_len: usize,
        model: &str,
        authorization: Option<HeaderValue>,
    ) -> bool {
        let call = SheetCall {
            model: self.sheet_model(app, model),
            upstream: app.compressor.config.summarizer.upstream.clone(),
            authorization,
            tools: None,
            affinity: None,
        };
        self.settle(app, annotations, plan, conversation_len, call)
    }

    fn sheet_model(&self, app: &AppState, model: &str) -> String {
        app.compressor.config.summarizer.model.clone().unwrap_or_else(|| model.to_string())
    }

    /// Metrics, headers and the sheet call; whether `ctxgate_expand` should be offered.
    fn settle(
        &self,
        app: &Arc<AppState>,
        headers: &mut HeaderMap,
        plan: &mut Plan,
        conversation_len: usize,
        call: SheetCall,
    ) -> bool {
        compress::record(&app.metrics, &self.label, plan);
        headers.insert(headers::TOKENS_BEFORE, HeaderValue::from(plan.tokens_before));
        headers.insert(headers::TOKENS_AFTER, HeaderValue::from(plan.tokens_after));
        headers.insert(headers::COMPRESSION, HeaderValue::from_static(plan.acted.as_str()));
        if let Some(sheet) = plan.summarize.take() {
            start_sheet(app, &self.key, sheet, call, conversation_len, plan.tokens_after);
        }
        plan.markers && app.compressor.config.expand
    }

    /// Counts how much of the previous request a session request shares as a prefix.
    pub(crate) fn count_prefix(&self, app: &AppState, (previous, shared): (u64, u64)) {
        let stage = |stage| ModelStage { model: self.label.clone(), stage };
        app.metrics.compression_prefix_bytes.get_or_create(&stage("previous")).inc_by(previous);
        app.metrics.compression_prefix_bytes.get_or_create(&stage("shared")).inc_by(shared);
    }
}

/// Compression without a session: the conversation's state is stored under a key derived from
/// the caller and its first messages, so a client that resends the same history gets the same
/// bytes upstream. Returns the request to send when it is not the client's as sent.
pub(crate) async fn stateless(
    app: &Arc<AppState>,
    ctx: &mut ChatContext,
) -> Result<Option<ChatRequest>, GatewayError> {
    if ctx.compression_opted_out() {
        return Ok(None);
    }
    let conversation = Conversation {
        scope: ctx.scope(),
        model: &ctx.request.model,
        route: ctx.route(app),
        messages: ctx.request.messages(),
        tools: ctx.request.tools(),
    };
    let Some((compaction, mut plan)) = stateless_plan(app, &conversation).await? else { return Ok(None) };
    let len = conversation.messages.len();
    let upstream = compaction.rebuild(app, &ctx.request, &mut plan)?;
    compaction.finish(app, ctx, &mut plan, len);
    Ok(Some(upstream))
}

/// A conversation compressed without a session, as any front end has it.
pub(crate) struct Conversation<'a> {
    /// The caller's stateless scope (see [`ChatContext::scope`]).
    pub(crate) scope: String,
    pub(crate) model: &'a str,
    pub(crate) route: &'a [Arc<Upstream>],
    pub(crate) messages: &'a [Box<RawValue>],
    /// Counted as the request's fixed tokens.
    pub(crate) tools: Option<&'a RawValue>,
}

/// The plan for a conversation without a session (its messages in `plan.messages`), under the
/// state its earlier requests froze; an epoch's state is stored, its originals first. `None`
/// when compression is off for the model.
pub(crate) async fn stateless_plan<'a>(
    app: &'a AppState,
    conversation: &Conversation<'_>,
) -> Result<Option<(Compaction<'a>, Plan)>, GatewayError> {
    let Some(active) = app.compressor.active(conversation.model) else { return Ok(None) };
    let (scope, messages) = (&conversation.scope, conversation.messages);
    let analysed = compress::analyse(active.counter, messages);
    let total = compress::fixed_tokens(active.counter, conversation.tools, None)
        + analysed.tokens.iter().map(|&t| u64::from(t)).sum::<u64>();
    let key = compress::conversation_key(scope, messages, &analysed.infos);
    // Under the first mark nothing was ever compacted: no state to look up.
    let first_mark = active.policy.pre_tokens().min(active.policy.high_tokens());
    let past_mark = total > first_mark;
    let Some(compaction) =
        Compaction::for_model(app, conversation.model, conversation.route, key, messages, past_mark).await
    else {
        return Ok(None);
    };
    let previous = if past_mark { load_state(app, &compaction.key).await } else { None };
    let plan = compaction.run(app, messages, conversation.tools, None, previous, false);
    if plan.epoch.is_some() || plan.reset {
        // The originals first: a state whose markers name nothing recoverable must not land.
        let stored = keep_originals(app, scope, messages, &plan.messages, &plan).await;
        let saved = match (&plan.state, stored) {
            (Some(state), Ok(())) => save_state(app, &compaction.key, state).await,
            (_, Err(err)) => Err(err),
            (None, Ok(())) => Ok(()),
        };
        if let Err(err) = saved {
            // The request still goes out (its markers name originals it carries itself); the
            // next one recomputes the epoch.
            tracing::warn!(error = %err, "cannot store compression state");
        }
    }
    Ok(Some((compaction, plan)))
}

/// Keeps in the caller's store the originals `plan`'s markers name (`sent`, the messages it
/// laid out, names dropped runs), so `ctxgate_expand` and `GET /v1/ctxgate/originals/{id}`
/// find them once the client no longer sends them.
async fn keep_originals(
    app: &AppState,
    scope: &str,
    messages: &[Box<RawValue>],
    sent: &[Box<RawValue>],
    plan: &Plan,
) -> Result<(), GatewayError> {
    let mut originals: Vec<(String, Bytes)> = plan
        .elided
        .iter()
        .map(|&i| {
            (
                original_key(scope, &marker::id_of(&messages[i])),
                Bytes::copy_from_slice(messages[i].get().as_bytes()),
            )
        })
        .collect();
    // A dropped run's id names its messages in order: kept as the list of their ids.
    let runs = sent.iter().flat_map(|m| marker::ids_in(m.get()));
    for run in runs.filter(|id| id.contains(marker::RUN)) {
        if let Some(members) = expand::run(messages, run) {
            let ids: Vec<String> = members.iter().map(|m| marker::id_of(m)).collect();
            let list = serde_json::to_vec(&ids).unwrap_or_default();
            originals.push((original_key(scope, run), Bytes::from(list)));
        }
    }
    if let Some(state) = plan.state.as_ref().filter(|s| s.summary.is_some()) {
        // The sheet's range id names an index of what it replaced.
        let replaced = &messages[state.lead..state.summarized_upto];
        let index = serde_json::json!({"role": "index", "content": marker::index(replaced)}).to_string();
        let range = marker::range_id(messages, state.lead, state.summarized_upto);
        originals.push((original_key(scope, &range), Bytes::from(index)));
    }
    if originals.is_empty() {
        return Ok(());
    }
    Ok(app.sessions.put_blobs(BlobKind::Original, originals).await?)
}

/// A conversation compacted on request (`POST /v1/responses/compact`).
pub(crate) struct Compacted {
    pub(crate) messages: Vec<Box<RawValue>>,
    pub(crate) tokens_before: u64,
    pub(crate) tokens_after: u64,
    pub(crate) acted: Acted,
}

/// Compacts `messages` now, whatever the marks say: the epoch a stateless request of this
/// conversation starts from no earlier state (down to the low-water mark of `model`'s window),
/// with its originals kept in the caller's store as any stateless epoch's. Rules only: a state
/// sheet is a model call written in the background, and this answer does not wait for one.
/// No state is saved: a forced epoch must not replace the one the conversation's own requests
/// froze, and the same conversation compacts to the same messages every time. With
/// compression off for `model`, the messages come back as they are.
pub(crate) async fn compact(
    app: &AppState,
    scope: &str,
    model: &str,
    messages: Vec<Box<RawValue>>,
) -> Result<Compacted, GatewayError> {
    let Some(active) = app.compressor.active(model) else {
        let counter = app.compressor.counter_for(model);
        let tokens = counter.messages(&messages).iter().map(|&t| u64::from(t)).sum();
        return Ok(Compacted { messages, tokens_before: tokens, tokens_after: tokens, acted: Acted::Off });
    };
    let analysed = compress::analyse(active.counter, &messages);
    let turn = compress::Turn {
        messages: &messages,
        analysed: &analysed,
        goal: None,
        tools: None,
        previous: None,
        ready: None,
        cold: false,
        force: true,
    };
    let mut plan = compress::run(&app.compressor, &active, turn);
    plan.summarize = None;
    if plan.epoch.is_some() {
        keep_originals(app, scope, &messages, &plan.messages, &plan).await?;
    }
    compress::record(&app.metrics, &app.model_labels.label(model), &plan);
    Ok(Compacted {
        messages: std::mem::take(&mut plan.messages),
        tokens_before: plan.tokens_before,
        tokens_after: plan.tokens_after,
        acted: plan.acted,
    })
}

/// Where a stateless caller's original is kept: under its scope as a hash tag, so a batch
/// lands on one Redis Cluster slot.
pub(crate) fn original_key(scope: &str, id: &str) -> String {
    format!("{{{scope}}}:{id}")
}

/// A stateless caller's stored original: one message, or a dropped run's messages in order.
pub(crate) async fn stored_original(app: &AppState, scope: &str, id: &str) -> Option<Vec<Box<RawValue>>> {
    let get = |id: String| async move {
        let bytes = app.sessions.get_blob(BlobKind::Original, &original_key(scope, &id)).await.ok()??;
        RawValue::from_string(String::from_utf8(bytes.to_vec()).ok()?).ok()
    };
    if !id.contains(marker::RUN) {
        return Some(vec![get(id.to_string()).await?]);
    }
    let bytes = app.sessions.get_blob(BlobKind::Original, &original_key(scope, id)).await.ok()??;
    let ids: Vec<String> = serde_json::from_slice(&bytes).ok()?;
    let mut messages = Vec::with_capacity(ids.len());
    for id in ids {
        messages.push(get(id).await?);
    }
    Some(messages)
}

async fn load_state(app: &AppState, key: &str) -> Option<State> {
    let bytes = app.sessions.get_blob(BlobKind::CompressionState, key).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

async fn save_state(app: &AppState, key: &str, state: &State) -> Result<(), GatewayError> {
    let bytes = serde_json::to_vec(state).map_err(|e| GatewayError::Internal(e.into()))?;
    Ok(app.sessions.put_blob(BlobKind::CompressionState, key, Bytes::from(bytes)).await?)
}

// === state sheets ===

/// Where and as whom a sheet call goes.
struct SheetCall {
    model: String,
    /// `summarizer.upstream`, else the model's route.
    upstream: Option<String>,
    /// The client's `Authorization`, for upstreams that take the caller's key.
    authorization: Option<HeaderValue>,
    /// The request's `tools`, canonical, so the call's prefix matches the conversation's.
    tools: Option<Box<RawValue>>,
    affinity: Option<crate::upstream::AffinityKey>,
}

/// The sheet waiting for `key`, if any. When one is still being written and this request may
/// reach the high-water mark, waits for it up to `summarizer.max_wait`.
async fn ready_sheet(
    app: &AppState,
    active: &Active<'_>,
    key: &str,
    messages: &[Box<RawValue>],
) -> Option<Summary> {
    if active.policy.mode != CompressionMode::Hybrid {
        return None;
    }
    let bound = match app.sheets.writing_since(key) {
        Some((len, view)) => {
            let added: u64 =
                messages.iter().skip(len).map(|m| u64::from(active.counter.message(m.get()))).sum();
            if view + added > active.policy.high_tokens() {
                app.compressor.config.summarizer.max_wait
            } else {
                Duration::ZERO
            }
        }
        None => Duration::ZERO,
    };
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(bytes)) = app.sessions.get_blob(BlobKind::Sheet, key).await {
            if let Ok(summary) = serde_json::from_slice::<Summary>(&bytes) {
                return Some(summary);
            }
        }
        if Instant::now() >= deadline || !app.sheets.writing(key) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20).min(bound)).await;
    }
}

/// Starts writing the sheet a plan asks for, unless one is already being written for `key`.
fn start_sheet(
    app: &Arc<AppState>,
    key: &str,
    request: SummaryRequest,
    call: SheetCall,
    conversation_len: usize,
    tokens_after: u64,
) {
    {
        let Ok(mut writing) = app.sheets.writing.lock() else { return };
        if writing.contains_key(key) {
            return;
        }
        writing.insert(key.to_string(), (conversation_len, tokens_after));
    }
    let app2 = app.clone();
    let key = key.to_string();
    app.spawn(async move {
        write_sheet(&app2, &key, request, call).await;
        if let Ok(mut writing) = app2.sheets.writing.lock() {
            writing.remove(&key);
        }
    });
}

/// Writes the sheet for `request` and stores it for the epoch that places it. Failures are
/// counted and logged; the conversation keeps going on rules.
async fn write_sheet(app: &AppState, key: &str, request: SummaryRequest, call: SheetCall) {
    let config = &app.compressor.config.summarizer;
    let metrics = &app.metrics;
    let failed = |reason| metrics.summarizer_failures.get_or_create(&ReasonLabel { reason }).inc();
    let started = Instant::now();
    let outcome = tokio::time::timeout(config.timeout, summarize(app, &request, &call)).await;
    metrics.summarizer_duration.observe(started.elapsed().as_secs_f64());
    let message = match outcome {
        Ok(Ok(message)) => message,
        Ok(Err(reason)) => {
            failed(reason);
            tracing::warn!(reason, "state sheet not written");
            return;
        }
        Err(_) => {
            failed("timeout");
            tracing::warn!(timeout = ?config.timeout, "state sheet not written in time");
            return;
        }
    };
    let summary = Summary { start: request.start, end: request.end, covered: request.covered, message };
    let Ok(bytes) = serde_json::to_vec(&summary) else { return };
    if let Err(err) = app.sessions.put_blob(BlobKind::Sheet, key, Bytes::from(bytes)).await {
        failed("store");
        tracing::warn!(error = %err, "cannot store a state sheet");
    }
}

async fn summarize(
    app: &AppState,
    request: &SummaryRequest,
    call: &SheetCall,
) -> Result<Box<RawValue>, &'static str> {
    let config = &app.compressor.config.summarizer;
    let body =
        compress::summary::request_body(request, &call.model, call.tools.as_deref(), config.max_tokens)
            .map_err(|_| "encode")?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(auth) = &call.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let route = match &call.upstream {
        Some(name) => app.upstreams.router.named(name).ok_or("no_upstream")?,
        None => app.upstreams.router.route(Some(&call.model)),
    };
    let outgoing = crate::upstream::Outgoing {
        method: http::Method::POST,
        path_and_query: "/v1/chat/completions".into(),
        headers,
        body: crate::upstream::OutgoingBody::Replayable(body),
        // The conversation's endpoint: the sheet call shares its prefix, so its cache.
        affinity: call.affinity,
    };
    let forwarded = app.upstreams.forward(route, outgoing).await.map_err(|_| "upstream")?;
    let response = forwarded.into_response();
    if !response.status().is_success() {
        return Err("upstream_status");
    }
    let bytes =
        http_body_util::BodyExt::collect(response.into_body()).await.map_err(|_| "upstream_body")?.to_bytes();
    let text = compress::summary::answer_text(&bytes).ok_or("no_text")?;
    compress::summary::sheet_message(
        &text,
        &config.role,
        request.epoch,
        &request.range,
        request.end - request.start,
    )
    .ok_or("unusable")
}
