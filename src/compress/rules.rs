//! The rule passes of a compaction epoch, run against a token budget.
//!
//! An epoch compacts the span before the recent turns down to the low-water mark and stops
//! there. Passes run in order of increasing loss, and every lossy one stops as soon as the
//! request fits:
//!
//! 1. lossless: whitespace and ANSI on every message (recent turns too, from the moment a
//!    message first appears: see [`normalize`]), and exact duplicates of a tool result, which
//!    point at the newest copy, kept verbatim;
//! 2. blobs elided and oversized tool outputs cut to their head and tail (no shorter than the
//!    budget needs);
//! 3. superseded reads, then tool results masked, largest first (oldest first among equals;
//!    the smallest that meets the budget alone, when one does);
//! 4. old assistant prose masked;
//! 5. model steps (an assistant message and its tool results) dropped one at a time, oldest
//!    first; a run of dropped steps shares one marker, named by its first and last ids.
//!
//! When that is not enough, the same passes run on the protected recent turns, oldest first
//! (never on the last turn); only then are user messages elided, oldest first, so the facts a
//! user states are kept longest.
//!
//! Every lossy rewrite leaves a marker naming its original ([`super::marker`]), and no marker
//! points at a message that is itself rewritten: a reference to a copy that a later pass cut
//! becomes a marker of its own. Rules rewrite messages in place, one for one, except dropped
//! steps, whose messages become one marker message; every remaining tool result still follows
//! the assistant message that called it.

use std::collections::HashMap;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{marker, text};
use crate::config::RulesConfig;
use crate::memo::Memo;
use crate::openai::message::{self, Call, Info, Role};
use crate::tokens::{TokenCounter, PARALLEL_BYTES};

/// About what a marker costs, in tokens: a cut that must meet the budget removes this much more.
const MARKER_TOKENS: u64 = 32;
/// A cut keeps at least this much of an output; below it the output is masked whole.
const MIN_KEPT: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    Whitespace,
    Ansi,
    DuplicateToolResults,
    SupersededReads,
    TruncateToolOutputs,
    ElideBlobs,
    MaskOldToolResults,
    MaskAssistantMessages,
    DropOldest,
    ElideUserMessages,
}

impl Rule {
    pub const ALL: [Rule; 10] = [
        Rule::Whitespace,
        Rule::Ansi,
        Rule::DuplicateToolResults,
        Rule::SupersededReads,
        Rule::TruncateToolOutputs,
        Rule::ElideBlobs,
        Rule::MaskOldToolResults,
        Rule::MaskAssistantMessages,
        Rule::DropOldest,
        Rule::ElideUserMessages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::Whitespace => "whitespace",
            Rule::Ansi => "ansi",
            Rule::DuplicateToolResults => "duplicate_tool_results",
            Rule::SupersededReads => "superseded_reads",
            Rule::TruncateToolOutputs => "truncate_tool_outputs",
            Rule::ElideBlobs => "elide_blobs",
            Rule::MaskOldToolResults => "mask_old_tool_results",
            Rule::MaskAssistantMessages => "mask_assistant_messages",
            Rule::DropOldest => "drop_oldest",
            Rule::ElideUserMessages => "elide_user_messages",
        }
    }
}

/// Tokens saved per rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub saved: [u64; Rule::ALL.len()],
}

impl RuleStats {
    pub fn add(&mut self, rule: Rule, tokens: u64) {
        self.saved[rule as usize] += tokens;
    }

    pub fn get(&self, rule: Rule) -> u64 {
        self.saved[rule as usize]
    }

    pub fn merge(&mut self, other: &RuleStats) {
        for (a, b) in self.saved.iter_mut().zip(other.saved) {
            *a += b;
        }
    }

    pub fn total(&self) -> u64 {
        self.saved.iter().sum()
    }
}

/// The configured rules, compiled once.
pub struct Rules {
    pub config: RulesConfig,
    reads: GlobSet,
    /// Lossless rewrites by message, so a conversation's recent messages are normalised once,
    /// not on every request.
    normalized: Memo<Option<Box<RawValue>>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Rules {
    pub fn new(config: &RulesConfig) -> Self {
        let mut builder = GlobSetBuilder::new();
        for pattern in &config.read_functions {
            // Validated with the config; a bad glob here only means no read matches it.
            if let Ok(glob) = Glob::new(pattern) {
                builder.add(glob);
            }
        }
        let reads = builder.build().unwrap_or_else(|_| GlobSet::empty());
        // Most messages need nothing (an entry without bytes); the rewritten ones are bounded.
        let normalized = Memo::new(100_000, 32 * 1024 * 1024);
        Self { config: config.clone(), reads, normalized }
    }
}

/// A conversation as the rules see it.
pub struct Conversation<'a> {
    pub messages: &'a [Box<RawValue>],
    pub infos: &'a [Info],
    pub tokens: &'a [u32],
}

impl Conversation<'_> {
    /// Index of the first message of each turn after the leading system messages: a user
    /// message, or an assistant message that starts a model step.
    pub fn turn_starts(&self, lead: usize) -> Vec<usize> {
        let mut starts = Vec::new();
        for (i, info) in self.infos.iter().enumerate().skip(lead) {
            let starts_turn = match info.role {
                Role::User => true,
                Role::Assistant => i == lead || self.infos[i - 1].role != Role::Assistant,
                _ => i == lead,
            };
            if starts_turn {
                starts.push(i);
            }
        }
        starts
    }

    /// The latest user message: the question being asked, kept verbatim.
    pub fn latest_user(&self) -> Option<usize> {
        self.infos.iter().rposition(|i| i.role == Role::User)
    }
}

/// The message with the lossless passes applied (whitespace, ANSI), or `None` when they change
/// nothing. Deterministic per message, so a message normalised when it first appears is the
/// same bytes in every later request: normalising never moves the prefix.
pub fn normalize(rules: &Rules, info: &Info, json: &str) -> Option<Box<RawValue>> {
    let config = &rules.config;
    if info.role == Role::System || !(config.whitespace || config.ansi) || info.text.is_none() {
        return None;
    }
    let change = |text: &str| {
        let ansi = if config.ansi { text::ansi(text) } else { None };
        let current = ansi.as_deref().unwrap_or(text);
        let spaces = if config.whitespace && text::may_need_whitespace(current) {
            text::whitespace(current)
        } else {
            None
        };
        spaces.or(ansi)
    };
    let weigh = |m: &Option<Box<RawValue>>| m.as_ref().map_or(0, |m| m.get().len());
    rules.normalized.get_or(json, 0, || message::edit_text(json, change), weigh)
}

