//! Token counting, cached per message so a long session is not re-tokenised on every turn: a
//! turn pays only for the messages it adds. Two kinds of vocabulary: tiktoken's (OpenAI's
//! models) and a model's own Hugging Face `tokenizer.json` (through the `tokenizers` crate),
//! for a local model whose count of the same text is 10-20% higher than tiktoken's.

use std::path::Path;

use serde::Deserialize;

use crate::memo::Memo;
use crate::openai::message::Info;

mod o200k;

/// The tokenizer a model's tokens are counted with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Chosen from the model name: o200k for current OpenAI models, cl100k for older ones,
    /// `default_encoding` for everything else.
    #[default]
    Auto,
    O200kBase,
    Cl100kBase,
}

/// Tokens OpenAI's chat format adds around each message (role and separators).
const PER_MESSAGE: u32 = 4;
/// Below this many bytes of messages, counting on other threads costs more than it saves.
pub(crate) const PARALLEL_BYTES: usize = 64 * 1024;
/// A text over twice this long is counted in pieces of about this size on every core: one large
/// tool output would otherwise keep a first-seen conversation's count on a single thread.
const PIECE_BYTES: usize = 16 * 1024;
/// Entries kept per generation; two generations bound the cache at twice this.
const GENERATION: usize = 200_000;

/// A vocabulary and the per-message count cache.
pub struct TokenCounter {
    vocabulary: Vocabulary,
    cache: Memo<u32>,
}

enum Vocabulary {
    Tiktoken(Encoding),
    Model(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vocabulary = match &self.vocabulary {
            Vocabulary::Tiktoken(encoding) => format!("{encoding:?}"),
            Vocabulary::Model(_) => "tokenizer.json".into(),
        };
        f.debug_struct("TokenCounter").field("vocabulary", &vocabulary).finish_non_exhaustive()
    }
}

impl TokenCounter {
    /// The counter for `encoding`; `Auto` is resolved by the caller with [`Self::encoding_for`].
    pub fn new(encoding: Encoding) -> Self {
        Self { vocabulary: Vocabulary::Tiktoken(encoding), cache: Memo::new(GENERATION, usize::MAX) }
    }

    /// A counter with a model's own tokenizer (a Hugging Face `tokenizer.json`).
    pub fn from_tokenizer_file(path: &Path) -> Result<Self, String> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        Ok(Self {
            vocabulary: Vocabulary::Model(Box::new(tokenizer)),
            cache: Memo::new(GENERATION, usize::MAX),
        })
    }

    /// The tokenizer, built on first use: its tables take tens of MB, which a gateway with
    /// compression off and no token limits never needs. `bpe-openai` counts exactly as tiktoken
    /// does (same vocabularies, same pre-tokenisation), several times faster on long texts,
    /// which is what a first-seen long conversation costs.
    fn bpe(encoding: Encoding) -> &'static bpe_openai::Tokenizer {
        match encoding {
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
            Encoding::O200kBase | Encoding::Auto => bpe_openai::o200k_base(),
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
        match &self.vocabulary {
            Vocabulary::Tiktoken(encoding) => {
                if text.len() < 2 * PIECE_BYTES {
                    return tiktoken_count(*encoding, text) as u32;
                }
                use rayon::prelude::*;
                pieces(text, PIECE_BYTES)
                    .par_iter()
                    .map(|piece| tiktoken_count(*encoding, piece))
                    .sum::<usize>() as u32
            }
            // A text the tokenizer refuses is counted at a byte per token: never under.
            Vocabulary::Model(tokenizer) => {
                tokenizer.encode_fast(text, false).map_or(text.len(), |e| e.len()) as u32
            }
        }
    }

    /// Tokens of one message (its JSON as sent), cached by its bytes.
    pub fn message(&self, json: &str) -> u32 {
        self.cached(json, 0, |json| PER_MESSAGE + self.text(&crate::openai::message::countable_text(json)))
    }

    /// [`Self::message`] of a message already parsed into `info` (not parsed again on a miss).
    pub fn message_of(&self, json: &str, info: &Info) -> u32 {
        self.cached(json, 0, |_| PER_MESSAGE + self.text(&crate::openai::message::countable(info)))
    }

    /// [`Self::messages`] of messages already parsed into `infos`.
    pub fn messages_of(&self, messages: &[Box<serde_json::value::RawValue>], infos: &[Info]) -> Vec<u32> {
        let bytes: usize = messages.iter().map(|m| m.get().len()).sum();
        if bytes < PARALLEL_BYTES || messages.len() < 2 {
            return messages.iter().zip(infos).map(|(m, info)| self.message_of(m.get(), info)).collect();
        }
        use rayon::prelude::*;
        messages.par_iter().zip(infos).map(|(m, info)| self.message_of(m.get(), info)).collect()
    }

    /// Tokens of each message ([`Self::message`]). A long conversation is counted on every
    /// core: tokenising is most of what its first request costs, and messages count
    /// independently. Short ones (and ones already cached, cheap either way) stay on this thread.
    pub fn messages(&self, messages: &[Box<serde_json::value::RawValue>]) -> Vec<u32> {
        let bytes: usize = messages.iter().map(|m| m.get().len()).sum();
        if bytes < PARALLEL_BYTES || messages.len() < 2 {
            return messages.iter().map(|m| self.message(m.get())).collect();
        }
        use rayon::prelude::*;
        messages.par_iter().map(|m| self.message(m.get())).collect()
    }

    /// Tokens of a JSON document counted as text (the `tools` array), cached by its bytes.
    pub fn json(&self, json: &str) -> u32 {
        self.cached(json, 1, |json| self.text(json))
    }

    fn cached(&self, json: &str, kind: u64, count: impl FnOnce(&str) -> u32) -> u32 {
        self.cache.get_or(json, kind, || count(json), |_| 0)
    }
}

