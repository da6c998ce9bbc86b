//! o200k's pre-tokeniser, by hand on ASCII text. `bpe-openai` splits with a `regex-automata`
//! search per piece (and a regex cache taken from a shared pool each time, contended when every
//! core counts); on the ASCII that agent transcripts are mostly made of, the same split by hand
//! is several times cheaper. Wherever a decision would look at a non-ASCII character the piece
//! is left to the library's own pre-tokeniser, so the pieces are the library's, exactly
//! (differential tests against it and tiktoken below).
//!
//! The pattern (leftmost-first, anchored at each piece's start):
//! 1. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 2. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 3. `\p{N}{1,3}`
//! 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
//! 5. `\s*[\r\n]+`
//! 6. `\s+$`, then `\s+(?!\S)`, then `\s+`

use bpe_openai::Tokenizer;

/// The tokens of `text` in o200k (`tokenizer` must be `bpe_openai::o200k_base()`).
pub(super) fn count(tokenizer: &Tokenizer, text: &str) -> usize {
    Pieces { tokenizer, text, at: 0 }
        // Every byte is a token of its own: a one-byte piece needs no encoder.
        .map(|piece| if piece.len() == 1 { 1 } else { tokenizer.bpe.count(piece.as_bytes()) })
        .sum()
}

/// The pieces o200k's pre-tokeniser cuts `text` into.
struct Pieces<'a> {
    tokenizer: &'a Tokenizer,
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = &self.text[self.at..];
        if rest.is_empty() {
            return None;
        }
        let len = match ascii_piece(rest.as_bytes()) {
            Some(len) => len,
            // The library's split from here: no pattern looks behind, and `$` is the text's end
            // either way, so its first piece is the one at this position. (Its patterns cover
            // every character and never match empty; the rest as one piece guards the loop.)
            None => self.tokenizer.split(rest).next().map(str::len).filter(|&n| n > 0).unwrap_or(rest.len()),
        };
        self.at += len;
        Some(&rest[..len])
    }
}

/// What a byte is to the pattern. Anything at or above 0x80 is `NonAscii`: a decision that
/// looks at one is not taken here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Upper,
    Lower,
    Digit,
    /// `\r` or `\n`.
    Newline,
    /// The other ASCII white space: space, tab, vertical tab, form feed.
    Space,
    /// ASCII that is not a letter, digit or white space.
    Other,
    NonAscii,
}

fn class(byte: u8) -> Class {
    match byte {
        b'A'..=b'Z' => Class::Upper,
        b'a'..=b'z' => Class::Lower,
        b'0'..=b'9' => Class::Digit,
        b'\r' | b'\n' => Class::Newline,
        b' ' | b'\t' | 0x0b | 0x0c => Class::Space,
        0x80..=0xff => Class::NonAscii,
        _ => Class::Other,
    }
}

/// The length of the piece at the start of `text`, or `None` where it depends on non-ASCII.
fn ascii_piece(text: &[u8]) -> Option<usize> {
    let at = |i: usize| text.get(i).copied().map(class);
    let run = |from: usize, want: Class| text[from..].iter().take_while(|&&b| class(b) == want).count();
    let first = at(0)?;
    // 1 and 2: a word, after at most one character that is not a line end, letter or digit.
    let start = match first {
        Class::Upper | Class::Lower => Some(0),
        Class::Space | Class::Other => Some(1),
        _ => None,
    };
    if let Some(start) = start {
        if let Some(end) = word(text, start)? {
            return contraction(text, end);
        }
    }
    match first {
        // 3: up to three digits.
        Class::Digit => {
            let digits = run(0, Class::Digit);
            if digits < 3 && at(digits) == Some(Class::NonAscii) {
                return None;
            }
            Some(digits.min(3))
        }
        // 4: punctuation, after at most one space, with the line ends and slashes after it.
        Class::Other => punctuation(text, 0),
        Class::Space if text[0] == b' ' && at(1) == Some(Class::Other) => punctuation(text, 1),
        // 5 and 6: white space.
        Class::Space | Class::Newline => {
            let len = text.iter().take_while(|&&b| matches!(class(b), Class::Space | Class::Newline)).count();
            if at(len) == Some(Class::NonAscii) {
                return None;
            }
            if let Some(last) = text[..len].iter().rposition(|&b| class(b) == Class::Newline) {
                return Some(last + 1);
            }
            Some(if len == text.len() || len == 1 { len } else { len - 1 })
        }
        Class::Upper | Class::Lower | Class::NonAscii => None,
    }
}

