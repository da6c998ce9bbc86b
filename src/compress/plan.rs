//! Compaction epochs and the prefix-stable layout.
//!
//! The upstream request is laid out as
//!
//! ```text
//! [client system messages] [goal block] [state sheet] [pinned user message] [compacted span] [recent turns]
//! ```
//!
//! Nothing before the recent turns changes between two compaction epochs: a request only
//! appends to them, so request N+1's messages begin with request N's, byte for byte, and the
//! provider's prompt cache (or the server's KV cache) keeps hitting. Every message gets the
//! lossless passes (whitespace, ANSI) from the first request it appears in, before any epoch
//! too; they are deterministic per message, so they never move the prefix.
//!
//! An epoch starts when the request's tokens pass the high-water mark (or the pre-compaction
//! mark when the cache is cold anyway, see [`Input::cold`]): the span before the recent turns
//! is compacted down to the low-water mark and no further ([`rules::compact`]: lossless passes
//! first, each lossy one stopping as soon as the request fits, the recent turns only when the
//! older span cannot reach the budget alone, user messages last), and in hybrid mode replaced
//! by the state sheet when one is ready and the rules would have to cut. That result is frozen
//! in [`State`] until the next epoch.
//!
//! Pure: no I/O. The caller stores [`State`] (in the checkpoint, or keyed by the conversation
//! for stateless clients), keeps the originals [`Plan::elided`] names, and runs the summary
//! calls the plan asks for.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::marker;
use super::rules::{self, Compacted, Conversation, Decisions, Lossless, Rule, RuleStats, Rules, Seed};
use crate::config::{CompressionMode, Policy};
use crate::openai::message::{Info, Role};
use crate::tokens::{TokenCounter, PARALLEL_BYTES};

/// What an earlier epoch decided, frozen until the next one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub epoch: u32,
    /// Leading system messages of the conversation when the state was made.
    pub lead: usize,
    /// `conversation[lead..upto]` is represented by the sheet, the pinned message and `frozen`.
    pub upto: usize,
    /// Hash of `conversation[lead..upto]`: a client that changes that history gets a new epoch.
    pub covered: String,
    /// `conversation[lead..summarized_upto]` is summarised in `summary`.
    pub summarized_upto: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Box<RawValue>>,
    /// The latest user message when the sheet replaced it, kept verbatim after the sheet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Box<RawValue>>,
    /// `conversation[summarized_upto..upto]` after the rules.
    pub frozen: Vec<Box<RawValue>>,
    /// Tokens of `summary`, `pinned` and `frozen`.
    pub tokens: u64,
    /// Whether the frozen part carries markers (so requests offer `ctxgate_expand`).
    #[serde(default)]
    pub markers: bool,
    /// What the rules made of each message of `summarized_upto..upto`: the next epoch of the
    /// same span starts from it. Absent in states written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Decisions>,
}

/// A state sheet, ready to be placed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// It covers `conversation[lead..end]` (with `start` the `summarized_upto` it was asked at).
    pub start: usize,
    pub end: usize,
    /// Hash of `conversation[lead..end]`.
    pub covered: String,
    pub message: Box<RawValue>,
}

/// A state sheet the caller should have written (in the background).
#[derive(Clone, Debug)]
pub struct SummaryRequest {
    pub start: usize,
    pub end: usize,
    pub covered: String,
    /// The upstream messages up to `end`: the same prefix the session's requests send, so the
    /// summary call hits the same cache.
    pub messages: Vec<Box<RawValue>>,
    pub epoch: u32,
    /// The id that names everything the sheet will replace (`conversation[lead..end]`), for its
    /// header: `ctxgate_expand` of it lists those originals by id.
    pub range: String,
}

/// What shaped the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acted {
    /// Compression is off (by policy or by the request).
    Off,
    /// Under the marks: sent as is.
    None,
    Rules,
    Hybrid,
}

impl Acted {
    pub fn as_str(self) -> &'static str {
        match self {
            Acted::Off => "off",
            Acted::None => "none",
            Acted::Rules => "rules",
            Acted::Hybrid => "hybrid",
        }
    }
}

/// The input of one request.
pub struct Input<'a> {
    pub messages: &'a [Box<RawValue>],
    pub infos: &'a [Info],
    pub tokens: &'a [u32],
    pub goal: Option<&'a RawValue>,
    /// Tokens outside the messages (tools, the goal block).
    pub fixed_tokens: u64,
    pub policy: &'a Policy,
    pub rules: &'a Rules,
    pub counter: &'a TokenCounter,
    /// Compact now whatever the marks say (the CLI's `--force`).
    pub force: bool,
    /// The provider's cache has expired since the conversation's previous request: an epoch
    /// now breaks no warm prefix, so it starts from the pre-compaction mark.
    pub cold: bool,
}

