//! File system operations for the host (protocol v4 `Fs`): lstat, list a directory to a depth,
//! mkdir -p, move, remove. Each answers one `FsResult` whose failures carry a kind the host
//! maps (to E2B's `not_found`, `already_exists`, ...), not only a message.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use smolvm_protocol::agent::{EntryKind, FsEntry, FsErrorKind, FsFailure, FsReply, FsRequest};

/// A listing stops before its JSON passes this (a frame holds 1 MiB): the reply says
/// `truncated`.
const LIST_BUDGET: usize = 900 * 1024;

/// uid/gid to names, read once per request from the guest's own files.
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn load() -> Names {
        let read = |path: &str| -> HashMap<u32, String> {
            let text = fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Names { users: read("/etc/passwd"), groups: read("/etc/group") }
    }
}

fn failure(kind: FsErrorKind, message: impl Into<String>) -> FsReply {
    FsReply { entries: Vec::new(), error: Some(FsFailure { kind, message: message.into() }), truncated: false }
}

fn io_failure(what: &str, path: &str, e: &std::io::Error) -> FsReply {
    let kind = match e.kind() {
        ErrorKind::NotFound => FsErrorKind::NotFound,
        ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
        ErrorKind::PermissionDenied => FsErrorKind::PermissionDenied,
        ErrorKind::NotADirectory => FsErrorKind::NotADirectory,
        ErrorKind::IsADirectory => FsErrorKind::IsADirectory,
        ErrorKind::InvalidInput | ErrorKind::InvalidFilename => FsErrorKind::Invalid,
        _ => FsErrorKind::Other,
    };
    failure(kind, format!("{what} {path}: {e}"))
}

fn entry(path: &Path, names: &Names) -> std::io::Result<FsEntry> {
    let m = fs::symlink_metadata(path)?;
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
    let id_name = |map: &HashMap<u32, String>, id: u32| map.get(&id).cloned().unwrap_or_else(|| id.to_string());
    Ok(FsEntry {
        name,
        path: path.to_string_lossy().into_owned(),
        kind,
        size: m.len(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        owner: id_name(&names.users, m.uid()),
        group: id_name(&names.groups, m.gid()),
        mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        symlink_target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    })
}

fn absolute(path: &str) -> Result<&Path, FsReply> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(failure(FsErrorKind::Invalid, format!("{path}: need an absolute path")))
    }
}

/// Runs one request.
pub fn run(req: &FsRequest) -> FsReply {
    let names = Names::load();
    let result = match req {
        FsRequest::Stat { path } => absolute(path).map(|p| one(p, path, "stat", &names)),
        FsRequest::ListDir { path, depth } => absolute(path).map(|p| list(p, path, (*depth).max(1), &names)),
        FsRequest::MakeDir { path } => absolute(path).map(|p| make_dir(p, path, &names)),
        FsRequest::Move { source, destination } => {
            absolute(source).and_then(|s| Ok((s, absolute(destination)?))).map(|(s, d)| rename(s, d, source, &names))
        }
        FsRequest::Remove { path } => absolute(path).map(|p| remove(p, path)),
    };
    result.unwrap_or_else(|failed| failed)
}

fn one(p: &Path, path: &str, what: &str, names: &Names) -> FsReply {
    match entry(p, names) {
        Ok(e) => FsReply { entries: vec![e], ..FsReply::default() },
        Err(e) => io_failure(what, path, &e),
    }
}

