//! Compaction epochs and the prefix-stable layout.
//!
//! The upstream request is laid out as
//!
//! ```text
//! [client system messages] [goal block] [state sheet] [pinned user message] [compacted span] [recent, verbatim]
//! ```
//!
//! Nothing before the verbatim tail changes between two compaction epochs: a request only
//! appends to the tail, so request N+1's messages begin with request N's, byte for byte, and
//! the provider's prompt cache (or the server's KV cache) keeps hitting. An epoch starts when
//! the request's tokens pass the high-water mark: the span before the recent turns is
//! compacted by the rules (and, in hybrid mode, replaced by the state sheet when one is ready)
//! down towards the low-water mark, and that result is frozen in [`State`] until the next epoch.
//!
//! Pure: no I/O. The caller stores [`State`] (in the checkpoint, or keyed by the conversation
//! for stateless clients) and runs the summary calls the plan asks for.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::rules::{self, Conversation, Rule, RuleStats, Rules};
use crate::config::{CompressionMode, Policy};
use crate::openai::message::{Info, Role};
use crate::tokens::TokenCounter;

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
    /// `conversation[summarized_upto..upto]` after the rules (oldest turns possibly dropped).
    pub frozen: Vec<Box<RawValue>>,
    /// Tokens of `summary`, `pinned` and `frozen`.
    pub tokens: u64,
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
    pub stats: RuleStats,
    pub summarize: Option<SummaryRequest>,
}

pub fn plan(input: &Input<'_>, previous: Option<State>, ready: Option<&Summary>) -> Plan {
    let n = input.messages.len();
    let lead = input.infos.iter().take_while(|i| i.role == Role::System).count();
    let all: u64 = input.tokens.iter().map(|&t| u64::from(t)).sum();
    let tokens_before = input.fixed_tokens + all;
    let policy = input.policy;

    if policy.mode == CompressionMode::Off {
        return Plan {
            messages: layout(input, lead, None),
            state: None,
            tokens_before,
            tokens_after: tokens_before,
            acted: Acted::Off,
            epoch: None,
            reset: false,
            fell_back: false,
            stats: RuleStats::default(),
            summarize: None,
        };
    }

    let had_state = previous.is_some();
    let mut state = previous.filter(|s| {
        s.lead == lead
            && s.summarized_upto <= s.upto
            && s.upto <= n
            && s.covered == covered(input.messages, lead, s.upto)
    });
    let reset = had_state && state.is_none();
    let base = input.fixed_tokens + input.tokens[..lead].iter().map(|&t| u64::from(t)).sum::<u64>();
    let tail = |from: usize| input.tokens[from..].iter().map(|&t| u64::from(t)).sum::<u64>();
    let view = |state: &Option<State>| match state {
        Some(s) => base + s.tokens + tail(s.upto),
        None => tokens_before,
    };

    let conversation = Conversation { messages: input.messages, infos: input.infos, tokens: input.tokens };
    let starts = conversation.turn_starts(lead);
    let keep = policy.keep_recent_turns;
    let cut = match keep {
        0 => n,
        keep if starts.len() > keep => starts[starts.len() - keep],
        _ => lead,
    };

    let mut stats = RuleStats::default();
    let mut epoch = None;
    let mut fell_back = false;
    let mut summarize = None;
    let upto = state.as_ref().map_or(lead, |s| s.upto);
    if (view(&state) > policy.high_tokens() || input.force) && cut > upto {
        let mut next = state.clone().unwrap_or_else(|| State {
            epoch: 0,
            lead,
            upto: lead,
            covered: String::new(),
            summarized_upto: lead,
            summary: None,
            pinned: None,
            frozen: Vec::new(),
            tokens: 0,
        });
        next.epoch += 1;
        next.upto = cut;
        let mut placed = Acted::Rules;
        compact(input, &conversation, &starts, &mut next, &mut stats);
        if policy.mode == CompressionMode::Hybrid && base + next.tokens + tail(cut) > policy.low_tokens() {
            let usable = ready.filter(|s| {
                s.start == next.summarized_upto
                    && s.end > s.start
                    && s.end <= cut
                    && s.covered == covered(input.messages, lead, s.end)
            });
            match usable {
                Some(summary) => {
                    let mut with_sheet = next.clone();
                    let mut sheet_stats = RuleStats::default();
                    with_sheet.summary = Some(summary.message.clone());
                    with_sheet.summarized_upto = summary.end;
                    with_sheet.pinned = conversation
                        .latest_user()
                        .filter(|&l| l >= lead && l < summary.end)
                        .map(|l| input.messages[l].clone());
                    compact(input, &conversation, &starts, &mut with_sheet, &mut sheet_stats);
                    // A sheet longer than what the rules leave of its span saves nothing.
                    if with_sheet.tokens < next.tokens {
                        next = with_sheet;
                        stats = sheet_stats;
                        placed = Acted::Hybrid;
                    } else {
                        fell_back = true;
                    }
                }
                None => fell_back = true,
            }
        }
        // Still past the high-water mark: without dropping, every following request would
        // start another epoch (and miss the cache).
        if policy.rules.drop_oldest && base + next.tokens + tail(cut) > policy.high_tokens() {
            drop_oldest(input, &starts, &mut next, base + tail(cut), &mut stats);
        }
        next.covered = covered(input.messages, lead, cut);
        epoch = Some(placed);
        state = Some(next);
    }

    let messages = layout(input, lead, state.as_ref());
    let tokens_after = view(&state);
    if policy.mode == CompressionMode::Hybrid && (tokens_after > policy.pre_tokens() || fell_back) {
        let start = state.as_ref().map_or(lead, |s| s.summarized_upto);
        // One sheet per span start: a sheet that is ready (even if it stops short of `cut`)
        // is placed at the next epoch, the rest of the span compacted by rules. Asking again
        // every turn would cost an LLM call per turn for a few more messages.
        let already = ready.is_some_and(|s| {
            s.start == start && s.end <= n && s.covered == covered(input.messages, lead, s.end)
        });
        if cut > start && !already {
            // The layout up to `cut`: everything but the recent turns, which are verbatim.
            let keep_tail = n - cut.max(state.as_ref().map_or(lead, |s| s.upto));
            summarize = Some(SummaryRequest {
                start,
                end: cut,
                covered: covered(input.messages, lead, cut),
                messages: messages[..messages.len() - keep_tail].to_vec(),
                epoch: state.as_ref().map_or(1, |s| s.epoch + 1),
            });
        }
    }
    let acted = match &state {
        Some(s) if s.summary.is_some() => Acted::Hybrid,
        Some(_) => Acted::Rules,
        None => Acted::None,
    };
    Plan { messages, state, tokens_before, tokens_after, acted, epoch, reset, fell_back, stats, summarize }
}

