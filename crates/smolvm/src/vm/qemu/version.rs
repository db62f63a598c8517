//! QEMU's version, part of what a snapshot records of its machine (`vm::MachineId`).

use std::path::{Path, PathBuf};

/// [`qemu_version`], remembered in `cache` (a file) for the binary as it is (path, inode,
/// size, mtime): an upgraded QEMU is asked again. Saves an exec per `create`.
pub fn qemu_version_cached(qemu: &Path, cache: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let resolved = if qemu.is_absolute() {
        qemu.to_path_buf()
    } else {
        // A bare name: where PATH finds it.
        std::env::split_paths(crate::child::CHILD_PATH)
            .map(|d| d.join(qemu))
            .find(|p| p.is_file())
            .unwrap_or(qemu.to_path_buf())
    };
    let Ok(m) = std::fs::metadata(&resolved) else { return qemu_version(qemu) };
    let key = format!("{} {} {} {}.{}", resolved.display(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((k, v)) = text.split_once('\n') {
            if k == key && !v.trim().is_empty() {
                return Ok(v.trim().to_string());
            }
        }
    }
    let v = qemu_version(qemu)?;
    let tmp = cache.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    if let Ok(mut f) = crate::text::create_private(&tmp) {
        if std::io::Write::write_all(&mut f, format!("{key}\n{v}\n").as_bytes()).is_ok() {
            let _ = std::fs::rename(&tmp, cache);
        }
    }
    Ok(v)
}

/// The first line of `qemu -version`, once per process and binary.
pub fn qemu_version(qemu: &Path) -> std::io::Result<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
    if let Some(v) = SEEN.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(qemu)) {
        return Ok(v.clone());
    }
    let out = std::process::Command::new(qemu)
        .arg("-version")
        .env_clear()
        .env("PATH", crate::child::CHILD_PATH)
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || line.is_empty() {
        return Err(std::io::Error::other(format!("{} -version said nothing useful", qemu.display())));
    }
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(qemu.to_path_buf(), line.clone());
    Ok(line)
}
