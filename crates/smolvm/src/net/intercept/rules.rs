//! Where a secret may go: each secret is bound to the request headers it belongs in, with
//! the exact shape of their value. The placeholder is replaced by the real value only in such
//! a header, and only when the header's whole value has that shape; anywhere else it refuses
//! the request (`request.rs`).
//!
//! The default binding is by the shapes API keys are sent in: `Authorization: Bearer {}`,
//! `x-api-key: {}`, `api-key: {}`. A secret can name its own (`header=x-goog-api-key`,
//! `header=authorization:Token`).

use serde::{Deserialize, Serialize};

use super::scrub::Mask;

/// One header a secret may be sent in: its (lower-case) name, and the auth scheme before the
/// value if any (`Authorization: Bearer {}` has scheme `Bearer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderSlot {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

/// Why a header binding is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("{0:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")]
    BadName(String),
    #[error("{0:?} is not an auth scheme (letters, digits and -)")]
    BadScheme(String),
    #[error("{0} cannot carry a secret: the network process sets or checks it itself")]
    Reserved(String),
}

/// Headers the interceptor owns: a secret bound to one would change framing or routing.
const RESERVED: &[&str] =
    &["host", "content-length", "transfer-encoding", "connection", "upgrade", "accept-encoding", "te", "trailer"];

impl HeaderSlot {
    /// The defaults: `Authorization: Bearer {}`, `x-api-key: {}`, `api-key: {}`.
    pub fn defaults() -> Vec<HeaderSlot> {
        vec![
            HeaderSlot { name: "authorization".into(), scheme: Some("Bearer".into()) },
            HeaderSlot { name: "x-api-key".into(), scheme: None },
            HeaderSlot { name: "api-key".into(), scheme: None },
        ]
    }

    /// Parses `NAME` or `NAME:SCHEME` (`x-goog-api-key`, `authorization:Token`).
    pub fn parse(spec: &str) -> Result<HeaderSlot, SlotError> {
        let (name, scheme) = match spec.split_once(':') {
            Some((n, s)) => (n, Some(s)),
            None => (spec, None),
        };
        let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(SlotError::BadName(name.into()));
        }
        let name = name.to_ascii_lowercase();
        if RESERVED.contains(&name.as_str()) {
            return Err(SlotError::Reserved(name));
        }
        if let Some(s) = scheme {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
                return Err(SlotError::BadScheme(s.into()));
            }
        }
        Ok(HeaderSlot { name, scheme: scheme.map(str::to_string) })
    }

    /// If `value` (a header `name`'s whole value, without surrounding white space) has this
    /// slot's shape around `placeholder`, the value to send instead.
    fn fill(&self, name: &str, value: &[u8], placeholder: &[u8], real: &[u8]) -> Option<Vec<u8>> {
        if !name.eq_ignore_ascii_case(&self.name) {
            return None;
        }
        match &self.scheme {
            None => (value == placeholder).then(|| real.to_vec()),
            Some(scheme) => {
                let rest = value.strip_suffix(placeholder)?;
                let word = rest.strip_suffix(b" ")?;
                word.eq_ignore_ascii_case(scheme.as_bytes()).then(|| [word, b" ", real].concat())
            }
        }
    }
}

impl std::fmt::Display for HeaderSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.scheme {
            Some(s) => write!(f, "{}: {s} <{{}}>", self.name),
            None => write!(f, "{}: <{{}}>", self.name),
        }
    }
}

/// One secret as the interceptor of a host uses it.
#[derive(Clone)]
pub struct Binding {
    pub name: String,
    pub placeholder: Vec<u8>,
    pub value: Vec<u8>,
    pub slots: Vec<HeaderSlot>,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding").field("name", &self.name).field("slots", &self.slots).finish_non_exhaustive()
    }
}

impl Binding {
    /// What replaces the real value in what the server sends back: the placeholder, cut or
    /// padded to the value's length (equal for placeholders made since they are made so).
    pub fn mask(&self) -> Mask {
        let mut mask: Vec<u8> = self.placeholder.iter().copied().take(self.value.len()).collect();
        mask.resize(self.value.len(), b'x');
        Mask { value: self.value.clone(), mask }
    }
}

