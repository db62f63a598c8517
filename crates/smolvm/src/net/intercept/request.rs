//! The guest-to-server direction of an intercepted HTTP/1.1 connection: each request head is
//! parsed strictly, checked, and **re-serialised** from its parsed fields (never forwarded as
//! the guest wrote it), with each secret's placeholder replaced by its value in the one header
//! the secret is bound to (`rules.rs`). Bodies pass, scanned for placeholders.
//!
//! The stream is a sequence of requests on one keep-alive connection (RFC 9112 §6). Anything
//! two parsers could frame differently is refused, so no "next request" can hide in a body,
//! where an upstream with a laxer parser would read it (request smuggling): bare CR or LF,
//! obs-fold, white space before a colon, a NUL, `Content-Length` that is not plain digits or
//! is given twice, a `Transfer-Encoding` other than exactly `chunked` or next to a length,
//! chunk extensions and trailer fields, HTTP/1.0. Every request's `Host` (and an absolute-form
//! target's authority) must be the name the connection was intercepted for. A placeholder
//! anywhere but its header (request line, another header, a body) refuses the request.
//!
//! A refused request is never forwarded: the relay drops the server connection and answers
//! the guest with the [`Refusal`]'s status. A refusal found inside a body comes after the
//! head and part of the body went out; the server then sees a request cut short, never the
//! rest of it.

use std::collections::VecDeque;

use super::rules::{header_use, placeholder_in, Binding, HeaderUse};
use aho_corasick::AhoCorasick;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one request.
const MAX_HEADERS: usize = 128;

/// A request refused: the status the guest is answered with and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refuse<T>(status: u16, reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal { status, reason: reason.into() })
}

/// What the response side needs to know of each request sent: a response to `HEAD` has no
/// body; one to an upgrade request may switch protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub head: bool,
    pub upgrade: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    /// After the last chunk: only the empty line (no trailer fields).
    LastCrlf(u8),
    /// An upgrade request went out: the guest's next bytes wait for the server's answer.
    AwaitUpgrade,
    /// Switched protocols: everything passes.
    Raw,
    Refused(Refusal),
}

/// See the module documentation.
pub struct RequestGate {
    host: String,
    /// The port the connection goes to (a `Host` may name it, or none).
    port: u16,
    /// Secrets' mode: ask for an identity encoding (so that echoes can be scrubbed) and offer
    /// no compressed WebSocket. Off for a plain connection that is only checked.
    identity: bool,
    bindings: Vec<Binding>,
    placeholders: Option<AhoCorasick>,
    longest: usize,
    state: State,
    /// A head or chunk-size line being collected, or bytes waiting for an upgrade's answer.
    line: Vec<u8>,
    /// The last `longest - 1` body bytes sent (a placeholder split across reads is found).
    body_tail: Vec<u8>,
    /// Requests sent whose response has not begun.
    pub sent: VecDeque<Sent>,
    /// Requests sent, and how many had a secret added.
    pub requests: u64,
    pub filled: u64,
}

impl std::fmt::Debug for RequestGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGate").field("host", &self.host).field("state", &self.state).finish_non_exhaustive()
    }
}

impl RequestGate {
    /// A gate that only checks: every request of a plain-HTTP connection under a domain
    /// allow-list names `host` (the name its first request was allowed for) at `port`, and is
    /// framed unambiguously; heads are re-serialised, nothing else changes.
    pub fn checking(host: &str, port: u16) -> RequestGate {
        RequestGate { port, identity: false, ..RequestGate::new(host, Vec::new()) }
    }

    /// `host`: the (normalised) name the connection was intercepted for.
    pub fn new(host: &str, bindings: Vec<Binding>) -> RequestGate {
        let placeholders =
            if bindings.is_empty() { None } else { AhoCorasick::new(bindings.iter().map(|b| &b.placeholder)).ok() };
        let longest = bindings.iter().map(|b| b.placeholder.len()).max().unwrap_or(0);
        RequestGate {
            host: host.to_string(),
            port: 443,
            identity: true,
            bindings,
            placeholders,
            longest,
            state: State::Head,
            line: Vec::new(),
            body_tail: Vec::new(),
            sent: VecDeque::new(),
            requests: 0,
            filled: 0,
        }
    }

