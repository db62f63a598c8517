//! Text that came from a guest, made safe to print on a terminal.

/// Escapes terminal control characters (ESC, BEL, backspace, C1 controls, ...) as `\u{..}`,
/// keeping newlines and tabs: a guest must not move the cursor, retitle the window or rewrite
/// what the user sees by printing to its console or naming a host.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn controls_are_escaped_lines_kept() {
        assert_eq!(super::escape_controls("a\x1b]0;pwned\x07b\n\tc\r"), "a\\u{1b}]0;pwned\\u{7}b\n\tc\\u{d}");
        assert_eq!(super::escape_controls("plain ünïcode"), "plain ünïcode");
    }
}
