//! The server-to-guest direction's last line of defence: every real value in a stream is
//! replaced by a mask of the same length (the secret's placeholder) before the guest sees it,
//! wherever TCP and TLS cut the stream, so a server that echoes a secret in any shape (a
//! header, a JSON error, a redirect) echoes the placeholder.
//!
//! Why masks of equal length: the replacement then changes no `Content-Length` and no chunk
//! size, so a response's framing stays what the server wrote.
//!
//! How a cut is handled: bytes at the end of what arrived that could begin a value (a suffix
//! that is a proper prefix of one) are held back until the next bytes decide. A stream that
//! pauses on such bytes (the end of a message, or a server that waits) is flushed with those
//! bytes *masked*, so a value split across a pause never reaches the guest either: at worst an
//! innocent tail that looks like the start of a secret arrives changed. What was emitted is
//! remembered (the last `longest - 1` raw bytes), so a value that began in flushed bytes is
//! still found and its rest masked.
//!
//! The search is one Aho-Corasick pass (overlapping matches, so no value hides inside
//! another) over each chunk as it is, plus a window of at most twice the longest value across
//! each boundary: no copy of the stream per pattern or per chunk beyond the output itself.

use aho_corasick::AhoCorasick;

/// A value and the mask that replaces it (same length).
#[derive(Clone)]
pub struct Mask {
    pub value: Vec<u8>,
    pub mask: Vec<u8>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a secret: never printed.
        write!(f, "Mask {{ <{} bytes> -> {:?} }}", self.value.len(), String::from_utf8_lossy(&self.mask))
    }
}

/// See the module documentation.
pub struct Scrubber {
    masks: Vec<Mask>,
    ac: Option<AhoCorasick>,
    /// The longest value's length.
    longest: usize,
    /// The last `longest - 1` raw bytes already emitted.
    ctx: Vec<u8>,
    /// Raw bytes not yet emitted (they could begin a value).
    held: Vec<u8>,
    /// Values replaced so far (for logs and tests).
    pub replaced: u64,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber").field("masks", &self.masks).field("held", &self.held.len()).finish_non_exhaustive()
    }
}

impl Scrubber {
    /// Masks whose value is empty, or whose mask has another length, are left out (the caller
    /// makes them equal; see `rules`).
    pub fn new(masks: Vec<Mask>) -> Scrubber {
        let masks: Vec<Mask> =
            masks.into_iter().filter(|m| !m.value.is_empty() && m.value.len() == m.mask.len()).collect();
        let longest = masks.iter().map(|m| m.value.len()).max().unwrap_or(0);
        // A DFA: a few values of tens of bytes make a small one, and it is the fastest to run
        // over every byte a server sends.
        let ac = if masks.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                .build(masks.iter().map(|m| &m.value))
                .ok()
        };
        Scrubber { masks, ac, longest, ctx: Vec::new(), held: Vec::new(), replaced: 0 }
    }

    /// Whether there is any value to mask (a plain connection's response framer has none).
    pub fn masks_anything(&self) -> bool {
        self.ac.is_some()
    }

    /// Whether bytes are held back (the caller flushes them when the stream pauses).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Scrubs `input` (the next bytes of the stream) into `out`; bytes that could begin a
    /// value are held back.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let Some(ac) = &self.ac else {
            out.extend_from_slice(input);
            return;
        };
        let joined;
        let new: &[u8] = if self.held.is_empty() {
            input
        } else {
            let mut j = std::mem::take(&mut self.held);
            j.extend_from_slice(input);
            joined = j;
            &joined
        };
        let start = out.len();
        out.extend_from_slice(new);
        let replaced = mask_matches(ac, &self.masks, &self.ctx, new, &mut out[start..]);
        self.replaced += replaced;
        // Hold back the longest suffix that could begin a value (it may have begun in what was
        // already emitted: then all of `new` is held).
        let hold = self.begun(&self.ctx, new).map_or(0, |(_, k)| k.min(new.len()));
        let emit = new.len() - hold;
        self.held = new[emit..].to_vec();
        out.truncate(start + emit);
        remember(&mut self.ctx, &new[..emit], self.longest);
    }

    /// Emits what is held back, masked: the stream paused (or a message ended) on bytes that
    /// could begin a value, and waiting longer would stall the guest.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let start = out.len();
        out.extend_from_slice(&held);
        if let Some(ac) = &self.ac {
            self.replaced += mask_matches(ac, &self.masks, &self.ctx, &held, &mut out[start..]);
        }
        // The held bytes end a prefix of some value (which may have begun in what was already
        // emitted): mask them as that part of the value.
        if let Some((m, k)) = self.begun(&self.ctx, &held) {
            let mask = &self.masks[m].mask;
            let n = k.min(held.len());
            out[start + held.len() - n..].copy_from_slice(&mask[k - n..k]);
        }
        remember(&mut self.ctx, &held, self.longest);
    }

    /// The value whose longest proper prefix `ctx + new` ends with: (mask index, that
    /// prefix's length).
    fn begun(&self, ctx: &[u8], new: &[u8]) -> Option<(usize, usize)> {
        let max = self.longest.saturating_sub(1);
        let joined;
        let tail: &[u8] = if new.len() >= max {
            &new[new.len() - max..]
        } else {
            let mut j = ctx[ctx.len().saturating_sub(max - new.len())..].to_vec();
            j.extend_from_slice(new);
            joined = j;
            &joined
        };
        (1..=tail.len()).rev().find_map(|k| {
            let suffix = &tail[tail.len() - k..];
            self.masks.iter().position(|m| k < m.value.len() && m.value.starts_with(suffix)).map(|i| (i, k))
        })
    }
}