/// What an epoch made of each message of its span, kept with the frozen messages so the next
/// epoch starts from it: an epoch only adds rewrites, so the previous one's markers and cuts
/// stay byte for byte and the cache keeps the prefix up to the first new one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    pub fates: Vec<Fate>,
    /// Tokens of each message as sent (0: a dropped message after the first of its run).
    pub tokens: Vec<u64>,
}

/// The previous epoch of the same span: its decisions and the messages it froze.
#[derive(Clone, Copy)]
pub struct Seed<'a> {
    pub decisions: &'a Decisions,
    pub frozen: &'a [Box<RawValue>],
}

impl<'a> Seed<'a> {
    /// Each message of the previous span as it was sent, or `None` where an earlier message of
    /// a dropped run carries it; `None` overall when the decisions do not match the messages.
    fn slots(&self, conversation: &Conversation<'_>, from: usize) -> Option<Vec<Slot>> {
        let Decisions { fates, tokens } = self.decisions;
        if fates.len() != tokens.len() || from + fates.len() > conversation.messages.len() {
            return None;
        }
        let mut frozen = self.frozen.iter();
        let mut slots = Vec::with_capacity(fates.len());
        for (&fate, &tokens) in fates.iter().zip(tokens) {
            let message = if fate == Fate::Dropped && tokens == 0 {
                RawValue::NULL.to_owned()
            } else {
                frozen.next()?.clone()
            };
            slots.push(Slot { message, tokens, fate });
        }
        frozen.next().is_none().then_some(slots)
    }
}

/// The lossless passes already applied to `messages[from..]` (by the request's layout):
/// each message's rewrite (`None`: unchanged) and its tokens as it will be sent.
#[derive(Clone, Copy)]
pub struct Lossless<'a> {
    pub from: usize,
    pub messages: &'a [Option<Box<RawValue>>],
    pub tokens: &'a [u64],
}

/// One epoch's span and budget.
pub struct Epoch<'a> {
    pub conversation: &'a Conversation<'a>,
    pub turn_starts: &'a [usize],
    /// The span starts here (after the leading system messages, or what a state sheet covers).
    pub from: usize,
    /// The protected recent turns start here: compacted only when the older span cannot
    /// reach the budget alone.
    pub protect_from: usize,
    /// The last turn starts here: never compacted.
    pub limit: usize,
    /// Tokens of everything outside `from..limit`, as it will be sent.
    pub outside: u64,
    /// The budget: the low-water mark.
    pub target: u64,
    /// The previous epoch of this span, to build on.
    pub seed: Option<Seed<'a>>,
    /// What the layout already normalised and counted, not to do it twice.
    pub lossless: Option<Lossless<'a>>,
}

/// What an epoch made of its span.
#[derive(Debug)]
pub struct Compacted {
    /// `from..upto`, compacted.
    pub messages: Vec<Box<RawValue>>,
    /// Where the compacted span ends: the protected turns' start, or past the ones compacted.
    pub upto: usize,
    pub tokens: u64,
    pub stats: RuleStats,
    /// Conversation indices of the originals the span's markers name.
    pub elided: Vec<usize>,
    /// What became of each message of `from..upto`.
    pub decisions: Decisions,
}

/// What happened to one message of the span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    Kept,
    /// Lossless rewrites only.
    Normalized,
    /// Parts cut (a blob, the middle of a long output), with an inline marker.
    Cut,
    /// Replaced whole by a marker.
    Elided,
    /// Replaced by a marker that refers to another message with the same (or newer) content.
    Reference(usize),
    /// Part of a dropped run: the run's first message carries its marker, the rest are gone.
    Dropped,
}

struct Slot {
    message: Box<RawValue>,
    tokens: u64,
    fate: Fate,
}

/// Compacts `epoch`'s span: see the module docs for the order of the passes.
pub fn compact(rules: &Rules, epoch: &Epoch<'_>, counter: &TokenCounter) -> Compacted {
    let mut work = Work::new(rules, epoch, counter);
    let config = &rules.config;
    let regions = [(epoch.from, epoch.protect_from), (epoch.protect_from, epoch.limit)];
    for (r, &(start, end)) in regions.iter().enumerate() {
        if r == 1 && !work.over() {
            break;
        }
        if r == 0 && config.mask_old_tool_results && config.mask_by_age {
            work.mask_by_age(start, end);
        }
        if config.duplicate_tool_results {
            work.duplicates(start, end);
        }
        if config.elide_blobs || config.truncate_tool_outputs {
            work.cut_large(start, end);
        }
        if config.superseded_reads {
            work.superseded(start, end);
        }
        if config.mask_old_tool_results {
            work.mask(start, end, Role::Tool, Rule::MaskOldToolResults);
        }
        if config.mask_assistant_messages {
            work.mask(start, end, Role::Assistant, Rule::MaskAssistantMessages);
        }
        if config.drop_oldest {
            work.drop_steps(start, end);
        }
    }
    if config.elide_user_messages {
        work.mask(epoch.from, epoch.limit, Role::User, Rule::ElideUserMessages);
        work.drop_oldest_with_users(epoch.from, epoch.limit);
    }
    work.fix_references();
    work.finish()
}

struct Work<'a> {
    rules: &'a Rules,
    epoch: &'a Epoch<'a>,
    counter: &'a TokenCounter,
    slots: Vec<Slot>,
    total: u64,
    stats: RuleStats,
    /// Which call each tool result answers, by call id.
    calls: HashMap<&'a str, &'a Call>,
    latest_user: Option<usize>,
}

