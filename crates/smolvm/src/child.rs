//! Starting helper processes (the network process, the agent proxy, QEMU): descriptors they
//! inherit, and the one line each prints when it is ready, read with a deadline. A child that
//! says "ready" on a pipe needs no polling of its sockets.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// Makes `fd` the child's descriptor `target` (without close-on-exec) and starts a new
/// session, between fork and exec. A negative `fd` only starts the session.
pub(crate) fn inherit_fd(cmd: &mut std::process::Command, fd: RawFd, target: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if fd < 0 {
                return Ok(());
            }
            if fd == target {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `helper SUBCOMMAND DIR` (a sandbox's helper process: `__netd`, `__agent-proxy`) with an
/// empty environment but the log filter, stdin closed, stdout a pipe for its ready line and
/// stderr its log file.
pub(crate) fn helper_command(
    helper: &std::path::Path,
    subcommand: &str,
    dir: &std::path::Path,
    log: std::fs::File,
    log_filter: Option<&str>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(helper);
    cmd.arg(subcommand)
        .arg(dir)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    if let Some(filter) = log_filter {
        cmd.env("SMOLVM_LOG", filter);
    }
    cmd
}

/// Notes a helper's pid in the sandbox directory (`<what>.pid`), so that `delete` can stop it
/// even when the process that started it is gone.
pub(crate) fn record_pid(dir: &std::path::Path, what: &str, pid: i32) {
    let _ = std::fs::write(dir.join(format!("{what}.pid")), pid.to_string());
}

/// Kills the helper `what` of the sandbox in `dir` if its pid file names a live process that
/// is that helper of that directory (checked on its command line), and waits for it.
pub(crate) fn kill_helper(dir: &std::path::Path, what: &str, subcommand: &str) {
    let Some(pid) =
        std::fs::read_to_string(dir.join(format!("{what}.pid"))).ok().and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.contains(&subcommand.as_bytes())
        && args.iter().any(|a| std::path::Path::new(std::ffi::OsStr::from_bytes(a)) == dir);
    if ours {
        let started = crate::vm::process::start_time(pid);
        let _ = crate::vm::process::signal(pid, libc::SIGKILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while crate::vm::process::is_alive(pid, started) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Whether the process at the other end of a unix socket runs as this process's user
/// (`SO_PEERCRED`): the sandbox's sockets serve their owner only, whatever the file modes say.
pub fn peer_is_owner(fd: &impl AsRawFd) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    rc == 0 && cred.uid == unsafe { libc::geteuid() }
}

/// One line from a child's stdout within `timeout`.
pub(crate) fn read_line_timeout(r: std::process::ChildStdout, timeout: Duration) -> std::io::Result<String> {
    let mut p = libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")));
    }
    let mut line = String::new();
    BufReader::new(r.take(64 * 1024)).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "it exited without a word"));
    }
    Ok(line)
}

/// For the child itself: after its ready line, stdout becomes /dev/null so that the parent
/// reading the pipe sees its end.
pub fn close_stdout() {
    // SAFETY: open/dup2/close on descriptors this process owns; nothing writes to stdout after.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_owner_is_recognised_on_a_socket_pair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(super::peer_is_owner(&a));
    }

    #[test]
    fn another_user_is_not_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // needs root to act as another user; CI runs as root
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let script =
            format!("import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); time.sleep(5)", path);
        let mut other = std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", &script])
            .spawn()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if std::time::Instant::now() < deadline && other.try_wait().unwrap().is_none() => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("the other user's client never connected: {e}"),
            }
        };
        assert!(!super::peer_is_owner(&conn), "a client of uid 65534 passed as the owner");
        let _ = other.kill();
        let _ = other.wait();
    }
}