/// Re-derives `frozen` from the conversation: the rules over `summarized_upto..upto`.
fn compact(
    input: &Input<'_>,
    conversation: &Conversation<'_>,
    starts: &[usize],
    state: &mut State,
    stats: &mut RuleStats,
) {
    let (frozen, saved) =
        rules::apply(input.rules, conversation, state.summarized_upto..state.upto, starts, input.counter);
    stats.merge(&saved);
    state.frozen = frozen;
    state.tokens = state_tokens(input.counter, state);
}

/// Drops the oldest whole turns of `frozen` (a user message, or a model step with its tool
/// results, so pairs stay whole; never the latest user message) until the request is back
/// under the low-water mark.
fn drop_oldest(input: &Input<'_>, starts: &[usize], state: &mut State, outside: u64, stats: &mut RuleStats) {
    let target = input.policy.low_tokens();
    let latest_user = input.infos.iter().rposition(|i| i.role == Role::User);
    let from = state.summarized_upto;
    let tokens: Vec<u64> = state.frozen.iter().map(|m| u64::from(input.counter.message(m.get()))).collect();
    let mut total = state.tokens;
    let mut dropped = vec![false; state.frozen.len()];
    let bounds = starts.iter().copied().chain(std::iter::once(state.upto));
    let turns: Vec<(usize, usize)> = bounds.clone().zip(bounds.skip(1)).collect();
    for (start, end) in turns {
        if outside + total <= target {
            break;
        }
        if start < from
            || end <= start
            || end > state.upto
            || latest_user.is_some_and(|l| (start..end).contains(&l))
        {
            continue;
        }
        total -= tokens[start - from..end - from].iter().sum::<u64>();
        dropped[start - from..end - from].iter_mut().for_each(|d| *d = true);
    }
    if total < state.tokens {
        let mut keep = dropped.iter().map(|d| !d);
        state.frozen.retain(|_| keep.next().unwrap_or(true));
        stats.add(Rule::DropOldest, state.tokens - total);
        state.tokens = total;
    }
}

fn state_tokens(counter: &TokenCounter, state: &State) -> u64 {
    state
        .summary
        .iter()
        .chain(&state.pinned)
        .chain(&state.frozen)
        .map(|m| u64::from(counter.message(m.get())))
        .sum()
}

fn layout(input: &Input<'_>, lead: usize, state: Option<&State>) -> Vec<Box<RawValue>> {
    let messages = input.messages;
    let mut out = Vec::with_capacity(messages.len() + 2);
    out.extend_from_slice(&messages[..lead]);
    if let Some(goal) = input.goal {
        out.push(goal.to_owned());
    }
    match state {
        Some(s) => {
            out.extend(s.summary.iter().cloned());
            out.extend(s.pinned.iter().cloned());
            out.extend(s.frozen.iter().cloned());
            out.extend_from_slice(&messages[s.upto..]);
        }
        None => out.extend_from_slice(&messages[lead..]),
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
        let message =
            super::super::summary::sheet_message(&text, "system", request.epoch, request.end - request.start)
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

    /// Checks a compressed request: tool messages follow the call they answer; system
    /// messages, the latest user message and the recent turns are as sent.
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
        let sent_infos: Vec<Info> = sent.iter().map(|m| Info::parse(m.get())).collect();
        for (m, info) in sent.iter().zip(&sent_infos) {
            if info.role == Role::System {
                assert!(texts(out).contains(&m.get()), "a system message was changed");
            }
        }
        if let Some(latest) = sent_infos.iter().rposition(|i| i.role == Role::User) {
            assert!(texts(out).contains(&sent[latest].get()), "the latest user message was changed");
        }
        let conversation = Conversation { messages: sent, infos: &sent_infos, tokens: &[] };
        let starts = conversation.turn_starts(1);
        let keep = h.policy.keep_recent_turns;
        if keep > 0 && starts.len() > keep {
            let recent = &sent[starts[starts.len() - keep]..];
            assert_eq!(texts(&out[out.len() - recent.len()..]), texts(recent), "recent turns were changed");
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
                mask_after_turns: rng.usize(0..12),
                drop_oldest: rng.bool(),
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
                sheet.message = super::super::summary::sheet_message(&bloated, "system", 1, 1).unwrap();
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
