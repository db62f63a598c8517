//! The server-to-guest direction of an intercepted HTTP/1.1 connection: responses are framed
//! (RFC 9112 §6.3) so that their bodies can be scrubbed as the payload the guest will read,
//! and every real value is masked (`scrub.rs`) in heads and payloads alike.
//!
//! - A chunked body is de-chunked, scrubbed, and sent as chunks of our own: a value the server
//!   splits across two chunks would otherwise reach the guest whole once it joins them.
//! - A `Content-Encoding` other than `identity` (or a transfer coding other than `chunked`) is
//!   refused with a 502 before any of that response reaches the guest: a compressed value
//!   cannot be found. The request side asks for `identity`, so a server that honours
//!   `Accept-Encoding` never sends one.
//! - After `101 Switching Protocols` the stream is scrubbed as bytes (a WebSocket's frames
//!   are not joined; its compression was not offered).
//!
//! The server is the real host, verified by its certificate: framing errors it makes end the
//! connection rather than guessing.

use std::collections::VecDeque;

use super::request::{Refusal, Sent};
use super::scrub::{Mask, Scrubber};

const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// The body runs until the server closes.
    UntilClose,
    /// Switched protocols.
    Raw,
}

/// What a fed response did besides producing bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// The answer to an upgrade request arrived: whether it switched protocols.
    pub upgrade_answered: Option<bool>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct ResponseScrub {
    scrub: Scrubber,
    state: State,
    line: Vec<u8>,
    /// Responses finished (for tests).
    pub responses: u64,
}

impl ResponseScrub {
    pub fn new(masks: Vec<Mask>) -> ResponseScrub {
        ResponseScrub { scrub: Scrubber::new(masks), state: State::Head, line: Vec::new(), responses: 0 }
    }

    /// Values masked so far.
    pub fn replaced(&self) -> u64 {
        self.scrub.replaced
    }

    /// Whether scrubbed bytes are held back, waiting for the next ones.
    pub fn holding(&self) -> bool {
        self.scrub.holding()
    }

    /// The server paused: what is held back goes out (masked where it could begin a value).
    pub fn pause(&mut self, out: &mut Vec<u8>) {
        self.emit_flush(out);
    }