/// Tokens of `text` in a tiktoken vocabulary; o200k pre-tokenises ASCII by hand ([`o200k`]).
fn tiktoken_count(encoding: Encoding, text: &str) -> usize {
    let bpe = TokenCounter::bpe(encoding);
    match encoding {
        Encoding::O200kBase | Encoding::Auto => o200k::count(bpe, text),
        Encoding::Cl100kBase => bpe.count(text),
    }
}

/// `text` cut into pieces of at least `size` bytes (the last may be shorter) where a line starts
/// with an ASCII letter or digit. Tiktoken's pre-tokenisers (o200k and cl100k) never put a newline
/// and a following letter or digit in one piece, and none of their patterns looks behind, so the
/// pieces' counts add up to the text's count exactly.
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(text.len() / size + 1);
    let mut start = 0;
    while text.len() - start >= 2 * size {
        let from = start + size;
        let Some(at) = bytes[from..].windows(2).position(|w| w[0] == b'\n' && w[1].is_ascii_alphanumeric())
        else {
            break;
        };
        let cut = from + at + 1;
        out.push(&text[start..cut]);
        start = cut;
    }
    out.push(&text[start..]);
    out
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
    fn counts_match_tiktoken_on_every_kind_of_text() {
        let blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkw".repeat(20);
        let (spaces, newlines) = (" ".repeat(100), "\n".repeat(50));
        let texts = [
            "hello world",
            "It's the user's job; they'll see what we've done, I'd say. DON'T SHOUT",
            "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
            r#"{"role":"tool","content":"{\"ok\":true,\"items\":[1,2,3]}","tool_call_id":"call_9"}"#,
            "1234567890 3.14159 -42 1e10 0x1F 2026-12-06T04:21:48Z",
            "   leading spaces\n\n\n   and blank lines   \n\t\ttabs\r\nwindows\r\n",
            "trailing spaces at the end     ",
            "\u{1b}[32mINFO\u{1b}[0m auth.thunder: started in 12ms",
            "中文文本，日本語のテキスト、한국어 텍스트",
            "emoji 🎉🚀 and ZWJ 👩‍💻 and flags 🇩🇪",
            "Ünïcödé àccents, Ελληνικά, русский, العربية, עברית",
            "HTTPServer XMLHttpRequest camelCaseWords snake_case_words SCREAMING_CASE",
            "path/to/file.rs:120:5 https://example.test/a?b=c&d=e#f",
            &blob,
            &spaces,
            &newlines,
        ];
        for (encoding, reference) in [
            (Encoding::O200kBase, tiktoken_rs::o200k_base_singleton()),
            (Encoding::Cl100kBase, tiktoken_rs::cl100k_base_singleton()),
        ] {
            let counter = TokenCounter::new(encoding);
            for text in texts {
                let want = reference.encode_ordinary(text).len() as u32;
                assert_eq!(counter.text(text), want, "{encoding:?}: {text:?}");
            }
            let all = texts.concat();
            assert_eq!(counter.text(&all), reference.encode_ordinary(&all).len() as u32, "{encoding:?}: all");
        }
    }

    /// Lines of every kind joined by every kind of line end, so that cuts fall after code,
    /// punctuation, spaces, CRLF and blank lines, before letters, digits and paths.
    fn mixed_text(bytes: usize) -> String {
        let lines = [
            "fn main() {",
            "    let x = vec![1, 2, 3];",
            "}",
            "2026-12-06T04:21:48Z INFO started",
            "\u{1b}[32mok\u{1b}[0m test tokens::counts ... ok",
            "It's the user's job; they'll see.",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "12345678 bytes",
            "中文文本，日本語のテキスト",
            "emoji 🎉🚀 👩‍💻",
            "HTTPServer XMLHttpRequest",
            "s the end",
            "'s quoted",
            "-- dashes --",
            "\t\ttabbed",
            "   indented   ",
            "Ünïcödé àccents",
        ];
        let ends = ["\n", "\n\n", " \n", "\r\n", ";\n", ":\n/", "\n  ", "\n\t", ".\n"];
        let (mut text, mut i, mut j) = (String::new(), 0usize, 0usize);
        while text.len() < bytes {
            text.push_str(lines[i % lines.len()]);
            text.push_str(ends[j % ends.len()]);
            i = (i * 7 + 3) % 9973;
            j = (j * 5 + 1) % 9967;
        }
        text
    }

    #[test]
    fn a_long_text_counted_in_pieces_counts_as_a_whole() {
        let text = mixed_text(8 * PIECE_BYTES);
        assert!(pieces(&text, PIECE_BYTES).len() >= 3, "the text must be counted in pieces");
        assert_eq!(pieces(&text, 64).concat(), text);
        for (encoding, reference) in [
            (Encoding::O200kBase, tiktoken_rs::o200k_base_singleton()),
            (Encoding::Cl100kBase, tiktoken_rs::cl100k_base_singleton()),
        ] {
            let want = reference.encode_ordinary(&text).len();
            assert_eq!(TokenCounter::new(encoding).text(&text) as usize, want, "{encoding:?}");
            // Small pieces put a cut after almost every line end the text has.
            let small = pieces(&text, 64);
            assert!(small.len() > 500, "{} pieces", small.len());
            assert_eq!(
                small.iter().map(|p| tiktoken_count(encoding, p)).sum::<usize>(),
                want,
                "{encoding:?}, small pieces"
            );
        }
    }

    #[test]
    fn a_long_conversation_counted_at_once_counts_each_message_as_alone() {
        let raw = |v: serde_json::Value| serde_json::value::to_raw_value(&v).unwrap();
        let messages: Vec<_> = (0..300)
            .map(|i| match i % 3 {
                0 => raw(serde_json::json!({"role": "user", "content": format!("question {i}: ").repeat(40)})),
                1 => raw(serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": format!("c{i}"), "type": "function", "function": {"name": "read", "arguments": format!("{{\"n\":{i}}}")}}]})),
                _ => raw(serde_json::json!({"role": "tool", "tool_call_id": format!("c{i}"), "content": format!("line {i}\n").repeat(60)})),
            })
            .collect();
        assert!(messages.iter().map(|m| m.get().len()).sum::<usize>() > PARALLEL_BYTES);
        let together = TokenCounter::new(Encoding::O200kBase).messages(&messages);
        let alone = TokenCounter::new(Encoding::O200kBase);
        let each: Vec<u32> = messages.iter().map(|m| alone.message(m.get())).collect();
        assert_eq!(together, each);
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

    #[test]
    fn a_models_own_tokenizer_counts_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, CHARACTERS).unwrap();
        let counter = TokenCounter::from_tokenizer_file(&path).unwrap();
        assert_eq!(counter.text("hello world"), 11, "one token per character");
        assert!(TokenCounter::from_tokenizer_file(&dir.path().join("missing.json")).is_err());
    }

    /// A tokenizer that makes every character a token.
    pub(crate) const CHARACTERS: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Split","pattern":{"Regex":"."},"behavior":"Isolated","invert":false},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#;
}
