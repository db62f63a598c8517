//! The host a client names in its first bytes: the server name of a TLS ClientHello (SNI), or
//! the `Host` header of an HTTP/1 request. Used to enforce `--allow-domain` on each connection.
//!
//! Both parsers are strict and bounded: they look at no more than [`MAX_SNIFF`] bytes and say
//! "need more" only while a well-formed prefix is still incomplete.

/// How many bytes of a connection are read before deciding (a ClientHello with post-quantum
/// key shares is ~1.8 KB; headers of an HTTP request rarely pass 8 KB).
pub const MAX_SNIFF: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// TLS with this server name.
    Tls(String),
    /// TLS with Encrypted Client Hello: the server name given (the "outer" one) is a public
    /// name of the provider, the real one is encrypted. It names nothing that can be checked.
    Ech(String),
    /// An HTTP/1 request for this host (port removed).
    Http(String),
    /// Neither, or one that names no host.
    Unnamed,
}

impl Sniffed {
    pub fn name(&self) -> Option<&str> {
        match self {
            Sniffed::Tls(n) | Sniffed::Http(n) => Some(n),
            _ => None,
        }
    }
}

/// Looks at the first bytes the client sent.
pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    let r = if buf[0] == 0x16 { tls_sni(buf) } else { http_host(buf) };
    match r {
        Sniffed::NeedMore if buf.len() >= MAX_SNIFF => Sniffed::Unnamed,
        // A name is a host name (or an address literal): anything else names nothing, and
        // never reaches a log or a terminal.
        Sniffed::Tls(n) | Sniffed::Http(n) if !plausible_host(&n) => Sniffed::Unnamed,
        r => r,
    }
}

