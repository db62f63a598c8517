//! Copying files into and out of a sandbox through its agent.
//!
//! What the guest sends back is untrusted: a file out of a sandbox is written to a fresh
//! temporary file beside the destination (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600), at most the
//! size the guest announced before sending it, given the guest's permission bits without
//! setuid, setgid or sticky (and masked by the umask) through its descriptor, and renamed into
//! place: a half-written, over-long or privileged file never appears, and a symlink planted at
//! the destination is replaced, never followed.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{SandboxError, Smolvm};
use crate::agent::AgentError;

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{sandbox}:{path}: no such file")]
    NoSuchFile { sandbox: String, path: String },
    #[error("{sandbox}:{path} is a directory")]
    Directory { sandbox: String, path: String },
    #[error("{path}: the guest sent more than the {announced} bytes it announced; nothing was kept")]
    TooLong { path: String, announced: u64 },
    #[error("{path}: the guest announces {announced} bytes and {free} are free where it would go; nothing was copied")]
    NoSpace { path: String, announced: u64, free: u64 },
    #[error("{path} exists; a directory is copied only to a new name (or into an existing directory)")]
    Exists { path: String },
    #[error("sandbox {sandbox}: {message}")]
    Guest { sandbox: String, message: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: io::Error },
}

pub(super) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.display().to_string();
    move |source| CopyError::Io { what, path, source }
}

/// A sink that refuses more than `left` bytes, and leaves a hole for a chunk of zeros (a
/// sparse file in the guest stays sparse here).
struct Capped<'a> {
    file: &'a File,
    left: u64,
    over: bool,
    pos: u64,
}

impl Capped<'_> {
    /// Gives the file its full length (a trailing hole has no write to make it).
    fn finish(&self) -> io::Result<()> {
        self.file.set_len(self.pos)
    }
}

impl Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.len() as u64 > self.left {
            self.over = true;
            return Err(io::Error::other("more bytes than announced"));
        }
        self.left -= buf.len() as u64;
        if buf.iter().any(|&b| b != 0) {
            self.file.write_all_at(buf, self.pos)?;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Smolvm {
    /// Copies the local file `local` to `remote` in the sandbox (into it if `remote` is a
    /// directory or ends in `/`), keeping its permission bits. Returns the guest path written.
    pub fn copy_in(&self, name: &str, local: &Path, remote: &str) -> Result<String, CopyError> {
        let meta = std::fs::metadata(local).map_err(io_err("read", local))?;
        let client = self.agent(name)?;
        let mut target = remote.to_string();
        if remote.ends_with('/') || client.stat(remote)?.is_some_and(|s| s.is_dir) {
            let file_name = local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            target = format!("{}/{file_name}", remote.trim_end_matches('/'));
        }
        let mut f = File::open(local).map_err(io_err("open", local))?;
        client.write_file(&target, &mut f, meta.permissions().mode() & 0o7777, 0, 0)?;
        Ok(target)
    }

    /// Copies `remote` out of the sandbox to `local` (into it if it is a directory); see the
    /// module docs for what is trusted of the guest's answer. Returns the path written.
    pub fn copy_out(&self, name: &str, remote: &str, local: &Path) -> Result<PathBuf, CopyError> {
        let client = self.agent(name)?;
        let stat =
            client.stat(remote)?.ok_or_else(|| CopyError::NoSuchFile { sandbox: name.into(), path: remote.into() })?;
        if stat.is_dir {
            return Err(CopyError::Directory { sandbox: name.into(), path: remote.into() });
        }
        // A real directory (not a symlink to one) receives the file under its own name.
        let mut target = local.to_path_buf();
        if std::fs::symlink_metadata(local).is_ok_and(|m| m.is_dir()) {
            let file_name = Path::new(remote).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "file".into());
            target = target.join(file_name);
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{base}.smolvm-partial-{}", std::process::id()));
        let (_, file) = read_into_new(&client, name, remote, &tmp, self.config().user_umask)?;
        let result = (|| -> Result<(), CopyError> {
            file.sync_all().map_err(io_err("sync", &tmp))?;
            std::fs::rename(&tmp, &target).map_err(io_err("rename into", &target))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| target)
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs(3) fills the zeroed struct we own; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Reads the guest file `remote` into the new local file `to` (created `O_EXCL|O_NOFOLLOW`,
/// 0600): refused before a byte is read if the guest announces more than the space left
/// there, cut off (and removed) past what it announced, given the guest's permission bits
/// without setuid, setgid or sticky, masked by `umask`. Returns the bytes and the file.
pub(super) fn read_into_new(
    client: &crate::agent::AgentClient,
    name: &str,
    remote: &str,
    to: &Path,
    umask: u32,
) -> Result<(u64, File), CopyError> {
    let stat =
        client.stat(remote)?.ok_or_else(|| CopyError::NoSuchFile { sandbox: name.into(), path: remote.into() })?;
    if stat.is_dir {
        return Err(CopyError::Directory { sandbox: name.into(), path: remote.into() });
    }
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let free = free_bytes(dir).map_err(io_err("statvfs", dir))?;
    if stat.size > free {
        return Err(CopyError::NoSpace { path: format!("{name}:{remote}"), announced: stat.size, free });
    }
    let file = crate::text::create_private(to).map_err(io_err("create", to))?;
    let result = (|| -> Result<u64, CopyError> {
        let mut sink = Capped { file: &file, left: stat.size, over: false, pos: 0 };
        let read = client.read_file(remote, &mut sink);
        if sink.over {
            return Err(CopyError::TooLong { path: format!("{name}:{remote}"), announced: stat.size });
        }
        read?;
        sink.finish().map_err(io_err("write", to))?;
        let mode = stat.mode & 0o777 & !umask;
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", to))?;
        Ok(sink.pos)
    })();
    match result {
        Ok(n) => Ok((n, file)),
        Err(e) => {
            let _ = std::fs::remove_file(to);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_refuses_what_was_not_announced() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let mut c = Capped { file: &f, left: 5 + 8192, over: false, pos: 0 };
        assert!(c.write(b"abc").is_ok() && c.write(&[0; 8192]).is_ok() && c.write(b"de").is_ok());
        assert!(c.write(b"!").is_err() && c.over);
        c.finish().unwrap();
        let back = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!((&back[..3], &back[3 + 8192..], back.len()), (&b"abc"[..], &b"de"[..], 5 + 8192));
    }

    #[test]
    fn the_umask_is_read_without_changing_it() {
        let m = crate::config::current_umask();
        assert!(m <= 0o777);
        assert_eq!(crate::config::current_umask(), m);
    }
}
