//! Copying directories into and out of a sandbox through its agent (`cp -r`), instead of
//! `scp -r -p`: an older OpenSSH keeps setuid bits with `-p`, and scp writes straight into the
//! destination, so a copy that fails halfway leaves half a tree.
//!
//! Out of a sandbox, what the guest lists is untrusted like what it sends: every name must be
//! one path component; the tree is built in a fresh directory beside the destination (mode
//! 0700 while it is built) and renamed into place only when complete; files get their
//! permission bits without setuid, setgid or sticky, masked by the umask; symbolic links are
//! made as links (never followed: nothing is written through one, every file is created
//! `O_EXCL|O_NOFOLLOW` in a directory this copy made); devices, FIFOs and sockets are skipped.
//! A guest can list without end, so a copy stops at [`MAX_ENTRIES`] entries or [`MAX_DEPTH`]
//! levels, and a file is refused before it is read if the announced size exceeds the space
//! left on the destination's file system.
//!
//! Into a sandbox, the tree is written under a temporary name beside the destination in the
//! guest and moved into place at the end; local symbolic links and special files are skipped
//! (the agent makes no links) and counted.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use smolvm_protocol::agent::{EntryKind, FsReply, FsRequest};

use super::files::{io_err, CopyError};
use super::Smolvm;
use crate::agent::AgentClient;

/// Entries one copy takes at most.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Directory levels one copy descends at most.
pub const MAX_DEPTH: usize = 256;

/// What a directory copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeCopy {
    /// Where the tree now is.
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Entries left out (devices, FIFOs, sockets; links, going into a sandbox).
    pub skipped: u64,
}

fn fs_call(client: &AgentClient, name: &str, req: FsRequest) -> Result<FsReply, CopyError> {
    let reply = client.fs(&req)?;
    match reply.error {
        Some(f) => Err(CopyError::Guest { sandbox: name.into(), message: f.message }),
        None => Ok(reply),
    }
}

