//! Files for the host: chunked writes that appear atomically, chunked reads, stat.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use smolvm_protocol::agent::{FileStat, GuestMsg, WriteFile, CHUNK};

use super::Session;

/// A file being written: data goes to a temporary file beside the target.
pub struct PendingWrite {
    file: File,
    tmp: PathBuf,
    meta: WriteFile,
}

fn tmp_path(target: &Path, id: u32) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.smolvm-{id}"))
}

pub fn write_start(s: &mut Session, id: u32, meta: WriteFile) {
    let target = PathBuf::from(&meta.path);
    if !target.is_absolute() || target.file_name().is_none() {
        return s.out.error(id, format!("{}: need an absolute file path", meta.path));
    }
    let tmp = tmp_path(&target, id);
    let opened = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp);
    match opened {
        Ok(file) => {
            s.writes.insert(id, PendingWrite { file, tmp, meta });
        }
        Err(e) => s.out.io_error(id, format!("create {}: {e}", tmp.display()), &e),
    }
}

/// Removes the temporary files of writes the host never finished (it disconnected).
pub fn discard_all(s: &mut Session) {
    for (_, w) in s.writes.drain() {
        let _ = fs::remove_file(&w.tmp);
    }
}

pub fn write_data(s: &mut Session, id: u32, data: &[u8]) {
    let Some(w) = s.writes.get_mut(&id) else { return };
    if let Err(e) = w.file.write_all(data) {
        let w = s.writes.remove(&id);
        if let Some(w) = w {
            let _ = fs::remove_file(&w.tmp);
            s.out.io_error(id, format!("write {}: {e}", w.meta.path), &e);
        }
    }
}

/// Syncs, sets owner and mode, and renames into place: readers see the old file or the new one.
pub fn write_end(s: &mut Session, id: u32) {
    let Some(w) = s.writes.remove(&id) else { return s.out.error(id, "no such file write") };
    let result = (|| -> std::io::Result<()> {
        w.file.sync_all()?;
        std::os::unix::fs::fchown(&w.file, Some(w.meta.uid), Some(w.meta.gid))?;
        w.file.set_permissions(fs::Permissions::from_mode(w.meta.mode & 0o7777))?;
        fs::rename(&w.tmp, &w.meta.path)
    })();
    match result {
        Ok(()) => {
            s.out.send(&GuestMsg::Done { id });
        }
        Err(e) => {
            let _ = fs::remove_file(&w.tmp);
            s.out.io_error(id, format!("finish {}: {e}", w.meta.path), &e);
        }
    }
}

/// Streams a file back from its own thread (a large read does not hold up other requests).
/// Regular files only, and at most the size they had when opened: a FIFO would hold the
/// thread (and the host's reader) forever, `/dev/zero` would never end.
pub fn read(s: &mut Session, id: u32, path: String) {
    let out = s.out.clone();
    let window = s.window(id);
    let windows = s.windows.clone();
    std::thread::spawn(move || {
        read_window(&out, id, &path, &window);
        super::flow::lock(&windows).remove(&id);
    });
}

fn read_window(out: &super::Writer, id: u32, path: &str, window: &super::flow::Window) {
    use super::flow::Grant;
    {
        // Non-blocking: opening a FIFO would otherwise wait for a writer.
        let mut f = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => f,
            Err(e) => return out.io_error(id, format!("open {path}: {e}"), &e),
        };
        let Ok(m) = f.metadata() else { return out.error(id, format!("stat {path}: vanished")) };
        if m.is_dir() {
            return out.io_error(
                id,
                format!("{path} is a directory"),
                &std::io::Error::from_raw_os_error(libc::EISDIR),
            );
        }
        if !m.is_file() {
            return out.error(id, format!("{path} is not a regular file (a device, FIFO or socket is not read)"));
        }
        let st =
            FileStat { size: m.len(), mode: m.mode(), uid: m.uid(), gid: m.gid(), mtime: m.mtime(), is_dir: false };
        let mut left = st.size;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            // The host stopped the read (or went away): nothing more to send.
            let Grant::Send(may) = window.take((left as usize).min(buf.len())) else { return };
            match f.read(&mut buf[..may]) {
                Ok(0) => break,
                Ok(n) => {
                    window.unused(may - n);
                    left -= n as u64;
                    if !out.send(&GuestMsg::FileData { id, data: buf[..n].to_vec() }) {
                        return;
                    }
                }
                Err(e) => return out.io_error(id, format!("read {path}: {e}"), &e),
            }
        }
        out.send(&GuestMsg::FileEnd { id, stat: st });
    }
}

pub fn stat(path: &str) -> Option<FileStat> {
    let m = fs::metadata(path).ok()?;
    Some(FileStat { size: m.len(), mode: m.mode(), uid: m.uid(), gid: m.gid(), mtime: m.mtime(), is_dir: m.is_dir() })
}

/// `/etc/profile.d/smolvm-env.sh`: the sandbox's variables for login shells.
pub fn write_profile_env(vars: &[(String, String)]) -> std::io::Result<()> {
    let body: String = vars.iter().map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', r"'\''"))).collect();
    let path = Path::new("/etc/profile.d/smolvm-env.sh");
    let tmp = path.with_extension("sh.tmp");
    fs::write(&tmp, body)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(tmp, path)
}
