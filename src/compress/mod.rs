//! Context compression: shrink what goes upstream while keeping the front of the prompt
//! byte-identical from turn to turn, so prompt and KV caches keep hitting.
//!
//! - [`tokens`]: tiktoken counts, cached per message.
//! - [`rules`] (over [`text`] and [`message`]): the named rule passes.
//! - [`plan`]: compaction epochs and the prefix-stable layout; pure.
//! - [`summary`]: the hybrid state sheet, written in the background.
//! - [`request`]: rebuilding the request body around the new messages.
//!
//! This module wires them to a request: the policy for its model, the stored state (in the
//! session's checkpoint, or keyed by the conversation for stateless clients), the response
//! headers and the metrics.

pub mod message;
pub mod plan;
pub mod request;
pub mod rules;
pub mod summary;
pub mod text;
pub mod tokens;

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use globset::{Glob, GlobMatcher};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use self::message::Info;
pub use self::plan::{Acted, Plan, State, Summary, SummaryRequest};
use self::rules::{Rule, Rules};
use self::tokens::TokenCounter;
use crate::config::{CompressionConfig, CompressionMode, Config, Encoding, Policy};
use crate::error::GatewayError;
use crate::telemetry::{Metrics, ModelStage, RuleLabel};
use crate::AppState;

/// Request header: `off` sends this request as is.
pub const OPT_OUT_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-compression");
/// Response headers.
pub const TOKENS_BEFORE_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-tokens-before");
pub const TOKENS_AFTER_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-tokens-after");
pub const ACTED_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-compression");

/// The compression policies, rules and token counters, built once from config.
pub struct Compressor {
    pub config: CompressionConfig,
    rules: Rules,
    models: Vec<(GlobMatcher, String, Policy)>,
    known: HashSet<String>,
    o200k: TokenCounter,
    cl100k: TokenCounter,
    /// Conversations with a state sheet being written, and the request tokens then.
    writing: Mutex<HashMap<String, (usize, u64)>>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor").field("mode", &self.config.policy.mode).finish_non_exhaustive()
    }
}

/// The policy one request runs under.
pub struct Active<'a> {
    pub policy: &'a Policy,
    pub counter: &'a TokenCounter,
    /// The model as a metric label: its configured name or pattern, or `other`.
    pub label: String,
}

impl Compressor {
    pub fn new(config: &Config) -> Self {
        let compression = &config.compression;
        let models = compression
            .models
            .iter()
            .flat_map(|m| {
                let policy = m.apply(&compression.policy);
                m.matches.iter().filter_map(move |pattern| {
                    Some((Glob::new(pattern).ok()?.compile_matcher(), pattern.clone(), policy.clone()))
                })
            })
            .collect();
        let known = config
            .upstreams
            .iter()
            .flat_map(|u| u.models.iter().cloned())
            .chain(config.routes.iter().flat_map(|r| r.models.iter().cloned()))
            .collect();
        Self {
            config: compression.clone(),
            rules: Rules::new(&compression.policy.rules),
            models,
            known,
            o200k: TokenCounter::new(Encoding::O200kBase),
            cl100k: TokenCounter::new(Encoding::Cl100kBase),
            writing: Mutex::new(HashMap::new()),
        }
    }

