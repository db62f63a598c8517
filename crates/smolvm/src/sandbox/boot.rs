//! Booting a sandbox from its row and its images: the one boot path of `create` and `start`.
//!
//! Order: the network process first (it binds the SSH forward and holds one end of the wire),
//! then QEMU with the other end, then the readiness line on the console, then the agent. Any
//! failure kills what was started; the caller removes what it made.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use smolvm_protocol::ready::Ready;

use super::Smolvm;
use crate::net::{self, Forward, NetConfig, NetError};
use crate::state::{SandboxRow, SandboxState};
use crate::vm::accel::Accel;
use crate::vm::process;
use crate::vm::qemu::{self, kernel_cmdline, Netdev, QemuConfig};
use crate::vm::ready::{console_tail, wait_for_ready, WaitError};

/// The images one boot uses, as host paths.
#[derive(Debug, Clone)]
pub(super) struct BootFiles {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Read-only layers over the base, top first.
    pub layers: Vec<PathBuf>,
}

/// Why a boot failed; the console tail is included where it helps.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{qemu} failed to start: {source}")]
    Spawn { qemu: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the guest did not become ready: {cause}\n--- last lines of the console ({console}) ---\n{tail}")]
    NotReady { cause: WaitError, console: String, tail: String },
    #[error("the guest agent did not answer: {0}")]
    Agent(String),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootError {
    let what = what.into();
    move |source| BootError::Io { what, source }
}

/// The managed public key, base64 for the kernel command line.
pub(super) fn public_key_b64(keys: &Path) -> Result<String, BootError> {
    let path = keys.join("id_ed25519.pub");
    let pubkey =
        std::fs::read_to_string(&path).map_err(io_err(format!("read the SSH public key {}", path.display())))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(pubkey.trim()))
}

/// Starts QEMU detached: its own session (a Ctrl-C or a closed terminal does not reach it),
/// its output in `qemu.log`, the network wire on its descriptor `net::WIRE_FD`.
fn spawn_qemu(cfg: &QemuConfig, wire: Option<&std::os::fd::OwnedFd>) -> Result<std::process::Child, BootError> {
    let spawn_err = |source: std::io::Error| BootError::Spawn { qemu: cfg.qemu.display().to_string(), source };
    let log = std::fs::File::create(qemu::qemu_log(&cfg.dir)).map_err(io_err("create qemu.log"))?;
    let mut cmd = cfg.command();
    // QEMU needs nothing of our environment (host API keys and tokens must not reach it).
    cmd.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin");
    cmd.stdout(log.try_clone().map_err(io_err("qemu.log"))?).stderr(log);
    match wire {
        Some(w) => crate::child::inherit_fd(&mut cmd, w.as_raw_fd(), net::WIRE_FD),
        None => crate::child::inherit_fd(&mut cmd, -1, -1),
    }
    tracing::debug!("starting {cmd:?}");
    // Not waited for once booted: QEMU outlives this process (it is re-parented when we exit).
    cmd.spawn().map_err(spawn_err)
}

