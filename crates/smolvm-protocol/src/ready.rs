//! The readiness line: the guest's push notification that it can be reached.
//!
//! The init prints exactly one such line on the serial console once sshd listens:
//!
//! ```text
//! SMOLVM_READY {"v":1,"host_key":"ssh-ed25519 AAAA...","boot_us":{"init":..,"mounts":..,"network":..,"sshd":..}}
//! ```
//!
//! The host waits for it instead of polling SSH, and pins `host_key` in the sandbox's
//! `known_hosts`, so that the first SSH connection is already strict. Timestamps are
//! microseconds of `CLOCK_BOOTTIME` (time since the guest kernel started), so the host can tell
//! kernel boot from init work without sharing a clock with the guest.

use serde::{Deserialize, Serialize};

/// Prefix of the readiness line; the JSON object follows after one space.
pub const READY_PREFIX: &str = "SMOLVM_READY ";

/// Version of the readiness line's JSON object.
pub const READY_VERSION: u32 = 1;

/// What the guest reports when it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Format version, [`READY_VERSION`] when written by this crate.
    pub v: u32,
    /// The guest sshd's host public key, one OpenSSH `authorized_keys`-style line.
    pub host_key: String,
    /// Boot phases, each the `CLOCK_BOOTTIME` microsecond at which the phase *ended*.
    pub boot_us: BootPhases,
}

/// `CLOCK_BOOTTIME` stamps in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BootPhases {
    /// The init's first instruction (kernel boot time before it).
    pub init: u64,
    /// Pseudo-filesystems mounted.
    pub mounts: u64,
    /// Loopback and the configured interface up.
    pub network: u64,
    /// sshd accepted a TCP connection on port 22.
    pub sshd: u64,
}

impl Ready {
    /// The full console line, without a trailing newline.
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).expect("plain strings and integers serialize");
        format!("{READY_PREFIX}{json}")
    }

    /// Finds a readiness line within one line of console output. The console may prefix it with
    /// other bytes (a kernel message interleaving), so the prefix is searched, not anchored.
    pub fn parse_line(line: &str) -> Option<Result<Ready, serde_json::Error>> {
        let at = line.find(READY_PREFIX)?;
        Some(serde_json::from_str(line[at + READY_PREFIX.len()..].trim_end()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ready {
        Ready {
            v: READY_VERSION,
            host_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE root@smolvm".into(),
            boot_us: BootPhases { init: 1, mounts: 2, network: 3, sshd: 4 },
        }
    }

    #[test]
    fn line_format_is_pinned() {
        assert_eq!(
            sample().to_line(),
            r#"SMOLVM_READY {"v":1,"host_key":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE root@smolvm","boot_us":{"init":1,"mounts":2,"network":3,"sshd":4}}"#
        );
    }

    #[test]
    fn parses_with_noise_before_and_cr_after() {
        let line = format!("[    1.0] x{}\r", sample().to_line());
        assert_eq!(Ready::parse_line(&line).map(Result::ok), Some(Some(sample())));
        assert!(Ready::parse_line("no marker").is_none());
        assert!(matches!(Ready::parse_line("SMOLVM_READY {bad"), Some(Err(_))));
    }

    #[test]
    fn unknown_fields_are_ignored_by_readers() {
        let line = r#"SMOLVM_READY {"v":1,"host_key":"k","boot_us":{"init":1,"mounts":2,"network":3,"sshd":4,"agent":5},"new":true}"#;
        assert!(matches!(Ready::parse_line(line), Some(Ok(_))));
    }
}
