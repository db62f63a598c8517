//! The guest's resolver at [`super::DNS`]: DNS queries parsed and answered by smolvm.
//!
//! Only what a sandbox needs: one question per query; `A` answered from the host's resolver
//! (filtered by the policy), `AAAA` answered empty (the sandbox network is IPv4), other types
//! answered `NOTIMP`. Answers carry a short TTL so that a changed policy or DNS record is seen.

use std::net::Ipv4Addr;

/// Record types we look at.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

/// TTL of the answers we give (seconds).
const TTL: u32 = 30;

/// Response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, echoed back.
    pub rd: bool,
    /// The question's name, lowercase, without a trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as received (echoed back).
    question: Vec<u8>,
}

/// Parses a query; `None` if it is not one we can answer (then it is dropped, as a malformed
/// datagram would be by any resolver). Compression pointers are not allowed in a question.
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qdcount != 1 {
        return None; // a response, not a standard query, or not one question
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(i..i + len)?;
        // Host-name characters only: other bytes are valid DNS but name nothing we resolve,
        // and must not reach a log or a terminal.
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        labels.push(std::str::from_utf8(label).ok()?.to_ascii_lowercase());
        i += len;
        if i > 12 + 255 {
            return None;
        }
    }
    let tail = msg.get(i..i + 4)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Some(Query {
        id,
        rd: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype,
        qclass,
        question: msg[12..i + 4].to_vec(),
    })
}

/// The answer to `q`: `rcode`, and for `NoError` the A records `addrs`.
pub fn response(q: &Query, rcode: Rcode, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let answers: &[Ipv4Addr] = if rcode == Rcode::NoError && q.qtype == TYPE_A { addrs } else { &[] };
    let mut out = Vec::with_capacity(12 + q.question.len() + answers.len() * 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, RD as asked, RA.
    let flags: u16 = 0x8000 | if q.rd { 0x0100 } else { 0 } | 0x0080 | rcode as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in answers {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name of the question
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&a.octets());
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn a_query_is_parsed_and_answered() {
        let q = parse_query(&query(0x1234, "A.Test", TYPE_A)).unwrap();
        assert_eq!((q.id, q.name.as_str(), q.qtype, q.rd), (0x1234, "a.test", TYPE_A, true));
        let r = response(&q, Rcode::NoError, &["198.51.100.10".parse().unwrap()]);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) & 0x800f, 0x8000);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[198, 51, 100, 10]);
        let nx = response(&q, Rcode::NxDomain, &["198.51.100.10".parse().unwrap()]);
        assert_eq!(u16::from_be_bytes([nx[2], nx[3]]) & 0xf, 3);
        assert_eq!(u16::from_be_bytes([nx[6], nx[7]]), 0, "no answers with an error");
        let q6 = parse_query(&query(1, "a.test", TYPE_AAAA)).unwrap();
        assert_eq!(u16::from_be_bytes([response(&q6, Rcode::NoError, &[])[6], 0]), 0);
    }

    #[test]
    fn malformed_queries_are_dropped() {
        assert!(parse_query(&[0; 5]).is_none());
        let mut resp = query(1, "a.test", TYPE_A);
        resp[2] |= 0x80;
        assert!(parse_query(&resp).is_none(), "a response is not a query");
        let mut cut = query(1, "a.test", TYPE_A);
        cut.truncate(cut.len() - 3);
        assert!(parse_query(&cut).is_none());
        assert!(parse_query(&query(1, "a\x1b.test", TYPE_A)).is_none(), "a control character");
        let mut ptr = query(1, "a.test", TYPE_A);
        ptr[12] = 0xc0;
        assert!(parse_query(&ptr).is_none(), "no compression in a question");
    }
}