#[derive(Debug)]
pub struct Plan {
    pub messages: Vec<Box<RawValue>>,
    pub state: Option<State>,
    pub tokens_before: u64,
    pub tokens_after: u64,
    pub acted: Acted,
    /// This request started an epoch (`Rules` or `Hybrid`: what it placed).
    pub epoch: Option<Acted>,
    /// The previous state no longer matched the client's history and was dropped.
    pub reset: bool,
    /// An epoch wanted a sheet that was not ready and used rules only.
    pub fell_back: bool,
    /// The epoch started early because the cache was cold.
    pub cold_epoch: bool,
    pub stats: RuleStats,
    pub summarize: Option<SummaryRequest>,
    /// Conversation indices of the originals this epoch's markers and sheet name (empty
    /// without an epoch): what a stateless caller must keep for `ctxgate_expand`.
    pub elided: Vec<usize>,
    /// The messages carry markers: the request should offer `ctxgate_expand`.
    pub markers: bool,
}

/// The messages from `from` on with the lossless passes applied, and their tokens.
struct Tail<'a> {
    input: &'a Input<'a>,
    messages: Vec<Option<Box<RawValue>>>,
    tokens: Vec<u64>,
    from: usize,
}

impl<'a> Tail<'a> {
    fn new(input: &'a Input<'a>, from: usize) -> Self {
        let mut tail = Self { input, messages: Vec::new(), tokens: Vec::new(), from: input.messages.len() };
        tail.extend_to(from);
        tail
    }

    /// Normalises down to `from` (work is done once per message).
    fn extend_to(&mut self, from: usize) {
        if from >= self.from {
            return;
        }
        let input = self.input;
        let one = |i: usize| {
            let normal = rules::normalize(input.rules, &input.infos[i], input.messages[i].get());
            let tokens = normal
                .as_ref()
                .map_or(u64::from(input.tokens[i]), |m| u64::from(input.counter.message(m.get())));
            (normal, tokens)
        };
        // A first-seen conversation is mostly counting its rewritten messages: a long one runs on
        // every core (an epoch's own pass then finds them normalised and counted).
        let bytes: usize = input.messages[from..self.from].iter().map(|m| m.get().len()).sum();
        let (mut messages, mut tokens): (Vec<_>, Vec<_>) = if bytes < PARALLEL_BYTES {
            (from..self.from).map(one).unzip()
        } else {
            use rayon::prelude::*;
            (from..self.from).into_par_iter().map(one).unzip()
        };
        messages.append(&mut self.messages);
        tokens.append(&mut self.tokens);
        (self.messages, self.tokens, self.from) = (messages, tokens, from);
    }

    fn tokens(&mut self, from: usize) -> u64 {
        self.extend_to(from);
        self.tokens[from - self.from..].iter().sum()
    }

    fn messages(&mut self, from: usize) -> impl Iterator<Item = Box<RawValue>> + '_ {
        self.extend_to(from);
        let originals = &self.input.messages[from..];
        self.messages[from - self.from..]
            .iter()
            .zip(originals)
            .map(|(n, o)| n.clone().unwrap_or_else(|| o.clone()))
    }
}

pub fn plan(input: &Input<'_>, previous: Option<State>, ready: Option<&Summary>) -> Plan {
    let n = input.messages.len();
    let lead = input.infos.iter().take_while(|i| i.role == Role::System).count();
    let all: u64 = input.tokens.iter().map(|&t| u64::from(t)).sum();
    let tokens_before = input.fixed_tokens + all;
    let policy = input.policy;
    let mut plan = Plan {
        messages: Vec::new(),
        state: None,
        tokens_before,
        tokens_after: tokens_before,
        acted: Acted::Off,
        epoch: None,
        reset: false,
        fell_back: false,
        cold_epoch: false,
        stats: RuleStats::default(),
        summarize: None,
        elided: Vec::new(),
        markers: false,
    };
    if policy.mode == CompressionMode::Off {
        plan.messages = layout(input, lead, None, None);
        return plan;
    }

    let had_state = previous.is_some();
    let mut state = previous.filter(|s| {
        s.lead == lead
            && s.summarized_upto <= s.upto
            && s.upto <= n
            && s.covered == covered(input.messages, lead, s.upto)
    });
    plan.reset = had_state && state.is_none();
    let base = input.fixed_tokens + input.tokens[..lead].iter().map(|&t| u64::from(t)).sum::<u64>();
    // Every message goes with the lossless passes from its first request on, before any
    // epoch too: the first epoch then moves the prefix only where it cuts.
    let mut tail = Tail::new(input, state.as_ref().map_or(lead, |s| s.upto));
    let view = |state: &Option<State>, tail: &mut Tail<'_>| match state {
        Some(s) => base + s.tokens + tail.tokens(s.upto),
        None => base + tail.tokens(lead),
    };

    let conversation = Conversation { messages: input.messages, infos: input.infos, tokens: input.tokens };
    let starts = conversation.turn_starts(lead);
    // The last turn (the question, or the tool results the model is to read) is never compacted.
    let limit = starts.last().copied().unwrap_or(lead).max(lead);
    let keep = policy.keep_recent_turns;
    let cut = match keep {
        0 => limit,
        keep if starts.len() > keep => starts[starts.len() - keep].min(limit),
        _ => lead,
    };

    let current = view(&state, &mut tail);
    let cold = input.cold && current > policy.pre_tokens();
    let from = state.as_ref().map_or(lead, |s| s.summarized_upto);
    if (current > policy.high_tokens() || input.force || cold) && limit > from {
        plan.cold_epoch = cold && current <= policy.high_tokens() && !input.force;
        let epoch = epoch(input, &conversation, &starts, state.clone(), ready, lead, (cut, limit), &mut tail);
        plan.stats = epoch.stats;
        plan.fell_back = epoch.fell_back;
        plan.elided = epoch.elided;
        plan.epoch = Some(epoch.placed);
        state = Some(epoch.state);
    }

    plan.messages = layout(input, lead, state.as_ref(), Some(&mut tail));
    plan.tokens_after = view(&state, &mut tail);
    // Markers the client sent back (items `POST /v1/responses/compact` returned) name
    // originals too.
    plan.markers =
        state.as_ref().is_some_and(|s| s.markers) || input.messages.iter().any(|m| marker::carries(m));
    if policy.mode == CompressionMode::Hybrid && (plan.tokens_after > policy.pre_tokens() || plan.fell_back) {
        let start = state.as_ref().map_or(lead, |s| s.summarized_upto);
        // One sheet per span start: a sheet that is ready (even if it stops short of `cut`)
        // is placed at the next epoch, the rest of the span compacted by rules. Asking again
        // every turn would cost an LLM call per turn for a few more messages.
        let already = ready.is_some_and(|s| {
            s.start == start && s.end <= n && s.covered == covered(input.messages, lead, s.end)
        });
        if cut > start && !already {
            // The layout up to `cut`: everything but the recent turns.
            let keep_tail = n - cut.max(state.as_ref().map_or(lead, |s| s.upto));
            plan.summarize = Some(SummaryRequest {
                start,
                end: cut,
                covered: covered(input.messages, lead, cut),
                messages: plan.messages[..plan.messages.len() - keep_tail].to_vec(),
                epoch: state.as_ref().map_or(1, |s| s.epoch + 1),
                range: marker::range_id(input.messages, lead, cut),
            });
        }
    }
    plan.acted = match &state {
        Some(s) if s.summary.is_some() => Acted::Hybrid,
        Some(_) => Acted::Rules,
        None => Acted::None,
    };
    plan.state = state;
    plan
}

