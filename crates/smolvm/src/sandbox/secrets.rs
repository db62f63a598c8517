//! Secrets that never enter the sandbox: the guest's variable holds a placeholder, and the
//! network process puts the real value into requests to the secret's hosts only
//! (`net::intercept`).
//!
//! Where each part lives: the values, placeholders and hosts in `secrets.json` of the sandbox's
//! host directory (0600; never in the database, the guest, a command line or a log); the
//! sandbox's CA in `egress-ca.pem` (public: the guest trusts it) and `egress-ca.key` (0600);
//! at run time the values in the network process's memory, handed over its control socket.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lifecycle::LifecycleError;
use super::{Smolvm, Status};
use crate::net::intercept::rules::HeaderSlot;
use crate::net::intercept::{InterceptConfig, SecretRule};
use crate::net::policy::{normalize_name, NetworkMode, NetworkPolicy};

/// A secret's value: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> SecretValue {
        SecretValue(value.into())
    }
    /// The value itself, for the one place that needs it (the network process's rules).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

/// A secret handed to a sandbox: the guest's variable `name`, the hosts its value may be sent
/// to (over TLS), the request headers it is sent in (empty: [`HeaderSlot::defaults`]), and the
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub hosts: Vec<String>,
    pub headers: Vec<HeaderSlot>,
    pub value: SecretValue,
}

/// What `secret list` shows: never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub hosts: Vec<String>,
    /// The headers its value is sent in, as `name: [scheme ]<{}>`.
    pub headers: Vec<String>,
}

/// Why a secret is refused (before anything is created or changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?}: not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    BadName { name: String },
    #[error("secret {name}: no host given: say where it may be sent, as {name}@HOST[,HOST...]")]
    NoHost { name: String },
    #[error("secret {name}: {host:?} is not a host name (an IP address cannot be checked against a certificate)")]
    BadHost { name: String, host: String },
    #[error("secret {name}: the sandbox's network policy refuses {host} ({rule})")]
    Refused { name: String, host: String, rule: String },
    #[error("secret {name}: its value is empty")]
    Empty { name: String },
    #[error("secret {name}: its value has a line break or a control character (it goes into HTTP headers)")]
    BadValue { name: String },
    #[error("secret {name} is given twice")]
    Twice { name: String },
}

/// One secret as stored in `secrets.json`.
#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    name: String,
    hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<HeaderSlot>,
    placeholder: String,
    value: String,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

/// Checks `secrets` against each other and against the sandbox's `policy`.
pub fn validate(secrets: &[Secret], policy: &NetworkPolicy) -> Result<(), SecretError> {
    let mut seen = std::collections::HashSet::new();
    for s in secrets {
        let name = s.name.clone();
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(SecretError::BadName { name });
        }
        if !seen.insert(name.clone()) {
            return Err(SecretError::Twice { name });
        }
        if s.hosts.is_empty() {
            return Err(SecretError::NoHost { name });
        }
        if s.value.0.is_empty() {
            return Err(SecretError::Empty { name });
        }
        if s.value.0.chars().any(|c| c.is_control()) {
            return Err(SecretError::BadValue { name });
        }
        for h in &s.hosts {
            let host = normalize_name(h);
            let is_name = host.contains('.')
                && host.parse::<std::net::IpAddr>().is_err()
                && host.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !is_name {
                return Err(SecretError::BadHost { name, host: h.clone() });
            }
            if policy.mode == NetworkMode::None {
                return Err(SecretError::Refused { name, host, rule: "network none".into() });
            }
            if !policy.allow_domains.is_empty() && !policy.allow_domains.iter().any(|d| d.matches(&host)) {
                return Err(SecretError::Refused { name, host, rule: "not in --allow-domain".into() });
            }
        }
    }
    Ok(())
}

/// Key prefixes that name a provider's key format, public in every such key: a placeholder
/// keeps one, so that tools that check a key's shape accept it. Nothing else of the value is
/// copied (a prefix of the value itself could be secret: a UUID-shaped key's first group).
const PUBLIC_PREFIXES: &[&str] = &[
    "sk-ant-api03-",
    "sk-ant-admin01-",
    "sk-ant-",
    "sk-proj-",
    "sk-svcacct-",
    "sk-or-v1-",
    "sk-",
    "github_pat_",
    "ghp_",
    "gho_",
    "ghs_",
    "glpat-",
    "gsk_",
    "xai-",
    "hf_",
    "AIza",
];

/// The fewest random hex digits a placeholder has.
const MIN_RANDOM: usize = 24;

