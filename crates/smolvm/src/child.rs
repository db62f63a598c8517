//! Starting helper processes (the network process, the agent proxy, QEMU): who they run as,
//! which descriptors they inherit, where they work, and the one line each prints when it is
//! ready, read with a deadline. A child that says "ready" on a pipe needs no polling.
//!
//! Every process that touches a guest's traffic is set up by [`Confine`] between fork and
//! exec: its own session, descriptors at fixed numbers, its working directory (the sandbox's
//! `run/` directory), its cgroup, `no_new_privs`, a 077 umask, and, when smolvm runs as root,
//! the sandbox's own unprivileged uid and gid with one supplementary group (see [`Identity`]). The order matters:
//! the cgroup is joined and the directory entered while still privileged, the identity is
//! dropped last.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// A uid and gid for a sandbox's processes (see [`crate::config::VmUsers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The one supplementary group: the group of the system user `smolvm`, which may read
    /// the kernel images (0640) that QEMU reopens by `/proc/self/fd`. Nothing else is
    /// readable by that group.
    pub images_gid: u32,
}

/// At most this many descriptors are handed to one child (QEMU: wire, agent, console, kernel,
/// base, upper disk and a few layers).
const MAX_FDS: usize = 16;

/// How one child of a sandbox is confined; applied by [`Confine::apply`] to a `Command`.
#[derive(Debug, Default)]
pub(crate) struct Confine {
    /// (our descriptor, the child's number), each inherited without close-on-exec.
    pub fds: Vec<(RawFd, RawFd)>,
    /// The child's working directory.
    pub cwd: Option<std::path::PathBuf>,
    /// Run as this identity (only meaningful when we are root).
    pub identity: Option<Identity>,
    /// `cgroup.procs` files (one per hierarchy) the child writes itself into.
    pub cgroup_procs: Vec<RawFd>,
    /// The program, opened by [`Executable::open`]: the child runs it through its descriptor.
    pub exe: Option<RawFd>,
    /// Namespaces and a root of its own (`crate::jail`); its working directory is then the
    /// jail's (`cwd` is what the jail binds there). Only when we are root.
    pub jail: Option<crate::jail::Jail>,
    /// The seccomp filter that refuses new namespaces.
    pub no_namespaces: bool,
    /// Killed when the thread that started it ends (`PR_SET_PDEATHSIG`): for a process that
    /// serves one command only (the sealing QEMU), which a killed command must not leave
    /// behind. Never for a sandbox's own processes, which outlive the command that starts them.
    pub dies_with_caller: bool,
}

/// Where the child finds its program: the command's path is `/proc/self/fd/EXE_FD`.
pub(crate) const EXE_FD: RawFd = 60;

/// A program opened by this process, to be run through its descriptor (`/proc/self/fd`):
/// the sandbox's uid may not be able to reach it by its path (smolvm run from a checkout in
/// a directory of root's only, say), and only needs to be allowed to execute the file itself.
#[derive(Debug)]
pub(crate) struct Executable {
    pub file: std::fs::File,
    pub path: std::path::PathBuf,
}

impl Executable {
    /// Opens `program` (a bare name is looked up in the fixed PATH children get).
    pub fn open(program: &std::path::Path) -> std::io::Result<Executable> {
        let path = if program.components().count() > 1 {
            program.to_path_buf()
        } else {
            CHILD_PATH.split(':').map(|d| std::path::Path::new(d).join(program)).find(|p| p.is_file()).ok_or_else(
                || {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} is not in {CHILD_PATH}", program.display()),
                    )
                },
            )?
        };
        let file = std::fs::File::open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        Ok(Executable { file, path })
    }

    /// A command running it: `/proc/self/fd/EXE_FD`, with the real path as `argv[0]`.
    pub fn command(&self) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(format!("/proc/self/fd/{EXE_FD}"));
        c.arg0(&self.path);
        c
    }
}