impl<'a> Work<'a> {
    fn new(rules: &'a Rules, epoch: &'a Epoch<'a>, counter: &'a TokenCounter) -> Self {
        let conversation = epoch.conversation;
        // The lossless rewrite of each message, with the tokens it saved by ANSI and by
        // whitespace. Independent per message, and on a first-seen conversation most of its
        // cost is counting the rewritten messages: a long one runs on every core.
        let lossless = |i: usize| {
            let original = &conversation.messages[i];
            let tokens = u64::from(conversation.tokens[i]);
            let info = &conversation.infos[i];
            let done = epoch.lossless.and_then(|l| {
                let k = i.checked_sub(l.from)?;
                Some((l.messages.get(k)?.clone(), *l.tokens.get(k)?))
            });
            let rewritten = match done {
                Some((message, after)) => message.map(|m| (m, after)),
                None => normalize(rules, info, original.get()).map(|m| {
                    let after = u64::from(counter.message(m.get()));
                    (m, after)
                }),
            };
            match rewritten {
                Some((message, after)) => {
                    // Saved tokens split between the two passes by the bytes each removed.
                    let text = info.text.as_deref().unwrap_or("");
                    let ansi = rules.config.ansi.then(|| text::ansi(text)).flatten();
                    let ansi_bytes = ansi.map_or(0, |a| text.len() - a.len());
                    let saved = tokens.saturating_sub(after);
                    let removed = text
                        .len()
                        .saturating_sub(Info::parse(message.get()).text.map_or(0, |t| t.len()))
                        .max(1);
                    let by_ansi = saved * ansi_bytes.min(removed) as u64 / removed as u64;
                    (Slot { message, tokens: after, fate: Fate::Normalized }, by_ansi, saved - by_ansi)
                }
                None => (Slot { message: original.clone(), tokens, fate: Fate::Kept }, 0, 0),
            }
        };
        let range = epoch.from..epoch.limit;
        let bytes: usize = conversation.messages[range.clone()].iter().map(|m| m.get().len()).sum();
        let rewritten: Vec<(Slot, u64, u64)> = if bytes < PARALLEL_BYTES {
            range.map(lossless).collect()
        } else {
            use rayon::prelude::*;
            range.into_par_iter().map(lossless).collect()
        };
        let mut stats = RuleStats::default();
        let mut slots: Vec<Slot> = rewritten
            .into_iter()
            .map(|(slot, by_ansi, by_whitespace)| {
                stats.add(Rule::Ansi, by_ansi);
                stats.add(Rule::Whitespace, by_whitespace);
                slot
            })
            .collect();
        // The previous epoch's rewrites stand; what it kept whole is whole here too.
        if let Some(seeded) = epoch.seed.and_then(|seed| seed.slots(conversation, epoch.from)) {
            for (slot, old) in slots.iter_mut().zip(seeded) {
                if !matches!(old.fate, Fate::Kept | Fate::Normalized) {
                    *slot = old;
                }
            }
        }
        let total = epoch.outside + slots.iter().map(|s| s.tokens).sum::<u64>();
        let calls = conversation.infos.iter().flat_map(|i| &i.calls).map(|c| (c.id.as_str(), c)).collect();
        Self { rules, epoch, counter, slots, total, stats, calls, latest_user: conversation.latest_user() }
    }

    fn over(&self) -> bool {
        self.total > self.epoch.target
    }