    /// Feeds bytes from the guest and appends what to send to the server to `out`. Once
    /// refused, every later call returns the same refusal.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        while !input.is_empty() {
            match self.state.clone() {
                State::Refused(r) => return Err(r),
                State::Raw => {
                    out.extend_from_slice(input);
                    input = &[];
                }
                State::AwaitUpgrade => {
                    if self.line.len() + input.len() > MAX_HEAD {
                        return self.fail(400, "more than 64 KiB sent before the server answered an upgrade");
                    }
                    self.line.extend_from_slice(input);
                    input = &[];
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = n.min(input.len() as u64) as usize;
                    self.body(&input[..take], out)?;
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = match (&self.state, left) {
                        (State::Body(_), 0) => self.message_end(),
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkEnd(0),
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::ChunkEnd(seen) | State::LastCrlf(seen) => {
                    if input[0] != b"\r\n"[seen as usize] {
                        return self
                            .fail(400, "a chunk does not end in CRLF (chunk extensions and trailers are refused)");
                    }
                    out.push(input[0]);
                    input = &input[1..];
                    self.state = match (&self.state, seen) {
                        (State::ChunkEnd(_), 0) => State::ChunkEnd(1),
                        (State::ChunkEnd(_), _) => State::ChunkSize,
                        (_, 0) => State::LastCrlf(1),
                        _ => self.message_end(),
                    };
                }
                State::Head | State::ChunkSize => {
                    let head = self.state == State::Head;
                    let limit = if head { MAX_HEAD } else { 18 };
                    let end: &[u8] = if head { b"\r\n\r\n" } else { b"\r\n" };
                    let before = self.line.len();
                    self.line.extend_from_slice(input);
                    if let Err(why) = line_endings(&self.line, before) {
                        return self.fail(400, why);
                    }
                    let from = before.saturating_sub(end.len() - 1);
                    let Some(at) = memchr::memmem::find(&self.line[from..], end).map(|i| from + i + end.len()) else {
                        input = &[];
                        if self.line.len() > limit {
                            return self.fail(if head { 431 } else { 400 }, "a request head or chunk line is too long");
                        }
                        continue;
                    };
                    if at > limit {
                        return self.fail(if head { 431 } else { 400 }, "a request head or chunk line is too long");
                    }
                    input = &input[at - before..];
                    let line = std::mem::take(&mut self.line)[..at].to_vec();
                    if head {
                        self.head(&line, out)?;
                    } else {
                        let n = chunk_size(&line[..line.len() - 2]).or_else(|e| self.fail(400, e))?;
                        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                        self.state = if n == 0 { State::LastCrlf(0) } else { State::ChunkData(n) };
                    }
                }
            }
        }
        Ok(())
    }

    /// The name every request must carry.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server answered the upgrade request: `switched` (101) makes the rest of the
    /// stream pass as it is; otherwise the bytes that waited are read as requests again.
    pub fn upgrade_answered(&mut self, switched: bool, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if self.state != State::AwaitUpgrade {
            return Ok(());
        }
        let waiting = std::mem::take(&mut self.line);
        if switched {
            self.state = State::Raw;
            out.extend_from_slice(&waiting);
            Ok(())
        } else {
            self.state = State::Head;
            self.feed(&waiting, out)
        }
    }

    fn fail<T>(&mut self, status: u16, reason: impl Into<String>) -> Result<T, Refusal> {
        let r = Refusal { status, reason: reason.into() };
        self.state = State::Refused(r.clone());
        Err(r)
    }

    fn message_end(&mut self) -> State {
        self.body_tail.clear();
        if self.sent.back().is_some_and(|s| s.upgrade) {
            State::AwaitUpgrade
        } else {
            State::Head
        }
    }

    /// Body bytes: sent on, unless a placeholder ends in them.
    fn body(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if let Some(ac) = &self.placeholders {
            let mut window = std::mem::take(&mut self.body_tail);
            let tail_len = window.len();
            window.extend_from_slice(&bytes[..bytes.len().min(self.longest)]);
            let across = ac.find(&window).is_some_and(|m| m.end() > tail_len);
            if across || ac.is_match(bytes) {
                let name = placeholder_in(&self.bindings, &window)
                    .or_else(|| placeholder_in(&self.bindings, bytes))
                    .map(|b| b.name.clone())
                    .unwrap_or_default();
                return self.fail(
                    403,
                    format!("the placeholder of {name} is in a request body: it is only sent in its header"),
                );
            }
            window.extend_from_slice(&bytes[bytes.len().min(self.longest)..]);
            let keep = self.longest.saturating_sub(1);
            self.body_tail = window[window.len().saturating_sub(keep)..].to_vec();
        }
        out.extend_from_slice(bytes);
        Ok(())
    }

    /// A complete head (ending in CRLF CRLF): checked, and sent re-serialised.
    fn head(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        match self.check_head(raw) {
            Ok((head, state, sent)) => {
                out.extend_from_slice(&head);
                self.requests += 1;
                self.sent.push_back(sent);
                self.state = state;
                if self.state == State::Head && sent.upgrade {
                    self.state = State::AwaitUpgrade;
                }
                Ok(())
            }
            Err(r) => {
                self.state = State::Refused(r.clone());
                Err(r)
            }
        }
    }