/// The PATH children get (and where bare program names are looked up).
pub(crate) const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl Confine {
    /// Installs the setup on `cmd` (it runs in the child, between fork and exec).
    pub fn apply(self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        assert!(self.fds.len() <= MAX_FDS, "too many descriptors for one child");
        let mut all = self.fds.clone();
        if let Some(exe) = self.exe {
            all.push((exe, EXE_FD));
        }
        assert!(all.len() <= MAX_FDS, "too many descriptors for one child");
        let mut src = [-1; MAX_FDS];
        let mut dst = [-1; MAX_FDS];
        for (i, (s, d)) in all.iter().enumerate() {
            src[i] = *s;
            dst[i] = *d;
        }
        let n = all.len();
        let exe = self.exe.is_some();
        // Prepared before the fork: nothing below allocates.
        let cwd = self.cwd.map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path"));
        let identity = self.identity;
        // SAFETY: geteuid has no preconditions.
        let jail = self.jail.filter(|_| unsafe { libc::geteuid() } == 0);
        let filter = self.no_namespaces.then(crate::jail::no_namespaces_filter);
        let dies_with_caller = self.dies_with_caller;
        // SAFETY: getpid has no preconditions.
        let caller = unsafe { libc::getpid() };
        let mut procs = [-1; 4];
        for (i, fd) in self.cgroup_procs.iter().take(4).enumerate() {
            procs[i] = *fd;
        }
        // SAFETY: only async-signal-safe system calls (setsid, write, fcntl, dup2, chdir,
        // unshare, mount, mkdir, symlink, open, close, pivot_root, umount2, prctl, umask,
        // setgroups, setresgid, setresuid, getppid) run between fork and exec, on values prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
                libc::setsid();
                for fd in procs.iter().filter(|fd| **fd >= 0) {
                    // "0" is the writing process: this child, before it execs.
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Moved out of the way first, so that no target number overwrites a source
                // still to be placed; dup2 then clears close-on-exec on the copy.
                let mut high = [-1; MAX_FDS];
                for i in 0..n {
                    high[i] = libc::fcntl(src[i], libc::F_DUPFD_CLOEXEC, 64);
                    check(high[i])?;
                }
                for i in 0..n {
                    check(libc::dup2(high[i], dst[i]))?;
                }
                if exe {
                    // Only to be exec'd through: closed in the program itself.
                    check(libc::fcntl(EXE_FD, libc::F_SETFD, libc::FD_CLOEXEC))?;
                }
                match (&jail, &cwd) {
                    (Some(j), _) => j.enter()?,
                    (None, Some(c)) => check(libc::chdir(c.as_ptr()))?,
                    (None, None) => {}
                }
                libc::umask(0o077);
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                if let Some(f) = &filter {
                    let prog = libc::sock_fprog { len: f.len() as u16, filter: f.as_ptr().cast_mut() };
                    crate::jail::install_filter(&prog)?;
                }
                if let Some(id) = identity {
                    if libc::geteuid() == 0 {
                        let groups = [id.images_gid];
                        check(libc::setgroups(1, groups.as_ptr()))?;
                        check(libc::setresgid(id.gid, id.gid, id.gid))?;
                        check(libc::setresuid(id.uid, id.uid, id.uid))?;
                    }
                }
                // After the change of uid, which clears it.
                if dies_with_caller {
                    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                    if libc::getppid() != caller {
                        // The caller died before the signal was armed.
                        return Err(std::io::Error::other("the starting process is gone"));
                    }
                }
                Ok(())
            });
        }
    }
}

/// `helper SUBCOMMAND DIR --owner UID` (a sandbox's helper process: `__netd`,
/// `__agent-proxy`, run through its descriptor: [`Executable`]) with an empty environment but
/// the log filter, stdin closed, stdout a pipe for its ready line and stderr its log file. DIR names the sandbox's `run/` directory for
/// the process list and for [`kill_helper`]'s check; the helper works in its current
/// directory (set to DIR by [`Confine`]), since as the sandbox's user it cannot reach DIR by
/// its path. UID is the user whose clients it serves.
pub(crate) fn helper_command(
    helper: &Executable,
    subcommand: &str,
    dir: &std::path::Path,
    log: std::fs::File,
    log_filter: Option<&str>,
) -> std::process::Command {
    let mut cmd = helper.command();
    // SAFETY: geteuid has no preconditions.
    let owner = unsafe { libc::geteuid() };
    cmd.arg(subcommand)
        .arg(dir)
        .arg("--owner")
        .arg(owner.to_string())
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    if let Some(filter) = log_filter {
        cmd.env("SMOLVM_LOG", filter);
    }
    cmd
}

/// The largest file a helper writes (its log, the refusal log, the console's): a guest that
/// makes it log without end (a refused connection a millisecond) fills no disk. Past it a write
/// fails (`EFBIG`, `SIGXFSZ` ignored) and the line is dropped; the files it rotates stay far
/// below it.
pub const HELPER_FILE_CAP: u64 = 16 << 20;

/// For a helper itself, first thing: no file it writes grows past [`HELPER_FILE_CAP`].
pub fn cap_file_size() {
    let lim = libc::rlimit { rlim_cur: HELPER_FILE_CAP, rlim_max: HELPER_FILE_CAP };
    // SAFETY: signal(SIGXFSZ, SIG_IGN) and setrlimit with a valid struct; no memory effects.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
    }
}

