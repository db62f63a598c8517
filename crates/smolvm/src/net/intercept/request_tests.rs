//! The request gate, fed every way TCP could cut its input, and attacked: placeholders out of
//! place, smuggling, another host.

use super::*;
use crate::net::intercept::response::ResponseScrub;
use crate::net::intercept::rules::HeaderSlot;

const PH: &str = "sk-smolvm-placeholder-0123456789abcdef";
const REAL: &str = "sk-REAL-VALUE-abcdefghijklmnopqrstuv";

fn gate() -> RequestGate {
    let b = Binding {
        name: "OPENAI_API_KEY".into(),
        placeholder: PH.as_bytes().to_vec(),
        value: REAL.as_bytes().to_vec(),
        slots: HeaderSlot::defaults(),
    };
    RequestGate::new("api.example.com", vec![b])
}

fn feed_all(input: &[u8]) -> Result<Vec<u8>, Refusal> {
    let mut g = gate();
    let mut out = Vec::new();
    g.feed(input, &mut out).map(|()| out)
}

/// The same input fed at every split and byte by byte: the output must not depend on how TCP
/// cut it.
fn all_splits(input: &[u8]) -> Result<Vec<u8>, Refusal> {
    let whole = feed_all(input);
    for cut in 1..input.len() {
        let mut g = gate();
        let mut out = Vec::new();
        let r = g.feed(&input[..cut], &mut out).and_then(|()| g.feed(&input[cut..], &mut out));
        match (&whole, r) {
            (Ok(w), Ok(())) => assert_eq!(&out, w, "split at {cut}"),
            (Err(w), Err(e)) => assert_eq!(w.status, e.status, "split at {cut}: {e:?}"),
            (w, r) => panic!("split at {cut}: whole {w:?}, split {r:?}"),
        }
    }
    whole
}

fn refused(input: &str, status: u16, says: &str) {
    match all_splits(input.as_bytes()) {
        Err(r) => {
            assert_eq!(r.status, status, "{input:?}: {r:?}");
            assert!(r.reason.contains(says), "{input:?}: {r:?}");
        }
        Ok(out) => panic!("forwarded {input:?} as {:?}", String::from_utf8_lossy(&out)),
    }
}

#[test]
fn the_value_goes_into_its_header_and_heads_are_reserialised() {
    let input = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nAuthorization:   Bearer {PH}  \r\nAccept-Encoding: gzip, br\r\n\
         Content-Length: 5\r\n\r\nhello\
         GET /two?x=1 HTTP/1.1\r\nhost: API.example.com:443\r\nx-api-key: {PH}\r\n\r\n"
    );
    let out = String::from_utf8(all_splits(input.as_bytes()).unwrap()).unwrap();
    assert_eq!(
        out,
        format!(
            "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {REAL}\r\nContent-Length: 5\r\n\
             Accept-Encoding: identity\r\n\r\nhello\
             GET /two?x=1 HTTP/1.1\r\nhost: API.example.com:443\r\nx-api-key: {REAL}\r\nAccept-Encoding: identity\r\n\r\n"
        )
    );
}

#[test]
fn chunked_bodies_are_framed_and_scanned() {
    let input = "POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\
                 3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let out = String::from_utf8(all_splits(input.as_bytes()).unwrap()).unwrap();
    assert!(out.contains("3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n"), "{out}");
}

#[test]
fn a_placeholder_anywhere_but_its_header_is_refused() {
    let h = "Host: api.example.com\r\n";
    refused(&format!("GET /v1/{PH} HTTP/1.1\r\n{h}\r\n"), 403, "request line");
    refused(&format!("GET /v1?key={PH} HTTP/1.1\r\n{h}\r\n"), 403, "request line");
    refused(&format!("GET / HTTP/1.1\r\n{h}X-Echo: {PH}\r\n\r\n"), 403, "X-Echo");
    refused(&format!("GET / HTTP/1.1\r\n{h}Authorization: Basic {PH}\r\n\r\n"), 403, "Authorization");
    refused(&format!("GET / HTTP/1.1\r\n{h}Authorization: Bearer {PH} {PH}\r\n\r\n"), 403, "Authorization");
    refused(&format!("GET / HTTP/1.1\r\n{h}Cookie: k={PH}\r\n\r\n"), 403, "Cookie");
    refused(&format!("POST / HTTP/1.1\r\n{h}Content-Length: {}\r\n\r\n{{\"k\":\"{PH}\"}}", PH.len() + 8), 403, "body");
    refused(
        &format!(
            "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n5\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            &PH[..5],
            PH.len() - 5,
            &PH[5..]
        ),
        403,
        "body",
    );
}

