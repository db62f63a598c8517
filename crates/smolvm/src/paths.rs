//! Where smolvm keeps things on the host.
//!
//! `SMOLVM_HOME`, if set, holds everything (state, sandboxes, keys, image cache). Otherwise the
//! XDG directories are used: state under `$XDG_DATA_HOME/smolvm` (`~/.local/share/smolvm`), the
//! image cache under `$XDG_CACHE_HOME/smolvm` (`~/.cache/smolvm`), which may be deleted at any
//! time and is refilled by a download.

use std::path::{Path, PathBuf};

/// The host directories of one smolvm installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// State: the database, sandboxes, SSH keys.
    pub data: PathBuf,
    /// Verified images.
    pub cache: PathBuf,
}

impl Home {
    /// From the values of `SMOLVM_HOME`, `HOME`, `XDG_DATA_HOME` and `XDG_CACHE_HOME` (the
    /// caller reads them; empty counts as unset).
    pub fn from_vars(
        smolvm_home: Option<PathBuf>,
        home: Option<PathBuf>,
        xdg_data: Option<PathBuf>,
        xdg_cache: Option<PathBuf>,
    ) -> Home {
        let set = |v: Option<PathBuf>| v.filter(|p| !p.as_os_str().is_empty());
        if let Some(h) = set(smolvm_home) {
            return Home::at(&h);
        }
        let home = set(home).unwrap_or_else(|| PathBuf::from("/root"));
        Home {
            data: set(xdg_data).unwrap_or_else(|| home.join(".local/share")).join("smolvm"),
            cache: set(xdg_cache).unwrap_or_else(|| home.join(".cache")).join("smolvm"),
        }
    }

    /// Everything under one directory.
    pub fn at(dir: &Path) -> Home {
        Home { data: dir.to_path_buf(), cache: dir.join("cache") }
    }

    pub fn images(&self) -> PathBuf {
        self.cache.join("images")
    }

    /// Snapshots a user took (`smolvm snapshot`), one directory each.
    pub fn snapshots(&self) -> PathBuf {
        self.data.join("snapshots")
    }

    /// Boot snapshots: a cache, like the images they are made from (`image prune` empties it).
    pub fn boot_snapshots(&self) -> PathBuf {
        self.cache.join("boot-snapshots")
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.data.join("sandboxes")
    }

    pub fn keys(&self) -> PathBuf {
        self.data.join("keys")
    }

    pub fn database(&self) -> PathBuf {
        self.data.join("state.db")
    }

    /// The manifest of the release `smolvm image import` made this home's default.
    pub fn default_release(&self) -> PathBuf {
        self.data.join("release.json")
    }
}

// A sandbox's directory. The file names are fixed (tests and operators read them), whatever
// the VMM behind them.

/// The directory that a sandbox's VMM and helpers work in, owned by the sandbox's user: its
/// sockets, the console and the logs. Everything in it is written by processes that a guest
/// may have taken over, and is read as such (`crate::text::open_untrusted`).
pub fn run_dir(dir: &Path) -> PathBuf {
    dir.join("run")
}
/// The guest's serial console, as the agent proxy writes it (capped, rotated).
pub fn console_log(dir: &Path) -> PathBuf {
    run_dir(dir).join("console.log")
}
/// The VMM's pid and start time, written by smolvm (not by the VMM) in the sandbox directory.
pub fn vm_pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}
/// The VMM's own output (stderr), relayed through the agent proxy (capped, rotated).
pub fn vm_log(dir: &Path) -> PathBuf {
    run_dir(dir).join("qemu.log")
}