/// For a helper itself, first thing: not dumpable, so that no process of the same uid (the
/// sandbox's QEMU included) can ptrace it or open its `/proc` files.
pub fn not_dumpable() {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integers only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// Notes a helper's pid in the sandbox directory (`<what>.pid`), so that `delete` can stop it
/// even when the process that started it is gone.
pub(crate) fn record_pid(dir: &std::path::Path, what: &str, pid: i32) {
    let _ = std::fs::write(dir.join(format!("{what}.pid")), pid.to_string());
}

/// Kills the helper `what` of the sandbox in `dir` if its pid file names a live process that
/// is that helper of that directory (checked on its command line); returns it (pid, start) to
/// wait for.
pub(crate) fn kill_helper(dir: &std::path::Path, what: &str, subcommand: &str) -> Option<(i32, Option<u64>)> {
    let pid =
        std::fs::read_to_string(dir.join(format!("{what}.pid"))).ok().and_then(|p| p.trim().parse::<i32>().ok())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.contains(&subcommand.as_bytes())
        && args.iter().any(|a| std::path::Path::new(std::ffi::OsStr::from_bytes(a)) == crate::paths::run_dir(dir));
    if !ours {
        return None;
    }
    let started = crate::vm::process::start_time(pid);
    let _ = crate::vm::process::signal(pid, libc::SIGKILL);
    Some((pid, started))
}

/// The pid a helper's pid file in the sandbox directory `dir` names (`<what>.pid`; QEMU's is
/// `qemu.pid`, "pid start"). The directory is root's (0700): the sandbox cannot write it.
pub fn recorded_pid(dir: &std::path::Path, what: &str) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(format!("{what}.pid"))).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The credentials of the process at the other end of a unix socket (`SO_PEERCRED`; for a
/// listening socket's clients: the process that listened).
fn peer_cred(fd: &impl AsRawFd) -> Option<libc::ucred> {
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
    (rc == 0).then_some(cred)
}

/// The pid of the process at the other end of a unix socket.
pub fn peer_pid(fd: &impl AsRawFd) -> Option<i32> {
    peer_cred(fd).map(|c| c.pid).filter(|p| *p > 0)
}

/// Connects to the unix socket at `path` and checks, before a byte is sent, that the process
/// serving it is `pid` (`what`, for the error). A sandbox's sockets sit in its `run/`
/// directory, which its uid can write: a taken-over QEMU could plant a socket of its own there
/// (and be handed secrets), or a link to another sandbox's (and have a command meant for this
/// one run there). Neither passes this check.
pub fn connect_served_by(
    path: &std::path::Path,
    pid: i32,
    what: &str,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    match peer_pid(&s) {
        Some(p) if p == pid => Ok(s),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by pid {}, not by the sandbox's {what} (pid {pid}): refused (a socket put there by \
                 something else)",
                path.display(),
                other.map_or("?".into(), |p| p.to_string())
            ),
        )),
    }
}

/// Whether the process at the other end of a unix socket runs as `owner` (`SO_PEERCRED`):
/// the sandbox's sockets serve their owner only, whatever the file modes say.
pub fn peer_is(fd: &impl AsRawFd, owner: u32) -> bool {
    peer_cred(fd).is_some_and(|c| c.uid == owner)
}

/// [`peer_is`] this process's own user.
pub fn peer_is_owner(fd: &impl AsRawFd) -> bool {
    // SAFETY: geteuid has no preconditions.
    peer_is(fd, unsafe { libc::geteuid() })
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

#[cfg(test)]
mod cap_tests {
    /// A helper's files stop at the cap: the write past it fails, the process lives on.
    #[test]
    fn a_capped_helper_cannot_grow_a_file_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // SAFETY: the child only makes system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            super::cap_file_size();
            let Ok(mut f) = std::fs::File::create(&path) else {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(10) }
            };
            let chunk = vec![b'x'; 1 << 20];
            let mut failed = false;
            for _ in 0..(super::HELPER_FILE_CAP >> 20) + 4 {
                if std::io::Write::write_all(&mut f, &chunk).is_err() {
                    failed = true;
                }
            }
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(if failed { 0 } else { 11 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "killed: {status:#x} (SIGXFSZ not ignored?)");
        assert_eq!(libc::WEXITSTATUS(status), 0, "11: the file grew past the cap");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), super::HELPER_FILE_CAP);
    }
}
