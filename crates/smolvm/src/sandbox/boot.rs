//! Starting a sandbox's VM and waiting until the guest says it is ready. Shared by `create`
//! and `start`.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use smolvm_protocol::ready::Ready;

use crate::vm::process;
use crate::vm::qemu::{self, QemuConfig};
use crate::vm::ready::{console_tail, wait_for_ready, WaitError};

/// A guest that is up.
#[derive(Debug)]
pub(super) struct Booted {
    pub pid: i32,
    pub pid_start: Option<u64>,
    pub ssh_port: u16,
    pub ready: Ready,
    /// From spawning QEMU to the readiness line.
    pub elapsed: Duration,
}

/// Why a boot failed; the console tail is included where it helps.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{qemu} failed to start: {stderr}\n  (is QEMU installed? scripts/install-host-deps.sh installs it; `smolvm doctor` checks)")]
    Spawn { qemu: String, stderr: String },
    #[error("QEMU started but wrote no pid file ({0})")]
    NoPid(String),
    #[error("the guest did not become ready: {cause}\n--- last lines of the console ({console}) ---\n{tail}")]
    NotReady { cause: WaitError, console: String, tail: String },
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; QEMU binds it right after).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts QEMU detached: its own session (a Ctrl-C or a closed terminal does not reach it),
/// its output in `qemu.log`. Returns its pid.
fn spawn_detached(cfg: &QemuConfig) -> Result<std::process::Child, BootError> {
    use std::os::unix::process::CommandExt;
    let spawn_err = |e: std::io::Error| BootError::Spawn { qemu: qemu::qemu_binary(), stderr: e.to_string() };
    let log = std::fs::File::create(qemu::qemu_log(&cfg.dir)).map_err(spawn_err)?;
    let mut cmd = cfg.command();
    cmd.stdout(log.try_clone().map_err(spawn_err)?).stderr(log);
    // SAFETY: setsid(2) is async-signal-safe, as required between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    tracing::debug!("starting {cmd:?}");
    // Not waited for once booted: QEMU outlives this process (it is re-parented when we exit).
    cmd.spawn().map_err(spawn_err)
}

/// Starts QEMU for `cfg` (its `ssh_port` is chosen here) and waits for the readiness line.
pub(super) fn boot(mut cfg: QemuConfig, timeout: Duration) -> Result<Booted, BootError> {
    let dir = cfg.dir.clone();
    let console = qemu::console_log(&dir);
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        for stale in [qemu::qmp_socket(&dir), qemu::pid_file(&dir)] {
            let _ = std::fs::remove_file(stale);
        }
        std::fs::write(&console, b"").map_err(|e| BootError::NoPid(format!("create {}: {e}", console.display())))?;
        cfg.ssh_port =
            free_port().map_err(|e| BootError::Spawn { qemu: qemu::qemu_binary(), stderr: e.to_string() })?;
        let mut child = spawn_detached(&cfg)?;
        let pid = child.id() as i32;
        let pid_start = process::start_time(pid);
        let mut fail = |cause: WaitError| {
            // How QEMU ended, if it did (before we kill it).
            let status = child.try_wait().ok().flatten().map(|s| format!(" (QEMU {s})")).unwrap_or_default();
            let _ = process::signal(pid, libc::SIGKILL);
            let qemu_log = std::fs::read_to_string(qemu::qemu_log(&dir)).unwrap_or_default();
            let tail = format!("{}\n--- qemu.log{status} ---\n{}", console_tail(&console, 30), qemu_log.trim());
            BootError::NotReady { cause, console: console.display().to_string(), tail }
        };
        let pidfd = process::pidfd(pid).map_err(|e| fail(WaitError::Io(e)))?;
        if let Err(e) = crate::agent::spawn_proxy(&dir) {
            return Err(fail(WaitError::Io(e)));
        }
        match wait_for_ready(&console, &pidfd, timeout) {
            Ok(ready) => {
                // Ready on the console means sshd and the agent are up; the proxy binds its
                // socket a moment later. Return only when a command can be sent.
                wait_for_agent(&cfg.name, &dir, timeout).map_err(|e| fail(WaitError::Io(std::io::Error::other(e))))?;
                return Ok(Booted { pid, pid_start, ssh_port: cfg.ssh_port, ready, elapsed: started.elapsed() });
            }
            Err(WaitError::Exited) if attempt < 5 && port_was_taken(&dir) => {
                // Another process took the port between our probe and QEMU's bind.
                tracing::debug!("port {} was taken; retrying", cfg.ssh_port);
                continue;
            }
            Err(e) => return Err(fail(e)),
        }
    }
}

/// Connects to the agent proxy (retrying while it starts) and exchanges Hello.
fn wait_for_agent(name: &str, dir: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match crate::agent::AgentClient::connect(name, &crate::agent::client_socket(dir)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let log = std::fs::read_to_string(dir.join("agent-proxy.log")).unwrap_or_default();
                return Err(format!("the agent did not answer: {e}\n--- agent-proxy.log ---\n{}", log.trim()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn port_was_taken(dir: &Path) -> bool {
    std::fs::read_to_string(qemu::qemu_log(dir)).is_ok_and(|l| l.contains("host forwarding"))
}
