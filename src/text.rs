//! Text that reaches a terminal: user and file text (prompts, paths, PNG metadata) may hold
//! control characters, which a terminal would obey (an ESC sequence can set the window title,
//! clear the screen or fake earlier output). Front ends pass such text through
//! [`escape_control`] before they echo it.

use std::borrow::Cow;

/// Whether `c` would act on a terminal instead of showing: the C0 controls (tab, newline and
/// ESC among them), DEL, the C1 controls, and the bidirectional overrides and isolates that
/// reorder what follows them on the line.
pub fn is_terminal_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every [`is_terminal_control`] character written as an escape a reader can
/// type back: `\n`, `\r`, `\t`, `\x1b` below U+0100, `\u{202e}` above. Other text, a
/// backslash included, is unchanged (borrowed when nothing needed escaping).
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_terminal_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_terminal_control(c) && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if is_terminal_control(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped() {
        assert!(matches!(escape_control("a fox, ☕ \\n"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "\\x1b]0;pwned\\x07\\x1b[2J"
        );
        assert_eq!(escape_control("a\nb\tc\rd\u{7f}"), "a\\nb\\tc\\rd\\x7f");
        assert_eq!(escape_control("x\u{9b}y\u{202e}z"), "x\\x9by\\u{202e}z");
    }
}
