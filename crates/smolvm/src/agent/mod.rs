//! The host side of the guest agent: commands and files without SSH.
//!
//! A virtio-serial port has one host-side client at a time, so each running sandbox has an
//! agent proxy ([`proxy`]): a small process (`smolvm __agent-proxy DIR`) that holds the one
//! connection to the guest for the VM's life and serves any number of local clients on
//! `<sandbox>/run/agent.sock`, renumbering their request ids onto the guest connection.
//! Clients ([`client`]) speak the same protocol to the proxy as the proxy speaks to the guest.
//! The proxy also writes the guest's serial console to `console.log` ([`console`]).
//!
//! The proxy is started before QEMU, with its ends of two socket pairs (agent port, console)
//! whose other ends QEMU gets: no socket file stands between them, and the proxy runs as the
//! sandbox's user, like QEMU.

pub mod client;
pub mod console;
mod outbox;
pub mod proxy;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub use client::{AgentClient, AgentError, ExecEvent, ExecHandle, ExecOutput};

/// The proxy's end of the agent port's socket pair.
pub const PROXY_VM_FD: RawFd = 3;
/// The proxy's end of the console's socket pair.
pub const PROXY_CONSOLE_FD: RawFd = 4;
/// The read end of the pipe that is QEMU's stdout and stderr: the proxy keeps it in
/// `run/qemu.log` with the console's cap (a file QEMU wrote itself had none, and a file-size
/// limit on QEMU would limit its disk too).
pub const PROXY_QEMU_LOG_FD: RawFd = 5;

/// The proxy's socket, for any number of clients.
pub fn client_socket(dir: &Path) -> PathBuf {
    crate::paths::run_dir(dir).join("agent.sock")
}

/// A proxy that was started; [`ProxyStart::ready`] waits for its word.
#[derive(Debug)]
pub struct ProxyStart {
    child: std::process::Child,
    stdout: Option<std::process::ChildStdout>,
    dir: PathBuf,
}

impl ProxyStart {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Returns once the proxy holds the guest's connection and serves clients (it says so on
    /// a pipe), or fails after `timeout`.
    pub fn ready(mut self, timeout: std::time::Duration) -> std::io::Result<()> {
        let stdout = self.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let line = crate::child::read_line_timeout(stdout, timeout).map_err(|e| {
            let _ = self.child.kill();
            let log = std::fs::read_to_string(self.dir.join("agent-proxy.log")).unwrap_or_default();
            std::io::Error::new(
                e.kind(),
                format!(
                    "the agent proxy did not start: {e}\n--- agent-proxy.log ---\n{}",
                    crate::text::escape_controls(log.trim())
                ),
            )
        })?;
        if line.trim() != "ready" {
            return Err(std::io::Error::other(format!("the agent proxy said {line:?}")));
        }
        Ok(())
    }
}

/// The proxy's descriptors and confinement.
#[derive(Debug)]
pub struct ProxyPlumbing {
    pub vm: OwnedFd,
    pub console: OwnedFd,
    /// The read end of QEMU's output pipe.
    pub qemu_log: OwnedFd,
    pub identity: Option<crate::child::Identity>,
    pub cgroup_procs: Vec<RawFd>,
}

/// Starts the proxy for the sandbox in `dir`, detached (its own session; its log in
/// `agent-proxy.log`), confined like QEMU. It exits by itself when the VM does.
pub fn spawn_proxy(
    dir: &Path,
    helper: &Path,
    log_filter: Option<&str>,
    p: ProxyPlumbing,
) -> std::io::Result<ProxyStart> {
    let log = std::fs::File::create(dir.join("agent-proxy.log"))?;
    let run = crate::paths::run_dir(dir);
    let exe = crate::child::Executable::open(helper)?;
    let mut cmd = crate::child::helper_command(&exe, "__agent-proxy", &run, log, log_filter);
    crate::child::Confine {
        fds: vec![
            (p.vm.as_raw_fd(), PROXY_VM_FD),
            (p.console.as_raw_fd(), PROXY_CONSOLE_FD),
            (p.qemu_log.as_raw_fd(), PROXY_QEMU_LOG_FD),
        ],
        cwd: Some(run),
        identity: p.identity,
        cgroup_procs: p.cgroup_procs,
        exe: Some(exe.file.as_raw_fd()),
        jail: Some(crate::jail::Jail::new(&crate::jail::mount_point(dir, "proxy"), &crate::paths::run_dir(dir), true)?),
        no_namespaces: true,
        // It outlives the command that starts it, as the sandbox does.
        dies_with_caller: false,
    }
    .apply(&mut cmd);
    let mut child = cmd.spawn()?;
    crate::child::record_pid(dir, "agent-proxy", child.id() as i32);
    let stdout = child.stdout.take();
    Ok(ProxyStart { child, stdout, dir: dir.to_path_buf() })
}

/// For `smolvm __agent-proxy DIR --owner UID`: runs the proxy in its working directory on the
/// descriptors its parent gave it, printing its ready line on stdout.
pub fn proxy_main(owner: u32) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    crate::child::not_dumpable();
    crate::child::cap_file_size();
    // SAFETY: the parent handed us these three descriptors (socket pair ends, a pipe's read
    // end) and nothing else in this process owns them.
    let (vm, console, qemu_log) = unsafe {
        (
            std::os::unix::net::UnixStream::from_raw_fd(PROXY_VM_FD),
            std::os::unix::net::UnixStream::from_raw_fd(PROXY_CONSOLE_FD),
            std::fs::File::from_raw_fd(PROXY_QEMU_LOG_FD),
        )
    };
    let here = Path::new(".");
    std::thread::spawn(move || {
        if let Err(e) = console::relay(console, Path::new(".")) {
            tracing::warn!("console: {e}");
        }
    });
    std::thread::spawn(move || {
        if let Err(e) = console::relay_to(qemu_log, Path::new("."), "qemu.log") {
            tracing::warn!("qemu.log: {e}");
        }
    });
    proxy::run(here, vm, owner, || {
        #[allow(clippy::print_stdout)]
        {
            println!("ready");
        }
        crate::child::close_stdout();
    })
}