/// What one epoch decided.
struct Decided {
    state: State,
    placed: Acted,
    stats: RuleStats,
    fell_back: bool,
    elided: Vec<usize>,
}

/// Compacts `conversation[from..limit]` (the recent turns from `cut` on only if it must) to
/// the low-water mark, with the ready sheet in hybrid mode when the rules would have to cut.
#[allow(clippy::too_many_arguments)]
fn epoch(
    input: &Input<'_>,
    conversation: &Conversation<'_>,
    starts: &[usize],
    previous: Option<State>,
    ready: Option<&Summary>,
    lead: usize,
    (cut, limit): (usize, usize),
    tail: &mut Tail<'_>,
) -> Decided {
    let policy = input.policy;
    let base = input.fixed_tokens + input.tokens[..lead].iter().map(|&t| u64::from(t)).sum::<u64>();
    let outside = base + tail.tokens(limit);
    let tail: &Tail<'_> = tail;
    let mut next = previous.unwrap_or_else(|| State {
        epoch: 0,
        lead,
        upto: lead,
        covered: String::new(),
        summarized_upto: lead,
        summary: None,
        pinned: None,
        frozen: Vec::new(),
        tokens: 0,
        markers: false,
        decisions: None,
    });
    next.epoch += 1;
    // Only the rules' own part of the previous epoch is built on: a new sheet moves the span.
    let previous_span = next.summarized_upto;
    let (decisions, frozen) = (next.decisions.take(), std::mem::take(&mut next.frozen));
    let run = |state: &State| {
        let sheet = state
            .summary
            .iter()
            .chain(&state.pinned)
            .map(|m| u64::from(input.counter.message(m.get())))
            .sum::<u64>();
        let epoch = rules::Epoch {
            conversation,
            turn_starts: starts,
            from: state.summarized_upto,
            protect_from: cut.max(state.summarized_upto),
            limit,
            outside: outside + sheet,
            target: policy.low_tokens(),
            seed: decisions
                .as_ref()
                .filter(|_| state.summarized_upto == previous_span)
                .map(|decisions| Seed { decisions, frozen: &frozen }),
            lossless: Some(Lossless { from: tail.from, messages: &tail.messages, tokens: &tail.tokens }),
        };
        (rules::compact(input.rules, &epoch, input.counter), sheet)
    };
    let (mut compacted, mut sheet_tokens) = run(&next);
    let mut placed = Acted::Rules;
    let mut fell_back = false;
    let lossy =
        [Rule::MaskOldToolResults, Rule::MaskAssistantMessages, Rule::DropOldest, Rule::ElideUserMessages];
    // The rules alone would leave the request over budget, or reach it only by cutting.
    let cuts = lossy.iter().any(|r| compacted.stats.get(*r) > 0);
    let over = outside + sheet_tokens + compacted.tokens > policy.low_tokens();
    if policy.mode == CompressionMode::Hybrid && (over || cuts) {
        let usable = ready.filter(|s| {
            s.start == next.summarized_upto
                && s.end > s.start
                && s.end <= limit
                && s.covered == covered(input.messages, lead, s.end)
        });
        match usable {
            Some(summary) => {
                let mut with_sheet = next.clone();
                with_sheet.summary = Some(summary.message.clone());
                with_sheet.summarized_upto = summary.end;
                with_sheet.pinned = conversation
                    .latest_user()
                    .filter(|&l| l >= lead && l < summary.end)
                    .map(|l| input.messages[l].clone());
                let (sheet_compacted, tokens) = run(&with_sheet);
                // A sheet longer than what the rules leave of its span saves nothing.
                if tokens + sheet_compacted.tokens < sheet_tokens + compacted.tokens {
                    let mut elided: Vec<usize> = (next.summarized_upto..summary.end).collect();
                    elided.extend(&sheet_compacted.elided);
                    next = with_sheet;
                    compacted = Compacted { elided, ..sheet_compacted };
                    sheet_tokens = tokens;
                    placed = Acted::Hybrid;
                } else {
                    fell_back = true;
                }
            }
            None => fell_back = true,
        }
    }
    next.upto = compacted.upto;
    next.covered = covered(input.messages, lead, compacted.upto);
    next.markers = next.summary.is_some() || compacted.messages.iter().any(|m| marker::carries(m));
    next.tokens = sheet_tokens + compacted.tokens;
    next.frozen = compacted.messages;
    next.decisions = Some(compacted.decisions);
    Decided { state: next, placed, stats: compacted.stats, fell_back, elided: compacted.elided }
}