    /// The server closed its side: a body that runs until then ends.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        self.emit_flush(out);
    }

    /// Feeds bytes from the server; appends what goes to the guest to `out`. `sent` holds the
    /// requests whose responses have not begun, oldest first. With nothing to mask (a plain
    /// connection that is only checked) the bytes pass exactly as they came, framed only to
    /// see each response's status.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, sent: &mut VecDeque<Sent>) -> Result<Events, Refusal> {
        if self.scrub.masks_anything() {
            return self.frame(input, out, sent);
        }
        out.extend_from_slice(input);
        self.frame(input, &mut Vec::new(), sent)
    }

    fn frame(&mut self, mut input: &[u8], out: &mut Vec<u8>, sent: &mut VecDeque<Sent>) -> Result<Events, Refusal> {
        let mut ev = Events::default();
        while !input.is_empty() {
            match self.state.clone() {
                State::Raw | State::UntilClose => {
                    self.scrub.feed(input, out);
                    input = &[];
                }
                State::Body(n) => {
                    let take = n.min(input.len() as u64) as usize;
                    self.scrub.feed(&input[..take], out);
                    input = &input[take..];
                    if n == take as u64 {
                        self.emit_flush(out);
                        self.done();
                    } else {
                        self.state = State::Body(n - take as u64);
                    }
                }
                State::ChunkData(n) => {
                    let take = n.min(input.len() as u64) as usize;
                    self.chunk_payload(&input[..take], out);
                    input = &input[take..];
                    self.state = if n == take as u64 { State::ChunkEnd(0) } else { State::ChunkData(n - take as u64) };
                }
                State::ChunkEnd(seen) => {
                    if input[0] != b"\r\n"[seen as usize] {
                        return Err(bad("a chunk that does not end in CRLF"));
                    }
                    input = &input[1..];
                    self.state = if seen == 0 { State::ChunkEnd(1) } else { State::ChunkSize };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let end: &[u8] = if self.state == State::Head { b"\r\n\r\n" } else { b"\r\n" };
                    let before = self.line.len();
                    self.line.extend_from_slice(input);
                    let from = before.saturating_sub(end.len() - 1);
                    let Some(at) = memchr::memmem::find(&self.line[from..], end).map(|i| from + i + end.len()) else {
                        if self.line.len() > MAX_HEAD {
                            return Err(bad("a response head or chunk line over 64 KiB"));
                        }
                        input = &[];
                        continue;
                    };
                    input = &input[at - before..];
                    let line = std::mem::take(&mut self.line)[..at].to_vec();
                    match self.state {
                        State::Head => self.head(&line, out, sent, &mut ev)?,
                        State::ChunkSize => {
                            let text = String::from_utf8_lossy(&line[..line.len() - 2]);
                            let size = text.split(';').next().unwrap_or_default().trim();
                            let n = u64::from_str_radix(size, 16).map_err(|_| bad("a malformed chunk size"))?;
                            self.state = if n == 0 { State::Trailers } else { State::ChunkData(n) };
                        }
                        _ if line == b"\r\n" => {
                            // The last chunk: what is held goes out as a chunk, then ours ends.
                            let mut rest = Vec::new();
                            self.scrub.flush(&mut rest);
                            chunk(&rest, out);
                            out.extend_from_slice(b"0\r\n\r\n");
                            self.done();
                        }
                        // Trailer fields are dropped: nothing the guest needs, and they would
                        // have to be scrubbed as headers.
                        _ => {}
                    }
                }
            }
        }
        Ok(ev)
    }

    fn done(&mut self) {
        self.responses += 1;
        self.state = State::Head;
    }

    fn emit_flush(&mut self, out: &mut Vec<u8>) {
        if matches!(self.state, State::ChunkData(_) | State::ChunkEnd(_) | State::ChunkSize | State::Trailers) {
            let mut rest = Vec::new();
            self.scrub.flush(&mut rest);
            chunk(&rest, out);
        } else {
            self.scrub.flush(out);
        }
    }

    fn chunk_payload(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut piece = Vec::with_capacity(bytes.len());
        self.scrub.feed(bytes, &mut piece);
        chunk(&piece, out);
    }

    fn head(
        &mut self,
        raw: &[u8],
        out: &mut Vec<u8>,
        sent: &mut VecDeque<Sent>,
        ev: &mut Events,
    ) -> Result<(), Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(raw) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(bad("a response head that does not parse")),
        }
        let code = resp.code.unwrap_or(0);
        let req = if (100..200).contains(&code) && code != 101 { sent.front().copied() } else { sent.pop_front() }
            .unwrap_or(Sent { head: false, upgrade: false });
        let (mut length, mut chunked, mut other_coding) = (None::<u64>, false, None::<String>);
        for h in resp.headers.iter() {
            let v = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
            if h.name.eq_ignore_ascii_case("content-encoding") && !(v.is_empty() || v == "identity") {
                other_coding = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.rsplit(',').next().is_some_and(|last| last.trim() == "chunked");
                if v != "chunked" {
                    other_coding = Some(v);
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            }
        }
        if let (Some(coding), true) = (other_coding, self.scrub.masks_anything()) {
            return Err(Refusal {
                status: 502,
                reason: format!(
                    "the server answered with a {coding:?}-coded body, which smolvm cannot check for the secret \
                     (it asked for identity)"
                ),
            });
        }
        if req.upgrade && (code == 101 || code >= 200) {
            ev.upgrade_answered = Some(code == 101);
        }
        // The head, scrubbed (framing fields hold no value: a mask keeps the length anyway).
        self.scrub.feed(raw, out);
        self.scrub.flush(out);
        self.state = if code == 101 {
            State::Raw
        } else if (100..200).contains(&code) || code == 204 || code == 304 || req.head {
            self.responses += u64::from(code >= 200);
            State::Head
        } else if chunked {
            State::ChunkSize
        } else {
            match length {
                Some(0) => {
                    self.responses += 1;
                    State::Head
                }
                Some(n) => State::Body(n),
                None => State::UntilClose,
            }
        };
        Ok(())
    }
}

/// One chunk of our own (nothing for an empty piece: that would end the body).
fn chunk(piece: &[u8], out: &mut Vec<u8>) {
    if !piece.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
}

fn bad(why: &str) -> Refusal {
    Refusal { status: 502, reason: format!("the server sent {why}") }
}
