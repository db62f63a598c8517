//! The serial console, written to `console.log` by the agent proxy with a size cap; QEMU's own
//! output (its stdout and stderr, a pipe) goes to `qemu.log` the same way.
//!
//! QEMU's console is one end of a socket pair; the proxy reads the other and appends to
//! `console.log`. When the file reaches [`FILE_CAP`] it becomes `console.log.1` (replacing the
//! previous one) and a new `console.log` starts: a guest that floods its console costs at most
//! [`TOTAL_CAP`] of the host's disk, and the newest output is always kept. (QEMU's own `file`
//! chardev has no cap, and QEMU could not rotate a file it cannot reopen as its user.)
//!
//! The readiness line is read from `console.log` by the booting process, which opened it
//! before the guest started; a guest that printed [`FILE_CAP`] before its readiness line does
//! not become ready (it times out), which no real boot comes near (a boot prints ~20 KiB).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

/// One file's size before it is rotated.
pub const FILE_CAP: u64 = 4 << 20;
/// The most the console occupies on the host: `console.log` and `console.log.1`.
pub const TOTAL_CAP: u64 = 2 * FILE_CAP;

fn open_log(dir: &Path, name: &str) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().create(true).append(true).custom_flags(libc::O_NOFOLLOW).open(dir.join(name))
}

/// Copies `from` (the console) to `dir/console.log` until it ends, rotating at [`FILE_CAP`].
pub fn relay(from: impl Read, dir: &Path) -> std::io::Result<()> {
    relay_to(from, dir, "console.log")
}

/// Copies `from` to `dir/<name>` until it ends, rotating at [`FILE_CAP`] to `<name>.1`. Once
/// the file cannot be written (a full disk), the rest is read and dropped: the writer (QEMU,
/// on a pipe) must never block on a log.
pub fn relay_to(mut from: impl Read, dir: &Path, name: &str) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let copied = copy_rotating(&mut from, dir, name, &mut buf);
    if copied.is_err() {
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() != std::io::ErrorKind::Interrupted => break,
                _ => {}
            }
        }
    }
    copied
}

fn copy_rotating(from: &mut impl Read, dir: &Path, name: &str, buf: &mut [u8]) -> std::io::Result<()> {
    let mut out = open_log(dir, name)?;
    let mut size = out.metadata()?.len();
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if size >= FILE_CAP {
                std::fs::rename(dir.join(name), dir.join(format!("{name}.1")))?;
                out = open_log(dir, name)?;
                size = 0;
            }
            let take = chunk.len().min((FILE_CAP - size) as usize);
            out.write_all(&chunk[..take])?;
            size += take as u64;
            chunk = &chunk[take..];
        }
    }
}

/// The last `max` bytes of the console of the sandbox directory `dir` (its `run/`), across
/// the rotation; read as untrusted files (no symbolic link followed).
pub fn tail(run_dir: &Path, max: u64) -> Vec<u8> {
    tail_of(run_dir, "console.log", max)
}

/// As [`tail`], for the log `name` in `run_dir`.
pub fn tail_of(run_dir: &Path, name: &str, max: u64) -> Vec<u8> {
    let read = |name: &str, max: u64| -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let Ok(mut f) = crate::text::open_untrusted(&run_dir.join(name)) else { return Vec::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
        let mut b = Vec::new();
        let _ = f.take(max).read_to_end(&mut b);
        b
    };
    let newest = read(name, max);
    if newest.len() as u64 >= max {
        return newest;
    }
    let mut all = read(&format!("{name}.1"), max - newest.len() as u64);
    all.extend_from_slice(&newest);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_capped_and_the_newest_output_kept() {
        let dir = tempfile::tempdir().unwrap();
        // 3.5 files' worth, then a last line.
        let flood = vec![b'x'; (FILE_CAP * 7 / 2) as usize];
        let input = [flood.as_slice(), b"\nthe end\n"].concat();
        relay(input.as_slice(), dir.path()).unwrap();
        let a = std::fs::metadata(dir.path().join("console.log")).unwrap().len();
        let b = std::fs::metadata(dir.path().join("console.log.1")).unwrap().len();
        assert!(a + b <= TOTAL_CAP, "{a} + {b}");
        assert_eq!(b, FILE_CAP);
        let t = tail(dir.path(), 1024);
        assert!(t.ends_with(b"\nthe end\n") && t.len() == 1024);
        // Across the rotation: more than the newest file holds.
        assert_eq!(tail(dir.path(), a + 10).len() as u64, a + 10);
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"secret").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("console.log")).unwrap();
        assert!(relay(&b"hi"[..], dir.path()).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"secret");
        assert!(tail(dir.path(), 100).is_empty(), "the reader does not follow it either");
    }
}
