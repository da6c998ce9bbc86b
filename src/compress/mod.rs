//! Context compression: shrink what goes upstream while keeping the front of the prompt
//! byte-identical from turn to turn, so prompt and KV caches keep hitting.
//!
//! - [`rules`] (over [`text`] and [`crate::openai::message`]): the named rule passes.
//! - [`plan`]: compaction epochs and the prefix-stable layout.
//! - [`summary`]: the hybrid state sheet's request and the message made from its answer.
//!
//! Everything here is pure: the policy for a model, the plan for one request, its metrics.
//! Where state lives (a session's checkpoint, a stateless conversation's stored epoch) and the
//! state-sheet calls belong to the chat pipeline (`chat::compression`), which hands this
//! module plain values. It never touches the store, an upstream or a request's HTTP parts.

pub(crate) mod expand;
pub mod marker;
pub mod plan;
pub mod rules;
pub(crate) mod summary;
mod text;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;

use bytes::Bytes;
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use self::plan::Input;
pub use self::plan::{Acted, Plan, State, Summary, SummaryRequest};
use self::rules::{Rule, Rules};
use crate::config::{CompressionConfig, CompressionMode, Config, ConfigError, Encoding, Policy};
use crate::error::GatewayError;
use crate::openai::message::{self, Info};
use crate::openai::ChatRequest;
use crate::telemetry::{Metrics, ModelStage, RuleLabel};
use crate::tokens::TokenCounter;

/// The compression policies, rules and token counters, built once from config.
pub struct Compressor {
    pub config: CompressionConfig,
    rules: Rules,
    models: Vec<(GlobMatcher, Policy)>,
    o200k: TokenCounter,
    cl100k: TokenCounter,
    /// Models' own tokenizers, by the path config names.
    tokenizers: HashMap<PathBuf, TokenCounter>,
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
}

impl Compressor {
    /// The compressor of a validated config (its tokenizer files load); a file that fails to
    /// load now is reported with its key.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let compression = &config.compression;
        let mut tokenizers = HashMap::new();
        let paths = compression
            .policy
            .tokenizer
            .iter()
            .chain(compression.models.iter().filter_map(|m| m.tokenizer.as_ref()));
        for path in paths.cloned() {
            if let std::collections::hash_map::Entry::Vacant(slot) = tokenizers.entry(path) {
                let counter = TokenCounter::from_tokenizer_file(slot.key())
                    .map_err(|e| ConfigError::single("compression.tokenizer", e))?;
                slot.insert(counter);
            }
        }
        let models = compression
            .models
            .iter()
            .flat_map(|m| {
                let policy = m.apply(&compression.policy);
                m.matches.iter().filter_map(move |pattern| {
                    Some((Glob::new(pattern).ok()?.compile_matcher(), policy.clone()))
                })
            })
            .collect();
        Ok(Self {
            config: compression.clone(),
            rules: Rules::new(&compression.policy.rules),
            models,
            o200k: TokenCounter::new(Encoding::O200kBase),
            cl100k: TokenCounter::new(Encoding::Cl100kBase),
            tokenizers,
        })
    }

    /// The policy for `model`, or `None` when compression is off for it.
    pub fn active(&self, model: &str) -> Option<Active<'_>> {
        let policy =
            self.models.iter().find(|(glob, _)| glob.is_match(model)).map_or(&self.config.policy, |(_, p)| p);
        if policy.mode == CompressionMode::Off {
            return None;
        }
        let encoding = match policy.encoding {
            Encoding::Auto => TokenCounter::encoding_for(model, self.config.default_encoding),
            other => other,
        };
        let counter = match &policy.tokenizer {
            Some(path) => self.tokenizers.get(path).unwrap_or(&self.o200k),
            None if encoding == Encoding::Cl100kBase => &self.cl100k,
            None => &self.o200k,
        };
        Some(Active { policy, counter })
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
}

/// One request's messages, parsed and counted.
pub struct Analysed {
    pub infos: Vec<Info>,
    pub tokens: Vec<u32>,
}

