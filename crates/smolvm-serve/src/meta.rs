//! What the server knows of a sandbox beyond smolvm's own state: its E2B template name,
//! metadata and when it expires. One small JSON file per sandbox in
//! `<home>/serve/sandboxes/<id>.json`, written whole (temporary file, then rename), so that a
//! restart of the server keeps every sandbox's timeout; a file whose sandbox is gone (deleted
//! with the CLI) is dropped when found.
//!
//! Why files and not a table in smolvm's database: these facts belong to this front end only;
//! the library's schema stays the library's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// The template it was created from (`base` or a preset's name).
    pub template: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds after which the server removes it (or pauses it, with `auto_pause`); 0 is
    /// never.
    #[serde(default)]
    pub end_at: i64,
    #[serde(default)]
    pub auto_pause: bool,
    /// When the API started it (unix seconds): the SDK's `startedAt`.
    #[serde(default)]
    pub started_at: i64,
    /// Made at each creation: the sandbox's access token is bound to it, so that a sandbox
    /// created again under the same name does not accept the old one.
    #[serde(default)]
    pub generation: String,
}

/// How long a removed sandbox's tombstone is kept.
pub const TOMBSTONE_DAYS: u64 = 7;

#[derive(Debug, Clone)]
pub struct MetaStore {
    dir: PathBuf,
}

impl MetaStore {
    pub fn new(dir: PathBuf) -> MetaStore {
        MetaStore { dir }
    }

    /// The record's path: none for an id that is not a sandbox name (an API caller's id
    /// never becomes a path outside this directory).
    fn path(&self, id: &str) -> Option<PathBuf> {
        smolvm::sandbox::names::validate(id).ok()?;
        Some(self.dir.join(format!("{id}.json")))
    }

    pub fn get(&self, id: &str) -> Option<Meta> {
        let text = std::fs::read_to_string(self.path(id)?).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn put(&self, id: &str, meta: &Meta) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(id).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{id:?} is not a sandbox name"))
        })?;
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(meta).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &path)
    }

    /// Forgets a sandbox, keeping its generation as a tombstone (`<id>.gone`, for
    /// [`TOMBSTONE_DAYS`]): a caller whose token was valid for it is told it is gone, every
    /// other caller learns nothing of whether such a sandbox ever was.
    pub fn remove(&self, id: &str) {
        let Some(p) = self.path(id) else { return };
        if let Some(m) = self.get(id).filter(|m| !m.generation.is_empty()) {
            let _ = std::fs::write(p.with_extension("gone"), m.generation);
        }
        let _ = std::fs::remove_file(p);
    }

    /// The generation of the sandbox of this name that was removed last, if it has one.
    pub fn gone_generation(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.path(id)?.with_extension("gone")).ok().filter(|g| !g.is_empty())
    }

    /// Drops tombstones older than [`TOMBSTONE_DAYS`].
    pub fn sweep_tombstones(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return };
        let max = std::time::Duration::from_secs(TOMBSTONE_DAYS * 86_400);
        for e in dir.flatten() {
            let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if e.file_name().to_string_lossy().ends_with(".gone") && old.is_some_and(|a| a > max) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Every sandbox that has a record.
    pub fn all(&self) -> Vec<(String, Meta)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?.to_string();
                Some((id.clone(), self.get(&id)?))
            })
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kept_whole_and_listed() {
        let d = std::env::temp_dir().join(format!("smolvm-meta-{}", std::process::id()));
        let s = MetaStore::new(d.clone());
        assert!(s.get("a").is_none());
        let m = Meta { template: "base".into(), end_at: 5, ..Meta::default() };
        s.put("a", &m).unwrap();
        assert_eq!(s.get("a").unwrap(), m);
        assert_eq!(s.all().len(), 1);
        s.remove("a");
        assert!(s.all().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