    /// The policy for `model`, or `None` when compression is off for it or the request opts out.
    pub fn active(&self, model: &str, headers: &HeaderMap) -> Option<Active<'_>> {
        if headers.get(&OPT_OUT_HEADER).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off")) {
            return None;
        }
        let (pattern, policy) = self
            .models
            .iter()
            .find(|(glob, _, _)| glob.is_match(model))
            .map_or((None, &self.config.policy), |(_, pattern, policy)| (Some(pattern), policy));
        if policy.mode == CompressionMode::Off {
            return None;
        }
        let encoding = match policy.encoding {
            Encoding::Auto => TokenCounter::encoding_for(model, self.config.default_encoding),
            other => other,
        };
        let counter = if encoding == Encoding::Cl100kBase { &self.cl100k } else { &self.o200k };
        let label = if self.known.contains(model) {
            model.to_string()
        } else {
            pattern.cloned().unwrap_or_else(|| "other".into())
        };
        Some(Active { policy, counter, label })
    }

    /// The token counter for `model`, whatever the compression policy (for token limits).
    pub fn counter_for(&self, model: &str) -> &TokenCounter {
        match TokenCounter::encoding_for(model, self.config.default_encoding) {
            Encoding::Cl100kBase => &self.cl100k,
            _ => &self.o200k,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether a state sheet is being written for `key` in this process.
    pub fn writing(&self, key: &str) -> bool {
        self.writing.lock().is_ok_and(|w| w.contains_key(key))
    }

    /// The tokens a request had when the sheet being written for `key` was asked for.
    fn writing_since(&self, key: &str) -> Option<(usize, u64)> {
        self.writing.lock().ok()?.get(key).copied()
    }
}

/// One request's messages, parsed and counted.
pub struct Analysed {
    pub infos: Vec<Info>,
    pub tokens: Vec<u32>,
}

pub fn analyse(counter: &TokenCounter, messages: &[Box<RawValue>]) -> Analysed {
    Analysed {
        infos: messages.iter().map(|m| Info::parse(m.get())).collect(),
        tokens: messages.iter().map(|m| counter.message(m.get())).collect(),
    }
}

/// Tokens outside the messages: the `tools` array and the goal block.
pub fn fixed_tokens(counter: &TokenCounter, tools: Option<&RawValue>, goal: Option<&RawValue>) -> u64 {
    tools.map_or(0, |t| u64::from(counter.json(t.get())))
        + goal.map_or(0, |g| u64::from(counter.message(g.get())))
}

/// Runs the plan for one request.
#[allow(clippy::too_many_arguments)]
pub fn run(
    compressor: &Compressor,
    active: &Active<'_>,
    messages: &[Box<RawValue>],
    analysed: &Analysed,
    goal: Option<&RawValue>,
    tools: Option<&RawValue>,
    previous: Option<State>,
    ready: Option<&Summary>,
) -> Plan {
    let input = plan::Input {
        messages,
        infos: &analysed.infos,
        tokens: &analysed.tokens,
        goal,
        fixed_tokens: fixed_tokens(active.counter, tools, goal),
        policy: active.policy,
        rules: &compressor.rules,
        counter: active.counter,
        force: false,
    };
    plan::plan(&input, previous, ready)
}

/// The state sheet waiting for `key`, if any. When one is still being written and this request
/// may reach the high-water mark, waits for it up to `summarizer.max_wait`.
pub async fn ready_summary(
    state: &AppState,
    active: &Active<'_>,
    key: &str,
    messages: &[Box<RawValue>],
) -> Option<Summary> {
    if active.policy.mode != CompressionMode::Hybrid {
        return None;
    }
    let compressor = &state.compressor;
    let bound = match compressor.writing_since(key) {
        Some((len, view)) => {
            let added: u64 =
                messages.iter().skip(len).map(|m| u64::from(active.counter.message(m.get()))).sum();
            if view + added > active.policy.high_tokens() {
                compressor.config.summarizer.max_wait
            } else {
                Duration::ZERO
            }
        }
        None => Duration::ZERO,
    };
    summary::wait_for(state, key, bound).await
}

/// Starts writing the sheet a plan asks for, unless one is already being written for `key`.
pub fn start_summary(
    state: &Arc<AppState>,
    key: &str,
    request: SummaryRequest,
    call: summary::Call,
    conversation_len: usize,
    tokens_after: u64,
) {
    {
        let Ok(mut writing) = state.compressor.writing.lock() else { return };
        if writing.contains_key(key) {
            return;
        }
        writing.insert(key.to_string(), (conversation_len, tokens_after));
    }
    let state = state.clone();
    let key = key.to_string();
    tokio::spawn(async move {
        summary::write(state.clone(), key.clone(), request, call).await;
        if let Ok(mut writing) = state.compressor.writing.lock() {
            writing.remove(&key);
        }
    });
}

/// The summary call for a request: the configured model and upstream, or the request's own.
pub fn summary_call(
    config: &CompressionConfig,
    model: &str,
    headers: &HeaderMap,
    tools: Option<&RawValue>,
) -> summary::Call {
    summary::Call {
        model: config.summarizer.model.clone().unwrap_or_else(|| model.to_string()),
        route_upstream: config.summarizer.upstream.clone(),
        authorization: headers.get(header::AUTHORIZATION).cloned(),
        tools: tools.and_then(|t| request::canonical(t.get())),
    }
}

/// Metrics for one planned request.
pub fn record(metrics: &Metrics, label: &str, plan: &Plan) {
    let stage = |stage| ModelStage { model: label.to_string(), stage };
    metrics.compression_tokens.get_or_create(&stage("before")).inc_by(plan.tokens_before);
    metrics.compression_tokens.get_or_create(&stage("after")).inc_by(plan.tokens_after);
    metrics.compression_requests.get_or_create(&stage(plan.acted.as_str())).inc();
    if let Some(kind) = plan.epoch {
        metrics.compression_epochs.get_or_create(&stage(kind.as_str())).inc();
    }
    if plan.reset {
        metrics.compression_epochs.get_or_create(&stage("reset")).inc();
    }
    if plan.fell_back {
        metrics.compression_epochs.get_or_create(&stage("fallback")).inc();
    }
    for rule in Rule::ALL {
        let saved = plan.stats.get(rule);
        if saved > 0 {
            metrics.compression_saved_tokens.get_or_create(&RuleLabel { rule: rule.name() }).inc_by(saved);
        }
    }
}

/// The response headers saying what compression did.
pub fn annotate(headers: &mut HeaderMap, plan: &Plan) {
    headers.insert(TOKENS_BEFORE_HEADER, HeaderValue::from(plan.tokens_before));
    headers.insert(TOKENS_AFTER_HEADER, HeaderValue::from(plan.tokens_after));
    headers.insert(ACTED_HEADER, HeaderValue::from_static(plan.acted.as_str()));
}

/// One request compressed without a gateway around it (the `compress` command): no stored
/// state and no state sheet, so hybrid runs as rules. `force` compacts whatever the marks say.
pub fn compress_offline(
    config: &Config,
    body: &[u8],
    mode: Option<CompressionMode>,
    force: bool,
) -> Result<(Bytes, Plan), GatewayError> {
    let (head, messages) = crate::openai::ChatRequestHead::parse_with_messages(body)?;
    let messages: Vec<Box<RawValue>> = messages.items.iter().map(|m| (*m).to_owned()).collect();
    let mut config = config.clone();
    if let Some(mode) = mode {
        config.compression.policy.mode = mode;
        config.compression.models.iter_mut().for_each(|m| m.mode = Some(mode));
    }
    let compressor = Compressor::new(&config);
    let Some(active) = compressor.active(&head.model, &HeaderMap::new()) else {
        let counter = &compressor.o200k;
        let analysed = analyse(counter, &messages);
        let tokens = fixed_tokens(counter, request::tools_of(body).as_deref(), None)
            + analysed.tokens.iter().map(|&t| u64::from(t)).sum::<u64>();
        let plan = Plan {
            messages,
            state: None,
            tokens_before: tokens,
            tokens_after: tokens,
            acted: Acted::Off,
            epoch: None,
            reset: false,
            fell_back: false,
            stats: rules::RuleStats::default(),
            summarize: None,
        };
        return Ok((Bytes::copy_from_slice(body), plan));
    };
    let tools = request::tools_of(body);
    let analysed = analyse(active.counter, &messages);
    let input = plan::Input {
        messages: &messages,
        infos: &analysed.infos,
        tokens: &analysed.tokens,
        goal: None,
        fixed_tokens: fixed_tokens(active.counter, tools.as_deref(), None),
        policy: active.policy,
        rules: &compressor.rules,
        counter: active.counter,
        force,
    };
    let plan = plan::plan(&input, None, None);
    let body = request::rebuild(body, &plan.messages, None)?;
    Ok((body, plan))
}

/// A cache key derived from a conversation key, for `prompt_cache_key`.
pub fn cache_key(conversation: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(conversation.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("ctxgate-{hex}")
}

/// What a session's checkpoint keeps about compression.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// Length and hash of each message of the previous upstream request, to measure how much
    /// of it the next one shares as a prefix.
    #[serde(default)]
    pub previous: Vec<(u32, u64)>,
}

impl SessionRecord {
    pub fn from_raw(raw: Option<&RawValue>) -> Self {
        raw.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
    }

    pub fn to_raw(&self) -> Option<Box<RawValue>> {
        serde_json::value::to_raw_value(self).ok()
    }

    /// Records `messages` as the latest upstream request; returns the bytes of the previous
    /// one and how many of them lead the new one unchanged.
    pub fn shared_prefix(&mut self, messages: &[Box<RawValue>]) -> (u64, u64) {
        let now: Vec<(u32, u64)> = messages.iter().map(|m| (m.get().len() as u32, hash(m.get()))).collect();
        let previous: u64 = self.previous.iter().map(|(len, _)| u64::from(*len)).sum();
        let shared =
            self.previous.iter().zip(&now).take_while(|(a, b)| a == b).map(|(a, _)| u64::from(a.0)).sum();
        self.previous = now;
        (previous, shared)
    }
}

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Stateless clients: the conversation's key (caller scope plus its system messages and first
/// other message) and its stored state.
pub fn conversation_key(scope: &str, messages: &[Box<RawValue>], infos: &[Info]) -> String {
    let first = infos.iter().position(|i| i.role != message::Role::System).map_or(messages.len(), |i| i + 1);
    format!("c:{scope}:{}", plan::covered(messages, 0, first))
}

pub async fn load_state(state: &AppState, key: &str) -> Option<State> {
    let bytes = state.sessions.store.get_blob(&format!("cmp:{key}")).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

pub async fn save_state(state: &AppState, key: &str, plan_state: &State) -> Result<(), GatewayError> {
    let bytes = serde_json::to_vec(plan_state).map_err(|e| GatewayError::Internal(e.into()))?;
    state
        .sessions
        .store
        .put_blob(&format!("cmp:{key}"), Bytes::from(bytes))
        .await
        .map_err(GatewayError::SessionStore)
}
