//! Token counting with tiktoken's vocabularies, cached per message so a long session is not
//! re-tokenised on every turn: a turn pays only for the messages it adds.

use tiktoken_rs::CoreBPE;

use crate::config::Encoding;
use crate::memo::Memo;

/// Tokens OpenAI's chat format adds around each message (role and separators).
const PER_MESSAGE: u32 = 4;
/// Entries kept per generation; two generations bound the cache at twice this.
const GENERATION: usize = 200_000;

/// A vocabulary and the per-message count cache.
pub struct TokenCounter {
    encoding: Encoding,
    cache: Memo<u32>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter").field("encoding", &self.encoding).finish_non_exhaustive()
    }
}

impl TokenCounter {
    /// The counter for `encoding`; `Auto` is resolved by the caller with [`Self::encoding_for`].
    pub fn new(encoding: Encoding) -> Self {
        Self { encoding, cache: Memo::new(GENERATION, usize::MAX) }
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
        self.cache.get_or(json, kind, || count(json), |_| 0)
    }
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
        assert_eq!(counter.cache.len(), 2);
        assert_eq!(counter.message(user), PER_MESSAGE + 2);
    }
}
