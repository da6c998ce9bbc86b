//! `[compression]`: when and how ctxgate shrinks what goes upstream. A default policy, with
//! per-model overrides (`[[compression.models]]`, first match wins).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Issues;
pub use crate::tokens::Encoding;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Requests go upstream as sent.
    #[default]
    Off,
    /// Rule passes only.
    Rules,
    /// Rules, plus an LLM state sheet of old turns when rules do not reach the target.
    Hybrid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Rules => "rules",
            Mode::Hybrid => "hybrid",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// The policy for models that match no `[[compression.models]]` entry.
    #[serde(flatten)]
    pub policy: Policy,
    /// Per-model overrides; each names its models (exact or glob) and the keys it changes.
    pub models: Vec<ModelPolicy>,
    /// Encoding for models tiktoken does not know (local and non-OpenAI models).
    pub default_encoding: Encoding,
    pub summarizer: SummarizerConfig,
    /// Offer the `ctxgate_expand` tool to requests whose messages carry markers, and answer it
    /// in the gateway's tool loop.
    pub expand: bool,
    /// The longest answer `ctxgate_expand` gives, in bytes (past it: ask with a query).
    pub expand_max_bytes: usize,
    /// How long a provider keeps a prompt cached. A session whose previous request is older
    /// compacts from the pre-compaction mark: its cache is cold anyway. `0s` turns this off.
    #[serde(with = "humantime_serde")]
    pub cache_lifetime: Duration,
}

impl CompressionConfig {
    /// The section's fields; `upstream_exists` answers for the summarizer's upstream.
    pub(super) fn validate(&self, upstream_exists: &dyn Fn(&str) -> bool, issues: &mut Issues) {
        let mut policies = vec![("compression".to_string(), self.policy.clone())];
        for (i, model) in self.models.iter().enumerate() {
            let at = format!("compression.models[{i}]");
            if model.matches.is_empty() {
                issues.push(format!("{at}.match"), "must name at least one model or glob");
            }
            for (j, pattern) in model.matches.iter().enumerate() {
                issues.glob(format!("{at}.match[{j}]"), pattern);
            }
            policies.push((at, model.apply(&self.policy)));
        }
        for (at, policy) in &policies {
            if policy.context_window == 0 {
                issues.push(format!("{at}.context_window"), "must be greater than zero");
            }
            let marks = [policy.low_water, policy.pre_compaction, policy.high_water];
            if !(0.0..=1.0).contains(&policy.token_margin) {
                issues.push(format!("{at}.token_margin"), "must be between 0 and 1");
            }
            if let Some(path) = &policy.tokenizer {
                if let Err(message) = crate::tokens::TokenCounter::from_tokenizer_file(path) {
                    issues.push(format!("{at}.tokenizer"), message);
                }
            }
            if !marks.iter().all(|m| *m > 0.0 && *m <= 1.0)
                || policy.low_water >= policy.high_water
                || policy.pre_compaction > policy.high_water
            {
                issues.push(
                    at,
                    "marks must satisfy 0 < low_water < high_water <= 1 and pre_compaction <= high_water",
                );
            }
        }
        for (j, pattern) in self.policy.rules.read_functions.iter().enumerate() {
            issues.glob(format!("compression.rules.read_functions[{j}]"), pattern);
        }
        if let Some(name) = &self.summarizer.upstream {
            if !upstream_exists(name) {
                issues.push("compression.summarizer.upstream", format!("no upstream is named `{name}`"));
            }
        }
        if !matches!(self.summarizer.role.as_str(), "system" | "user") {
            issues.push("compression.summarizer.role", "must be `system` or `user`");
        }
        issues.positive("compression.summarizer.timeout", self.summarizer.timeout);
        if self.expand_max_bytes < 256 {
            issues.push("compression.expand_max_bytes", "must be at least 256");
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            models: Vec::new(),
            default_encoding: Encoding::O200kBase,
            summarizer: SummarizerConfig::default(),
            expand: true,
            expand_max_bytes: 32 * 1024,
            cache_lifetime: Duration::from_secs(300),
        }
    }
}

/// A policy override for some models: unset keys keep the default policy's values.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicy {
    /// Exact model names or globs (`gpt-4o*`).
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    pub mode: Option<Mode>,
    pub context_window: Option<u64>,
    pub high_water: Option<f64>,
    pub low_water: Option<f64>,
    pub pre_compaction: Option<f64>,
    pub keep_recent_turns: Option<usize>,
    pub encoding: Option<Encoding>,
    pub tokenizer: Option<PathBuf>,
    pub token_margin: Option<f64>,
}

impl ModelPolicy {
    pub fn apply(&self, base: &Policy) -> Policy {
        let mut policy = base.clone();
        policy.mode = self.mode.unwrap_or(policy.mode);
        policy.context_window = self.context_window.unwrap_or(policy.context_window);
        policy.high_water = self.high_water.unwrap_or(policy.high_water);
        policy.low_water = self.low_water.unwrap_or(policy.low_water);
        policy.pre_compaction = self.pre_compaction.unwrap_or(policy.pre_compaction);
        policy.keep_recent_turns = self.keep_recent_turns.unwrap_or(policy.keep_recent_turns);
        policy.encoding = self.encoding.unwrap_or(policy.encoding);
        if self.tokenizer.is_some() {
            policy.tokenizer.clone_from(&self.tokenizer);
        }
        policy.token_margin = self.token_margin.unwrap_or(policy.token_margin);
        policy
    }
}

