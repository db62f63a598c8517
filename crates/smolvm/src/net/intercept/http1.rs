//! The guest-to-server direction of an intercepted HTTP/1.1 connection: request heads are
//! rewritten (each placeholder replaced by its secret), bodies pass untouched.
//!
//! The stream is a sequence of requests on one keep-alive connection, so the rewriter follows
//! HTTP/1.1's message framing (RFC 9112 §6): a head ends at the empty line; its body is
//! `Content-Length` bytes, or chunks when `Transfer-Encoding` ends in `chunked`, or nothing.
//! A request that asks to upgrade (WebSocket) is the last one rewritten: what follows is the
//! new protocol's, and passes as it is. A head larger than [`MAX_HEAD`], or one that cannot
//! be framed (bad or conflicting lengths), ends the connection: guessing its framing could
//! let a second request through unrewritten or, worse, rewrite a body.

/// The largest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// A replacement: every occurrence of `from` in a request head becomes `to`.
#[derive(Clone)]
pub struct Replace {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
}

impl std::fmt::Debug for Replace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a secret: never printed.
        write!(f, "Replace {{ from: {:?}, to: <{} bytes> }}", String::from_utf8_lossy(&self.from), self.to.len())
    }
}

/// Why the stream cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("a request head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("a request's Content-Length is not a number, or two of them differ")]
    BadLength,
    #[error("a chunk size line is malformed")]
    BadChunk,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// `n` more body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// `n` more bytes of chunk data, then its CRLF.
    ChunkData(u64),
    /// The CRLF after a chunk's data (bytes of it seen).
    ChunkEnd(u8),
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// Everything passes (after an upgrade).
    Raw,
    Failed(FramingError),
}

/// See the module documentation.
#[derive(Debug)]
pub struct Rewriter {
    replace: Vec<Replace>,
    state: State,
    /// A head, or a chunk-size or trailer line, being collected.
    line: Vec<u8>,
    /// Requests whose head was rewritten (for logs and tests).
    pub rewritten: u64,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(s: &[u8], r: &Replace) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = find(rest, &r.from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(&r.to);
        rest = &rest[i + r.from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// How the body of a request with this head is framed, and whether it upgrades.
fn framing(head: &[u8]) -> Result<(State, bool), FramingError> {
    let text = String::from_utf8_lossy(head);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut upgrade = false;
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                let n: u64 = value.parse().map_err(|_| FramingError::BadLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(FramingError::BadLength);
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            }
            "upgrade" => upgrade = true,
            _ => {}
        }
    }
    // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
    let body = if chunked {
        State::ChunkSize
    } else {
        match length {
            Some(0) | None => State::Head,
            Some(n) => State::Body(n),
        }
    };
    Ok((body, upgrade))
}

impl Rewriter {
    pub fn new(replace: Vec<Replace>) -> Rewriter {
        Rewriter { replace, state: State::Head, line: Vec::new(), rewritten: 0 }
    }

