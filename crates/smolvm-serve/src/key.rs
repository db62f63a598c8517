//! The server's API key: generated on first run, kept 0600 in the home, compared in constant
//! time; and the per-sandbox access tokens derived from it.
//!
//! Why derived tokens: the E2B SDKs send the API key to the control plane only; requests to a
//! sandbox carry the `envdAccessToken` the control plane returned for it. An HMAC of the
//! sandbox's id under the key needs no storage, survives a restart of the server, and a token
//! of one sandbox opens no other.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path} holds no key (an empty or malformed file); delete it to have a new one made")]
    Empty { path: PathBuf },
}

/// The API key (never printed by `Debug`).
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// The key's prefix, so that it is recognisable in a configuration file.
const PREFIX: &str = "smolvm_";

impl ApiKey {
    pub fn new(value: impl Into<String>) -> ApiKey {
        ApiKey(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads the key at `path`, or makes one there (0600, written whole or not at all).
    /// Returns it and whether it was made now.
    pub fn load_or_create(path: &Path) -> Result<(ApiKey, bool), KeyError> {
        let io = |source| KeyError::Io { path: path.to_path_buf(), source };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Mode { path: path.to_path_buf(), mode });
                }
                let key = text.trim();
                if key.len() < 16 {
                    return Err(KeyError::Empty { path: path.to_path_buf() });
                }
                Ok((ApiKey(key.to_string()), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let key = ApiKey(format!("{PREFIX}{}", hex::encode(random_bytes::<24>().map_err(io)?)));
                let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
                f.write_all(format!("{}\n", key.0).as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
                // A second server starting at the same moment: the first rename wins, both
                // read that one back.
                std::fs::hard_link(&tmp, path).or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(io(e)),
                })?;
                let _ = std::fs::remove_file(&tmp);
                let (key2, _) = ApiKey::load_or_create(path)?;
                let made = key2.0 == key.0;
                Ok((key2, made))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Whether `given` is this key, in time independent of where they differ.
    pub fn matches(&self, given: &str) -> bool {
        self.0.as_bytes().ct_eq(given.as_bytes()).into()
    }

    /// The access token of sandbox `id` of creation `generation` (a nonce made when the API
    /// created it): hex of HMAC-SHA256(key, "envd:" + id + ":" + generation). A sandbox
    /// deleted and created again under the same name has another generation: the old token
    /// (and every URL signed with it) opens nothing.
    pub fn sandbox_token(&self, id: &str, generation: &str) -> String {
        hex::encode(self.mac(id, generation).finalize().into_bytes())
    }

    /// Whether `token` is sandbox `id`'s (of `generation`), in constant time.
    pub fn token_matches(&self, id: &str, generation: &str, token: &str) -> bool {
        let Ok(raw) = hex::decode(token) else { return false };
        self.mac(id, generation).verify_slice(&raw).is_ok()
    }

    fn mac(&self, id: &str, generation: &str) -> Hmac<sha2::Sha256> {
        #[allow(clippy::expect_used)]
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(self.0.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"envd:");
        mac.update(id.as_bytes());
        // A sandbox from before generations (or made outside the API) keeps the token it had.
        if !generation.is_empty() {
            mac.update(b":");
            mac.update(generation.as_bytes());
        }
        mac
    }
}

fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b)
}

/// A random hex string (ids that must not be guessed).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if ok.is_err() {
        // /dev/urandom always exists on Linux; a fallback that still differs per call.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = <sha2::Sha256 as sha2::Digest>::digest(format!("{t:?}{}", std::process::id()).as_bytes()).to_vec();
        b.truncate(bytes);
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn made_once_private_and_read_back() {
        let d = std::env::temp_dir().join(format!("smolvm-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let path = d.join("serve/api-key");
        let (k, made) = ApiKey::load_or_create(&path).unwrap();
        assert!(made && k.expose().starts_with(PREFIX));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, made2) = ApiKey::load_or_create(&path).unwrap();
        assert!(!made2 && k2.matches(k.expose()));
        assert!(!k.matches("smolvm_wrong") && !k.matches(""));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(ApiKey::load_or_create(&path), Err(KeyError::Mode { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_sandbox_token_opens_that_sandbox_only() {
        let k = ApiKey::new("smolvm_0123456789abcdef");
        let t = k.sandbox_token("sbx-a", "g1");
        assert!(k.token_matches("sbx-a", "g1", &t));
        assert!(!k.token_matches("sbx-b", "g1", &t));
        assert!(!ApiKey::new("smolvm_other_key_0000").token_matches("sbx-a", "g1", &t));
        assert!(!k.token_matches("sbx-a", "g1", "zz"));
        // The same name created again: the old token opens nothing.
        assert!(!k.token_matches("sbx-a", "g2", &t));
        assert_ne!(k.sandbox_token("sbx-a", "g2"), t);
    }
}
