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
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: io::Error },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.display().to_string();
    move |source| CopyError::Io { what, path, source }
}

/// A sink that refuses more than `left` bytes.
struct Capped<'a> {
    file: &'a File,
    left: u64,
    over: bool,
}

impl Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.over = true;
            return Err(io::Error::other("more bytes than announced"));
        }
        self.left -= buf.len() as u64;
        (&mut &*self.file).write_all(buf)?;
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
        let file = crate::text::create_private(&tmp).map_err(io_err("create", &tmp))?;
        let result = (|| -> Result<(), CopyError> {
            let mut sink = Capped { file: &file, left: stat.size, over: false };
            let read = client.read_file(remote, &mut sink);
            if sink.over {
                return Err(CopyError::TooLong { path: format!("{name}:{remote}"), announced: stat.size });
            }
            read?;
            let mode = stat.mode & 0o777 & !self.config().user_umask;
            file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &tmp))?;
            file.sync_all().map_err(io_err("sync", &tmp))?;
            std::fs::rename(&tmp, &target).map_err(io_err("rename into", &target))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_refuses_what_was_not_announced() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let mut c = Capped { file: &f, left: 5, over: false };
        assert!(c.write(b"abc").is_ok() && c.write(b"de").is_ok());
        assert!(c.write(b"!").is_err() && c.over);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"abcde");
    }

    #[test]
    fn the_umask_is_read_without_changing_it() {
        let m = crate::config::current_umask();
        assert!(m <= 0o777);
        assert_eq!(crate::config::current_umask(), m);
    }
}
