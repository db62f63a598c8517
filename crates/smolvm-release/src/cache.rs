//! Cache entries: directories that appear whole or not at all.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{BuildEnv, BuildError};
use smolvm::lock::FileLock;

/// Marker written last into a finished entry.
const COMPLETE: &str = ".complete";

/// A recipe hash being assembled: every input that determines the output's bytes.
#[derive(Debug, Default)]
pub(crate) struct RecipeHash(Sha256);

impl RecipeHash {
    pub(crate) fn new(kind: &str) -> RecipeHash {
        let mut h = RecipeHash(Sha256::new());
        h.text("kind", kind);
        h
    }

    /// Adds a named value. Names and lengths are hashed too, so fields cannot run together.
    pub(crate) fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.bytes(name, value.as_bytes())
    }

    pub(crate) fn bytes(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// Adds a file's contents under its name.
    pub(crate) fn file(&mut self, name: &str, path: &Path) -> Result<&mut Self, BuildError> {
        let bytes = fs::read(path).map_err(BuildError::io(format!("read recipe file {}", path.display())))?;
        Ok(self.bytes(name, &bytes))
    }

    /// Adds every file under `dir` (relative path, mode, contents or link target), sorted.
    pub(crate) fn tree(&mut self, name: &str, dir: &Path) -> Result<&mut Self, BuildError> {
        let mut entries = Vec::new();
        walk(dir, dir, &mut entries)?;
        entries.sort();
        for (rel, meta) in entries {
            self.bytes(&format!("{name}/{rel}"), &meta);
        }
        Ok(self)
    }

    /// The first 16 bytes as hex: short enough for a path, long enough never to collide.
    pub(crate) fn key(&self) -> String {
        hex::encode(&self.0.clone().finalize()[..16])
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let rd = fs::read_dir(dir).map_err(BuildError::io(format!("read {}", dir.display())))?;
    for entry in rd {
        let entry = entry.map_err(BuildError::io(format!("read {}", dir.display())))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(BuildError::io(format!("stat {}", path.display())))?;
        let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        let mut desc = format!("{:o}\n", meta.permissions().mode()).into_bytes();
        if meta.is_dir() {
            out.push((rel, desc));
            walk(root, &path, out)?;
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(BuildError::io(format!("readlink {}", path.display())))?;
            desc.extend_from_slice(target.display().to_string().as_bytes());
            out.push((rel, desc));
        } else {
            desc.extend(fs::read(&path).map_err(BuildError::io(format!("read {}", path.display())))?);
            out.push((rel, desc));
        }
    }
    Ok(())
}

/// Returns the cache entry `<cache>/<kind>/<key>/`, building it with `build` (into a
/// temporary directory, renamed into place when `build` succeeds) if it is not there yet.
/// Concurrent builders of one entry serialise on a lock; the second finds the first's result.
/// The bool is true on a cache hit.
pub(crate) fn entry(
    env: &BuildEnv,
    kind: &str,
    key: &str,
    build: impl FnOnce(&Path) -> Result<(), BuildError>,
) -> Result<(PathBuf, bool), BuildError> {
    let dir = env.cache.join(kind);
    let done = dir.join(key);
    if done.join(COMPLETE).exists() {
        return Ok((done, true));
    }
    fs::create_dir_all(&dir).map_err(BuildError::io(format!("create build cache {}", dir.display())))?;
    let _lock = FileLock::exclusive(&dir.join(format!("{key}.lock")))
        .map_err(BuildError::io(format!("lock {}", dir.display())))?;
    if done.join(COMPLETE).exists() {
        return Ok((done, true));
    }
    // Leftovers of a killed build of this entry (we hold its lock, so none is running).
    for e in fs::read_dir(&dir).map_err(BuildError::io(format!("read {}", dir.display())))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{key}.tmp-")) || name == key {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let tmp = dir.join(format!("{key}.tmp-{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(BuildError::io(format!("create {}", tmp.display())))?;
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::write(tmp.join(COMPLETE), b"").map_err(BuildError::io("mark cache entry complete"))?;
    fs::rename(&tmp, &done).map_err(BuildError::io(format!("rename into {}", done.display())))?;
    Ok((done, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path) -> BuildEnv {
        BuildEnv { source: dir.to_path_buf(), cache: dir.join("cache"), jobs: 1 }
    }

    #[test]
    fn entry_is_built_once_and_failures_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let env = env(d.path());
        let err = entry(&env, "k", "abc", |_| Err(BuildError::Invalid("boom".into())));
        assert!(err.is_err());
        assert_eq!(
            fs::read_dir(env.cache.join("k"))
                .unwrap()
                .filter(|e| { !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".lock") })
                .count(),
            0
        );
        let (p, hit) = entry(&env, "k", "abc", |t| {
            fs::write(t.join("f"), "1").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(!hit);
        assert_eq!(fs::read_to_string(p.join("f")).unwrap(), "1");
        let (_, hit) = entry(&env, "k", "abc", |_| panic!("must not rebuild")).unwrap();
        assert!(hit);
    }

    #[test]
    fn recipe_hash_separates_fields_and_sees_tree_changes() {
        let a = RecipeHash::new("x").text("a", "bc").key();
        let b = RecipeHash::new("x").text("ab", "c").key();
        assert_ne!(a, b);
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("t/s")).unwrap();
        fs::write(d.path().join("t/s/f"), "1").unwrap();
        let k1 = RecipeHash::new("x").tree("t", &d.path().join("t")).unwrap().key();
        fs::write(d.path().join("t/s/f"), "2").unwrap();
        let k2 = RecipeHash::new("x").tree("t", &d.path().join("t")).unwrap().key();
        assert_ne!(k1, k2);
    }
}