/// When compression acts and how far it goes. Marks are fractions of `context_window`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub mode: Mode,
    /// The model's context window, in tokens (prompt, tools included).
    pub context_window: u64,
    /// A compaction epoch starts when a request's upstream tokens exceed this share.
    pub high_water: f64,
    /// What a compaction epoch compresses down to.
    pub low_water: f64,
    /// Hybrid: the summary of the next span starts in the background at this share.
    pub pre_compaction: f64,
    /// The most recent turns (a user message, or one model step with its tool results) that
    /// are always sent verbatim.
    pub keep_recent_turns: usize,
    pub encoding: Encoding,
    /// The model's own Hugging Face `tokenizer.json`, to count as the upstream does (a local
    /// model counts the same text 10-20% higher than tiktoken).
    pub tokenizer: Option<PathBuf>,
    /// Counted tokens are taken to be this share more than counted (0.15: 15%), for a model
    /// whose tokenizer is not at hand; the marks shrink by as much.
    pub token_margin: f64,
    pub rules: RulesConfig,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            context_window: 128_000,
            high_water: 0.8,
            low_water: 0.5,
            pre_compaction: 0.6,
            keep_recent_turns: 4,
            encoding: Encoding::Auto,
            tokenizer: None,
            token_margin: 0.0,
            rules: RulesConfig::default(),
        }
    }
}

impl Policy {
    pub fn high_tokens(&self) -> u64 {
        self.mark(self.high_water)
    }

    pub fn low_tokens(&self) -> u64 {
        self.mark(self.low_water)
    }

    pub fn pre_tokens(&self) -> u64 {
        self.mark(self.pre_compaction)
    }

    /// A share of the window in counted tokens, the margin taken off.
    fn mark(&self, share: f64) -> u64 {
        (self.context_window as f64 * share / (1.0 + self.token_margin)) as u64
    }
}

/// The rule passes; each can be switched off.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Trailing blanks, runs of blanks inside lines and of blank lines, outside code fences.
    pub whitespace: bool,
    /// ANSI escape sequences (terminal colours, cursor moves).
    pub ansi: bool,
    /// A tool result identical to an earlier one becomes a reference to it.
    pub duplicate_tool_results: bool,
    /// An older read of the same resource (same read-like function, same arguments) becomes a
    /// pointer to the newer read.
    pub superseded_reads: bool,
    /// Function names (globs) that read a resource without changing it.
    pub read_functions: Vec<String>,
    /// Tool outputs longer than `max_tool_output_tokens` keep their head and tail.
    pub truncate_tool_outputs: bool,
    pub max_tool_output_tokens: u64,
    /// Runs of base64 or hex longer than `min_blob_bytes` are elided.
    pub elide_blobs: bool,
    pub min_blob_bytes: usize,
    /// Tool results are replaced by a marker when the budget needs it, largest first.
    pub mask_old_tool_results: bool,
    /// Also mask every tool result more than `mask_after_turns` turns old at each epoch,
    /// whatever the budget (off by default: masking is a budget choice).
    pub mask_by_age: bool,
    pub mask_after_turns: usize,
    /// Old assistant prose is replaced by a marker when the budget needs it.
    pub mask_assistant_messages: bool,
    /// Whole old model steps (an assistant message and its tool results) become one marker
    /// message when the budget needs it.
    pub drop_oldest: bool,
    /// Last resort: old user messages become markers, oldest first.
    pub elide_user_messages: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            whitespace: true,
            ansi: true,
            duplicate_tool_results: true,
            superseded_reads: true,
            read_functions: ["read*", "*_read", "cat", "view*", "open*", "get_*", "fetch*", "ls", "list*"]
                .map(String::from)
                .to_vec(),
            truncate_tool_outputs: true,
            max_tool_output_tokens: 2_000,
            elide_blobs: true,
            min_blob_bytes: 256,
            mask_old_tool_results: true,
            mask_by_age: false,
            mask_after_turns: 10,
            mask_assistant_messages: true,
            drop_oldest: true,
            elide_user_messages: true,
        }
    }
}

impl RulesConfig {
    /// Every rule switched off, their parameters at their defaults: a base to switch some on.
    pub fn none() -> Self {
        Self {
            whitespace: false,
            ansi: false,
            duplicate_tool_results: false,
            superseded_reads: false,
            truncate_tool_outputs: false,
            elide_blobs: false,
            mask_old_tool_results: false,
            mask_assistant_messages: false,
            drop_oldest: false,
            elide_user_messages: false,
            ..Self::default()
        }
    }
}

/// The LLM call that writes the hybrid state sheet.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SummarizerConfig {
    /// Upstream name; unset: the session's own route.
    pub upstream: Option<String>,
    /// Model; unset: the request's model.
    pub model: Option<String>,
    /// Bound on one summary call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a request at the high-water mark waits for a summary still being written
    /// before it falls back to rules.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// `max_tokens` of the summary.
    pub max_tokens: u32,
    /// Role of the state-sheet message (`system` or `user`).
    pub role: String,
}

impl Default for SummarizerConfig {
    fn default() -> Self {
        Self {
            upstream: None,
            model: None,
            timeout: Duration::from_secs(120),
            max_wait: Duration::from_millis(500),
            max_tokens: 1_024,
            role: "system".into(),
        }
    }
}