/// A placeholder for `value`: a public key-format prefix if the value has one, the marker
/// `smolvm-placeholder-`, and random hex digits up to the value's length (longer for a short
/// value), so that an echo of the value can be replaced by it in place.
fn placeholder_for(value: &str) -> String {
    let prefix = PUBLIC_PREFIXES.iter().find(|p| value.starts_with(**p)).copied().unwrap_or("");
    let head = format!("{prefix}smolvm-placeholder-");
    let digits = value.len().saturating_sub(head.len()).max(MIN_RANDOM);
    let mut bytes = vec![0u8; digits.div_ceil(2)];
    crate::digest::random_bytes(&mut bytes);
    let mut hex = hex::encode(bytes);
    hex.truncate(digits);
    format!("{head}{hex}")
}

pub(super) fn secrets_file(dir: &Path) -> PathBuf {
    dir.join("secrets.json")
}
fn ca_cert_file(dir: &Path) -> PathBuf {
    dir.join("egress-ca.pem")
}
fn ca_key_file(dir: &Path) -> PathBuf {
    dir.join("egress-ca.key")
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> super::SandboxError {
    move |source| super::SandboxError::Io { what, source }
}

fn load(dir: &Path) -> Result<Vec<Stored>, super::SandboxError> {
    let path = secrets_file(dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| super::SandboxError::Io {
            what: format!("read {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

/// Writes a file of the owner's only, atomically (a temporary file made 0600 first).
fn write_private(path: &Path, body: &[u8]) -> Result<(), super::SandboxError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = crate::text::create_private(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    f.write_all(body).and_then(|()| f.sync_all()).map_err(io_err(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("rename {}", path.display())))
}

fn save(dir: &Path, all: &[Stored]) -> Result<(), super::SandboxError> {
    if all.is_empty() {
        let _ = std::fs::remove_file(secrets_file(dir));
        return Ok(());
    }
    let body = serde_json::to_vec(all).map_err(|e| super::SandboxError::Io {
        what: "encode secrets.json".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    write_private(&secrets_file(dir), &body)
}

/// The sandbox's CA (made on first use): (label, certificate PEM, key PEM).
fn ca(dir: &Path, label: &str) -> Result<(String, String), super::SandboxError> {
    let (cert, key) = (ca_cert_file(dir), ca_key_file(dir));
    if let (Ok(c), Ok(k)) = (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) {
        return Ok((c, k));
    }
    let (c, k) = crate::net::intercept::ca::generate(label).map_err(|e| super::SandboxError::Io {
        what: "make the sandbox's CA".into(),
        source: std::io::Error::other(e),
    })?;
    write_private(&key, k.as_bytes())?;
    write_private(&cert, c.as_bytes())?;
    Ok((c, k))
}

/// Where the guest finds the CA, and the variables that point tools at it.
pub(super) const GUEST_CA: &str = "/usr/local/share/ca-certificates/smolvm-egress.crt";
const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Smolvm {
    /// Stores `secrets` for sandbox `name` (new ones get a placeholder; a secret given again
    /// keeps its placeholder and takes the new value and hosts).
    pub(super) fn store_secrets(&self, name: &str, secrets: &[Secret]) -> Result<(), super::SandboxError> {
        let dir = self.dir(name);
        let mut all = load(&dir)?;
        for s in secrets {
            let hosts: Vec<String> = s.hosts.iter().map(|h| normalize_name(h)).collect();
            match all.iter_mut().find(|x| x.name == s.name) {
                Some(x) => {
                    x.hosts = hosts;
                    x.headers = s.headers.clone();
                    x.value = s.value.0.clone();
                }
                None => all.push(Stored {
                    name: s.name.clone(),
                    hosts,
                    headers: s.headers.clone(),
                    placeholder: placeholder_for(&s.value.0),
                    value: s.value.0.clone(),
                }),
            }
        }
        save(&dir, &all)
    }

    /// The secrets of sandbox `name` with their values, for a clone of it (which gets its own
    /// placeholders and CA).
    pub(super) fn stored_secrets(&self, name: &str) -> Result<Vec<Secret>, super::SandboxError> {
        Ok(load(&self.dir(name))?
            .into_iter()
            .map(|s| Secret { name: s.name, hosts: s.hosts, headers: s.headers, value: SecretValue::new(s.value) })
            .collect())
    }

    /// The secrets of sandbox `name`: names and hosts.
    pub fn secrets(&self, name: &str) -> Result<Vec<SecretInfo>, super::SandboxError> {
        self.row(name)?;
        Ok(load(&self.dir(name))?
            .into_iter()
            .map(|s| {
                let slots = if s.headers.is_empty() { HeaderSlot::defaults() } else { s.headers };
                SecretInfo { name: s.name, hosts: s.hosts, headers: slots.iter().map(|h| h.to_string()).collect() }
            })
            .collect())
    }

    /// Adds or replaces a secret of sandbox `name`; a running sandbox uses it at once.
    pub fn set_secret(&self, name: &str, secret: Secret) -> Result<(), LifecycleError> {
        let _lock = self.lock(name)?;
        let row = self.row(name)?;
        validate(std::slice::from_ref(&secret), &row.policy)
            .map_err(|source| LifecycleError::Secret { name: name.into(), source })?;
        self.store_secrets(name, &[secret])?;
        self.apply_secrets(name)
    }

    /// Removes a secret; `false` if it had none of that name.
    pub fn unset_secret(&self, name: &str, secret: &str) -> Result<bool, LifecycleError> {
        let _lock = self.lock(name)?;
        self.row(name)?;
        let dir = self.dir(name);
        let mut all = load(&dir)?;
        let before = all.len();
        all.retain(|s| s.name != secret);
        let removed = all.len() != before;
        save(&dir, &all)?;
        self.apply_secrets(name)?;
        Ok(removed)
    }

    /// Hands a running sandbox's secrets to its network process and their placeholders to
    /// its guest.
    fn apply_secrets(&self, name: &str) -> Result<(), LifecycleError> {
        if Self::status_of(&self.row(name)?) != Status::Running {
            return Ok(());
        }
        self.send_intercept(name).map_err(|source| LifecycleError::SecretsNotApplied { name: name.into(), source })?;
        self.install_ca(name)?;
        self.push_env(name)
    }

    /// Tells the network process of a starting or running sandbox its secrets (none: nothing
    /// is intercepted).
    pub(super) fn send_intercept(&self, name: &str) -> Result<(), crate::net::NetError> {
        let dir = self.dir(name);
        let all = load(&dir).map_err(|e| crate::net::NetError::Start(e.to_string()))?;
        let rules: Vec<SecretRule> = all
            .iter()
            .map(|s| SecretRule {
                name: s.name.clone(),
                hosts: s.hosts.clone(),
                placeholder: s.placeholder.clone(),
                value: s.value.clone(),
                headers: s.headers.clone(),
            })
            .collect();
        if rules.is_empty() && !ca_key_file(&dir).exists() {
            return Ok(());
        }
        let (ca_cert_pem, ca_key_pem) = ca(&dir, name).map_err(|e| crate::net::NetError::Start(e.to_string()))?;
        let extra_roots_pem = match &self.config().egress_extra_roots {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| crate::net::NetError::Io { what: format!("read {}", p.display()), source })?,
            ),
            None => None,
        };
        let config = InterceptConfig { rules, ca_label: name.to_string(), ca_cert_pem, ca_key_pem, extra_roots_pem };
        crate::net::control(&dir, &crate::net::ControlRequest::Intercept { config }).map(|_| ())
    }

    /// The variables the guest gets for its secrets: each placeholder, and (when it has any)
    /// where tools find the sandbox's CA.
    pub(super) fn secret_env(&self, name: &str) -> Result<Vec<(String, String)>, super::SandboxError> {
        let all = load(&self.dir(name))?;
        let mut vars: Vec<(String, String)> = all.iter().map(|s| (s.name.clone(), s.placeholder.clone())).collect();
        if !all.is_empty() {
            for (k, v) in [
                ("NODE_EXTRA_CA_CERTS", GUEST_CA),
                ("SSL_CERT_FILE", GUEST_BUNDLE),
                ("REQUESTS_CA_BUNDLE", GUEST_BUNDLE),
                ("CURL_CA_BUNDLE", GUEST_BUNDLE),
            ] {
                vars.push((k.into(), v.into()));
            }
        }
        Ok(vars)
    }

    /// Makes the guest trust the sandbox's CA (its system bundle and `GUEST_CA`), if it has
    /// secrets. Idempotent: a restarted sandbox has it already.
    pub(super) fn install_ca(&self, name: &str) -> Result<(), LifecycleError> {
        let dir = self.dir(name);
        if load(&dir)?.is_empty() {
            return Ok(());
        }
        let (cert, _) = ca(&dir, name)?;
        let script = format!(
            "set -e; mkdir -p {d}; cat > {ca}; \
             grep -q 'smolvm egress CA {name}' {b} 2>/dev/null || \
             {{ printf '\\n# smolvm egress CA {name}\\n' >> {b}; cat {ca} >> {b}; }}",
            d = Path::new(GUEST_CA).parent().map(|p| p.display().to_string()).unwrap_or_default(),
            ca = GUEST_CA,
            b = GUEST_BUNDLE,
        );
        let out = self
            .exec(
                name,
                &["sh".into(), "-c".into(), script],
                Some(cert.as_bytes()),
                Some(std::time::Duration::from_secs(60)),
            )
            .map_err(|source| LifecycleError::Env { name: name.into(), source })?;
        if out.code() != 0 {
            return Err(LifecycleError::Env {
                name: name.into(),
                source: crate::agent::AgentError::Guest {
                    sandbox: name.into(),
                    message: format!("installing the sandbox's CA failed: {}", String::from_utf8_lossy(&out.stderr)),
                    errno: None,
                },
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, hosts: &[&str], value: &str) -> Secret {
        Secret {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            headers: vec![],
            value: SecretValue::new(value),
        }
    }

    #[test]
    fn bad_secrets_are_refused_with_what_is_wrong() {
        let p = NetworkPolicy::default();
        assert!(validate(&[s("OPENAI_API_KEY", &["api.openai.com"], "sk-1")], &p).is_ok());
        assert!(matches!(validate(&[s("OPENAI_API_KEY", &[], "v")], &p), Err(SecretError::NoHost { .. })));
        assert!(matches!(validate(&[s("1X", &["a.b"], "v")], &p), Err(SecretError::BadName { .. })));
        assert!(matches!(validate(&[s("K", &["10.0.0.1"], "v")], &p), Err(SecretError::BadHost { .. })));
        assert!(matches!(validate(&[s("K", &["a.b"], "")], &p), Err(SecretError::Empty { .. })));
        assert!(matches!(validate(&[s("K", &["a.b"], "x\r\nEvil: 1")], &p), Err(SecretError::BadValue { .. })));
        assert!(matches!(
            validate(&[s("K", &["a.b"], "v"), s("K", &["c.d"], "w")], &p),
            Err(SecretError::Twice { .. })
        ));
        let none = NetworkPolicy { mode: NetworkMode::None, ..NetworkPolicy::default() };
        assert!(matches!(validate(&[s("K", &["a.b"], "v")], &none), Err(SecretError::Refused { .. })));
        let only = NetworkPolicy { allow_domains: vec!["*.example.com".parse().unwrap()], ..NetworkPolicy::default() };
        assert!(validate(&[s("K", &["api.example.com"], "v")], &only).is_ok());
        assert!(matches!(validate(&[s("K", &["api.other.com"], "v")], &only), Err(SecretError::Refused { .. })));
    }

    #[test]
    fn placeholders_are_random_shaped_like_the_value_and_never_it() {
        let a = placeholder_for("sk-proj-abcdef0123456789");
        let b = placeholder_for("sk-proj-abcdef0123456789");
        assert_ne!(a, b);
        assert!(a.starts_with("sk-proj-smolvm-placeholder-"), "{a}");
        assert!(!a.contains("abcdef0123456789"));
        assert!(placeholder_for("plainvalue").starts_with("smolvm-placeholder-"));
        assert!(!format!("{:?}", SecretValue::new("hunter2")).contains("hunter2"));
        // A long value: the placeholder has its length, so an echo is masked in place.
        let long = format!("sk-ant-api03-{}", "Q".repeat(95));
        let p = placeholder_for(&long);
        assert_eq!(p.len(), long.len());
        assert!(p.starts_with("sk-ant-api03-smolvm-placeholder-"), "{p}");
    }

    #[test]
    fn a_placeholder_carries_no_part_of_the_value_beyond_a_public_prefix() {
        // A UUID-shaped key: its first group was copied before (48 bits of it).
        let uuid = "8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60";
        let p = placeholder_for(uuid);
        let random = p.strip_prefix("smolvm-placeholder-").unwrap_or_else(|| panic!("{p}"));
        assert!(random.len() >= MIN_RANDOM && random.chars().all(|c| c.is_ascii_hexdigit()), "{p}");
        assert!(!p.contains("8f14e45f") && !p.contains("1c2b3d4e5f60"), "{p}");
        // Many values, the same rule: only the marker and random digits after the prefix.
        for v in ["AKIAIOSFODNN7EXAMPLE", "my-team-key-0001-zz", "Bearer-ish_value"] {
            let p = placeholder_for(v);
            assert!(p.starts_with("smolvm-placeholder-") && p.len() >= v.len(), "{v}: {p}");
        }
    }
}
