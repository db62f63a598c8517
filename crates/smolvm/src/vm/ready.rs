//! Waiting for the guest's readiness line, pushed on the serial console.
//!
//! QEMU writes the console to a file; we watch that file with inotify and the VMM with a pidfd,
//! and read each new chunk as it is written: no sleeping, no polling of SSH. The wait ends on
//! the readiness line, on the VMM's exit, or at the deadline.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use smolvm_protocol::ready::Ready;

/// How the wait ended, when not with a readiness line.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the VM exited during boot")]
    Exited,
    #[error("no readiness line within {0:?}")]
    Timeout(Duration),
    #[error("the guest printed a malformed readiness line: {0}")]
    Malformed(String),
    #[error("the guest's readiness line names no valid host key: {0}")]
    HostKey(String),
    #[error("watching the console: {0}")]
    Io(#[from] io::Error),
}

fn inotify_on(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: valid descriptor and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    // SAFETY: reading into a stack buffer of the given length from a non-blocking descriptor.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// A console line longer than this is not a readiness line (nor kept while waiting for one).
pub const MAX_READY_LINE: usize = 4096;

/// The host key of a readiness line, parsed as a key: `ssh-ed25519 <base64 of the 51-byte
/// key blob>`, returned in that canonical form (a comment or anything else is dropped, so no
/// text of the guest's reaches `known_hosts`).
pub fn parse_host_key(text: &str) -> Result<String, WaitError> {
    use base64::Engine;
    let bad = || WaitError::HostKey(text.escape_debug().to_string());
    let mut words = text.split_ascii_whitespace();
    let (Some("ssh-ed25519"), Some(b64)) = (words.next(), words.next()) else { return Err(bad()) };
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad())?;
    let mut want = vec![0, 0, 0, 11];
    want.extend_from_slice(b"ssh-ed25519");
    want.extend_from_slice(&[0, 0, 0, 32]);
    if blob.len() != 51 || blob[..19] != want[..] {
        return Err(bad());
    }
    Ok(format!("ssh-ed25519 {}", base64::engine::general_purpose::STANDARD.encode(&blob)))
}

/// A parsed readiness line, its host key checked and canonical.
fn strict(r: Result<Ready, serde_json::Error>) -> Result<Ready, WaitError> {
    let mut r = r.map_err(|e| WaitError::Malformed(e.to_string()))?;
    r.host_key = parse_host_key(&r.host_key)?;
    Ok(r)
}

/// Waits for the readiness line in `console` while `vmm` (a pidfd) lives.
pub fn wait_for_ready(console: &Path, vmm: &OwnedFd, timeout: Duration) -> Result<Ready, WaitError> {
    let deadline = Instant::now() + timeout;
    let notify = inotify_on(console)?;
    // Written by the sandbox's own processes: no symbolic link is followed.
    let mut file = crate::text::open_untrusted(console)?;
    let mut pending = Vec::new();
    let mut offset = 0u64;
    loop {
        // Read whatever is new (also right after the watch was set, so nothing is missed).
        file.seek(SeekFrom::Start(offset))?;
        let mut chunk = Vec::new();
        file.read_to_end(&mut chunk)?;
        offset += chunk.len() as u64;
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            if line.len() > MAX_READY_LINE {
                continue;
            }
            if let Some(r) = Ready::parse_line(&String::from_utf8_lossy(&line)) {
                return strict(r);
            }
        }
        // A guest that floods the console without a newline does not grow this without end.
        if pending.len() > MAX_READY_LINE {
            pending.clear();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WaitError::Timeout(timeout));
        }
        let mut fds = [
            libc::pollfd { fd: notify.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: vmm.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        if fds[1].revents != 0 {
            // One last read: the line may have been written just before the exit.
            file.seek(SeekFrom::Start(offset))?;
            let mut rest = String::new();
            let _ = file.read_to_string(&mut rest);
            let all = String::from_utf8_lossy(&pending).into_owned() + &rest;
            if let Some(r) = all.lines().filter(|l| l.len() <= MAX_READY_LINE).find_map(Ready::parse_line) {
                return strict(r);
            }
            return Err(WaitError::Exited);
        }
        drain(&notify);
    }
}

/// The last `lines` lines of the console, for error messages: read from its end (at most
/// 64 KiB, across its rotation), terminal control characters escaped (it is the guest's text).
pub fn console_tail(console: &Path, lines: usize) -> String {
    let dir = console.parent().unwrap_or(Path::new("."));
    let text = String::from_utf8_lossy(&crate::agent::console::tail(dir, 64 * 1024)).into_owned();
    let all: Vec<&str> = text.lines().collect();
    crate::text::escape_console(&all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use smolvm_protocol::ready::BootPhases;
    use std::io::Write;

    /// A real ed25519 public key (the key blob of a test key).
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKrJH2E6qqXa0R3wsDjwtHFgnfPuVcTfKOmyx96qhx1e";

    fn ready_line() -> String {
        Ready {
            v: 1,
            host_key: format!("{KEY} root@guest"),
            boot_us: BootPhases { init: 1, mounts: 2, network: 3, sshd: 4 },
        }
        .to_line()
    }

    #[test]
    fn a_host_key_is_parsed_as_a_key() {
        assert_eq!(parse_host_key(&format!("{KEY} comment")).unwrap(), KEY, "canonical, the comment dropped");
        for bad in [
            "ssh-rsa AAAAB3NzaC1yc2E",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==",
            "* ssh-ed25519 AAAA\n[127.0.0.1]:22 ssh-ed25519 AAAA",
        ] {
            assert!(parse_host_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A stand-in VMM: a child process whose pidfd the wait watches.
    fn vmm(seconds: &str) -> (std::process::Child, OwnedFd) {
        let child = std::process::Command::new("sleep").arg(seconds).spawn().unwrap();
        let fd = crate::vm::process::pidfd(child.id() as i32).unwrap();
        (child, fd)
    }

    #[test]
    fn the_line_written_later_is_seen_without_polling() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, b"[    0.1] booting\n").unwrap();
        let (mut child, fd) = vmm("30");
        let path = console.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            // In two writes, the line split mid-way, as a console may deliver it.
            let line = ready_line();
            let (a, b) = line.split_at(10);
            f.write_all(a.as_bytes()).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            writeln!(f, "{b}").unwrap();
        });
        let got = wait_for_ready(&console, &fd, Duration::from_secs(20)).unwrap();
        assert_eq!(got.host_key, KEY);
        writer.join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn an_exit_a_timeout_and_a_malformed_line_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, b"no line here\n").unwrap();
        let (mut child, fd) = vmm("0.1");
        assert!(matches!(wait_for_ready(&console, &fd, Duration::from_secs(20)), Err(WaitError::Exited)));
        let _ = child.wait();

        let (mut child, fd) = vmm("30");
        assert!(matches!(wait_for_ready(&console, &fd, Duration::from_millis(200)), Err(WaitError::Timeout(_))));
        std::fs::write(&console, b"SMOLVM_READY {not json\n").unwrap();
        assert!(matches!(wait_for_ready(&console, &fd, Duration::from_secs(5)), Err(WaitError::Malformed(_))));
        let _ = child.kill();
        let _ = child.wait();
    }
}
