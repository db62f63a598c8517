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
            user_umask: current_umask(),
        }
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
