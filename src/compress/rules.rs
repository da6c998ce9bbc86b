//! The rule passes. Each is named, can be switched off, and reports the tokens it saved.
//!
//! Rules rewrite message *content* only, one message for one message, so every tool message
//! still follows the assistant message whose `tool_calls` it answers. They never touch system
//! messages or the latest user message; the caller passes only the span before the recent
//! turns, and the goal block and summaries are not part of the conversation at all.

use std::collections::HashMap;
use std::ops::Range;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde_json::value::RawValue;

use super::text;
use crate::config::RulesConfig;
use crate::openai::message::{self, Info, Role};
use crate::tokens::TokenCounter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    Whitespace,
    Ansi,
    DuplicateToolResults,
    SupersededReads,
    TruncateToolOutputs,
    ElideBlobs,
    MaskOldToolResults,
    DropOldest,
}

impl Rule {
    pub const ALL: [Rule; 8] = [
        Rule::Whitespace,
        Rule::Ansi,
        Rule::DuplicateToolResults,
        Rule::SupersededReads,
        Rule::TruncateToolOutputs,
        Rule::ElideBlobs,
        Rule::MaskOldToolResults,
        Rule::DropOldest,
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
            Rule::DropOldest => "drop_oldest",
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
#[derive(Debug)]
pub struct Rules {
    pub config: RulesConfig,
    reads: GlobSet,
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
        Self { config: config.clone(), reads }
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

    /// The latest user message, which no rule may touch.
    pub fn latest_user(&self) -> Option<usize> {
        self.infos.iter().rposition(|i| i.role == Role::User)
    }
}

/// The span `range` with the rules applied, one message for each message, and what each
/// rule saved. `turn_starts` is of the whole conversation (ages count from its end).
pub fn apply(
    rules: &Rules,
    conversation: &Conversation<'_>,
    range: Range<usize>,
    turn_starts: &[usize],
    counter: &TokenCounter,
) -> (Vec<Box<RawValue>>, RuleStats) {
    let config = &rules.config;
    let infos = conversation.infos;
    let latest_user = conversation.latest_user();
    let turns = turn_starts.len();
    let turn_of = |i: usize| turn_starts.partition_point(|&s| s <= i);

    // Which assistant call each tool message answers.
    let mut calls = HashMap::new();
    // The last call of each (function, arguments), for superseded reads.
    let mut last_read = HashMap::new();
    for (i, info) in infos.iter().enumerate() {
        for call in &info.calls {
            calls.insert(call.id.as_str(), call);
            if config.superseded_reads && rules.reads.is_match(&call.name) {
                last_read.insert((call.name.as_str(), canonical_arguments(&call.arguments)), (i, &call.id));
            }
        }
    }
    // The first tool message with each text, for duplicates.
    let mut first_with_text: HashMap<&str, &str> = HashMap::new();

    let mut stats = RuleStats::default();
    let mut out = Vec::with_capacity(range.len());
    for (i, info) in infos.iter().enumerate().take(range.end) {
        let original = &conversation.messages[i];
        if info.role == Role::Tool {
            if let (Some(text), Some(id)) = (&info.text, &info.tool_call_id) {
                let first = *first_with_text.entry(text.as_str()).or_insert(id.as_str());
                if i < range.start {
                    continue;
                }
                let call = calls.get(id.as_str());
                let (rule, marker) = marker_for(rules, i, text, id, first, call.copied(), &last_read, || {
                    turns.saturating_sub(turn_of(i))
                });
                if let Some(new) = marker.and_then(|m| message::replace_text(original.get(), &m)) {
                    let after = counter.message(new.get());
                    // A marker longer than what it replaces saves nothing.
                    if after < conversation.tokens[i] {
                        stats.add(rule, saved(conversation.tokens[i], after));
                        out.push(new);
                        continue;
                    }
                }
            }
        }
        if i < range.start {
            continue;
        }
        if info.role == Role::System || Some(i) == latest_user {
            out.push(original.clone());
            continue;
        }
        match rewrite_content(rules, info, original.get(), conversation.tokens[i]) {
            Some((new, removed)) => {
                let after = counter.message(new.get());
                attribute(&mut stats, &removed, saved(conversation.tokens[i], after));
                out.push(new);
            }
            None => out.push(original.clone()),
        }
    }
    (out, stats)
}

/// A replacement for a whole tool result, if a rule calls for one: masked for age,
/// superseded by a later read, or a duplicate of an earlier result.
#[allow(clippy::too_many_arguments)]
fn marker_for(
    rules: &Rules,
    i: usize,
    text: &str,
    id: &str,
    first: &str,
    call: Option<&message::Call>,
    last_read: &HashMap<(&str, String), (usize, &String)>,
    age: impl Fn() -> usize,
) -> (Rule, Option<String>) {
    let config = &rules.config;
    let name = call.map_or("unknown", |c| c.name.as_str());
    if config.mask_old_tool_results && age() > config.mask_after_turns && text.len() > 64 {
        let marker =
            format!("[ctxgate: result of {name} from {} turns ago masked ({} bytes)]", age(), text.len());
        return (Rule::MaskOldToolResults, Some(marker));
    }
    if let Some(call) = call.filter(|_| config.superseded_reads) {
        if rules.reads.is_match(&call.name) {
            let key = (call.name.as_str(), canonical_arguments(&call.arguments));
            if let Some((later, later_id)) = last_read.get(&key) {
                if *later > i && text.len() > 64 {
                    let marker = format!("[ctxgate: superseded by a later {name} call ({later_id})]");
                    return (Rule::SupersededReads, Some(marker));
                }
            }
        }
    }
    if config.duplicate_tool_results && first != id && text.len() >= 64 {
        return (Rule::DuplicateToolResults, Some(format!("[ctxgate: same output as tool call {first}]")));
    }
    (Rule::DuplicateToolResults, None)
}

/// Bytes each rule removed from one message.
type Removed = Vec<(Rule, usize)>;

/// The content transforms, in order; returns the new message and the bytes each removed.
fn rewrite_content(rules: &Rules, info: &Info, json: &str, tokens: u32) -> Option<(Box<RawValue>, Removed)> {
    let config = &rules.config;
    let text = info.text.as_ref()?;
    let max_bytes = (config.max_tool_output_tokens as usize * text.len()) / (tokens.max(1) as usize);
    let truncate = config.truncate_tool_outputs
        && info.role == Role::Tool
        && u64::from(tokens) > config.max_tool_output_tokens;
    let transform = |text: &str, removed: &mut Removed| -> Option<String> {
        let mut current = std::borrow::Cow::Borrowed(text);
        let mut step = |rule: Rule, on: bool, f: &dyn Fn(&str) -> Option<String>| {
            if !on {
                return;
            }
            if let Some(next) = f(&current) {
                removed.push((rule, current.len().saturating_sub(next.len())));
                current = std::borrow::Cow::Owned(next);
            }
        };
        step(Rule::Ansi, config.ansi, &text::ansi);
        step(Rule::ElideBlobs, config.elide_blobs, &|t| text::blobs(t, config.min_blob_bytes));
        step(Rule::Whitespace, config.whitespace, &text::whitespace);
        step(Rule::TruncateToolOutputs, truncate, &|t| text::head_and_tail(t, max_bytes));
        match current {
            std::borrow::Cow::Owned(text) => Some(text),
            std::borrow::Cow::Borrowed(_) => None,
        }
    };
    // Most old messages need nothing: find that out on the text already parsed, before
    // re-parsing the message to rewrite it.
    transform(text, &mut Vec::new())?;
    let mut removed = Vec::new();
    let new = message::edit_text(json, |text| transform(text, &mut removed))?;
    Some((new, removed))
}

/// Splits a message's saved tokens between the rules that changed it, by bytes removed.
fn attribute(stats: &mut RuleStats, removed: &[(Rule, usize)], tokens: u64) {
    let bytes: usize = removed.iter().map(|(_, n)| n).sum();
    if bytes == 0 {
        return;
    }
    let mut left = tokens;
    for (k, (rule, n)) in removed.iter().enumerate() {
        let share = if k + 1 == removed.len() { left } else { tokens * *n as u64 / bytes as u64 };
        stats.add(*rule, share.min(left));
        left -= share.min(left);
    }
}

fn saved(before: u32, after: u32) -> u64 {
    u64::from(before.saturating_sub(after))
}

/// Arguments with their keys sorted and spacing removed, so two calls with the same arguments
/// compare equal however the model serialised them.
fn canonical_arguments(arguments: &str) -> String {
    serde_json::from_str::<serde_json::Value>(arguments)
        .map_or_else(|_| arguments.to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Encoding;

    fn raw(s: String) -> Box<RawValue> {
        RawValue::from_string(s).unwrap()
    }

    struct Fixture {
        messages: Vec<Box<RawValue>>,
        infos: Vec<Info>,
        tokens: Vec<u32>,
        counter: TokenCounter,
    }

    impl Fixture {
        fn new(messages: Vec<serde_json::Value>) -> Self {
            let counter = TokenCounter::new(Encoding::O200kBase);
            let messages: Vec<_> = messages.into_iter().map(|m| raw(m.to_string())).collect();
            let infos = messages.iter().map(|m| Info::parse(m.get())).collect();
            let tokens = messages.iter().map(|m| counter.message(m.get())).collect();
            Self { messages, infos, tokens, counter }
        }

        fn run(&self, config: &RulesConfig, range: Range<usize>) -> (Vec<String>, RuleStats) {
            let conversation =
                Conversation { messages: &self.messages, infos: &self.infos, tokens: &self.tokens };
            let starts = conversation.turn_starts(1);
            let (out, stats) = apply(&Rules::new(config), &conversation, range, &starts, &self.counter);
            (out.iter().map(|m| m.get().to_string()).collect(), stats)
        }
    }

    fn only(rule: Rule) -> RulesConfig {
        let mut config = RulesConfig::none();
        let switch = match rule {
            Rule::Whitespace => &mut config.whitespace,
            Rule::Ansi => &mut config.ansi,
            Rule::DuplicateToolResults => &mut config.duplicate_tool_results,
            Rule::SupersededReads => &mut config.superseded_reads,
            Rule::TruncateToolOutputs => &mut config.truncate_tool_outputs,
            Rule::ElideBlobs => &mut config.elide_blobs,
            Rule::MaskOldToolResults => &mut config.mask_old_tool_results,
            Rule::DropOldest => &mut config.drop_oldest,
        };
        *switch = true;
        config
    }

    fn call(id: &str, name: &str, args: &str) -> serde_json::Value {
        serde_json::json!({"role":"assistant","content":null,"tool_calls":[{"id":id,"type":"function","function":{"name":name,"arguments":args}}]})
    }

    fn result(id: &str, text: &str) -> serde_json::Value {
        serde_json::json!({"role":"tool","tool_call_id":id,"content":text})
    }

    fn content(json: &str) -> String {
        serde_json::from_str::<serde_json::Value>(json).unwrap()["content"].as_str().unwrap_or("").to_string()
    }

    fn sys() -> serde_json::Value {
        serde_json::json!({"role":"system","content":"You   are   helpful.\n\n\n\n"})
    }

    fn user(text: &str) -> serde_json::Value {
        serde_json::json!({"role":"user","content":text})
    }

    #[test]
    fn whitespace_and_ansi_rewrite_only_old_non_system_text() {
        let f = Fixture::new(vec![
            sys(),
            user("please   look\n\n\n\nhere"),
            call("c1", "run", "{}"),
            result("c1", "\u{1b}[32mok\u{1b}[0m   done"),
            user("latest    message   stays"),
        ]);
        let (out, stats) = f.run(&RulesConfig::default(), 1..5);
        assert_eq!(content(&out[0]), "please look\n\nhere");
        assert_eq!(out[1], f.messages[2].get(), "untouched messages keep their bytes");
        assert_eq!(content(&out[2]), "ok done");
        assert_eq!(out[3], f.messages[4].get(), "the latest user message is protected");
        assert!(stats.get(Rule::Whitespace) > 0);
        assert!(stats.get(Rule::Ansi) > 0);
        let (unchanged, _) = f.run(&RulesConfig::default(), 0..1);
        assert_eq!(unchanged[0], f.messages[0].get(), "system messages are never rewritten");
    }

    #[test]
    fn duplicate_tool_results_point_at_the_first() {
        let listing = "file_a.txt\nfile_b.txt\nfile_c.txt\nfile_d.txt\nfile_e.txt\nfile_f.txt\n";
        let f = Fixture::new(vec![
            sys(),
            user("list"),
            call("c1", "run_ls", "{}"),
            result("c1", listing),
            call("c2", "run_ls", "{}"),
            result("c2", listing),
            user("next"),
        ]);
        let (out, stats) = f.run(&only(Rule::DuplicateToolResults), 1..7);
        assert_eq!(content(&out[2]), listing);
        assert_eq!(content(&out[4]), "[ctxgate: same output as tool call c1]");
        assert!(stats.get(Rule::DuplicateToolResults) > 0);
        // The reference still answers its own call.
        assert!(out[4].contains(r#""tool_call_id":"c2""#));
    }

    #[test]
    fn older_reads_of_the_same_resource_are_superseded() {
        let body = "line of the file that is long enough to matter for the rule\n".repeat(3);
        let f = Fixture::new(vec![
            sys(),
            user("read it"),
            call("c1", "cat", r#"{"file_name":"a.txt"}"#),
            result("c1", &format!("v1 {body}")),
            call("c2", "cat", r#"{ "file_name": "b.txt" }"#),
            result("c2", &format!("other {body}")),
            call("c3", "cat", r#"{ "file_name" : "a.txt" }"#),
            result("c3", &format!("v2 {body}")),
            user("next"),
        ]);
        let (out, stats) = f.run(&only(Rule::SupersededReads), 1..7);
        assert_eq!(content(&out[2]), "[ctxgate: superseded by a later cat call (c3)]");
        assert!(content(&out[4]).starts_with("other"), "another file is not superseded");
        assert!(stats.get(Rule::SupersededReads) > 0);
        // Writes are not reads: the same call to a non-read function is kept.
        let f = Fixture::new(vec![
            sys(),
            call("c1", "write_file", r#"{"f":"a"}"#),
            result("c1", &body),
            call("c2", "write_file", r#"{"f":"a"}"#),
            result("c2", &format!("x{body}")),
        ]);
        let (out, _) = f.run(&only(Rule::SupersededReads), 1..5);
        assert_eq!(content(&out[1]), body);
    }

    #[test]
    fn oversized_tool_outputs_keep_head_and_tail() {
        let big: String = (0..3000).map(|i| format!("row {i}: value\n")).collect();
        let f = Fixture::new(vec![sys(), call("c1", "query", "{}"), result("c1", &big), user("next")]);
        let config = RulesConfig { max_tool_output_tokens: 500, ..only(Rule::TruncateToolOutputs) };
        let (out, stats) = f.run(&config, 1..4);
        let text = content(&out[1]);
        assert!(text.starts_with("row 0: value\n") && text.ends_with("row 2999: value\n"));
        assert!(text.contains("[ctxgate: omitted "));
        let after = f.counter.text(&text) as u64;
        assert!(after <= 560, "{after} tokens");
        assert!(stats.get(Rule::TruncateToolOutputs) > 10_000);
    }

    #[test]
    fn blobs_are_elided_in_any_message() {
        let blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkw".repeat(10);
        let f = Fixture::new(vec![sys(), user(&format!("see {blob}")), user("next")]);
        let (out, stats) = f.run(&only(Rule::ElideBlobs), 1..3);
        assert!(content(&out[0]).starts_with("see [ctxgate: elided a 440-byte encoded blob]"));
        assert!(stats.get(Rule::ElideBlobs) > 50);
    }

    #[test]
    fn old_tool_results_are_masked_by_age() {
        let mut messages = vec![sys()];
        for n in 0..6 {
            messages.push(call(&format!("c{n}"), "search", &format!(r#"{{"q":{n}}}"#)));
            messages.push(result(
                &format!("c{n}"),
                &format!("{n} result: {}", "a line of tool output that is worth masking\n".repeat(5)),
            ));
        }
        let f = Fixture::new(messages);
        let config = RulesConfig { mask_after_turns: 3, ..only(Rule::MaskOldToolResults) };
        let (out, stats) = f.run(&config, 1..13);
        // Six steps: the first two are more than three turns old.
        let masked: Vec<bool> = out
            .iter()
            .skip(1)
            .step_by(2)
            .map(|m| content(m).starts_with("[ctxgate: result of search"))
            .collect();
        assert_eq!(masked, [true, true, false, false, false, false]);
        assert!(stats.get(Rule::MaskOldToolResults) > 0);
    }

    #[test]
    fn every_switch_off_changes_nothing() {
        let f = Fixture::new(vec![sys(), user("a    b\n\n\n\n\u{1b}[1mc"), user("x")]);
        let (out, stats) = f.run(&RulesConfig::none(), 0..3);
        assert_eq!(out, f.messages.iter().map(|m| m.get().to_string()).collect::<Vec<_>>());
        assert_eq!(stats.total(), 0);
    }
}