/// One path component, as a guest must name an entry.
fn component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl Smolvm {
    /// Copies the guest directory `remote` to `local` (into it, under the directory's name, if
    /// `local` is a directory).
    pub fn copy_dir_out(&self, name: &str, remote: &str, local: &Path) -> Result<TreeCopy, CopyError> {
        let client = self.agent(name)?;
        let mut target = local.to_path_buf();
        if std::fs::symlink_metadata(local).is_ok_and(|m| m.is_dir()) {
            let base = Path::new(remote).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "dir".into());
            target = target.join(base);
        }
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(CopyError::Exists { path: target.display().to_string() });
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{base}.smolvm-partial-{}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(io_err("create", &tmp))?;
        let mut done = TreeCopy { path: target.display().to_string(), ..TreeCopy::default() };
        let umask = self.config().user_umask;
        let result = self.walk_out(&client, name, remote, &tmp, 0, umask, &mut done).and_then(|mode| {
            let mode = mode & 0o777 & !umask;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &tmp))?;
            std::fs::rename(&tmp, &target).map_err(io_err("rename into", &target))
        });
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Copies the entries of guest directory `remote` into the local directory `dir` (made by
    /// this copy); returns `remote`'s own mode, which the caller gives `dir` last (a directory
    /// without write permission is so still filled).
    #[allow(clippy::too_many_arguments)]
    fn walk_out(
        &self,
        client: &AgentClient,
        name: &str,
        remote: &str,
        dir: &Path,
        depth: usize,
        umask: u32,
        done: &mut TreeCopy,
    ) -> Result<u32, CopyError> {
        let too_big = |what: String| CopyError::Guest { sandbox: name.into(), message: what };
        if depth > MAX_DEPTH {
            return Err(too_big(format!("{remote}: deeper than {MAX_DEPTH} levels; not copied")));
        }
        let own = fs_call(client, name, FsRequest::Stat { path: remote.into() })?;
        let own_mode = own.entries.first().map(|e| e.mode).unwrap_or(0o700);
        let listing = fs_call(client, name, FsRequest::ListDir { path: remote.into(), depth: 1 })?;
        if listing.truncated {
            return Err(too_big(format!(
                "{remote} has more entries than one listing holds; archive it in the sandbox (tar) and copy the file"
            )));
        }
        for e in listing.entries {
            done.dirs += u64::from(e.kind == EntryKind::Dir);
            if done.files + done.dirs + done.links + done.skipped >= MAX_ENTRIES as u64 {
                return Err(too_big(format!("more than {MAX_ENTRIES} entries; not copied")));
            }
            if !component(&e.name) {
                return Err(too_big(format!("the guest listed an entry named {:?} in {remote}", e.name)));
            }
            let from = format!("{}/{}", remote.trim_end_matches('/'), e.name);
            let to = dir.join(&e.name);
            match e.kind {
                EntryKind::Dir => {
                    std::fs::DirBuilder::new().mode(0o700).create(&to).map_err(io_err("create", &to))?;
                    let mode = self.walk_out(client, name, &from, &to, depth + 1, umask, done)?;
                    let mode = mode & 0o777 & !umask;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                        .map_err(io_err("chmod", &to))?;
                }
                EntryKind::File => {
                    done.bytes += super::files::read_into_new(client, name, &from, &to, umask)?.0;
                    done.files += 1;
                }
                EntryKind::Symlink => {
                    let target = e.symlink_target.unwrap_or_default();
                    std::os::unix::fs::symlink(&target, &to).map_err(io_err("link", &to))?;
                    done.links += 1;
                }
                EntryKind::Other => done.skipped += 1,
            }
        }
        Ok(own_mode)
    }

    /// Copies the local directory `local` to `remote` in the sandbox (into it, under the
    /// directory's name, if `remote` is a directory).
    pub fn copy_dir_in(&self, name: &str, local: &Path, remote: &str) -> Result<TreeCopy, CopyError> {
        let client = self.agent(name)?;
        let base = local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dir".into());
        let mut target = remote.trim_end_matches('/').to_string();
        if remote.ends_with('/') || client.stat(remote)?.is_some_and(|s| s.is_dir) {
            target = format!("{target}/{base}");
        }
        if client.stat(&target)?.is_some() {
            return Err(CopyError::Exists { path: format!("{name}:{target}") });
        }
        let (parent, leaf) = target.rsplit_once('/').unwrap_or(("", &target));
        let tmp = format!("{parent}/.{leaf}.smolvm-partial-{}", std::process::id());
        let mut done = TreeCopy { path: target.clone(), ..TreeCopy::default() };
        let result = (|| {
            fs_call(&client, name, FsRequest::MakeDir { path: tmp.clone() })?;
            self.walk_in(&client, name, local, &tmp, 0, &mut done)?;
            fs_call(&client, name, FsRequest::Move { source: tmp.clone(), destination: target.clone() }).map(|_| ())
        })();
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                let _ = client.fs(&FsRequest::Remove { path: tmp });
                Err(e)
            }
        }
    }

    fn walk_in(
        &self,
        client: &AgentClient,
        name: &str,
        local: &Path,
        remote: &str,
        depth: usize,
        done: &mut TreeCopy,
    ) -> Result<(), CopyError> {
        if depth > MAX_DEPTH {
            return Err(CopyError::Io {
                what: "descend into",
                path: local.display().to_string(),
                source: std::io::Error::other(format!("deeper than {MAX_DEPTH} levels")),
            });
        }
        for entry in std::fs::read_dir(local).map_err(io_err("list", local))? {
            let entry = entry.map_err(io_err("list", local))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            let leaf = entry.file_name().to_string_lossy().into_owned();
            let to = format!("{remote}/{leaf}");
            if meta.is_dir() {
                fs_call(client, name, FsRequest::MakeDir { path: to.clone() })?;
                self.walk_in(client, name, &path, &to, depth + 1, done)?;
                done.dirs += 1;
            } else if meta.is_file() {
                let mut f = std::fs::File::open(&path).map_err(io_err("open", &path))?;
                client.write_file(&to, &mut f, meta.permissions().mode() & 0o7777, 0, 0)?;
                done.files += 1;
                done.bytes += meta.len();
            } else {
                done.skipped += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_names_entries_with_one_component_only() {
        for bad in ["", ".", "..", "a/b", "/etc", "x\0y"] {
            assert!(!component(bad), "{bad:?}");
        }
        for good in ["a", ".hidden", "a b", "..."] {
            assert!(component(good), "{good:?}");
        }
    }
}