fn list(p: &Path, path: &str, depth: u32, names: &Names) -> FsReply {
    match fs::metadata(p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return failure(FsErrorKind::NotADirectory, format!("{path} is not a directory")),
        Err(e) => return io_failure("list", path, &e),
    }
    let mut reply = FsReply::default();
    let mut budget = 0usize;
    // Breadth first, each directory sorted: the first levels are complete if the budget ends.
    let mut level = vec![p.to_path_buf()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(read) = fs::read_dir(dir) else { continue };
            let mut children: Vec<_> = read.flatten().map(|e| e.path()).collect();
            children.sort();
            for child in children {
                let Ok(e) = entry(&child, names) else { continue };
                budget += e.path.len() + e.name.len() + e.owner.len() + e.group.len() + 160;
                if budget > LIST_BUDGET {
                    reply.truncated = true;
                    return reply;
                }
                if e.kind == EntryKind::Dir {
                    next.push(child);
                }
                reply.entries.push(e);
            }
        }
        level = next;
    }
    reply
}

fn make_dir(p: &Path, path: &str, names: &Names) -> FsReply {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => return failure(FsErrorKind::AlreadyExists, format!("{path} exists already")),
        Ok(_) => return failure(FsErrorKind::AlreadyExists, format!("{path} exists and is not a directory")),
        Err(_) => {}
    }
    match fs::create_dir_all(p) {
        Ok(()) => one(p, path, "stat", names),
        Err(e) => io_failure("mkdir", path, &e),
    }
}

fn rename(src: &Path, dst: &Path, source: &str, names: &Names) -> FsReply {
    if let Err(e) = fs::symlink_metadata(src) {
        return io_failure("move", source, &e);
    }
    match fs::rename(src, dst) {
        Ok(()) => {}
        // Across file systems (the root and /tmp, say): what mv does.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let status = std::process::Command::new("/bin/mv").arg("--").arg(src).arg(dst).status();
            if !status.is_ok_and(|s| s.success()) {
                return io_failure("move", source, &e);
            }
        }
        Err(e) => return io_failure("move", source, &e),
    }
    one(dst, &dst.to_string_lossy(), "stat", names)
}

fn remove(p: &Path, path: &str) -> FsReply {
    let removed = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => FsReply::default(),
        Err(e) => io_failure("remove", path, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_to_a_depth_and_maps_failures_to_kinds() {
        let d = tempfile_dir();
        let root = d.to_string_lossy().into_owned();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/b/f"), b"xyz").unwrap();
        std::os::unix::fs::symlink("a", d.join("l")).unwrap();
        let r = run(&FsRequest::ListDir { path: root.clone(), depth: 1 });
        let names: Vec<_> = r.entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(names, [("a", EntryKind::Dir), ("l", EntryKind::Symlink)]);
        assert_eq!(r.entries[1].symlink_target.as_deref(), Some("a"));
        let r = run(&FsRequest::ListDir { path: root.clone(), depth: 3 });
        assert_eq!(r.entries.len(), 4);
        assert_eq!(r.entries[3].size, 3);
        let r = run(&FsRequest::MakeDir { path: format!("{root}/a") });
        assert_eq!(r.error.unwrap().kind, FsErrorKind::AlreadyExists);
        let r = run(&FsRequest::MakeDir { path: format!("{root}/x/y") });
        assert_eq!(r.entries[0].kind, EntryKind::Dir);
        let r = run(&FsRequest::Move { source: format!("{root}/a/b/f"), destination: format!("{root}/g") });
        assert_eq!(r.entries[0].name, "g");
        let r = run(&FsRequest::Stat { path: format!("{root}/a/b/f") });
        assert_eq!(r.error.unwrap().kind, FsErrorKind::NotFound);
        assert!(run(&FsRequest::Remove { path: format!("{root}/a") }).error.is_none());
        assert_eq!(run(&FsRequest::Remove { path: format!("{root}/a") }).error.unwrap().kind, FsErrorKind::NotFound);
        let r = run(&FsRequest::ListDir { path: format!("{root}/g"), depth: 1 });
        assert_eq!(r.error.unwrap().kind, FsErrorKind::NotADirectory);
        assert_eq!(run(&FsRequest::Stat { path: "rel".into() }).error.unwrap().kind, FsErrorKind::Invalid);
        fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("smolvm-init-fs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
