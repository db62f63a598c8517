//! How a [`crate::sandbox::Smolvm`] is set up: every value the library would otherwise look up
//! in the process environment. The CLI builds it from its environment (`SMOLVM_HOME`,
//! `SMOLVM_IMAGES_MANIFEST`, ...); an SDK user builds it in code. The library itself never
//! reads the environment.

use std::path::PathBuf;

use crate::paths::Home;

/// Where a sandbox's images come from. Both `None`: the release pinned in this binary (or the
/// one `image import` made this home's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOverrides {
    /// Another release's `manifest.json`, a path or an http(s) URL.
    pub manifest: Option<String>,
    /// Download `<prefix>/<tag>/<asset>` instead of the release's own URLs (a mirror).
    pub url_prefix: Option<String>,
    /// Accept a manifest over plain `http://`. Off by default: the manifest *is* the list of
    /// digests everything else is checked against, so whoever can alter it in transit chooses
    /// what the sandboxes boot. (Assets may come over http: each is checked against it.)
    pub allow_insecure_manifest: bool,
}

/// The configuration of one smolvm installation.
#[derive(Debug, Clone)]
pub struct Config {
    pub home: Home,
    pub images: ImageOverrides,
    /// The QEMU system emulator.
    pub qemu: PathBuf,
    /// The `smolvm` executable that runs each sandbox's helper processes (`__netd`,
    /// `__agent-proxy`).
    pub helper: PathBuf,
    /// A `tracing` filter handed to the helpers (their logs are in the sandbox directory).
    pub helper_log: Option<String>,
    /// A hosts file that sandboxes' resolvers consult first (tests that build an "internet").
    pub resolver_hosts: Option<PathBuf>,
    /// The uids and gids that sandboxes' processes run as when this process is root (QEMU,
    /// its network process and agent proxy: one uid per sandbox, so that no sandbox's QEMU can
    /// reach another's processes or files). `None` as root: sandboxes refuse to boot.
    pub vm_users: Option<VmUsers>,
    /// Where the host-wide uid leases live (`sandbox::uids`): one directory for every home on
    /// the host, so that no two homes' sandboxes share a uid.
    pub uid_leases: PathBuf,
    /// A PEM file of CA certificates trusted for the real hosts that secrets go to, besides
    /// the host's own roots (tests that stand up their own "provider" with a test CA).
    pub egress_extra_roots: Option<PathBuf>,
    /// The mask for files written for the user outside the home (`copy_out`): the user's own
    /// umask, which a program may have narrowed for its own files.
    pub user_umask: u32,
}

impl Config {
    /// Defaults for `home`: the compiled-in release, `qemu-system-x86_64` on `PATH`, and this
    /// program as the helper if it is `smolvm` (else a `smolvm` beside it, else on `PATH`).
    pub fn new(home: Home) -> Config {
        Config {
            home,
            images: ImageOverrides::default(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            helper: default_helper(),
            helper_log: None,
            resolver_hosts: None,
            vm_users: None,
            uid_leases: PathBuf::from(DEFAULT_UID_LEASES),
            egress_extra_roots: None,
            user_umask: current_umask(),
        }
    }
}

/// The host-wide uid lease directory (on a tmpfs: no process outlives a reboot, nor a lease).
pub const DEFAULT_UID_LEASES: &str = "/run/smolvm/uids";

/// A range of ids reserved for sandboxes: sandbox slot `i` runs as `uid_base + i`,
/// `gid_base + i`. `scripts/install-host-deps.sh` creates the system user `smolvm` and gives
/// it such a range in `/etc/subuid` and `/etc/subgid`, so that no other user or container
/// tool on the host is handed the same ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUsers {
    pub uid_base: u32,
    pub gid_base: u32,
    pub count: u32,
    /// The group of the user `smolvm`: the sandboxes' one supplementary group, which may read
    /// the kernel images.
    pub images_gid: u32,
}

/// The system user that `scripts/install-host-deps.sh` creates for sandboxes.
pub const VM_USER: &str = "smolvm";

impl VmUsers {
    /// The range of the system user `user`, read from this host's `/etc/subuid`,
    /// `/etc/subgid` and `/etc/passwd`. Called by the program that builds a [`Config`] (the
    /// library reads no host configuration by itself).
    pub fn of_system_user(user: &str) -> Option<VmUsers> {
        let subuid = std::fs::read_to_string("/etc/subuid").ok()?;
        let subgid = std::fs::read_to_string("/etc/subgid").ok()?;
        // The user's primary group (NAME:x:UID:GID:...).
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let gid = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&user)).then(|| f.get(3)?.parse::<u32>().ok()).flatten()
        })?;
        VmUsers::from_subid_files(user, &subuid, &subgid, gid)
    }

    /// The identity of slot `slot`, if the range has it.
    pub fn identity(&self, slot: u32) -> Option<crate::child::Identity> {
        (slot < self.count).then(|| crate::child::Identity {
            uid: self.uid_base + slot,
            gid: self.gid_base + slot,
            images_gid: self.images_gid,
        })
    }

    /// Parses the `NAME:START:COUNT` lines of `/etc/subuid` and `/etc/subgid` for `user`, whose
    /// group is `images_gid`.
    pub fn from_subid_files(user: &str, subuid: &str, subgid: &str, images_gid: u32) -> Option<VmUsers> {
        let find = |text: &str| {
            text.lines().find_map(|l| {
                let mut f = l.trim().split(':');
                (f.next()? == user).then_some(())?;
                let start: u32 = f.next()?.parse().ok()?;
                let count: u32 = f.next()?.parse().ok()?;
                (start > 0 && count > 0 && start.checked_add(count).is_some()).then_some((start, count))
            })
        };
        let (uid_base, ucount) = find(subuid)?;
        let (gid_base, gcount) = find(subgid)?;
        Some(VmUsers { uid_base, gid_base, count: ucount.min(gcount), images_gid })
    }
}

/// This process's umask, read without changing it (other threads may be creating files).
pub fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

fn default_helper() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "smolvm") {
            return exe;
        }
        if let Some(sibling) = exe.parent().map(|d| d.join("smolvm")).filter(|p| p.is_file()) {
            return sibling;
        }
    }
    PathBuf::from("smolvm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_comes_from_the_subid_files_and_is_bounded() {
        let u = VmUsers::from_subid_files("smolvm", "alice:100000:65536\nsmolvm:300000:1000\n", "smolvm:400000:500", 9);
        let u = u.unwrap();
        assert_eq!(u, VmUsers { uid_base: 300000, gid_base: 400000, count: 500, images_gid: 9 });
        assert_eq!(u.identity(0), Some(crate::child::Identity { uid: 300000, gid: 400000, images_gid: 9 }));
        assert_eq!(u.identity(500), None);
        assert!(VmUsers::from_subid_files("smolvm", "alice:1:2", "smolvm:1:2", 9).is_none());
        assert!(VmUsers::from_subid_files("smolvm", "smolvm:0:5", "smolvm:1:2", 9).is_none(), "never uid 0");
        assert!(VmUsers::from_subid_files("smolvm", "smolvm:4294967290:100", "smolvm:1:2", 9).is_none());
    }
}