    /// Feeds bytes from the guest; returns what to send to the server.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<u8>, FramingError> {
        let mut out = Vec::with_capacity(input.len() + 64);
        while !input.is_empty() {
            match self.state.clone() {
                State::Failed(e) => return Err(e),
                State::Raw => {
                    out.extend_from_slice(input);
                    input = &[];
                }
                State::Body(n) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if n == take as u64 { State::Head } else { State::Body(n - take as u64) };
                }
                State::ChunkData(n) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if n == take as u64 { State::ChunkEnd(0) } else { State::ChunkData(n - take as u64) };
                }
                State::ChunkEnd(seen) => {
                    let want = b"\r\n"[seen as usize];
                    if input[0] != want {
                        return Err(self.fail(FramingError::BadChunk));
                    }
                    out.push(input[0]);
                    input = &input[1..];
                    self.state = if seen == 1 { State::ChunkSize } else { State::ChunkEnd(1) };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let end: &[u8] = if self.state == State::Head { b"\r\n\r\n" } else { b"\r\n" };
                    // Take bytes up to (and including) the end marker, if it is in sight.
                    let before = self.line.len();
                    self.line.extend_from_slice(input);
                    let from = before.saturating_sub(end.len() - 1);
                    let Some(at) = find(&self.line[from..], end).map(|i| from + i + end.len()) else {
                        input = &[];
                        if self.line.len() > MAX_HEAD {
                            return Err(self.fail(FramingError::HeadTooLarge));
                        }
                        continue;
                    };
                    if at > MAX_HEAD {
                        return Err(self.fail(FramingError::HeadTooLarge));
                    }
                    let consumed = at - before;
                    input = &input[consumed..];
                    let line: Vec<u8> = std::mem::take(&mut self.line)[..at].to_vec();
                    match self.state {
                        State::Head => {
                            let (body, upgrade) = framing(&line).map_err(|e| self.fail(e))?;
                            let mut head = line;
                            for r in &self.replace {
                                head = replace_all(&head, r);
                            }
                            self.rewritten += 1;
                            out.extend_from_slice(&head);
                            self.state = if upgrade { State::Raw } else { body };
                        }
                        State::ChunkSize => {
                            out.extend_from_slice(&line);
                            let text = String::from_utf8_lossy(&line[..line.len() - 2]);
                            let size = text.split(';').next().unwrap_or_default().trim();
                            let n = u64::from_str_radix(size, 16).map_err(|_| self.fail(FramingError::BadChunk))?;
                            self.state = if n == 0 { State::Trailers } else { State::ChunkData(n) };
                        }
                        _ => {
                            // A trailer line; the empty one ends the message.
                            let done = line == b"\r\n";
                            out.extend_from_slice(&line);
                            if done {
                                self.state = State::Head;
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn fail(&mut self, e: FramingError) -> FramingError {
        self.state = State::Failed(e.clone());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> Rewriter {
        Rewriter::new(vec![Replace { from: b"PLACEHOLDER".to_vec(), to: b"real-secret".to_vec() }])
    }

    /// The same input fed in every split: the output must not depend on how TCP cut it.
    fn all_splits(input: &[u8]) -> Vec<u8> {
        let whole = rw().feed(input).unwrap();
        for cut in 1..input.len() {
            let mut r = rw();
            let mut out = r.feed(&input[..cut]).unwrap();
            out.extend(r.feed(&input[cut..]).unwrap());
            assert_eq!(out, whole, "split at {cut}");
        }
        let mut r = rw();
        let bytewise: Vec<u8> = input.iter().flat_map(|b| r.feed(&[*b]).unwrap()).collect();
        assert_eq!(bytewise, whole, "byte by byte");
        whole
    }

    #[test]
    fn headers_are_rewritten_bodies_are_not_on_a_keep_alive_connection() {
        let input = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer PLACEHOLDER\r\nContent-Length: 11\r\n\r\nPLACEHOLDER\
GET /two HTTP/1.1\r\nx-api-key: PLACEHOLDER\r\n\r\n";
        let out = String::from_utf8(all_splits(input)).unwrap();
        assert_eq!(
            out,
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer real-secret\r\nContent-Length: 11\r\n\r\nPLACEHOLDER\
GET /two HTTP/1.1\r\nx-api-key: real-secret\r\n\r\n"
        );
    }

    #[test]
    fn chunked_bodies_are_framed_and_left_alone() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nAuthorization: PLACEHOLDER\r\n\r\n\
b\r\nPLACEHOLDER\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\nGET / HTTP/1.1\r\nA: PLACEHOLDER\r\n\r\n";
        let out = String::from_utf8(all_splits(input)).unwrap();
        assert!(out.contains("Authorization: real-secret"), "{out}");
        assert!(out.contains("b\r\nPLACEHOLDER\r\n"), "the body is untouched: {out}");
        assert!(out.ends_with("GET / HTTP/1.1\r\nA: real-secret\r\n\r\n"), "{out}");
    }

    #[test]
    fn after_an_upgrade_everything_passes() {
        let input = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nAuthorization: PLACEHOLDER\r\n\r\n\x81\x05PLACEHOLDER";
        let out = all_splits(input);
        assert!(out.starts_with(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nAuthorization: real-secret\r\n\r\n"));
        assert!(out.ends_with(b"\x81\x05PLACEHOLDER"));
    }

    #[test]
    fn unframeable_requests_end_the_connection() {
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(rw().feed(huge.as_bytes()), Err(FramingError::HeadTooLarge));
        let mut r = rw();
        let _ = r.feed(&vec![b'a'; MAX_HEAD + 1]);
        assert_eq!(r.feed(b"\r\n\r\n"), Err(FramingError::HeadTooLarge), "a failed stream stays failed");
        let two = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(rw().feed(two), Err(FramingError::BadLength));
        assert_eq!(rw().feed(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Err(FramingError::BadLength));
        let bad_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(rw().feed(bad_chunk), Err(FramingError::BadChunk));
    }

    #[test]
    fn the_secret_is_never_in_debug_output() {
        let r = rw();
        assert!(!format!("{r:?}").contains("real-secret"), "{r:?}");
    }
}
