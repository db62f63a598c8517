//! What a restored guest is told to change (`HostMsg::Refresh`, protocol v3) and what it
//! answers; JSON inside the frames, so that fields can grow without a protocol version.

use serde::{Deserialize, Serialize};

/// What [`HostMsg::Refresh`](super::HostMsg::Refresh) asks of the guest (travels as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    /// Random bytes from the host, hex: mixed into the kernel's pool, which is then reseeded,
    /// so that two guests restored from one snapshot never produce the same random bytes.
    pub seed_hex: String,
    /// The host's wall clock (ns since the epoch): the guest's clock is stepped to it.
    pub unix_ns: u64,
    /// A new identity, for a guest that is a clone (not for a resume).
    pub identity: Option<Identity>,
}

/// A clone's own identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// Base64 of root's `authorized_keys` (the key of the home that restores the snapshot).
    pub authorized_key_b64: String,
    /// The clone's new SSH host key, made by the host. Absent from older hosts: the guest
    /// then makes one itself, which costs ~0.2 s of a restore under emulation (the curve
    /// arithmetic runs on a cold translation cache). A guest that predates the field ignores
    /// it and reports the key it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<HostKey>,
}

/// An SSH host key pair, both halves in OpenSSH's formats (ed25519). The public half travels
/// too so that the guest does no curve arithmetic at all: it writes both as given (deriving
/// the public key from the private one, which parsing the private key does, costs what
/// making one costs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` ...
    pub private: PrivateText,
    /// `ssh-ed25519 AAAA...`
    pub public: String,
}

/// Text that is a secret (a private key): travels like a `String` but never shows in a
/// `Debug` rendering, so that no log line carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrivateText(pub String);

impl std::fmt::Debug for PrivateText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateText(<{} bytes, not shown>)", self.0.len())
    }
}

/// The guest's answer to a [`Refresh`] (as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Refreshed {
    /// The new SSH host public key, when an identity was asked for.
    pub host_key: Option<String>,
    /// Steps that failed, each a line (the others were done).
    pub errors: Vec<String>,
    /// How long each step took in the guest, µs, in order (absent from older guests): what
    /// a restore spends where, for `status` and the bench.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps_us: Vec<(String, u64)>,
}