/// Patterns 1 and 2 from `start`: `Ok(Some(end))` for a word, `Ok(None)` for none, `None` when
/// a non-ASCII character decides.
fn word(text: &[u8], start: usize) -> Option<Option<usize>> {
    let class_at = |i: usize| text.get(i).copied().map(class);
    if class_at(start) == Some(Class::NonAscii) {
        return None;
    }
    let upper = text[start..].iter().take_while(|&&b| class(b) == Class::Upper).count();
    let lower = text[start + upper..].iter().take_while(|&&b| class(b) == Class::Lower).count();
    let end = start + upper + lower;
    if (upper > 0 || lower > 0) && class_at(end) == Some(Class::NonAscii) {
        // A letter or mark beyond ASCII would extend the word.
        return None;
    }
    // Upper-case letters then lower-case ones (1), or upper-case ones alone (2).
    Some((lower > 0 || upper > 0).then_some(end))
}

/// `end` extended by a contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`, any case).
fn contraction(text: &[u8], end: usize) -> Option<usize> {
    if text.get(end) != Some(&b'\'') {
        return Some(end);
    }
    let lower = |i: usize| text.get(end + i).map(u8::to_ascii_lowercase);
    // `(?i)s` also matches U+017F, a long s.
    if lower(1).is_some_and(|b| b >= 0x80) {
        return None;
    }
    let extra = match (lower(1), lower(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => 2,
        (Some(b'r'), Some(b'e')) | (Some(b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => 3,
        _ => 0,
    };
    Some(end + extra)
}

/// Pattern 4 from `start` (after the optional space): punctuation, then line ends and slashes.
fn punctuation(text: &[u8], start: usize) -> Option<usize> {
    let other = text[start..].iter().take_while(|&&b| class(b) == Class::Other).count();
    let end = start + other;
    if text.get(end).is_some_and(|&b| b >= 0x80) {
        return None;
    }
    let tail = text[end..].iter().take_while(|&&b| matches!(b, b'\r' | b'\n' | b'/')).count();
    Some(end + tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(text: &str) -> Vec<&str> {
        bpe_openai::o200k_base().split(text).collect()
    }

    fn ours(text: &str) -> Vec<&str> {
        Pieces { tokenizer: bpe_openai::o200k_base(), text, at: 0 }.collect()
    }

    #[test]
    fn pieces_are_the_librarys_on_chosen_texts() {
        for text in [
            "hello world",
            "It's the user's job; they'll see what we've done, I'd say. DON'T SHOUT 'S 'Re 'lL",
            "HTTPServer XMLHttpRequest camelCase snake_case SCREAMING_CASE x",
            "foo.bar foo.\n\nbar ./path/to/file.rs:120:5 https://example.test/a?b=c&d=e#f //",
            "   leading\n\n\n   and blank lines   \n\t\ttabs\r\nwindows\r\n  \n  x\n",
            "1234567890 3.14159 -42 1e10 0x1F",
            "trailing spaces     ",
            "\u{1b}[32mINFO\u{1b}[0m started",
            "\u{b}\u{c}vt and ff\u{c}\u{b}",
            "'s at the start, ' alone, '' twice, it'",
            "naïve café ſ 's 'ſ Ünïcödé",
            "non\u{a0}breaking\u{85}next line",
            "e\u{301}combining ab\u{301}",
            "١٢٣ digits 12١ 1١",
            "中文 emoji 🎉 !🎉 a🎉",
            "",
            " ",
            "\n",
            "x",
        ] {
            assert_eq!(ours(text), library(text), "{text:?}");
        }
    }

    #[test]
    fn pieces_are_the_librarys_on_random_texts() {
        const ALPHABET: &[&str] = &[
            "a", "b", "s", "t", "e", "r", "l", "d", "m", "v", "A", "B", "S", "T", "R", "E", "L", "D", "0",
            "7", "'", "\"", ".", ",", "/", "-", "_", "(", "{", "\u{1b}", "\u{7f}", "\u{0}", " ", " ", " ",
            "\t", "\n", "\r", "\u{b}", "\u{c}", "é", "ſ", "\u{a0}", "\u{85}", "中", "١", "\u{301}", "🎉",
            "Ü",
        ];
        let mut rng = fastrand::Rng::with_seed(13);
        for round in 0..20_000 {
            let len = rng.usize(0..24);
            // Mostly ASCII, as transcripts are; some rounds without any non-ASCII at all.
            let ascii_only = round % 2 == 0;
            let text: String = (0..len)
                .map(|_| {
                    let pool = if ascii_only { &ALPHABET[..40] } else { ALPHABET };
                    pool[rng.usize(0..pool.len())]
                })
                .collect();
            assert_eq!(ours(&text), library(&text), "{text:?}");
        }
    }

    #[test]
    fn counts_are_tiktokens() {
        let reference = tiktoken_rs::o200k_base_singleton();
        let mut rng = fastrand::Rng::with_seed(7);
        let words =
            ["fn", "main", "Result", "HTTP", "it's", "0x1F", "  ", "\n", "\r\n", "::", "{", "é", "12345"];
        for _ in 0..2_000 {
            let text: String = (0..rng.usize(1..60)).map(|_| words[rng.usize(0..words.len())]).collect();
            let want = reference.encode_ordinary(&text).len();
            assert_eq!(count(bpe_openai::o200k_base(), &text), want, "{text:?}");
        }
    }
}