#[test]
fn smuggling_and_ambiguous_framing_are_refused() {
    let h = "Host: api.example.com\r\n";
    // A bare LF hides Content-Length from a CRLF-only parser (and shows it to nginx or Go).
    refused(&format!("POST / HTTP/1.1\r\n{h}X: y\nContent-Length: 40\r\n\r\n"), 400, "bare LF");
    refused(&format!("POST / HTTP/1.1\r\n{h}X: y\rContent-Length: 4\r\n\r\n"), 400, "bare CR");
    refused(&format!("POST / HTTP/1.1\r\n{h}Content-Length: +5\r\n\r\nhello"), 400, "plain number");
    refused(&format!("POST / HTTP/1.1\r\n{h}Content-Length: 5, 5\r\n\r\nhello"), 400, "plain number");
    refused(&format!("POST / HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"), 400, "twice");
    refused(&format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: identity, chunked\r\n\r\n"), 400, "Transfer-Encoding");
    refused(
        &format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400,
        "Transfer-Encoding",
    );
    refused(&format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"), 400, "both");
    refused(&format!("POST / HTTP/1.1\r\n{h}Content-Length : 5\r\n\r\nhello"), 400, "malformed");
    refused(&format!("GET / HTTP/1.1\r\n{h}X: a\r\n  folded\r\n\r\n"), 400, "malformed");
    refused(&format!("GET / HTTP/1.0\r\n{h}\r\n"), 400, "HTTP/1.1");
    refused(
        &format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"),
        400,
        "chunk",
    );
    refused(
        &format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        400,
        "trailers",
    );
    refused(&format!("CONNECT api.example.com:443 HTTP/1.1\r\n{h}\r\n"), 400, "CONNECT");
    refused(&format!("GET / HTTP/1.1\r\n{h}X: a\0b\r\n\r\n"), 400, "NUL");
    // (Not at every split: 64 KiB squared.)
    let huge = format!("GET /{} HTTP/1.1\r\n{h}\r\n", "a".repeat(MAX_HEAD));
    assert_eq!(feed_all(huge.as_bytes()).unwrap_err().status, 431);
    let mut g = gate();
    assert_eq!(g.feed(&huge.as_bytes()[..MAX_HEAD + 1], &mut Vec::new()).unwrap_err().status, 431);
}

#[test]
fn every_request_must_name_the_intercepted_host() {
    refused("GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n", 421, "other.example.com");
    refused("GET / HTTP/1.1\r\nHost: api.example.com:8443\r\n\r\n", 421, "Host");
    refused("GET / HTTP/1.1\r\n\r\n", 400, "exactly one Host");
    refused("GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: api.example.com\r\n\r\n", 400, "exactly one Host");
    refused("GET https://other.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n", 421, "other.example.com");
    refused("GET https://api.example.com@evil.test/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n", 421, "evil");
    // The second request of a keep-alive connection is checked too.
    refused(
        "GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\nGET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
        421,
        "other",
    );
    assert!(feed_all(b"GET https://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n").is_ok());
}

#[test]
fn an_upgrade_waits_for_the_server_s_answer() {
    let mut g = gate();
    let mut out = Vec::new();
    let req = format!("GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nSec-WebSocket-Extensions: permessage-deflate\r\nAuthorization: Bearer {PH}\r\n\r\n");
    g.feed(req.as_bytes(), &mut out).unwrap();
    let sent = String::from_utf8(out.clone()).unwrap();
    assert!(sent.contains(REAL) && !sent.contains("permessage-deflate"), "{sent}");
    // Bytes after it wait: they are a WebSocket's only if the server switches.
    out.clear();
    g.feed(b"GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n", &mut out).unwrap();
    assert!(out.is_empty());
    // Refused upgrade: those bytes are read as a request, and checked.
    assert_eq!(g.upgrade_answered(false, &mut out).unwrap_err().status, 421);
    // Switched: they pass.
    let mut g = gate();
    g.feed(req.as_bytes(), &mut Vec::new()).unwrap();
    g.feed(b"\x81\x05hello", &mut out).unwrap();
    g.upgrade_answered(true, &mut out).unwrap();
    assert_eq!(out, b"\x81\x05hello");
}

#[test]
fn the_secret_is_never_in_debug_output() {
    let g = gate();
    assert!(!format!("{g:?}").contains(REAL), "{g:?}");
}

fn scrub() -> ResponseScrub {
    ResponseScrub::new(vec![crate::net::intercept::scrub::Mask {
        value: REAL.into(),
        mask: PH.as_bytes()[..REAL.len()].to_vec(),
    }])
}

fn respond(input: &[u8], sent: &[Sent]) -> Result<Vec<u8>, Refusal> {
    let mut s = scrub();
    let mut q: VecDeque<Sent> = sent.iter().copied().collect();
    let mut out = Vec::new();
    s.feed(input, &mut out, &mut q)?;
    s.end(&mut out);
    Ok(out)
}

const GET: Sent = Sent { head: false, upgrade: false };

#[test]
fn responses_echoing_the_value_reach_the_guest_masked() {
    let body = format!("{{\"error\":\"Invalid URL (GET /v1/{REAL})\"}}");
    let input = format!(
        "HTTP/1.1 404 Not Found\r\nX-Echo: Bearer {REAL}\r\nContent-Length: {}\r\n\r\n{body}\
         HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}\r\n{:x}\r\n{}\r\n0\r\nX-T: {REAL}\r\n\r\n",
        body.len(),
        &REAL[..16],
        REAL.len() - 16,
        &REAL[16..]
    );
    for cut in 0..input.len() {
        let mut s = scrub();
        let mut q: VecDeque<Sent> = [GET, GET].into_iter().collect();
        let mut out = Vec::new();
        s.feed(&input.as_bytes()[..cut], &mut out, &mut q).unwrap();
        s.pause(&mut out);
        s.feed(&input.as_bytes()[cut..], &mut out, &mut q).unwrap();
        s.end(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains(&REAL[8..]), "cut {cut}: {text}");
        assert_eq!(s.responses, 2, "cut {cut}: {text}");
        assert!(text.contains(&format!("Content-Length: {}", body.len())), "{text}");
    }
    // The value split across two chunks is joined, masked, and sent as one.
    let text = String::from_utf8(respond(input.as_bytes(), &[GET, GET]).unwrap()).unwrap();
    assert!(text.contains(&format!("{:x}\r\n{}\r\n0\r\n\r\n", REAL.len(), &PH[..REAL.len()])), "{text}");
}

#[test]
fn compressed_responses_are_refused_before_any_of_them_reaches_the_guest() {
    for coding in ["Content-Encoding: gzip", "Content-Encoding: br", "Transfer-Encoding: gzip, chunked"] {
        let input = format!("HTTP/1.1 200 OK\r\n{coding}\r\nContent-Length: 4\r\n\r\n\x1f\x08\x08\x00");
        let r = respond(input.as_bytes(), &[GET]).unwrap_err();
        assert_eq!(r.status, 502, "{coding}");
    }
    assert!(respond(b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\nok", &[GET]).is_ok());
}

#[test]
fn head_1xx_204_and_upgrades_are_framed() {
    let head = Sent { head: true, upgrade: false };
    let input =
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
    let mut s = scrub();
    let mut q: VecDeque<Sent> = [head, GET].into_iter().collect();
    let mut out = Vec::new();
    s.feed(input, &mut out, &mut q).unwrap();
    assert_eq!(s.responses, 2);
    assert!(q.is_empty());
    let up = Sent { head: false, upgrade: true };
    let mut q: VecDeque<Sent> = [up].into_iter().collect();
    let mut s = scrub();
    let ev = s.feed(format!("HTTP/1.1 101 Switching\r\n\r\n\x01\x10{REAL}").as_bytes(), &mut out, &mut q).unwrap();
    assert_eq!(ev.upgrade_answered, Some(true));
    s.end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains(REAL));
}

/// A plain connection under a domain allow-list: every request is for the allowed host, at
/// the connection's port; the head goes out re-serialised, and nothing else changes.
#[test]
fn a_checked_plain_connection_keeps_every_request_on_its_host() {
    let mut g = RequestGate::checking("a.test", 80);
    let mut out = Vec::new();
    g.feed(b"GET / HTTP/1.1\r\nHost: a.test:80\r\nAccept-Encoding: gzip\r\n\r\n", &mut out).unwrap();
    assert_eq!(out, b"GET / HTTP/1.1\r\nHost: a.test:80\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(g.feed(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n", &mut out).unwrap_err().status, 421);
    let mut g = RequestGate::checking("a.test", 80);
    assert_eq!(g.feed(b"GET / HTTP/1.1\r\nHost: a.test:443\r\n\r\n", &mut out).unwrap_err().status, 421);
    let mut g = RequestGate::checking("a.test", 80);
    assert_eq!(g.feed(b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", &mut out).unwrap_err().status, 421);
}