/// Each message parsed once (on every core for a long conversation, as counting is), and its
/// tokens counted from what was parsed.
pub fn analyse(counter: &TokenCounter, messages: &[Box<RawValue>]) -> Analysed {
    let bytes: usize = messages.iter().map(|m| m.get().len()).sum();
    let infos: Vec<Info> = if bytes < crate::tokens::PARALLEL_BYTES {
        messages.iter().map(|m| Info::parse(m.get())).collect()
    } else {
        use rayon::prelude::*;
        messages.par_iter().map(|m| Info::parse(m.get())).collect()
    };
    let tokens = counter.messages_of(messages, &infos);
    Analysed { infos, tokens }
}

/// Tokens outside the messages: the `tools` array and the goal block.
pub fn fixed_tokens(counter: &TokenCounter, tools: Option<&RawValue>, goal: Option<&RawValue>) -> u64 {
    tools.map_or(0, |t| u64::from(counter.json(t.get())))
        + goal.map_or(0, |g| u64::from(counter.message(g.get())))
}

/// One request's conversation, as the plan takes it.
pub struct Turn<'a> {
    pub messages: &'a [Box<RawValue>],
    pub analysed: &'a Analysed,
    pub goal: Option<&'a RawValue>,
    pub tools: Option<&'a RawValue>,
    /// The state an earlier epoch froze.
    pub previous: Option<State>,
    /// A state sheet written since.
    pub ready: Option<&'a Summary>,
    /// The provider's cache has expired since the previous request.
    pub cold: bool,
    /// Compact whatever the marks say.
    pub force: bool,
}

/// Runs the plan for one request.
pub fn run(compressor: &Compressor, active: &Active<'_>, turn: Turn<'_>) -> Plan {
    let input = plan::Input {
        messages: turn.messages,
        infos: &turn.analysed.infos,
        tokens: &turn.analysed.tokens,
        goal: turn.goal,
        fixed_tokens: fixed_tokens(active.counter, turn.tools, turn.goal),
        policy: active.policy,
        rules: &compressor.rules,
        counter: active.counter,
        force: turn.force,
        cold: turn.cold,
    };
    plan::plan(&input, turn.previous, turn.ready)
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
    if plan.cold_epoch {
        metrics.compression_epochs.get_or_create(&stage("cold")).inc();
    }
    for rule in Rule::ALL {
        let saved = plan.stats.get(rule);
        if saved > 0 {
            metrics.compression_saved_tokens.get_or_create(&RuleLabel { rule: rule.name() }).inc_by(saved);
        }
    }
}

/// One request compressed without a gateway around it (the `compress` command): no stored
/// state and no state sheet, so hybrid runs as rules. `force` compacts whatever the marks say.
pub fn compress_offline(
    config: &Config,
    body: &[u8],
    mode: Option<CompressionMode>,
    force: bool,
) -> Result<(Bytes, Plan), GatewayError> {
    let request = ChatRequest::parse(Bytes::copy_from_slice(body))?;
    let mut config = config.clone();
    if let Some(mode) = mode {
        config.compression.policy.mode = mode;
        config.compression.models.iter_mut().for_each(|m| m.mode = Some(mode));
    }
    let compressor = Compressor::new(&config).map_err(|e| GatewayError::Internal(e.into()))?;
    let active = compressor
        .active(&request.model)
        .unwrap_or(Active { policy: &config.compression.policy, counter: &compressor.o200k });
    let analysed = analyse(active.counter, request.messages());
    let turn = Turn {
        messages: request.messages(),
        analysed: &analysed,
        goal: None,
        tools: request.tools(),
        previous: None,
        ready: None,
        cold: false,
        force,
    };
    let mut plan = run(&compressor, &active, turn);
    if plan.acted == Acted::Off {
        return Ok((request.body().clone(), plan));
    }
    let messages = std::mem::take(&mut plan.messages);
    let extra = (plan.markers && config.compression.expand).then(expand::definition);
    let body = request.rebuild(messages, None, extra.as_deref())?.body().clone();
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