    fn check_head(&mut self, raw: &[u8]) -> Result<(Vec<u8>, State, Sent), Refusal> {
        if raw.contains(&0) {
            return refuse(400, "a NUL byte in a request head");
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(raw) {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            Err(httparse::Error::TooManyHeaders) => {
                return refuse(431, format!("more than {MAX_HEADERS} header fields"))
            }
            Ok(_) => return refuse(400, "a request head that does not parse as one"),
            Err(e) => return refuse(400, format!("a malformed request head ({e})")),
        }
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return refuse(400, "only HTTP/1.1 is accepted on an intercepted connection");
        };
        if method.eq_ignore_ascii_case("CONNECT") {
            return refuse(400, "CONNECT is refused on an intercepted connection");
        }
        if let Some(b) =
            placeholder_in(&self.bindings, method.as_bytes()).or(placeholder_in(&self.bindings, target.as_bytes()))
        {
            return refuse(
                403,
                format!("the placeholder of {} is in the request line: it is only sent in its header", b.name),
            );
        }
        self.check_target(target)?;
        let mut head = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        let (mut length, mut chunked, mut upgrade, mut hosts) = (None::<u64>, false, false, 0);
        for h in req.headers.iter() {
            let value = trim_ows(h.value);
            let lower = h.name.to_ascii_lowercase();
            match lower.as_str() {
                "host" => {
                    hosts += 1;
                    if !self.same_host(value) {
                        return refuse(
                            421,
                            format!(
                                "Host {:?} is not {} (the name this connection was opened for)",
                                lossy(value),
                                self.host
                            ),
                        );
                    }
                }
                "content-length" => {
                    if length.is_some() {
                        return refuse(400, "Content-Length given twice");
                    }
                    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                        return refuse(400, format!("Content-Length {:?} is not a plain number", lossy(value)));
                    }
                    length = Some(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(0));
                }
                "transfer-encoding" => {
                    if chunked || !value.eq_ignore_ascii_case(b"chunked") {
                        return refuse(400, "a Transfer-Encoding other than one \"chunked\"");
                    }
                    chunked = true;
                }
                "upgrade" => upgrade = true,
                // The server is asked for an identity encoding (below), so that what it sends
                // back can be scanned; no compressed WebSocket either.
                "accept-encoding" | "sec-websocket-extensions" if self.identity => continue,
                _ => {}
            }
            let value = match header_use(&self.bindings, h.name, value) {
                HeaderUse::Plain => value.to_vec(),
                HeaderUse::Filled(v) => {
                    self.filled += 1;
                    v
                }
                HeaderUse::Misplaced(secret) => {
                    return refuse(
                        403,
                        format!(
                            "the placeholder of {secret} is in header {}, which it is not bound to, or not in the \
                             shape it is sent in there",
                            h.name
                        ),
                    )
                }
            };
            head.extend_from_slice(h.name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(&value);
            head.extend_from_slice(b"\r\n");
        }
        if hosts != 1 {
            return refuse(400, "a request needs exactly one Host");
        }
        if chunked && length.is_some() {
            return refuse(400, "both Content-Length and Transfer-Encoding");
        }
        if self.identity {
            head.extend_from_slice(b"Accept-Encoding: identity\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let state = match (chunked, length) {
            (true, _) => State::ChunkSize,
            (false, Some(n)) if n > 0 => State::Body(n),
            _ => State::Head,
        };
        Ok((head, state, Sent { head: method.eq_ignore_ascii_case("HEAD"), upgrade }))
    }

    /// An origin-form target, `*`, or an absolute-form one for this very host.
    fn check_target(&self, target: &str) -> Result<(), Refusal> {
        if target.starts_with('/') || target == "*" {
            return Ok(());
        }
        let lower = target.to_ascii_lowercase();
        let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"));
        let Some(rest) = rest else { return refuse(400, "a request target that is not a path or a URL") };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') || !self.same_host(authority.as_bytes()) {
            return refuse(421, format!("the request is for {authority:?}, not {}", self.host));
        }
        Ok(())
    }

    fn same_host(&self, value: &[u8]) -> bool {
        let Ok(v) = std::str::from_utf8(value) else { return false };
        let name = match v.rsplit_once(':') {
            Some((n, p)) if p.parse::<u16>() == Ok(self.port) => n,
            Some(_) => return false,
            None => v,
        };
        crate::net::policy::normalize_name(name) == self.host
    }
}

/// Checks that every LF from `from` on (and the CR before it) is a CRLF: a bare CR or LF is
/// refused.
fn line_endings(buf: &[u8], from: usize) -> Result<(), &'static str> {
    let start = from.saturating_sub(1);
    for i in start..buf.len() {
        match buf[i] {
            b'\n' if i == 0 || buf[i - 1] != b'\r' => return Err("a bare LF in a request head"),
            b'\r' if i + 1 < buf.len() && buf[i + 1] != b'\n' => return Err("a bare CR in a request head"),
            _ => {}
        }
    }
    Ok(())
}

/// A chunk-size line (without its CRLF): hex digits only.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    if line.is_empty() || line.len() > 15 || !line.iter().all(u8::is_ascii_hexdigit) {
        return Err("a chunk size that is not plain hex digits (chunk extensions are refused)");
    }
    u64::from_str_radix(std::str::from_utf8(line).unwrap_or("x"), 16).map_err(|_| "a chunk size out of range")
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

fn lossy(v: &[u8]) -> String {
    crate::text::escape_controls(&String::from_utf8_lossy(&v[..v.len().min(100)]))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
