//! Text transforms the rules apply to message content. Each returns `None` when it changes
//! nothing, so untouched messages keep their bytes.

/// Trailing blanks, runs of blanks inside a line, and runs of blank lines (kept to one),
/// outside fenced code blocks, whose layout is meaning.
pub(super) fn whitespace(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut in_fence = false;
    let mut blank_run = 0;
    for (i, line) in text.split('\n').enumerate() {
        let fence = line.trim_start().starts_with("```");
        if in_fence || fence {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(line);
            blank_run = 0;
            if fence {
                in_fence = !in_fence;
            }
            continue;
        }
        let trimmed = line.trim_end_matches([' ', '\t', '\r']);
        if trimmed.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        if i > 0 {
            out.push('\n');
        }
        let body = trimmed.trim_start_matches([' ', '\t']);
        out.push_str(&trimmed[..trimmed.len() - body.len()]);
        let mut last_blank = false;
        for c in body.chars() {
            let blank = c == ' ' || c == '\t';
            if !(blank && last_blank) {
                out.push(if blank { ' ' } else { c });
            }
            last_blank = blank;
        }
    }
    (out != text).then_some(out)
}

/// Whether [`whitespace`] may change `text`: a cheap scan that skips the rewrite of the many
/// texts it would leave alone.
pub(super) fn may_need_whitespace(text: &str) -> bool {
    let bytes = text.as_bytes();
    let finder = |needle: &[u8]| memchr::memmem::find(bytes, needle).is_some();
    finder(b"  ")
        || finder(b"\t")
        || finder(b" \n")
        || finder(b"\n\n\n")
        || finder(b"\r")
        || bytes.last() == Some(&b' ')
}

/// ANSI escape sequences: CSI (`ESC [ … final`), OSC (`ESC ] … BEL|ESC \`) and two-byte escapes.
pub(super) fn ansi(text: &str) -> Option<String> {
    if !text.contains('\u{1b}') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // Character-set designation: ESC ( B and friends take one more byte.
            Some('(' | ')' | '*' | '+') => {
                chars.next();
            }
            _ => {}
        }
    }
    Some(out)
}

/// Runs of base64 (or hex) of at least `min` bytes, each replaced by `marker(its length)`.
pub(super) fn blobs(text: &str, min: usize, marker: impl Fn(usize) -> String) -> Option<String> {
    let bytes = text.as_bytes();
    let is_blob_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_');
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_blob_byte(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_blob_byte(bytes[i]) {
            i += 1;
        }
        let run = &bytes[start..i];
        // Long identifiers and words are not blobs: a blob mixes digits with letters of both cases
        // (base64) or is all hex.
        let digits = run.iter().filter(|b| b.is_ascii_digit()).count();
        let looks_encoded = digits * 20 > run.len()
            && (run.iter().any(u8::is_ascii_uppercase) && run.iter().any(u8::is_ascii_lowercase)
                || run.iter().all(u8::is_ascii_hexdigit));
        if run.len() >= min && looks_encoded {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len() / 2));
            out.push_str(&text[copied..start]);
            out.push_str(&marker(run.len()));
            copied = i;
        }
    }
    out.map(|mut out| {
        out.push_str(&text[copied..]);
        out
    })
}

/// Keeps the head (about two thirds of `max_bytes`) and tail of a long text, on line
/// boundaries where there are lines, with `marker(bytes, lines)` on its own line for what was
/// omitted.
pub(super) fn head_and_tail(
    text: &str,
    max_bytes: usize,
    marker: impl Fn(usize, usize) -> String,
) -> Option<String> {
    if text.len() <= max_bytes {
        return None;
    }
    let head_end = floor_boundary(text, max_bytes * 2 / 3);
    let head_end = text[..head_end].rfind('\n').filter(|&n| n > head_end / 2).map_or(head_end, |n| n + 1);
    let tail_start = ceil_boundary(text, text.len() - max_bytes / 3);
    let tail_start = text[tail_start..]
        .find('\n')
        .filter(|&n| n < (text.len() - tail_start) / 2)
        .map_or(tail_start, |n| tail_start + n + 1);
    if tail_start <= head_end {
        return None;
    }
    let omitted = &text[head_end..tail_start];
    let lines = omitted.matches('\n').count();
    let mut out = String::with_capacity(max_bytes + 96);
    out.push_str(&text[..head_end]);
    out.push_str(&marker(omitted.len(), lines));
    out.push('\n');
    out.push_str(&text[tail_start..]);
    Some(out)
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_collapses_outside_code_fences() {
        let text = "a   b  \n\n\n\nc\t\td\n```\nx    y\n\n\n```\n  indented   z";
        assert_eq!(whitespace(text).unwrap(), "a b\n\nc d\n```\nx    y\n\n\n```\n  indented z");
        assert_eq!(whitespace("tidy\n\nalready"), None);
    }

    #[test]
    fn ansi_sequences_are_removed() {
        let text = "\u{1b}[1;31merror\u{1b}[0m: \u{1b}]0;title\u{7}done\u{1b}(B";
        assert_eq!(ansi(text).unwrap(), "error: done");
        assert_eq!(ansi("plain"), None);
    }

    #[test]
    fn blobs_are_elided_but_words_are_not() {
        let blob =
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg"
                .repeat(4);
        let text = format!("image: data:image/png;base64,{blob} end");
        let mark = |n: usize| format!("[ctxgate: elided a {n}-byte encoded blob]");
        let out = blobs(&text, 256, mark).unwrap();
        assert_eq!(
            out,
            format!("image: data:image/png;base64,[ctxgate: elided a {}-byte encoded blob] end", blob.len())
        );
        let hex = "deadbeef0123456789".repeat(20);
        assert!(blobs(&hex, 256, mark).is_some());
        let identifier = "a_very_long_identifier_".repeat(20);
        assert_eq!(blobs(&identifier, 256, mark), None);
    }

    #[test]
    fn head_and_tail_keep_both_ends_and_say_what_was_cut() {
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let mark = |bytes: usize, lines: usize| format!("[ctxgate: omitted {bytes} bytes ({lines} lines)]");
        let out = head_and_tail(&text, 600, mark).unwrap();
        assert!(out.starts_with("line 0\n"));
        assert!(out.ends_with("line 999\n"));
        assert!(out.len() < 800, "{}", out.len());
        let marker = out.lines().find(|l| l.starts_with("[ctxgate: omitted")).unwrap();
        let omitted: usize = marker.split(' ').nth(2).unwrap().parse().unwrap();
        assert_eq!(out.len() - marker.len() - 1 + omitted, text.len());
        assert_eq!(head_and_tail("short", 600, mark), None);
        let wide = "é".repeat(1000);
        assert!(head_and_tail(&wide, 301, mark).is_some());
    }
}