/// What a request header becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderUse {
    /// No placeholder in it: sent as it is.
    Plain,
    /// A secret's slot: sent with this value instead.
    Filled(Vec<u8>),
    /// A placeholder where it does not belong: the request is refused (the secret's name).
    Misplaced(String),
}

/// Decides what each header of a request becomes under `bindings`.
pub fn header_use(bindings: &[Binding], name: &str, value: &[u8]) -> HeaderUse {
    for b in bindings {
        if let Some(v) = b.slots.iter().find_map(|s| s.fill(name, value, &b.placeholder, &b.value)) {
            return HeaderUse::Filled(v);
        }
    }
    match bindings.iter().find(|b| contains(value, &b.placeholder) || contains(name.as_bytes(), &b.placeholder)) {
        Some(b) => HeaderUse::Misplaced(b.name.clone()),
        None => HeaderUse::Plain,
    }
}

/// The secret whose placeholder `bytes` holds, if any.
pub fn placeholder_in<'a>(bindings: &'a [Binding], bytes: &[u8]) -> Option<&'a Binding> {
    bindings.iter().find(|b| contains(bytes, &b.placeholder))
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(slots: Vec<HeaderSlot>) -> Vec<Binding> {
        vec![Binding { name: "KEY".into(), placeholder: b"PH-123".to_vec(), value: b"real-v".to_vec(), slots }]
    }

    #[test]
    fn the_value_goes_only_into_a_bound_header_of_exactly_its_shape() {
        let b = binding(HeaderSlot::defaults());
        assert_eq!(header_use(&b, "Authorization", b"Bearer PH-123"), HeaderUse::Filled(b"Bearer real-v".to_vec()));
        assert_eq!(header_use(&b, "authorization", b"bearer PH-123"), HeaderUse::Filled(b"bearer real-v".to_vec()));
        assert_eq!(header_use(&b, "X-Api-Key", b"PH-123"), HeaderUse::Filled(b"real-v".to_vec()));
        assert_eq!(header_use(&b, "api-key", b"PH-123"), HeaderUse::Filled(b"real-v".to_vec()));
        for (name, value) in [
            ("Authorization", b"Bearer PH-123 x".as_slice()),
            ("Authorization", b"Basic PH-123"),
            ("Authorization", b"PH-123"),
            ("Authorization", b"Bearer  PH-123"),
            ("x-api-key", b"PH-123PH-123"),
            ("x-api-key", b" PH-123"),
            ("x-echo", b"PH-123"),
            ("x-PH-123", b"v"),
        ] {
            assert_eq!(header_use(&b, name, value), HeaderUse::Misplaced("KEY".into()), "{name}: {value:?}");
        }
        assert_eq!(header_use(&b, "x-echo", b"nothing"), HeaderUse::Plain);
        let goog = binding(vec![HeaderSlot::parse("x-goog-api-key").unwrap()]);
        assert_eq!(header_use(&goog, "x-goog-api-key", b"PH-123"), HeaderUse::Filled(b"real-v".to_vec()));
        assert_eq!(header_use(&goog, "authorization", b"Bearer PH-123"), HeaderUse::Misplaced("KEY".into()));
    }

    #[test]
    fn header_specs_are_checked() {
        assert_eq!(
            HeaderSlot::parse("Authorization:Token").unwrap(),
            HeaderSlot { name: "authorization".into(), scheme: Some("Token".into()) }
        );
        assert!(matches!(HeaderSlot::parse("x y"), Err(SlotError::BadName(_))));
        assert!(matches!(HeaderSlot::parse("a:b c"), Err(SlotError::BadScheme(_))));
        assert!(matches!(HeaderSlot::parse("Host"), Err(SlotError::Reserved(_))));
        assert!(matches!(HeaderSlot::parse("content-length"), Err(SlotError::Reserved(_))));
    }

    #[test]
    fn the_mask_has_the_value_s_length() {
        let mut b = binding(vec![]).remove(0);
        assert_eq!(b.mask().mask, b"PH-123");
        b.value = b"a-much-longer-value".to_vec();
        assert_eq!(b.mask().mask.len(), b.value.len());
        assert!(!format!("{b:?}").contains("real"));
    }
}