fn plausible_host(n: &str) -> bool {
    !n.is_empty() && n.len() <= 253 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

/// A cursor that fails (returns `None`) instead of reading past the end.
struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

/// The SNI of a ClientHello, which may span several TLS records.
fn tls_sni(buf: &[u8]) -> Sniffed {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut c = Cur { b: buf };
    let total = |hs: &[u8]| 4 + ((hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize);
    while let Some(hdr) = c.take(5) {
        if hdr[0] != 0x16 || hdr[1] != 3 {
            return Sniffed::Unnamed;
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        match c.take(len) {
            Some(body) => hs.extend_from_slice(body),
            None => {
                hs.extend_from_slice(c.b);
                break;
            }
        }
        if hs.len() >= 4 && hs.len() >= total(&hs) {
            break;
        }
    }
    if hs.len() < 4 {
        return Sniffed::NeedMore;
    }
    if hs[0] != 1 {
        return Sniffed::Unnamed; // not a ClientHello
    }
    if hs.len() < total(&hs) {
        return Sniffed::NeedMore;
    }
    match parse_client_hello(&hs) {
        Some((_, true)) => Sniffed::Ech(String::new()),
        Some((Some(name), false)) => Sniffed::Tls(name),
        _ => Sniffed::Unnamed,
    }
}

/// The extension type of Encrypted Client Hello (draft-ietf-tls-esni).
const ECH_EXTENSION: usize = 0xfe0d;

/// The server name a ClientHello gives, and whether it carries ECH (every extension is read:
/// the order is the client's).
fn parse_client_hello(hs: &[u8]) -> Option<(Option<String>, bool)> {
    let mut c = Cur { b: hs };
    c.take(1)?; // type
    let len = c.u24()?;
    let mut c = Cur { b: c.take(len)? };
    c.take(2 + 32)?; // version, random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    let ext_len = c.u16()?;
    let mut ext = Cur { b: c.take(ext_len)? };
    let (mut sni, mut ech) = (None, false);
    while !ext.b.is_empty() {
        let ty = ext.u16()?;
        let len = ext.u16()?;
        let body = ext.take(len)?;
        if ty == ECH_EXTENSION {
            ech = true;
        }
        if ty != 0 || sni.is_some() {
            continue;
        }
        let mut s = Cur { b: body };
        let list_len = s.u16()?;
        let mut list = Cur { b: s.take(list_len)? };
        while !list.b.is_empty() {
            let kind = list.u8()?;
            let n = list.u16()?;
            let name = list.take(n)?;
            if kind == 0 {
                sni = Some(std::str::from_utf8(name).ok()?.to_ascii_lowercase());
                break;
            }
        }
    }
    Some((sni, ech))
}

/// The Host header of an HTTP/1.x request.
fn http_host(buf: &[u8]) -> Sniffed {
    // A method is upper-case letters followed by a space.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len < 16 { Sniffed::NeedMore } else { Sniffed::Unnamed };
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return Sniffed::Unnamed;
    }
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Sniffed::NeedMore;
    };
    let head = &buf[..end];
    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    if !request_line.ends_with(b" HTTP/1.1") && !request_line.ends_with(b" HTTP/1.0") {
        return Sniffed::Unnamed;
    }
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        let Ok(v) = std::str::from_utf8(&line[colon + 1..]) else { return Sniffed::Unnamed };
        let v = v.trim();
        // Strip a port; a bracketed IPv6 literal keeps its brackets' content.
        let host = if let Some(rest) = v.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            v.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map(|(h, _)| h).unwrap_or(v)
        };
        return if host.is_empty() { Sniffed::Unnamed } else { Sniffed::Http(host.to_ascii_lowercase()) };
    }
    Sniffed::Unnamed
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello naming `host`.
    pub(crate) fn client_hello(host: &str) -> Vec<u8> {
        client_hello_with(host, &[])
    }

    /// The same with more extensions (raw: type, length, body) after the server name.
    fn client_hello_with(host: &str, more: &[u8]) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats first
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
        exts.extend_from_slice(more);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_of_a_client_hello_even_when_cut_or_split() {
        let ch = client_hello("A.Test");
        assert_eq!(sniff(&ch), Sniffed::Tls("a.test".into()));
        for cut in [1, 3, 5, 9, ch.len() - 1] {
            assert_eq!(sniff(&ch[..cut]), Sniffed::NeedMore, "cut at {cut}");
        }
        // The same handshake split over two records.
        let hs = &ch[5..];
        let (a, b) = hs.split_at(10);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(sniff(&two), Sniffed::Tls("a.test".into()));
    }

    /// ECH: the server name in sight is the provider's public one; the real one is encrypted.
    #[test]
    fn an_encrypted_client_hello_is_told_apart() {
        let ech = client_hello_with("public.cdn.test", &[0xfe, 0x0d, 0x00, 0x04, 0, 1, 2, 3]);
        assert_eq!(sniff(&ech), Sniffed::Ech(String::new()));
        assert_eq!(Sniffed::Ech(String::new()).name(), None);
        let other = client_hello_with("a.test", &[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        assert_eq!(sniff(&other), Sniffed::Tls("a.test".into()));
    }

    #[test]
    fn tls_without_sni_or_garbage_names_nothing() {
        let mut ch = client_hello("x.test");
        ch[5] = 2; // a ServerHello, not a ClientHello
        assert_eq!(sniff(&ch), Sniffed::Unnamed);
        let mut lying = client_hello("x.test");
        let n = lying.len();
        lying[n - 8] = 0xff; // the name length now points past the end
        assert_eq!(sniff(&lying), Sniffed::Unnamed);
        assert_eq!(sniff(&[0x16, 9, 9, 0, 1, 0]), Sniffed::Unnamed);
    }

    #[test]
    fn http_host_header() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: B.test:8080\r\n\r\n"), Sniffed::Http("b.test".into()));
        assert_eq!(
            sniff(b"POST /x HTTP/1.0\r\nUser-Agent: c\r\nhost:a.test\r\n\r\nbody"),
            Sniffed::Http("a.test".into())
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"), Sniffed::Http("2001:db8::1".into()));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a.te"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), Sniffed::Unnamed, "no Host");
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Unnamed);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Unnamed);
        assert_eq!(sniff(&[b'A'; 20]), Sniffed::Unnamed);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a\x1b[2Jb\r\n\r\n"), Sniffed::Unnamed, "a control character");
    }

    #[test]
    fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(MAX_SNIFF, b'a');
        assert_eq!(sniff(&req), Sniffed::Unnamed);
    }
}