/// Masks, in `out` (a copy of `new`), every byte of `new` inside a match in `ctx + new`;
/// returns how many matches ended in `new`.
fn mask_matches(ac: &AhoCorasick, masks: &[Mask], ctx: &[u8], new: &[u8], out: &mut [u8]) -> u64 {
    let mut n = 0;
    // Matches that begin in what was already emitted and end in `new`: a small window.
    if !ctx.is_empty() {
        let longest = masks.iter().map(|m| m.value.len()).max().unwrap_or(0);
        let mut window = ctx.to_vec();
        window.extend_from_slice(&new[..new.len().min(longest.saturating_sub(1))]);
        for m in ac.find_overlapping_iter(&window) {
            if m.start() < ctx.len() && m.end() > ctx.len() {
                let mask = &masks[m.pattern().as_usize()].mask;
                let in_new = m.end() - ctx.len();
                out[..in_new].copy_from_slice(&mask[ctx.len() - m.start()..]);
                n += 1;
            }
        }
    }
    for m in ac.find_overlapping_iter(new) {
        out[m.start()..m.end()].copy_from_slice(&masks[m.pattern().as_usize()].mask);
        n += 1;
    }
    n
}

/// Keeps the last `longest - 1` bytes of what was emitted.
fn remember(ctx: &mut Vec<u8>, emitted: &[u8], longest: usize) {
    let keep = longest.saturating_sub(1);
    ctx.extend_from_slice(emitted);
    if ctx.len() > keep {
        ctx.drain(..ctx.len() - keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &[u8] = b"sk-REAL-0123456789abcdef";
    const MASK: &[u8] = b"sk-smolvm-placeholder-ff";

    fn scrubber() -> Scrubber {
        Scrubber::new(vec![
            Mask { value: VALUE.to_vec(), mask: MASK.to_vec() },
            Mask { value: b"aab-second-value".to_vec(), mask: b"xxx-second-maskk".to_vec() },
        ])
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Feeds `parts`, flushing after each when `pause`; returns the output.
    fn run(parts: &[&[u8]], pause: bool) -> Vec<u8> {
        let mut s = scrubber();
        let mut out = Vec::new();
        for p in parts {
            s.feed(p, &mut out);
            if pause {
                s.flush(&mut out);
            }
        }
        s.flush(&mut out);
        out
    }

    #[test]
    fn a_value_is_masked_at_every_cut_and_the_length_is_kept() {
        let input =
            [b"HTTP/1.1 404\r\nX: ".as_slice(), VALUE, b"\r\n\r\n{\"e\":\"", VALUE, b"\"}aab-second-value"].concat();
        let want =
            [b"HTTP/1.1 404\r\nX: ".as_slice(), MASK, b"\r\n\r\n{\"e\":\"", MASK, b"\"}xxx-second-maskk"].concat();
        assert_eq!(run(&[&input], false), want);
        for cut in 1..input.len() {
            assert_eq!(run(&[&input[..cut], &input[cut..]], false), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes, false), want, "byte by byte");
    }

    #[test]
    fn a_value_split_across_pauses_never_arrives_whole_or_in_part_beyond_its_prefix() {
        let input = [b"abc ".as_slice(), VALUE, b" def"].concat();
        for cut in 1..input.len() {
            for cut2 in cut + 1..input.len() {
                let out = run(&[&input[..cut], &input[cut..cut2], &input[cut2..]], true);
                assert_eq!(out.len(), input.len(), "the length is kept");
                assert!(!contains(&out, &VALUE[2..]), "cuts {cut},{cut2}: {}", String::from_utf8_lossy(&out));
                // No run of the value's secret part longer than its shared prefix survives.
                for w in VALUE[3..].windows(4) {
                    assert!(!contains(&out, w), "cuts {cut},{cut2}: {}", String::from_utf8_lossy(&out));
                }
            }
        }
    }

    #[test]
    fn a_value_that_begins_inside_a_flushed_prefix_of_itself_is_found() {
        // "aa" paused (held: it begins "aab-..."), then "ab-second-value": the value starts at
        // the second 'a', inside what was flushed.
        let out = run(&[b"aa", b"ab-second-value!"], true);
        assert!(!contains(&out, b"second-value"), "{}", String::from_utf8_lossy(&out));
        assert_eq!(out.len(), 18);
    }

    #[test]
    fn innocent_text_passes_unchanged_and_nothing_is_held_at_a_line_end() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello sk-REAL but not all\n";
        let mut s = scrubber();
        let mut out = Vec::new();
        s.feed(text, &mut out);
        assert_eq!(out, text, "held: {}", s.held.len());
        assert!(!s.holding());
        // A tail that could begin the value is held until the next bytes decide.
        let mut out = Vec::new();
        s.feed(b"ends with sk-RE", &mut out);
        assert!(s.holding());
        assert_eq!(out, b"ends with ");
        s.feed(b"ST of it", &mut out);
        assert_eq!(out, b"ends with sk-REST of it");
    }

    #[test]
    fn the_value_is_never_in_debug_output() {
        assert!(!format!("{:?}", scrubber()).contains("REAL"));
    }
}
