//! The library's configuration, from this process's environment: the only place that reads it.
//!
//! | variable | what |
//! |---|---|
//! | `SMOLVM_HOME` | everything in one directory (else XDG data and cache directories) |
//! | `SMOLVM_IMAGES_MANIFEST` | another release's `manifest.json` (path or URL) |
//! | `SMOLVM_IMAGES_URL` | a mirror prefix: `<prefix>/<tag>/<asset>` |
//! | `SMOLVM_ALLOW_INSECURE_MANIFEST=1` | accept `SMOLVM_IMAGES_MANIFEST` over plain http |
//! | `SMOLVM_QEMU` | the QEMU executable |
//! | `SMOLVM_BIN` | the `smolvm` that runs the helpers (default: this program) |
//! | `SMOLVM_LOG` | log filter, also handed to the helpers |
//! | `SMOLVM_RESOLVER_HOSTS` | a hosts file for sandboxes' resolvers (tests) |
//! | `SMOLVM_EGRESS_EXTRA_CA` | a PEM file of CAs trusted for secrets' hosts besides the host's (tests) |

use std::path::PathBuf;

use smolvm::config::{Config, ImageOverrides};
use smolvm::paths::Home;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The umask this process started with (main narrows its own to 077).
pub static USER_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The system user whose uid range sandboxes run in when smolvm is root.
pub const VM_USER: &str = smolvm::config::VM_USER;

/// The range `scripts/install-host-deps.sh` reserved in `/etc/subuid` and `/etc/subgid`.
pub fn vm_users() -> Option<smolvm::config::VmUsers> {
    smolvm::config::VmUsers::of_system_user(VM_USER)
}

pub fn home() -> Home {
    Home::from_vars(path("SMOLVM_HOME"), path("HOME"), path("XDG_DATA_HOME"), path("XDG_CACHE_HOME"))
}

pub fn from_env() -> Config {
    let mut c = Config::new(home());
    c.images = ImageOverrides {
        manifest: var("SMOLVM_IMAGES_MANIFEST"),
        url_prefix: var("SMOLVM_IMAGES_URL"),
        allow_insecure_manifest: var("SMOLVM_ALLOW_INSECURE_MANIFEST").is_some_and(|v| v == "1"),
    };
    if let Some(q) = path("SMOLVM_QEMU") {
        c.qemu = q;
    }
    if let Some(b) = path("SMOLVM_BIN") {
        c.helper = b;
    }
    c.helper_log = var("SMOLVM_LOG");
    c.resolver_hosts = path("SMOLVM_RESOLVER_HOSTS");
    c.egress_extra_roots = path("SMOLVM_EGRESS_EXTRA_CA");
    c.vm_users = vm_users();
    if let Some(m) = USER_UMASK.get() {
        c.user_umask = *m;
    }
    c
}
