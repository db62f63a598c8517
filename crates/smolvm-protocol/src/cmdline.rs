//! Kernel command-line keys shared by host and guest.
//!
//! The host never puts secrets here: the command line is readable by every process in the guest
//! (`/proc/cmdline`) and appears in the host's process list. An SSH *public* key is not a secret.

/// Base64 (standard alphabet, padded) of one or more `authorized_keys` lines for root.
pub const AUTHORIZED_KEY_B64: &str = "smolvm.authorized_key_b64";

/// The guest's hostname. Overrides the hostname field of `ip=`.
pub const HOSTNAME: &str = "smolvm.hostname";

/// The block device holding the sandbox's writable layer (e.g. `/dev/vdb`), an ext4 filesystem.
/// When present, the root device (the shared, read-only base) becomes the lower layer of an
/// overlayfs whose upper layer lives on this device, and the init switches root into it. Without
/// it, the root device itself is the writable root.
pub const UPPER: &str = "smolvm.upper";

/// Read-only layers stacked over the base, top first, comma-separated block devices (e.g.
/// `/dev/vdc`): a preset's tooling. Used only with [`UPPER`].
pub const LAYERS: &str = "smolvm.layers";

/// The kernel's own static IP syntax, which the init parses itself (the kernel is built without
/// `CONFIG_IP_PNP`): `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.
pub const IP: &str = "ip";

/// Splits a kernel command line into `(key, value)` pairs. A bare word yields an empty value.
/// Quoted values (`key="a b"`) are unquoted, as the kernel does.
pub fn parse(cmdline: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let bytes = cmdline.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        let mut in_quote = false;
        while i < bytes.len() && (in_quote || !bytes[i].is_ascii_whitespace()) {
            if bytes[i] == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        if start == i {
            break;
        }
        let word = &cmdline[start..i];
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        out.push((k, v.trim_matches('"')));
    }
    out
}

/// The value of the last occurrence of `key` (the kernel's rule for repeated parameters).
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    parse(cmdline).into_iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_values_and_quotes() {
        let c = "console=ttyS0 root=/dev/vda rw quiet smolvm.hostname=\"my box\" ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
        let p = parse(c);
        assert_eq!(p[0], ("console", "ttyS0"));
        assert_eq!(p[2], ("rw", ""));
        assert_eq!(get(c, HOSTNAME), Some("my box"));
        assert_eq!(get(c, IP), Some("10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"));
        assert_eq!(get(c, AUTHORIZED_KEY_B64), None);
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(get("a=1 a=2", "a"), Some("2"));
    }

    #[test]
    fn keys_are_pinned() {
        // These strings are part of the boot ABI: old guests read them.
        assert_eq!(AUTHORIZED_KEY_B64, "smolvm.authorized_key_b64");
        assert_eq!(HOSTNAME, "smolvm.hostname");
        assert_eq!(UPPER, "smolvm.upper");
        assert_eq!(LAYERS, "smolvm.layers");
    }
}