    fn info(&self, i: usize) -> &'a Info {
        &self.epoch.conversation.infos[i]
    }

    fn slot(&self, i: usize) -> &Slot {
        &self.slots[i - self.epoch.from]
    }

    /// Whether the message at `i` is still whole (lossless rewrites aside).
    fn whole(&self, i: usize) -> bool {
        matches!(self.slot(i).fate, Fate::Kept | Fate::Normalized)
    }

    /// Puts `message` in place of the message at `i`, if it is smaller; counts what it saved.
    fn replace(&mut self, i: usize, message: Box<RawValue>, fate: Fate, rule: Rule) -> bool {
        let tokens = u64::from(self.counter.message(message.get()));
        let slot = &mut self.slots[i - self.epoch.from];
        if tokens >= slot.tokens {
            return false;
        }
        self.stats.add(rule, slot.tokens - tokens);
        self.total -= slot.tokens - tokens;
        *slot = Slot { message, tokens, fate };
        true
    }

    /// Replaces the text of the message at `i` by a marker of the whole original, `note`
    /// appended to its description.
    fn elide(&mut self, i: usize, note: &str, fate: Fate, rule: Rule) -> bool {
        let info = self.info(i);
        let original = &self.epoch.conversation.messages[i];
        let call = info.tool_call_id.as_deref().and_then(|id| self.calls.get(id).copied());
        let what = format!("{}{note}", marker::describe(info, call));
        let tokens = u64::from(self.epoch.conversation.tokens[i]);
        let text = marker::whole(&[marker::id_of(original)], &what, tokens);
        match message::replace_text(original.get(), &text) {
            Some(new) => self.replace(i, new, fate, rule),
            None => false,
        }
    }

    /// Tool results older than `mask_after_turns` turns, masked whatever the budget (the
    /// `mask_by_age` switch).
    fn mask_by_age(&mut self, start: usize, end: usize) {
        let starts = self.epoch.turn_starts;
        let turns = starts.len();
        for i in start..end {
            let age = turns.saturating_sub(starts.partition_point(|&s| s <= i));
            if self.info(i).role == Role::Tool && self.whole(i) && age > self.rules.config.mask_after_turns {
                self.elide(i, "", Fate::Elided, Rule::MaskOldToolResults);
            }
        }
    }

    /// A tool result whose text a later one repeats becomes a reference to the newest copy.
    fn duplicates(&mut self, start: usize, end: usize) {
        let conversation = self.epoch.conversation;
        let mut newest: HashMap<&str, usize> = HashMap::new();
        for (i, info) in conversation.infos.iter().enumerate().skip(start) {
            if let (Role::Tool, Some(text)) = (info.role, &info.text) {
                if text.len() >= 64 {
                    newest.insert(text.as_str(), i);
                }
            }
        }
        for i in start..end {
            let info = self.info(i);
            let Some(text) = info.text.as_deref().filter(|_| info.role == Role::Tool && self.whole(i)) else {
                continue;
            };
            let Some(&copy) = newest.get(text).filter(|&&j| j > i) else { continue };
            let Some(copy_id) = conversation.infos[copy].tool_call_id.as_deref() else { continue };
            let note = format!(" — same output as call {copy_id} below");
            self.elide(i, &note, Fate::Reference(copy), Rule::DuplicateToolResults);
        }
    }

    /// Blobs elided from any message but a user's, and tool outputs over
    /// `max_tool_output_tokens` cut to their head and tail, oldest first, while over budget.
    fn cut_large(&mut self, start: usize, end: usize) {
        let config = &self.rules.config;
        for i in start..end {
            if !self.over() {
                return;
            }
            let info = self.info(i);
            if !self.whole(i) || matches!(info.role, Role::User | Role::System) || info.text.is_none() {
                continue;
            }
            if config.elide_blobs {
                let id = marker::id_of(&self.epoch.conversation.messages[i]);
                let edited = message::edit_text(self.slot(i).message.get(), |text| {
                    text::blobs(text, config.min_blob_bytes, |n| {
                        marker::partial(&id, &format!("{n}-byte encoded blob"))
                    })
                });
                if let Some(new) = edited {
                    self.replace(i, new, Fate::Cut, Rule::ElideBlobs);
                }
            }
            let tokens = self.slot(i).tokens;
            if config.truncate_tool_outputs
                && self.over()
                && info.role == Role::Tool
                && tokens > config.max_tool_output_tokens
            {
                // Cut no more than the budget needs: the last cut of an epoch keeps what it can.
                let excess = self.total - self.epoch.target;
                let keep = tokens.saturating_sub(excess + MARKER_TOKENS).max(config.max_tool_output_tokens);
                self.cut_middle(i, keep);
            }
        }
    }

    /// An older read of the same resource (a read-like function, the same arguments) becomes
    /// a marker pointing at the newer read, while over budget.
    fn superseded(&mut self, start: usize, end: usize) {
        let conversation = self.epoch.conversation;
        let mut last_read: HashMap<(&str, String), usize> = HashMap::new();
        for (i, info) in conversation.infos.iter().enumerate().skip(start) {
            let Some(call) = info.tool_call_id.as_deref().and_then(|id| self.calls.get(id)) else { continue };
            if info.role == Role::Tool && self.rules.reads.is_match(&call.name) {
                last_read.insert((call.name.as_str(), canonical_arguments(&call.arguments)), i);
            }
        }
        for i in start..end {
            if !self.over() {
                return;
            }
            let info = self.info(i);
            if info.role != Role::Tool || !self.whole(i) {
                continue;
            }
            let Some(call) = info.tool_call_id.as_deref().and_then(|id| self.calls.get(id)) else { continue };
            let Some(&later) = last_read.get(&(call.name.as_str(), canonical_arguments(&call.arguments)))
            else {
                continue;
            };
            if later > i {
                let later_id = conversation.infos[later].tool_call_id.as_deref().unwrap_or("");
                let note = format!(" — superseded by the later {} call {later_id}", call.name);
                self.elide(i, &note, Fate::Reference(later), Rule::SupersededReads);
            }
        }
    }

    /// Messages of `role` (never the latest user message), largest first and oldest first
    /// among equals, each replaced by a marker, while over budget. When one message is enough
    /// to meet the budget, the smallest such goes instead of the largest, so an epoch does not
    /// mask far more than it needs.
    fn mask(&mut self, start: usize, end: usize, role: Role, rule: Rule) {
        let mut candidates: Vec<usize> = (start..end)
            .filter(|&i| {
                let info = self.info(i);
                // A cut output may still be masked: its marker names the whole original.
                info.role == role
                    && Some(i) != self.latest_user
                    && (self.whole(i) || self.slot(i).fate == Fate::Cut)
                    && info.text.as_ref().is_some_and(|t| t.len() >= 64)
            })
            .collect();
        candidates.sort_by_key(|&i| (std::cmp::Reverse(self.slot(i).tokens), i));
        while self.over() && !candidates.is_empty() {
            let need = self.total - self.epoch.target + MARKER_TOKENS;
            // Sorted largest first: those that meet the budget alone are a prefix.
            let enough = candidates.partition_point(|&i| self.slot(i).tokens >= need);
            let pick = match enough {
                0 => 0,
                n => {
                    let smallest = self.slot(candidates[n - 1]).tokens;
                    candidates.partition_point(|&i| self.slot(i).tokens > smallest)
                }
            };
            let i = candidates.remove(pick);
            // The last result the budget needs, much larger than the need: keep its head and
            // tail rather than mask all of it.
            let spare = self.slot(i).tokens.saturating_sub(need);
            let cuttable = role == Role::Tool
                && self.rules.config.truncate_tool_outputs
                && (self.whole(i) || self.slot(i).fate == Fate::Cut);
            if cuttable && spare >= MIN_KEPT && self.cut_middle(i, spare) {
                continue;
            }
            self.elide(i, "", Fate::Elided, rule);
        }
    }

    /// Cuts the middle of the text at `i` so that about `keep` tokens remain.
    fn cut_middle(&mut self, i: usize, keep: u64) -> bool {
        let original = &self.epoch.conversation.messages[i];
        let id = marker::id_of(original);
        let slot = self.slot(i);
        // An output cut before is cut again from the whole (normalised) text, so there is one
        // marker and its byte count is the original's.
        let (source, tokens) = match slot.fate {
            Fate::Cut => {
                let whole =
                    normalize(self.rules, self.info(i), original.get()).unwrap_or_else(|| original.clone());
                let tokens = u64::from(self.counter.message(whole.get()));
                (whole, tokens)
            }
            _ => (slot.message.clone(), slot.tokens),
        };
        // Bytes per token of the text as it stands (whitespace and ANSI already gone).
        let current = Info::parse(source.get()).text.map_or(0, |t| t.len());
        let mut max_bytes = (keep as usize * current) / (tokens.max(1) as usize);
        // Tokens per byte differ between the parts of an output (numbers, JSON, prose), so the
        // average misses: measure the cut and correct it, a few times at most. A cut that keeps
        // far more than asked leaves the epoch over budget, and the next pass then masks the
        // whole output.
        let want = keep + MARKER_TOKENS;
        let (mut best, mut best_fits): (Option<Box<RawValue>>, bool) = (None, false);
        for _ in 0..4 {
            let edited = message::edit_text(source.get(), |text| {
                text::head_and_tail(text, max_bytes, |bytes, lines| {
                    marker::partial(
                        &id,
                        &format!("{bytes} bytes ({lines} lines) from the middle of this output"),
                    )
                })
            });
            let Some(new) = edited else { break };
            let tokens = u64::from(self.counter.message(new.get()));
            // Over the ask is over the budget; a little under is fine.
            let fits = tokens <= want;
            if fits || !best_fits {
                (best, best_fits) = (Some(new), fits);
            }
            if fits && tokens + want / 20 >= want {
                break;
            }
            // Aim a little under the ask, scaled by what this try measured.
            let aim = (want - want / 40).saturating_sub(MARKER_TOKENS).max(1);
            max_bytes = (max_bytes as u64 * aim / tokens.saturating_sub(MARKER_TOKENS).max(1)) as usize;
        }
        best.is_some_and(|new| self.replace(i, new, Fate::Cut, Rule::TruncateToolOutputs))
    }

    /// Model steps (an assistant message and the tool results that follow it), oldest first,
    /// while over budget. Consecutive dropped steps become one assistant message whose marker
    /// names every original; user and system messages stay and end a run.
    fn drop_steps(&mut self, start: usize, end: usize) {
        let mut run = None;
        let mut i = start;
        while i < end && self.over() {
            if !matches!(self.info(i).role, Role::Assistant | Role::Tool)
                || self.slot(i).fate == Fate::Dropped
            {
                run = None;
                i += 1;
                continue;
            }
            let step_end = (i + 1..end).find(|&j| self.info(j).role != Role::Tool).unwrap_or(end);
            // A step smaller than a marker goes with the steps after it, once they pay for one.
            let from = *run.get_or_insert(i);
            self.drop_run(from, step_end);
            i = step_end;
        }
    }

    /// The last resort, when only messages too short to mask alone are left (a chat of many
    /// short user statements): runs of the oldest messages, user messages and what is left of
    /// model steps, each become one marker, whole steps at a time, oldest first, until the
    /// budget is met. The latest user message stays.
    fn drop_oldest_with_users(&mut self, start: usize, end: usize) {
        let mut run = None;
        let mut i = start;
        while i < end && self.over() {
            let role = self.info(i).role;
            // A run dropped before keeps its own marker.
            if Some(i) == self.latest_user
                || matches!(role, Role::System | Role::Tool)
                || self.slot(i).fate == Fate::Dropped
            {
                run = None;
                i += 1;
                continue;
            }
            let unit_end = match role {
                Role::Assistant => (i + 1..end).find(|&j| self.info(j).role != Role::Tool).unwrap_or(end),
                _ => i + 1,
            };
            let from = *run.get_or_insert(i);
            self.drop_run_as(from, unit_end, Rule::ElideUserMessages);
            i = unit_end;
        }
    }

    /// Replaces `start..end` by one marker message; false when that would not be smaller.
    fn drop_run(&mut self, start: usize, end: usize) -> bool {
        self.drop_run_as(start, end, Rule::DropOldest)
    }

    fn drop_run_as(&mut self, start: usize, end: usize, rule: Rule) -> bool {
        let conversation = self.epoch.conversation;
        let mut names: Vec<(&str, usize)> = Vec::new();
        for call in (start..end).flat_map(|i| &conversation.infos[i].calls) {
            match names.iter_mut().find(|(name, _)| *name == call.name) {
                Some((_, n)) => *n += 1,
                None => names.push((&call.name, 1)),
            }
        }
        let names: Vec<String> = names
            .into_iter()
            .map(|(name, n)| if n > 1 { format!("{name} ×{n}") } else { name.to_string() })
            .collect();
        let original: u64 = (start..end).map(|i| u64::from(conversation.tokens[i])).sum();
        let users = (start..end).filter(|&i| conversation.infos[i].role == Role::User).count();
        let what = match (users, names.is_empty()) {
            (0, true) => format!("{} assistant messages", end - start),
            (0, false) => format!("model steps calling {}", names.join(", ")),
            (users, _) => format!("{} messages, {users} of them the user's", end - start),
        };
        let first = marker::id_of(&conversation.messages[start]);
        let text = match end - start {
            1 => marker::whole(&[first], &what, original),
            _ => marker::run(&first, &marker::id_of(&conversation.messages[end - 1]), &what, original),
        };
        let Ok(message) =
            serde_json::value::to_raw_value(&serde_json::json!({"role": "assistant", "content": text}))
        else {
            return false;
        };
        let tokens = u64::from(self.counter.message(message.get()));
        let current: u64 = (start..end).map(|i| self.slot(i).tokens).sum();
        if tokens >= current {
            return false;
        }
        self.stats.add(rule, current - tokens);
        self.total -= current - tokens;
        let from = self.epoch.from;
        self.slots[start - from] = Slot { message, tokens, fate: Fate::Dropped };
        for slot in &mut self.slots[start - from + 1..end - from] {
            *slot = Slot { message: RawValue::NULL.to_owned(), tokens: 0, fate: Fate::Dropped };
        }
        true
    }

    /// A reference whose target a later pass cut becomes a marker of its own original.
    fn fix_references(&mut self) {
        loop {
            let stale: Vec<usize> = (self.epoch.from..self.epoch.limit)
                .filter(|&i| match self.slot(i).fate {
                    Fate::Reference(target) => target < self.epoch.limit && !self.whole(target),
                    _ => false,
                })
                .collect();
            if stale.is_empty() {
                return;
            }
            for i in stale {
                // Its own marker is smaller than its content, so this always applies: force it.
                let info = self.info(i);
                let original = &self.epoch.conversation.messages[i];
                let call = info.tool_call_id.as_deref().and_then(|id| self.calls.get(id).copied());
                let tokens = u64::from(self.epoch.conversation.tokens[i]);
                let text = marker::whole(&[marker::id_of(original)], &marker::describe(info, call), tokens);
                if let Some(message) = message::replace_text(original.get(), &text) {
                    let tokens = u64::from(self.counter.message(message.get()));
                    let slot = &mut self.slots[i - self.epoch.from];
                    self.total = self.total + tokens - slot.tokens.min(self.total);
                    *slot = Slot { message, tokens, fate: Fate::Elided };
                }
            }
        }
    }

    fn finish(self) -> Compacted {
        let epoch = self.epoch;
        // The protected turns join the compacted span up to the last one a lossy pass touched.
        let touched = (epoch.protect_from..epoch.limit).rev().find(|&i| !self.whole(i));
        let upto = match touched {
            Some(i) => {
                epoch.turn_starts.iter().copied().find(|&s| s > i).unwrap_or(epoch.limit).min(epoch.limit)
            }
            None => epoch.protect_from,
        };
        let span = &self.slots[..upto - epoch.from];
        let elided =
            span.iter().enumerate().filter(|(_, s)| !matches!(s.fate, Fate::Kept | Fate::Normalized));
        let elided = elided.map(|(k, _)| epoch.from + k).collect();
        let kept = span.iter().filter(|s| !(s.fate == Fate::Dropped && s.tokens == 0));
        let messages: Vec<Box<RawValue>> = kept.map(|s| s.message.clone()).collect();
        let tokens = span.iter().map(|s| s.tokens).sum();
        let decisions = Decisions {
            fates: span.iter().map(|s| s.fate).collect(),
            tokens: span.iter().map(|s| s.tokens).collect(),
        };
        Compacted { messages, upto, tokens, stats: self.stats, elided, decisions }
    }
}

