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

/// A serial console's text for a terminal: its CR LF line ends as LF, then
/// [`escape_controls`].
pub fn escape_console(s: &str) -> String {
    escape_controls(&s.replace("\r\n", "\n"))
}

/// Opens a file that a sandbox's processes write (in its `run/` directory) for reading: no
/// symbolic link is followed, and a FIFO or device planted in its place is refused instead of
/// blocking or reading it.
pub fn open_untrusted(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not a file", path.display())));
    }
    Ok(f)
}

/// Creates `path` as a new file of the owner's only (0600), never through a symbolic link or
/// over an existing file (`O_EXCL|O_NOFOLLOW`): for files written beside untrusted ones.
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// The contents of such a file, at most `max` bytes (its start).
pub fn read_untrusted(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut b = Vec::new();
    open_untrusted(path)?.take(max).read_to_end(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn controls_are_escaped_lines_kept() {
        assert_eq!(super::escape_controls("a\x1b]0;pwned\x07b\n\tc\r"), "a\\u{1b}]0;pwned\\u{7}b\n\tc\\u{d}");
        assert_eq!(super::escape_controls("plain ünïcode"), "plain ünïcode");
    }
}