impl Smolvm {
    /// Boots `row`'s sandbox from `files` and waits until a command can run in it; on success
    /// the row says `running` with its pid, port, host key and boot figures.
    pub(super) fn boot_row(
        &self,
        row: &mut SandboxRow,
        accel: &Accel,
        files: &BootFiles,
        timeout: Duration,
    ) -> Result<(), BootError> {
        let dir = self.dir(&row.name);
        let key_b64 = public_key_b64(&self.home().keys())?;
        let netcfg = NetConfig {
            policy: row.policy.clone(),
            ssh: Forward { host: 0, guest: 22 },
            forwards: self.db().forwards(&row.name)?,
            dns_hosts: self.config().resolver_hosts.clone(),
        };
        let console = qemu::console_log(&dir);
        for stale in [qemu::qmp_socket(&dir), qemu::pid_file(&dir)] {
            let _ = std::fs::remove_file(stale);
        }
        std::fs::write(&console, b"").map_err(io_err(format!("create {}", console.display())))?;
        let started = Instant::now();
        let (cfg_netdev, wire, ssh_port) = if self.unrestricted_user_net {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(io_err("find a free port"))?
                .port();
            (Netdev::UnrestrictedUser { ssh_port: port }, None, port)
        } else {
            net::write_config(&dir, &netcfg)?;
            let c = self.config();
            let w = net::spawn(&dir, &c.helper, c.helper_log.as_deref(), Duration::from_secs(10))?;
            let port = w.ssh_port;
            (Netdev::Wire, Some(w), port)
        };
        let cfg = QemuConfig {
            name: row.name.clone(),
            accel: accel.clone(),
            memory_mib: row.memory_mib,
            cpus: row.cpus,
            kernel: files.kernel.clone(),
            cmdline: kernel_cmdline(&row.name, accel, files.layers.len(), &key_b64),
            base: files.rootfs.clone(),
            upper: dir.join("disk.ext4"),
            layers: files.layers.clone(),
            netdev: cfg_netdev,
            dir: dir.clone(),
            qemu: self.config().qemu.clone(),
        };
        let mut child = match spawn_qemu(&cfg, wire.as_ref().map(|w| &w.qemu_end)) {
            Ok(c) => c,
            Err(e) => {
                if let Some(w) = &wire {
                    let _ = process::signal(w.pid, libc::SIGKILL);
                }
                return Err(e);
            }
        };
        // Our copy of QEMU's end: closed, so that the network process sees QEMU's exit.
        drop(wire);
        let pid = child.id() as i32;
        let pid_start = process::start_time(pid);
        // Recorded at once: if this process dies now (Ctrl-C, SIGKILL), `delete` still finds
        // and stops the VM it started.
        row.pid = Some(pid);
        row.pid_start = pid_start;
        self.db().update(row)?;
        let mut fail = |cause: WaitError| {
            // How QEMU ended, if it did (before we kill it).
            let status = child.try_wait().ok().flatten().map(|s| format!(" (QEMU {s})")).unwrap_or_default();
            let _ = process::signal(pid, libc::SIGKILL);
            let qemu_log = std::fs::read_to_string(qemu::qemu_log(&dir)).unwrap_or_default();
            let tail = format!(
                "{}\n--- qemu.log{status} ---\n{}",
                console_tail(&console, 30),
                crate::text::escape_controls(qemu_log.trim())
            );
            BootError::NotReady { cause, console: console.display().to_string(), tail }
        };
        let pidfd = process::pidfd(pid).map_err(|e| fail(WaitError::Io(e)))?;
        // The proxy starts with QEMU, so that its Hello waits for the guest's agent.
        let proxy = crate::agent::spawn_proxy(&dir, &self.config().helper, self.config().helper_log.as_deref())
            .map_err(|e| fail(WaitError::Io(e)))?;
        let ready: Ready = wait_for_ready(&console, &pidfd, timeout).map_err(&mut fail)?;
        // Ready on the console means sshd and the agent are up. The proxy says so once it holds
        // the agent's connection and serves clients; one Hello through it proves the path.
        let agent = proxy.ready(timeout).map_err(|e| e.to_string()).and_then(|()| {
            crate::agent::AgentClient::connect(&row.name, &crate::agent::client_socket(&dir)).map_err(|e| e.to_string())
        });
        if let Err(e) = agent {
            let _ = process::signal(pid, libc::SIGKILL);
            return Err(BootError::Agent(e));
        }
        let elapsed = started.elapsed();
        super::ssh::write_known_hosts(&dir.join("known_hosts"), ssh_port, &ready.host_key)
            .map_err(io_err("write known_hosts"))?;
        tracing::debug!("{} ready in {elapsed:?}: {:?}", row.name, ready.boot_us);
        row.state = SandboxState::Running;
        row.pid = Some(pid);
        row.pid_start = pid_start;
        row.ssh_port = Some(ssh_port);
        row.host_key = Some(ready.host_key.clone());
        row.boot_json = serde_json::to_string(&ready.boot_us).ok();
        row.ready_ms = Some(elapsed.as_millis() as u64);
        self.db().update(row)?;
        Ok(())
    }
}
