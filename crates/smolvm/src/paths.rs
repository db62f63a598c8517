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
    /// From `SMOLVM_HOME`, else XDG, else `$HOME`.
    pub fn from_env() -> Home {
        if let Some(h) = std::env::var_os("SMOLVM_HOME").filter(|h| !h.is_empty()) {
            return Home::at(Path::new(&h));
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        let xdg = |var: &str, default: &str| {
            std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| home.join(default))
        };
        Home {
            data: xdg("XDG_DATA_HOME", ".local/share").join("smolvm"),
            cache: xdg("XDG_CACHE_HOME", ".cache").join("smolvm"),
        }
    }

    /// Everything under one directory.
    pub fn at(dir: &Path) -> Home {
        Home { data: dir.to_path_buf(), cache: dir.join("cache") }
    }

    pub fn images(&self) -> PathBuf {
        self.cache.join("images")
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
}