fn layout(
    input: &Input<'_>,
    lead: usize,
    state: Option<&State>,
    tail: Option<&mut Tail<'_>>,
) -> Vec<Box<RawValue>> {
    let messages = input.messages;
    let mut out = Vec::with_capacity(messages.len() + 2);
    out.extend_from_slice(&messages[..lead]);
    if let Some(goal) = input.goal {
        out.push(goal.to_owned());
    }
    match (state, tail) {
        (Some(s), Some(tail)) => {
            out.extend(s.summary.iter().cloned());
            out.extend(s.pinned.iter().cloned());
            out.extend(s.frozen.iter().cloned());
            out.extend(tail.messages(s.upto));
        }
        (Some(s), None) => {
            out.extend(s.summary.iter().cloned());
            out.extend(s.pinned.iter().cloned());
            out.extend(s.frozen.iter().cloned());
            out.extend_from_slice(&messages[s.upto..]);
        }
        (None, Some(tail)) => out.extend(tail.messages(lead)),
        (None, None) => out.extend_from_slice(&messages[lead..]),
    }
    out
}

/// Hex of the first 16 bytes of SHA-256 over `messages[from..to]`, each length-prefixed.
pub fn covered(messages: &[Box<RawValue>], from: usize, to: usize) -> String {
    let mut hasher = Sha256::new();
    for m in &messages[from..to] {
        hasher.update((m.get().len() as u64).to_le_bytes());
        hasher.update(m.get().as_bytes());
    }
    hasher.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Encoding, RulesConfig};

    fn raw(value: serde_json::Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    /// A seeded agent session: a system prompt, user turns, and model steps that call tools
    /// (some reads repeated, some outputs huge, some with ANSI colours).
    struct Session {
        rng: fastrand::Rng,
        messages: Vec<Box<RawValue>>,
        calls: usize,
    }

    impl Session {
        fn new(seed: u64) -> Self {
            let system =
                raw(serde_json::json!({"role": "system", "content": "You are a careful coding agent."}));
            Self { rng: fastrand::Rng::with_seed(seed), messages: vec![system], calls: 0 }
        }

        /// One turn: a user message or a model step with its tool results.
        fn turn(&mut self) {
            if self.rng.u8(..4) == 0 || self.messages.len() == 1 {
                let n = self.rng.u32(..1000);
                let text = format!("Please   handle ticket #{n}.\n\n\n\nIt matters.");
                self.messages.push(raw(serde_json::json!({"role": "user", "content": text})));
                return;
            }
            let calls: Vec<(String, String, String)> = (0..self.rng.usize(1..3))
                .map(|_| {
                    self.calls += 1;
                    let file = self.rng.u8(..5);
                    let name = if self.rng.bool() { "read_file" } else { "run_tests" };
                    (
                        format!("call_{}", self.calls),
                        name.to_string(),
                        format!(r#"{{"path":"src/f{file}.rs"}}"#),
                    )
                })
                .collect();
            let tool_calls: Vec<_> = calls
                .iter()
                .map(|(id, name, args)| serde_json::json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                .collect();
            self.messages.push(raw(
                serde_json::json!({"role": "assistant", "content": null, "tool_calls": tool_calls}),
            ));
            for (id, name, args) in calls {
                let lines = if self.rng.u8(..6) == 0 { 150 } else { self.rng.usize(5..40) };
                let mut out = String::new();
                for l in 0..lines {
                    out.push_str(&format!(
                        "\u{1b}[32m{name}\u{1b}[0m {args} line {l}:   value = {}\n",
                        l * 7
                    ));
                }
                self.messages
                    .push(raw(serde_json::json!({"role": "tool", "tool_call_id": id, "content": out})));
            }
        }
    }

    struct Harness {
        counter: TokenCounter,
        rules: Rules,
        policy: Policy,
    }

    impl Harness {
        fn new(mode: CompressionMode, window: u64) -> Self {
            let policy = Policy { mode, context_window: window, keep_recent_turns: 3, ..Policy::default() };
            Self { counter: TokenCounter::new(Encoding::O200kBase), rules: Rules::new(&policy.rules), policy }
        }

        fn plan(
            &self,
            messages: &[Box<RawValue>],
            goal: Option<&RawValue>,
            state: Option<State>,
            ready: Option<&Summary>,
        ) -> Plan {
            let infos: Vec<Info> = messages.iter().map(|m| Info::parse(m.get())).collect();
            let tokens: Vec<u32> = messages.iter().map(|m| self.counter.message(m.get())).collect();
            let input = Input {
                messages,
                infos: &infos,
                tokens: &tokens,
                goal,
                fixed_tokens: 0,
                policy: &self.policy,
                rules: &self.rules,
                counter: &self.counter,
                force: false,
                cold: false,
            };
            plan(&input, state, ready)
        }
    }

    fn texts(messages: &[Box<RawValue>]) -> Vec<&str> {
        messages.iter().map(|m| m.get()).collect()
    }

    /// A sheet for a summary request, as the background writer would store it.
    fn sheet_for(request: &SummaryRequest) -> Summary {
        let text =
            format!("## Active Task\nepoch {} covering {}..{}", request.epoch, request.start, request.end);
        let message = super::super::summary::sheet_message(
            &text,
            "system",
            request.epoch,
            &request.range,
            request.end - 1,
        )
        .unwrap();
        Summary { start: request.start, end: request.end, covered: request.covered.clone(), message }
    }

    fn only_whitespace() -> RulesConfig {
        RulesConfig { whitespace: true, ..RulesConfig::none() }
    }

    /// Over 100 turns: between epochs, each upstream request starts with the previous one,
    /// byte for byte; every request fits the window; epochs stay rare.
    fn prefix_is_stable_between_epochs(mode: CompressionMode) {
        let mut h = Harness::new(mode, 40_000);
        if mode == CompressionMode::Hybrid {
            // Rules alone reach the target on this session; with only the weakest the sheet
            // has to act.
            h.policy.rules = only_whitespace();
            h.rules = Rules::new(&h.policy.rules);
        }
        let goal = raw(serde_json::json!({"role": "system", "content": "[goal] keep the build green"}));
        let mut session = Session::new(7);
        let mut state = None;
        let mut ready: Option<Summary> = None;
        let mut previous: Option<Vec<Box<RawValue>>> = None;
        let (mut epochs, mut sheets, mut stable) = (0, 0, 0);
        for _ in 0..100 {
            session.turn();
            let plan = h.plan(&session.messages, Some(&goal), state.take(), ready.as_ref());
            assert!(plan.tokens_after <= h.policy.context_window, "{} tokens", plan.tokens_after);
            assert!(!plan.reset);
            match plan.epoch {
                Some(kind) => {
                    epochs += 1;
                    sheets += usize::from(kind == Acted::Hybrid);
                    assert!(plan.tokens_after <= plan.tokens_before);
                    // An epoch of rules moves the prefix only where it cuts: the lossless passes
                    // were applied when each message first appeared, and earlier epochs'
                    // markers stand.
                    if let (Acted::Rules, Some(previous)) = (kind, &previous) {
                        let same = previous
                            .iter()
                            .zip(&plan.messages)
                            .take_while(|(a, b)| a.get() == b.get())
                            .count();
                        if let Some(first) = plan.messages.get(same).filter(|_| same < previous.len()) {
                            assert!(
                                marker::carries(first),
                                "the prefix moved at an uncut message: {}",
                                first.get()
                            );
                        }
                    }
                }
                None => {
                    if let Some(previous) = &previous {
                        assert_eq!(
                            texts(&plan.messages[..previous.len()]),
                            texts(previous),
                            "prefix changed without an epoch"
                        );
                        stable += 1;
                    }
                }
            }
            // The layout's fixed front: client system messages, then the goal block.
            assert_eq!(plan.messages[0].get(), session.messages[0].get());
            assert_eq!(plan.messages[1].get(), goal.get());
            if let Some(request) = &plan.summarize {
                ready = Some(sheet_for(request));
            }
            state = plan.state;
            previous = Some(plan.messages);
        }
        assert!(epochs >= 2, "{epochs} epochs");
        assert!(epochs <= 30, "{epochs} epochs: compaction should be rare");
        assert!(stable >= 60, "{stable} stable turns");
        if mode == CompressionMode::Hybrid {
            assert!(sheets >= 1, "no state sheet was placed");
        }
    }

    #[test]
    fn rules_keep_the_prefix_stable_over_100_turns() {
        prefix_is_stable_between_epochs(CompressionMode::Rules);
    }

    #[test]
    fn hybrid_keeps_the_prefix_stable_over_100_turns() {
        prefix_is_stable_between_epochs(CompressionMode::Hybrid);
    }

    /// `message` as the lossless passes leave it.
    fn normalized(h: &Harness, message: &RawValue) -> String {
        let info = Info::parse(message.get());
        rules::normalize(&h.rules, &info, message.get())
            .map_or_else(|| message.get().to_string(), |m| m.get().to_string())
    }

    /// Checks a compressed request: tool messages follow the call they answer; system messages
    /// are as sent; the latest user message and the recent turns are as sent but for the
    /// lossless passes (unless the epoch had to compact recent turns to reach its budget);
    /// every original tool result is present whole or named by a marker; a reference points at
    /// a result that is present whole.
    fn assert_valid(h: &Harness, sent: &[Box<RawValue>], plan: &Plan) {
        let out = &plan.messages;
        let infos: Vec<Info> = out.iter().map(|m| Info::parse(m.get())).collect();
        let mut open_calls: Vec<String> = Vec::new();
        for info in &infos {
            match info.role {
                Role::Assistant => open_calls = info.calls.iter().map(|c| c.id.clone()).collect(),
                Role::Tool => {
                    let id = info.tool_call_id.clone().unwrap();
                    assert!(open_calls.contains(&id), "tool result {id} does not follow its call");
                }
                _ => open_calls.clear(),
            }
        }
        let out_texts: Vec<String> = out.iter().map(|m| m.get().to_string()).collect();
        let sent_infos: Vec<Info> = sent.iter().map(|m| Info::parse(m.get())).collect();
        for (m, info) in sent.iter().zip(&sent_infos) {
            if info.role == Role::System {
                assert!(texts(out).contains(&m.get()), "a system message was changed");
            }
        }
        if let Some(latest) = sent_infos.iter().rposition(|i| i.role == Role::User) {
            // As sent, or as the lossless passes leave it (a pinned message is kept as sent).
            let latest = &sent[latest];
            let kept = texts(out).contains(&latest.get()) || out_texts.contains(&normalized(h, latest));
            assert!(kept, "the latest user message was changed");
        }
        let conversation = Conversation { messages: sent, infos: &sent_infos, tokens: &[] };
        let starts = conversation.turn_starts(1);
        let last = starts.last().copied().unwrap_or(sent.len());
        let from = match (h.policy.keep_recent_turns, &plan.state) {
            (_, Some(state)) => state.upto.max(last.min(state.upto)),
            (keep, None) if keep > 0 && starts.len() > keep => starts[starts.len() - keep],
            _ => last,
        };
        // Lossless passes apply to every message from its first request on.
        let recent: Vec<String> = sent[from..].iter().map(|m| normalized(h, m)).collect();
        assert_eq!(&out_texts[out.len() - recent.len()..], &recent[..], "recent turns were changed");
        // Named by a marker, in a dropped run a marker names, or listed in the index a marked range
        // id (a state sheet's) resolves to.
        let mut marked: std::collections::HashSet<String> =
            out.iter().flat_map(|m| marker::ids_in(m.get()).into_iter().map(str::to_string)).collect();
        let message_ids: Vec<String> = sent.iter().map(|m| marker::id_of(m)).collect();
        for id in marked.clone() {
            if message_ids.contains(&id) {
                continue;
            }
            if let Some(run) = super::super::expand::run(sent, &id) {
                marked.extend(run.iter().map(|m| marker::id_of(m)));
                continue;
            }
            let index = super::super::expand::resolve(sent, &id);
            assert!(index.is_some(), "a marker names {id}, which is no original");
            marked.extend(index.iter().flat_map(|i| marker::ids_in(i.get())).map(str::to_string));
        }
        let whole_results: Vec<&str> = infos
            .iter()
            .filter(|i| i.role == Role::Tool && !i.text.as_deref().unwrap_or("").contains(marker::PREFIX))
            .filter_map(|i| i.tool_call_id.as_deref())
            .collect();
        for ((m, info), id) in sent.iter().zip(&sent_infos).zip(&message_ids) {
            if info.role != Role::Tool {
                continue;
            }
            let present = texts(out).contains(&m.get()) || out_texts.contains(&normalized(h, m));
            assert!(present || marked.contains(id), "a tool result vanished without a marker: {}", m.get());
        }
        for text in &out_texts {
            if let Some(at) = text
                .find("same output as call ")
                .or_else(|| text.find(" call ").filter(|_| text.contains("superseded by")))
            {
                let target = text[at..].split_whitespace().find(|w| w.starts_with("call_")).unwrap_or("");
                let target = target.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_');
                if !target.is_empty() {
                    assert!(
                        whole_results.contains(&target),
                        "a reference points at {target}, which is not whole"
                    );
                }
            }
        }
    }

    #[test]
    fn compressed_requests_stay_valid_and_leave_protected_messages_alone() {
        for seed in 0..40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mode = if rng.bool() { CompressionMode::Rules } else { CompressionMode::Hybrid };
            let mut h = Harness::new(mode, rng.u64(3_000..20_000));
            h.policy.keep_recent_turns = rng.usize(0..5);
            h.policy.rules = RulesConfig {
                whitespace: rng.bool(),
                ansi: rng.bool(),
                duplicate_tool_results: rng.bool(),
                superseded_reads: rng.bool(),
                truncate_tool_outputs: rng.bool(),
                elide_blobs: rng.bool(),
                mask_old_tool_results: rng.bool(),
                mask_by_age: rng.bool(),
                mask_after_turns: rng.usize(0..12),
                mask_assistant_messages: rng.bool(),
                drop_oldest: rng.bool(),
                elide_user_messages: rng.bool(),
                max_tool_output_tokens: rng.u64(50..3000),
                ..RulesConfig::default()
            };
            h.rules = Rules::new(&h.policy.rules);
            let mut session = Session::new(seed);
            let mut state = None;
            let mut ready = None;
            for _ in 0..rng.usize(10..80) {
                session.turn();
                let plan = h.plan(&session.messages, None, state.take(), ready.as_ref());
                assert_valid(&h, &session.messages, &plan);
                if let Some(request) = &plan.summarize {
                    ready = Some(sheet_for(request));
                }
                state = plan.state;
            }
        }
    }

    /// Parallel calls, a legacy `function` message, content arrays, null content, an
    /// assistant that talks and calls, users back to back, a developer message mid-way, and a
    /// message that is not even an object: compaction still pairs every tool result with its
    /// call and never fails.
    #[test]
    fn adversarial_transcripts_keep_their_pairs() {
        let big = "x".repeat(9_000);
        let mut messages = vec![raw(serde_json::json!({"role": "system", "content": "s"}))];
        for n in 0..12 {
            let ids: Vec<String> = (0..3).map(|k| format!("p{n}_{k}")).collect();
            messages.push(raw(serde_json::json!({"role": "user", "content": [{"type": "text", "text": format!("go   {n}\n\n\n\n")}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})));
            messages.push(raw(serde_json::json!({"role": "user", "content": null})));
            messages.push(raw(serde_json::json!({
                "role": "assistant", "content": "calling three tools",
                "tool_calls": ids.iter().map(|id| serde_json::json!({"id": id, "type": "function", "function": {"name": "read_file", "arguments": "{\"p\":1}"}})).collect::<Vec<_>>()
            })));
            for id in &ids {
                messages.push(raw(serde_json::json!({"role": "tool", "tool_call_id": id, "content": [{"type": "text", "text": big.clone()}]})));
            }
            messages.push(raw(serde_json::json!({"role": "developer", "content": "mid-way instructions"})));
            messages
                .push(raw(serde_json::json!({"role": "function", "name": "legacy", "content": "old style"})));
            messages.push(raw(serde_json::json!("not an object")));
        }
        for mode in [CompressionMode::Rules, CompressionMode::Hybrid] {
            let h = Harness::new(mode, 8_000);
            let mut plan = h.plan(&messages, None, None, None);
            if let Some(request) = &plan.summarize {
                plan = h.plan(&messages, None, None, Some(&sheet_for(request)));
            }
            assert!(plan.epoch.is_some());
            assert!(plan.tokens_after < plan.tokens_before);
            let out: Vec<Info> = plan.messages.iter().map(|m| Info::parse(m.get())).collect();
            for (i, info) in
                out.iter().enumerate().filter(|(_, i)| i.role == Role::Tool && i.tool_call_id.is_some())
            {
                let id = info.tool_call_id.as_deref().unwrap();
                let call = out[..i].iter().rposition(|m| m.role == Role::Assistant).unwrap();
                assert!(out[call].calls.iter().any(|c| c.id == id), "{id} lost its call");
                assert!(
                    out[call + 1..i].iter().all(|m| m.role == Role::Tool),
                    "{id} is separated from its call"
                );
            }
            assert!(plan.messages.iter().any(|m| m.get() == "\"not an object\""));
        }
    }

    #[test]
    fn a_sheet_longer_than_what_it_replaces_is_not_placed() {
        let mut h = Harness::new(CompressionMode::Hybrid, 20_000);
        h.policy.rules = only_whitespace();
        h.rules = Rules::new(&h.policy.rules);
        let mut session = Session::new(11);
        let (mut state, mut ready) = (None, None);
        for _ in 0..200 {
            session.turn();
            let plan = h.plan(&session.messages, None, state.take(), ready.as_ref());
            if let Some(request) = &plan.summarize {
                let mut sheet = sheet_for(request);
                let filler: String = (0..20_000).map(|i| format!("fact {i} of no use\n")).collect();
                let bloated = format!("## Active Task\n{filler}");
                sheet.message = super::super::summary::sheet_message(
                    &bloated,
                    "system",
                    1,
                    &request.range,
                    request.end - 1,
                )
                .unwrap();
                ready = Some(sheet);
            }
            if plan.epoch.is_some() && ready.is_some() {
                assert_eq!(plan.epoch, Some(Acted::Rules));
                assert!(plan.fell_back);
                assert!(!plan.messages.iter().any(|m| m.get().contains("[ctxgate state sheet")));
                return;
            }
            state = plan.state;
        }
        panic!("no epoch with a sheet ready");
    }

    /// A model step: an assistant call and its tool result of about `words` tokens.
    fn step(messages: &mut Vec<Box<RawValue>>, id: usize, words: usize) {
        let call = serde_json::json!({"id": format!("c{id}"), "type": "function",
            "function": {"name": "read_file", "arguments": format!(r#"{{"path":"f{id}"}}"#)}});
        messages.push(raw(serde_json::json!({"role": "assistant", "content": null, "tool_calls": [call]})));
        let text = format!("file {id}: {}", "lorem ".repeat(words));
        messages.push(raw(
            serde_json::json!({"role": "tool", "tool_call_id": format!("c{id}"), "content": text}),
        ));
    }

    fn agent(turns: &[usize]) -> Vec<Box<RawValue>> {
        let mut messages = vec![
            raw(serde_json::json!({"role": "system", "content": "You are a coding agent."})),
            raw(serde_json::json!({"role": "user", "content": "Fix the build."})),
        ];
        for (id, &words) in turns.iter().enumerate() {
            step(&mut messages, id, words);
        }
        messages
    }

    #[test]
    fn an_epoch_builds_on_the_previous_one_so_its_markers_stay_in_place() {
        // Window 10,000: an epoch at 8,000 compacts to 5,000, by dropping the oldest steps.
        let mut h = Harness::new(CompressionMode::Rules, 10_000);
        h.policy.rules = RulesConfig { drop_oldest: true, ..only_whitespace() };
        h.rules = Rules::new(&h.policy.rules);
        let mut messages = agent(&[]);
        let (mut state, mut previous): (Option<State>, Vec<Box<RawValue>>) = (None, Vec::new());
        let mut epochs = Vec::new();
        for id in 0..40 {
            step(&mut messages, id, 600);
            let plan = h.plan(&messages, None, state.take(), None);
            if plan.epoch.is_some() {
                epochs.push((previous.clone(), plan.messages.clone(), messages.clone()));
            }
            // Through JSON, as the session checkpoint and the stateless store keep it.
            state = plan.state.map(|s| serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap());
            previous = plan.messages;
        }
        assert!(epochs.len() >= 3, "{} epochs", epochs.len());
        for (before, after, sent) in &epochs[1..] {
            // The previous epoch's run marker (right after the system and user messages) stays
            // byte for byte; this epoch's run follows it.
            assert!(before[2].get().contains("[ctxgate:elided id="), "{}", before[2].get());
            assert_eq!(after[2].get(), before[2].get(), "the previous epoch's marker moved");
            assert!(after[3].get().contains("[ctxgate:elided id="), "{}", after[3].get());
            // Compacted from scratch, the same request would have merged both runs into one
            // marker, breaking the cached prefix right after the user message.
            let fresh = h.plan(sent, None, None, None);
            assert_ne!(fresh.messages[2].get(), before[2].get());
        }
    }

    #[test]
    fn changed_history_resets_the_state() {
        let h = Harness::new(CompressionMode::Rules, 4_000);
        let mut session = Session::new(3);
        let mut state = None;
        while state.is_none() {
            session.turn();
            state = h.plan(&session.messages, None, None, None).state;
        }
        session.turn();
        let again = h.plan(&session.messages, None, state.clone(), None);
        assert!(!again.reset);
        session.messages[1] = raw(serde_json::json!({"role": "user", "content": "edited history"}));
        let edited = h.plan(&session.messages, None, state, None);
        assert!(edited.reset);
        assert!(edited.messages.iter().any(|m| m.get().contains("edited history")));
    }

    #[test]
    fn off_sends_the_messages_as_they_came() {
        let h = Harness::new(CompressionMode::Off, 1_000);
        let mut session = Session::new(1);
        for _ in 0..30 {
            session.turn();
        }
        let plan = h.plan(&session.messages, None, None, None);
        assert_eq!(texts(&plan.messages), texts(&session.messages));
        assert_eq!(plan.acted, Acted::Off);
        assert_eq!(plan.tokens_before, plan.tokens_after);
    }

    #[test]
    fn a_sheet_replaces_the_old_span_after_system_and_goal() {
        let mut h = Harness::new(CompressionMode::Hybrid, 20_000);
        h.policy.rules = only_whitespace();
        h.rules = Rules::new(&h.policy.rules);
        let goal = raw(serde_json::json!({"role": "system", "content": "[goal]"}));
        let mut session = Session::new(11);
        let (mut state, mut ready) = (None, None);
        let mut placed = None;
        for _ in 0..200 {
            session.turn();
            let plan = h.plan(&session.messages, Some(&goal), state.take(), ready.as_ref());
            if let Some(request) = &plan.summarize {
                assert_eq!(
                    request.messages[0].get(),
                    session.messages[0].get(),
                    "the sheet call shares the prefix"
                );
                ready = Some(sheet_for(request));
            }
            if plan.epoch == Some(Acted::Hybrid) {
                placed = Some(plan);
                break;
            }
            state = plan.state;
        }
        let plan = placed.expect("a sheet was placed");
        assert!(plan.messages[2].get().contains("[ctxgate state sheet, epoch"));
        assert_eq!(plan.acted, Acted::Hybrid);
        assert!(
            plan.tokens_after <= h.policy.high_tokens(),
            "{} of {}",
            plan.tokens_after,
            plan.tokens_before
        );
        assert!(plan.tokens_after <= h.policy.context_window);
    }
}