/// Arguments with their keys sorted and spacing removed, so two calls with the same arguments
/// compare equal however the model serialised them.
fn canonical_arguments(arguments: &str) -> String {
    serde_json::from_str::<serde_json::Value>(arguments)
        .map_or_else(|_| arguments.to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::config::Encoding;

    fn raw(value: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    fn call(id: &str, name: &str, args: &str) -> Value {
        json!({"role":"assistant","content":null,"tool_calls":[{"id":id,"type":"function","function":{"name":name,"arguments":args}}]})
    }

    fn result(id: &str, text: &str) -> Value {
        json!({"role":"tool","tool_call_id":id,"content":text})
    }

    fn user(text: &str) -> Value {
        json!({"role":"user","content":text})
    }

    fn said(text: &str) -> Value {
        json!({"role":"assistant","content":text})
    }

    fn content(message: &RawValue) -> String {
        serde_json::from_str::<Value>(message.get()).unwrap()["content"].as_str().unwrap_or("").to_string()
    }

    struct Fixture {
        messages: Vec<Box<RawValue>>,
        infos: Vec<Info>,
        tokens: Vec<u32>,
        counter: TokenCounter,
    }

    impl Fixture {
        fn new(messages: Vec<Value>) -> Self {
            let counter = TokenCounter::new(Encoding::O200kBase);
            let mut all = vec![raw(json!({"role":"system","content":"You   are   helpful.\n\n\n\n"}))];
            all.extend(messages.into_iter().map(raw));
            let infos = all.iter().map(|m| Info::parse(m.get())).collect();
            let tokens = all.iter().map(|m| counter.message(m.get())).collect();
            Self { messages: all, infos, tokens, counter }
        }

        fn total(&self) -> u64 {
            self.tokens.iter().map(|&t| u64::from(t)).sum()
        }

        /// Compacts everything but the last turn, protecting the last `keep` turns before it,
        /// down to `target` tokens.
        fn run(&self, config: &RulesConfig, keep: usize, target: u64) -> Compacted {
            let conversation =
                Conversation { messages: &self.messages, infos: &self.infos, tokens: &self.tokens };
            let starts = conversation.turn_starts(1);
            let limit = *starts.last().unwrap();
            let protect_from = starts[starts.len().saturating_sub(keep + 1)];
            let outside = self.tokens[..1].iter().chain(&self.tokens[limit..]).map(|&t| u64::from(t)).sum();
            let epoch = Epoch {
                conversation: &conversation,
                turn_starts: &starts,
                from: 1,
                protect_from,
                limit,
                outside,
                target,
                seed: None,
                lossless: None,
            };
            compact(&Rules::new(config), &epoch, &self.counter)
        }
    }

    fn only(set: impl Fn(&mut RulesConfig)) -> RulesConfig {
        let mut config = RulesConfig::none();
        set(&mut config);
        config
    }

    fn lines(tag: &str, n: usize) -> String {
        (0..n).map(|i| format!("{tag} line {i}: a value worth reading\n")).collect()
    }

    #[test]
    fn lossless_passes_rewrite_content_only_and_never_system_messages() {
        let f = Fixture::new(vec![
            user("please   look\n\n\n\nhere"),
            call("c1", "run", "{}"),
            result("c1", "\u{1b}[32mok\u{1b}[0m   done"),
            user("latest    message"),
        ]);
        let out = f.run(&RulesConfig::default(), 0, u64::MAX);
        assert_eq!(content(&out.messages[0]), "please look\n\nhere");
        assert_eq!(out.messages[1].get(), f.messages[2].get(), "untouched messages keep their bytes");
        assert_eq!(content(&out.messages[2]), "ok done");
        assert!(out.stats.get(Rule::Whitespace) > 0 && out.stats.get(Rule::Ansi) > 0);
        assert!(out.elided.is_empty(), "lossless passes leave no marker");
        let info = Info::parse(f.messages[0].get());
        assert!(normalize(&Rules::new(&RulesConfig::default()), &info, f.messages[0].get()).is_none());
    }

    #[test]
    fn the_newest_copy_of_a_result_is_kept_and_the_older_points_at_it() {
        // The reported case: one page fetched twice in a row.
        let page = lines("page", 20);
        let f = Fixture::new(vec![
            user("read the page twice"),
            call("c1", "fetch_page", r#"{"url":"https://a.test"}"#),
            result("c1", &page),
            call("c2", "fetch_page", r#"{"url":"https://a.test"}"#),
            result("c2", &page),
            user("next"),
        ]);
        // Lossless passes only (a budget already met): the reference is one of them.
        let out = f.run(&RulesConfig::default(), 0, u64::MAX);
        let older = content(&out.messages[2]);
        assert!(older.starts_with(marker::PREFIX) && older.contains("same output as call c2"), "{older}");
        assert_eq!(marker::ids_in(&older), [marker::id_of(&f.messages[3])]);
        assert_eq!(content(&out.messages[4]), page, "the newest copy stays whole");
    }

    #[test]
    fn a_reference_whose_copy_is_cut_becomes_a_marker_of_its_own() {
        // The newest copy is itself over budget and gets masked: nothing may point at it.
        let page = lines("page", 400);
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "fetch_page", r#"{"u":1}"#),
            result("c1", &page),
            call("c2", "fetch_page", r#"{"u":1}"#),
            result("c2", &page),
            user("next"),
        ]);
        let config = only(|c| {
            c.duplicate_tool_results = true;
            c.mask_old_tool_results = true;
        });
        let out = f.run(&config, 0, 300);
        for (k, i) in [(2, 3), (4, 5)] {
            let text = content(&out.messages[k]);
            assert!(text.starts_with(marker::PREFIX), "{text}");
            assert!(!text.contains("same output as"), "a reference to a cut copy: {text}");
            assert_eq!(marker::ids_in(&text), [marker::id_of(&f.messages[i])]);
        }
    }

    #[test]
    fn masking_stops_at_the_budget_and_takes_the_largest_first() {
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "search", r#"{"q":1}"#),
            result("c1", &lines("small", 10)),
            call("c2", "search", r#"{"q":2}"#),
            result("c2", &lines("big", 200)),
            call("c3", "search", r#"{"q":3}"#),
            result("c3", &lines("medium", 40)),
            user("next"),
        ]);
        let config = only(|c| c.mask_old_tool_results = true);
        let big = u64::from(f.tokens[5]);
        // Enough to drop only the big one.
        let out = f.run(&config, 0, f.total() - big + 100);
        assert!(content(&out.messages[4]).starts_with(marker::PREFIX), "the largest goes first");
        assert_eq!(out.messages[2].get(), f.messages[3].get(), "under budget: the rest is whole");
        assert_eq!(out.messages[6].get(), f.messages[7].get());
        assert_eq!(out.elided, [5]);
        assert!(out.stats.get(Rule::MaskOldToolResults) > 0);
    }

    #[test]
    fn user_messages_go_last_and_leave_markers() {
        let fact = "Remember: the launch code is 7-4-1-9, and the meeting moved to Thursday at 10. \
            Bring the signed forms, the blue folder with the budget figures for the third quarter, and \
            the list of everyone who confirmed; Maria will host, and the room is 4.12 on the fourth floor.";
        let f = Fixture::new(vec![
            user(fact),
            said(&lines("long assistant explanation", 30)),
            call("c1", "search", "{}"),
            result("c1", &lines("result", 60)),
            user("what was the launch code? answer in full, please, with every digit."),
            said("ok"),
            user("latest"),
        ]);
        let config = RulesConfig::default();
        // A budget the assistant prose and the tool output can meet: the user's fact stays.
        let out = f.run(&config, 0, f.total() / 3);
        assert!(out.messages.iter().any(|m| content(m) == fact), "the user fact was cut first");
        // A budget nothing but the user messages can meet: they go too, oldest first, behind
        // markers (one run for all here: each alone is shorter than what a marker saves).
        let out = f.run(&config, 0, 0);
        let first = content(&out.messages[0]);
        assert!(first.starts_with(marker::PREFIX) && first.contains("of them the user's"), "{first}");
        assert!(marker::ids_in(&first)[0].starts_with(&marker::id_of(&f.messages[1])), "{first}");
        assert!(out.elided.contains(&1), "the fact's original is kept for ctxgate_expand");
        assert!(out.stats.get(Rule::ElideUserMessages) > 0);
        assert!(out.elided.contains(&1));
    }

    #[test]
    fn short_user_statements_past_the_budget_go_as_runs_oldest_first() {
        // Each statement is shorter than a marker: masked one by one, none would save a token.
        let mut messages = Vec::new();
        for i in 0..30 {
            messages.push(user(&format!("My {i}th fact: item {i} costs {} euros.", i * 7)));
            messages.push(said("Noted."));
        }
        messages.push(user("What does item 3 cost?"));
        let f = Fixture::new(messages);
        let target = f.total() / 3;
        let out = f.run(&RulesConfig::default(), 0, target);
        // The question, the last turn, is outside the compacted span and stays as it is.
        let total = u64::from(f.tokens[0] + f.tokens[f.tokens.len() - 1]) + out.tokens;
        assert!(total <= target, "{total} tokens for a budget of {target}");
        assert!(out.stats.get(Rule::ElideUserMessages) > 0);
        let first = content(&out.messages[0]);
        assert!(first.starts_with(marker::PREFIX) && first.contains("of them the user's"), "{first}");
        assert!(
            marker::ids_in(&first)[0].starts_with(&marker::id_of(&f.messages[1])),
            "the run starts at the oldest"
        );
        // The newest statements are the ones left whole.
        assert!(out.messages.iter().any(|m| content(m) == "My 29th fact: item 29 costs 203 euros."));
    }

    #[test]
    fn protected_turns_yield_to_the_budget_oldest_first_but_never_the_last_turn() {
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "logs", "{}"),
            result("c1", &lines("old log", 20)),
            user("more"),
            call("c2", "logs", "{}"),
            result("c2", &lines("recent log", 300)),
            call("c3", "logs", "{}"),
            result("c3", &lines("newest log", 300)),
        ]);
        let config = only(|c| c.mask_old_tool_results = true);
        // Protect the two turns before the last: the old span alone cannot reach this budget.
        let out = f.run(&config, 2, f.total() - u64::from(f.tokens[6]) / 2);
        assert_eq!(out.upto, 7, "the protected turns up to the last were compacted");
        assert!(content(&out.messages[5]).starts_with(marker::PREFIX), "the protected result went");
        assert_eq!(out.elided, [3, 6], "the older span first, then the protected turns");
        // Never the last turn, whatever the budget.
        let out = f.run(&config, 2, 0);
        assert_eq!(out.upto, 7);
        assert_eq!(out.messages.len(), 6);
    }

    #[test]
    fn oversized_outputs_keep_head_and_tail_with_a_marker_naming_the_original() {
        let big: String = (0..3000).map(|i| format!("row {i}: value\n")).collect();
        let f = Fixture::new(vec![user("go"), call("c1", "query", "{}"), result("c1", &big), user("next")]);
        let config = RulesConfig { max_tool_output_tokens: 500, ..only(|c| c.truncate_tool_outputs = true) };
        let out = f.run(&config, 0, 0);
        let text = content(&out.messages[2]);
        assert!(text.starts_with("row 0: value\n") && text.ends_with("row 2999: value\n"));
        assert_eq!(marker::ids_in(&text), [marker::id_of(&f.messages[3])]);
        assert!(f.counter.text(&text) <= 600, "{}", f.counter.text(&text));
        assert!(out.stats.get(Rule::TruncateToolOutputs) > 10_000);
    }

    #[test]
    fn a_cut_keeps_what_the_budget_allows_and_a_cut_output_can_still_be_masked() {
        // Half of each line's bytes are colour codes, gone before any cut.
        let big: String =
            (0..3000).map(|i| format!("\u{1b}[32mrow {i}\u{1b}[0m: \u{1b}[1mvalue\u{1b}[0m\n")).collect();
        let f = Fixture::new(vec![user("go"), call("c1", "query", "{}"), result("c1", &big), user("next")]);
        let config = RulesConfig {
            max_tool_output_tokens: 500,
            ..only(|c| {
                c.ansi = true;
                c.truncate_tool_outputs = true;
                c.mask_old_tool_results = true;
            })
        };
        let outside = u64::from(f.tokens[0] + f.tokens[f.tokens.len() - 1]);
        let lossless = outside + f.run(&config, 0, u64::MAX).tokens;
        // A budget a cut meets: the output keeps all the budget leaves it, not 500 tokens.
        let target = lossless - 2_000;
        let out = f.run(&config, 0, target);
        let total = outside + out.tokens;
        assert!(total <= target && total > target - 200, "{total} for a budget of {target}");
        assert!(content(&out.messages[2]).contains("from the middle of this output"));
        // A budget no cut can meet: the cut output is masked whole.
        let out = f.run(&config, 0, outside + 200);
        let text = content(&out.messages[2]);
        assert!(text.starts_with(marker::PREFIX) && !text.contains("row 0"), "{text:.200}");
    }

    #[test]
    fn a_cut_lands_on_the_budget_when_tokens_per_byte_vary_along_the_output() {
        // Prose at the head (several bytes per token), digits at the tail (about one): the
        // average ratio alone would keep far more tokens than the budget leaves.
        let prose = "the quick brown fox jumps over the lazy dog again and again\n".repeat(1500);
        let digits: String = (0..1500)
            .map(|i| format!("{};{};{};{};{};{}\n", i % 7, i % 3, i % 9, i % 5, i % 2, i % 8))
            .collect();
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "query", "{}"),
            result("c1", &(prose + &digits)),
            user("next"),
        ]);
        let config = RulesConfig {
            max_tool_output_tokens: 500,
            ..only(|c| {
                c.truncate_tool_outputs = true;
                c.mask_old_tool_results = true;
            })
        };
        let outside = u64::from(f.tokens[0] + f.tokens[f.tokens.len() - 1]);
        let whole = outside + f.run(&config, 0, u64::MAX).tokens;
        for keep in [1_000, 4_000, 9_000] {
            let target = outside + keep;
            assert!(target < whole);
            let out = f.run(&config, 0, target);
            let total = outside + out.tokens;
            let text = content(&out.messages[2]);
            assert!(
                text.contains("from the middle of this output"),
                "{keep}: masked instead of cut: {text:.200}"
            );
            assert!(
                total <= target && total + target / 10 >= target,
                "{total} for a budget of {target} (whole {whole})"
            );
        }
    }

    #[test]
    fn the_last_result_the_budget_needs_is_cut_rather_than_masked_when_much_larger() {
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "read", r#"{"f":1}"#),
            result("c1", &lines("a", 120)),
            call("c2", "read", r#"{"f":2}"#),
            result("c2", &lines("b", 120)),
            user("next"),
        ]);
        let config = only(|c| {
            c.mask_old_tool_results = true;
            c.truncate_tool_outputs = true;
        });
        let one = u64::from(f.tokens[3]);
        assert!(one < 2_000, "under max_tool_output_tokens: only the budget cuts it");
        let outside = u64::from(f.tokens[0] + f.tokens[f.tokens.len() - 1]);
        // One and a half results over the budget: one masked, the other keeps about half.
        let target = f.total() - one - one / 2;
        let out = f.run(&config, 0, target);
        let total = outside + out.tokens;
        assert!(total <= target && total + 150 > target, "{total} for a budget of {target}");
        let texts = [content(&out.messages[2]), content(&out.messages[4])];
        assert!(texts.iter().any(|t| t.starts_with(marker::PREFIX)), "one masked");
        assert!(texts.iter().any(|t| t.contains("line 0:") && t.contains("from the middle of this output")));
    }

    #[test]
    fn an_output_already_cut_to_the_maximum_is_cut_again_rather_than_masked() {
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "read", r#"{"f":1}"#),
            result("c1", &lines("a", 600)),
            call("c2", "read", r#"{"f":2}"#),
            result("c2", &lines("b", 600)),
            user("next"),
        ]);
        let config = |mask: bool| RulesConfig {
            max_tool_output_tokens: 500,
            ..only(|c| {
                c.truncate_tool_outputs = true;
                c.mask_old_tool_results = mask;
            })
        };
        let outside = u64::from(f.tokens[0] + f.tokens[f.tokens.len() - 1]);
        // Both outputs cut to the maximum, and nothing else to do: the floor of cutting alone.
        let cut = outside + f.run(&config(false), 0, outside + 1).tokens;
        // A little under that: one of them gives up a little more, and is not masked whole.
        let target = cut - 200;
        let out = f.run(&config(true), 0, target);
        let total = outside + out.tokens;
        assert!(total <= target && total + 150 > target, "{total} for a budget of {target}");
        for text in [content(&out.messages[2]), content(&out.messages[4])] {
            assert!(text.contains("from the middle of this output"), "{text:.200}");
            assert_eq!(text.matches(marker::PREFIX).count(), 1, "one marker: {text:.300}");
        }
    }

    #[test]
    fn blobs_are_elided_but_not_from_user_messages() {
        let blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkw".repeat(10);
        let f = Fixture::new(vec![
            user(&format!("my key: {blob}")),
            call("c1", "screenshot", "{}"),
            result("c1", &format!("png {blob}")),
            user("next"),
        ]);
        let out = f.run(&only(|c| c.elide_blobs = true), 0, 0);
        assert!(content(&out.messages[0]).contains(&blob), "a user's text is a fact");
        let text = content(&out.messages[2]);
        assert!(text.starts_with("png [ctxgate:elided id=") && !text.contains(&blob));
    }

    #[test]
    fn dropped_steps_become_one_marker_naming_every_original() {
        let f = Fixture::new(vec![
            user("go"),
            call("c1", "a", "{}"),
            result("c1", &lines("a", 30)),
            call("c2", "b", "{}"),
            result("c2", &lines("b", 30)),
            user("next"),
        ]);
        let out = f.run(&only(|c| c.drop_oldest = true), 0, 0);
        assert_eq!(out.messages.len(), 2, "user + one marker message");
        let text = content(&out.messages[1]);
        let run = format!("{}..{}", marker::id_of(&f.messages[2]), marker::id_of(&f.messages[5]));
        assert_eq!(marker::ids_in(&text), [run.as_str()], "one id for the run: {text}");
        assert!(text.contains("model steps calling a, b"), "{text}");
    }

    #[test]
    fn steps_are_dropped_one_at_a_time_and_a_long_run_keeps_a_small_marker() {
        let mut messages = vec![user("go")];
        for n in 0..120 {
            messages.push(call(&format!("c{n}"), "ping", "{}"));
            messages.push(result(&format!("c{n}"), &format!("host {n} up 3ms")));
        }
        messages.push(user("which hosts answered?"));
        let f = Fixture::new(messages);
        let config = only(|c| c.drop_oldest = true);
        // A budget a few steps meet: only the first few go (each is smaller than a marker).
        let out = f.run(&config, 0, f.total() - 10);
        let whole = out.messages.len() - 2;
        assert!((2 * 112..2 * 120).contains(&whole), "user, one marker, then {whole} whole messages");
        assert!(content(&out.messages[1]).starts_with(marker::PREFIX));
        assert_eq!(content(&out.messages[2]), "", "a whole step follows: {}", out.messages[2].get());
        // Most of the run: its one marker stays the size of a marker, whatever the run's length.
        let out = f.run(&config, 0, f.total() / 4);
        let tokens = f.counter.text(&content(&out.messages[1]));
        assert!(tokens < 60, "{tokens} tokens: {}", content(&out.messages[1]));
        assert!(content(&out.messages[1]).contains("ping ×"));
        let total = f.tokens[0] as u64 + f.tokens[f.tokens.len() - 1] as u64 + out.tokens;
        assert!(total <= f.total() / 4, "the budget is met: {total} > {}", f.total() / 4);
    }

    #[test]
    fn masking_by_age_is_a_switch() {
        let mut messages = vec![user("go")];
        for n in 0..6 {
            messages.push(call(&format!("c{n}"), "search", &format!(r#"{{"q":{n}}}"#)));
            messages.push(result(&format!("c{n}"), &lines(&n.to_string(), 5)));
        }
        messages.push(user("next"));
        let f = Fixture::new(messages);
        let config = only(|c| {
            c.mask_old_tool_results = true;
            c.mask_by_age = true;
            c.mask_after_turns = 3;
        });
        // A budget already met: only the age switch masks anything.
        let out = f.run(&config, 0, u64::MAX);
        let masked: Vec<bool> =
            (0..6).map(|n| content(&out.messages[2 + 2 * n]).starts_with(marker::PREFIX)).collect();
        assert_eq!(masked, [true, true, true, false, false, false]);
        let out = f.run(&only(|c| c.mask_old_tool_results = true), 0, u64::MAX);
        assert!(out.elided.is_empty(), "without the switch masking is a budget choice");
    }

    #[test]
    fn every_switch_off_changes_nothing() {
        let f = Fixture::new(vec![
            user("a    b\n\n\n\n\u{1b}[1mc"),
            call("c1", "x", "{}"),
            result("c1", &lines("x", 100)),
            user("x"),
        ]);
        let out = f.run(&RulesConfig::none(), 0, 0);
        assert_eq!(
            out.messages.iter().map(|m| m.get()).collect::<Vec<_>>(),
            f.messages[1..4].iter().map(|m| m.get()).collect::<Vec<_>>()
        );
        assert_eq!(out.stats.total(), 0);
    }
}
