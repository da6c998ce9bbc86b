//! Token counting with tiktoken's vocabularies, cached per message so a long session is not
//! re-tokenised on every turn: a turn pays only for the messages it adds.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use tiktoken_rs::CoreBPE;

use crate::config::Encoding;

/// Tokens OpenAI's chat format adds around each message (role and separators).
const PER_MESSAGE: u32 = 4;
/// Entries kept per generation; two generations bound the cache at twice this.
const GENERATION: usize = 200_000;

/// A vocabulary and the per-message count cache.
pub struct TokenCounter {
    encoding: Encoding,
    cache: Mutex<Generations>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter").field("encoding", &self.encoding).finish_non_exhaustive()
    }
}

/// Two maps: lookups promote from the old one, and when the young one fills the old one is
/// dropped. A cheap bound that keeps what the live sessions use.
#[derive(Default)]
struct Generations {
    young: HashMap<(u64, usize), u32>,
    old: HashMap<(u64, usize), u32>,
}

impl Generations {
    fn get(&mut self, key: (u64, usize)) -> Option<u32> {
        if let Some(n) = self.young.get(&key) {
            return Some(*n);
        }
        let n = self.old.remove(&key)?;
        self.insert(key, n);
        Some(n)
    }

    fn insert(&mut self, key: (u64, usize), n: u32) {
        if self.young.len() >= GENERATION {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, n);
    }
}

impl TokenCounter {
    /// The counter for `encoding`; `Auto` is resolved by the caller with [`Self::encoding_for`].
    pub fn new(encoding: Encoding) -> Self {
        Self { encoding, cache: Mutex::new(Generations::default()) }
    }

    /// The tokenizer, built on first use: its tables take tens of MB, which a gateway with
    /// compression off and no token limits never needs.
    fn bpe(&self) -> &'static CoreBPE {
        match self.encoding {
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Encoding::O200kBase | Encoding::Auto => tiktoken_rs::o200k_base_singleton(),
        }
    }

    /// The encoding for `model`: what tiktoken knows for OpenAI's models, `fallback` for the rest.
    pub fn encoding_for(model: &str, fallback: Encoding) -> Encoding {
        use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
        match get_tokenizer(model) {
            Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => Encoding::O200kBase,
            Some(Tokenizer::Cl100kBase) => Encoding::Cl100kBase,
            _ => fallback,
        }
    }

    /// Tokens of a text.
    pub fn text(&self, text: &str) -> u32 {
        self.bpe().encode_ordinary(text).len() as u32
    }

    /// Tokens of one message (its JSON as sent), cached by its bytes.
    pub fn message(&self, json: &str) -> u32 {
        self.cached(json, 0, |json| PER_MESSAGE + self.text(&crate::openai::message::countable_text(json)))
    }

    /// Tokens of a JSON document counted as text (the `tools` array), cached by its bytes.
    pub fn json(&self, json: &str) -> u32 {
        self.cached(json, 1, |json| self.text(json))
    }

    fn cached(&self, json: &str, kind: u64, count: impl FnOnce(&str) -> u32) -> u32 {
        let key = (hash(json) ^ kind, json.len());
        if let Some(n) = self.cache.lock().ok().and_then(|mut c| c.get(key)) {
            return n;
        }
        let n = count(json);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(key, n);
        }
        n
    }
}

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_model() {
        assert_eq!(TokenCounter::encoding_for("gpt-4o-mini", Encoding::Cl100kBase), Encoding::O200kBase);
        assert_eq!(TokenCounter::encoding_for("gpt-4-0613", Encoding::O200kBase), Encoding::Cl100kBase);
        assert_eq!(TokenCounter::encoding_for("qwen2.5-coder", Encoding::Cl100kBase), Encoding::Cl100kBase);
    }

    #[test]
    fn message_counts_cover_text_and_tool_calls_and_are_cached() {
        let counter = TokenCounter::new(Encoding::O200kBase);
        let user = r#"{"role":"user","content":"hello world"}"#;
        assert_eq!(counter.message(user), PER_MESSAGE + counter.text("hello world"));
        let call = r#"{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"ls","arguments":"{\"a\":true}"}}]}"#;
        assert!(counter.message(call) > PER_MESSAGE + counter.text("ls"));
        assert_eq!(counter.cache.lock().unwrap().young.len(), 2);
        assert_eq!(counter.message(user), PER_MESSAGE + 2);
    }
}
