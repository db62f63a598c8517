//! stop, start, delete, expose and env: changes to an existing sandbox, each under its lock.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::boot::BootError;
use super::{remove_all, SandboxError, Smolvm, Status};
use crate::state::{SandboxState, StateError};
use crate::vm::process;

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("sandbox {name}: a VM (pid {pid}) still runs on its disk, left by an interrupted create or start")]
    StillRunning { name: String, pid: i32 },
    #[error("sandbox {name}: its {what} image (sha256 {sha256}) is no longer cached (release {tag})")]
    ImageGone { name: String, what: &'static str, sha256: String, tag: String },
    #[error("sandbox {name}: forward 127.0.0.1:{host} -> guest {guest}: {source}")]
    Forward { name: String, host: u16, guest: u16, source: crate::net::NetError },
    #[error("sandbox {name}: {key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    VarName { name: String, key: String },
    #[error("sandbox {name}: hand the environment to the guest: {source}")]
    Env { name: String, source: crate::agent::AgentError },
    #[error("sandbox {name}: {source}")]
    Policy { name: String, source: crate::net::PolicyError },
    #[error("sandbox {name}: the new network policy is saved but not applied to the running sandbox: {source}")]
    PolicyNotApplied { name: String, source: crate::net::NetError },
    #[error("sandbox {name}: {source}")]
    Secret { name: String, source: super::secrets::SecretError },
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("fork: {0}")]
    Fork(Box<super::create::CreateError>),
    #[error("sandbox {name} is running, not paused")]
    NotPaused { name: String },
    #[error("sandbox {name}: the secrets are saved but not handed to its network process: {source}")]
    SecretsNotApplied { name: String, source: crate::net::NetError },
}

/// Waits up to `timeout` for `pid` to exit.
fn wait_exit(pid: i32, started: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(fd) = process::pidfd(pid) else {
        return !process::is_alive(pid, started);
    };
    loop {
        if !process::is_alive(pid, started) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
    }
}

impl Smolvm {
    /// Stops the VM: the guest's init is asked to power off cleanly (sync, unmount); after
    /// `timeout` the VM is terminated.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<(), LifecycleError> {
        let _lock = self.lock(name)?;
        self.stop_locked(name, timeout)
    }

    fn stop_locked(&self, name: &str, timeout: Duration) -> Result<(), LifecycleError> {
        let mut row = self.row(name)?;
        if Self::status_of(&row) == Status::Running {
            let pid = row.pid.unwrap_or(0);
            // The agent's Shutdown (else SIGTERM to PID 1 over SSH) makes smolvm-init stop
            // everything, sync, unmount and power off.
            let graceful = match self.agent(name).and_then(|c| c.shutdown()) {
                Ok(()) => Some(()),
                Err(e) => {
                    tracing::debug!("{name}: agent shutdown failed ({e}); trying SSH");
                    self.ssh_command(name, &["kill".into(), "-TERM".into(), "1".into()], false)
                        .ok()
                        .and_then(|mut c| {
                            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().ok()
                        })
                        .map(|_| ())
                }
            };
            if graceful.is_none() || !wait_exit(pid, row.pid_start, timeout) {
                tracing::warn!("{name}: no clean power-off within {timeout:?}; terminating the VM");
                if let Ok(mut q) = self.vmm().control(&self.dir(name), pid) {
                    q.quit();
                }
                if !wait_exit(pid, row.pid_start, Duration::from_secs(5)) {
                    let _ = process::signal(pid, libc::SIGKILL);
                    wait_exit(pid, row.pid_start, Duration::from_secs(5));
                }
            }
        }
        row.state = SandboxState::Stopped;
        row.pid = None;
        row.pid_start = None;
        row.ssh_port = None;
        self.db().update(&row)?;
        // A paused sandbox that is stopped forgets its saved memory: its next start boots.
        let _ = std::fs::remove_dir_all(self.dir(name).join(super::pause::PAUSED_DIR));
        let _ = std::fs::remove_file(self.dir(name).join("ssh.ctl"));
        crate::vm::cgroup::remove(
            &self.cgroups,
            &self.cgroup_name(name),
            &self.dir(name).join(crate::vm::cgroup::RECORD),
        );
        Ok(())
    }

    /// Boots a stopped (or crashed) sandbox again, on the disk it had.
    pub fn start(&self, name: &str, timeout: Duration) -> Result<(), LifecycleError> {
        let _lock = self.lock(name)?;
        let mut row = self.row(name)?;
        if Self::status_of(&row) == Status::Running {
            return Ok(());
        }
        // Never a second VM on the same disk: one a killed create or start left behind runs on.
        if let Some(pid) = row.pid.filter(|p| process::is_alive(*p, row.pid_start)) {
            return Err(LifecycleError::StillRunning { name: name.into(), pid });
        }
        if Self::status_of(&row) == Status::Paused {
            drop(_lock);
            return self.resume(name, timeout).map(|_| ());
        }
        let accel = Self::accel_of(&row);
        let files = self.files_of(&row)?;
        self.boot_row(&mut row, &accel, &files, timeout, &super::boot::Start::Cold)?;
        // Variables set while it was stopped reach the guest now (and ones removed meanwhile
        // leave the file its disk kept).
        self.after_boot(name, false)
    }

    /// Deletes a sandbox: its VM (killed: see below), disk and record.
    pub fn delete(&self, name: &str) -> Result<(), LifecycleError> {
        let _lock = self.lock(name)?;
        let row = self.row(name)?;
        // No clean power-off: the disk is about to be thrown away, so nothing in the guest
        // needs syncing, and a guest that ignores the request cannot hold delete up. Whatever
        // VM the row or the pid file names is killed, whatever the recorded state: a create or
        // start killed half-way leaves a VM the state never called running.
        let t = Instant::now();
        self.kill_vm(name, &row);
        tracing::debug!("{name}: its processes ended after {:?}", t.elapsed());
        super::throw_away(&self.dir(name));
        self.release_uid(name);
        self.db().delete(name)?;
        tracing::debug!("{name}: deleted after {:?}", t.elapsed());
        // The lock file stays (empty): removing it would let a command waiting on the old file
        // and one opening a new file both hold "the" lock.
        Ok(())
    }

    /// Used when `create` fails: kill whatever started and forget the sandbox.
    pub(super) fn discard(&self, name: &str) {
        if let Ok(Some(row)) = self.db().get(name) {
            self.kill_vm(name, &row);
        }
        remove_all(&self.dir(name));
        self.release_uid(name);
        let _ = self.db().delete(name);
    }

    /// Gives up the host-wide lease of a sandbox's uid (its processes are gone).
    fn release_uid(&self, name: &str) {
        let (Some(users), Ok(Some(slot))) = (self.config().vm_users, self.db().uid_slot_of(name)) else { return };
        if let Some(id) = users.identity(slot) {
            let _ = super::uids::release(&self.config().uid_leases, id.uid, &self.lease_holder(name));
        }
    }

    /// Kills the sandbox's VM if one runs: the pid the row recorded (its start time checked),
    /// and the pid QEMU wrote (checked to be this sandbox's QEMU by its `-name`). Its helpers
    /// (network process, agent proxy) end with it.
    pub(super) fn kill_vm(&self, name: &str, row: &crate::state::SandboxRow) {
        let dir = self.dir(name);
        // Every process first, then the waits: they end in parallel.
        let mut dying: Vec<(i32, Option<u64>)> = Vec::new();
        if let Some(pid) = row.pid.filter(|p| process::is_alive(*p, row.pid_start)) {
            let _ = process::signal(pid, libc::SIGKILL);
            dying.push((pid, row.pid_start));
        }
        // The pid file: "PID START", written by smolvm as soon as QEMU was spawned.
        let from_file = std::fs::read_to_string(crate::paths::vm_pid_file(&dir)).ok().and_then(|p| {
            let mut w = p.split_whitespace();
            Some((w.next()?.parse::<i32>().ok()?, w.next().and_then(|s| s.parse::<u64>().ok()).filter(|s| *s != 0)))
        });
        if let Some((pid, started)) =
            from_file.filter(|(p, s)| process::is_alive(*p, *s) && self.vmm().is_vm_of(*p, name))
        {
            let _ = process::signal(pid, libc::SIGKILL);
            dying.push((pid, started));
        }
        // They would end on their own once QEMU's end of their sockets closes; not leaving it
        // to a moment later keeps "deleted" exact.
        for (what, sub) in [("netd", "__netd"), ("agent-proxy", "__agent-proxy")] {
            if let Some(p) = crate::child::kill_helper(&dir, what, sub) {
                dying.push(p);
            }
        }
        for (pid, started) in dying {
            wait_exit(pid, started, Duration::from_secs(5));
        }
        crate::vm::cgroup::remove(&self.cgroups, &self.cgroup_name(name), &dir.join(crate::vm::cgroup::RECORD));
    }

    /// Forwards 127.0.0.1:`host_port` (default: a free port) to the guest's `guest_port`.
    /// Returns the host port. Kept across stop/start.
    pub fn expose(&self, name: &str, guest_port: u16, host_port: Option<u16>) -> Result<u16, LifecycleError> {
        let _lock = self.lock(name)?;
        self.running(name)?;
        let forward = crate::net::Forward { host: host_port.unwrap_or(0), guest: guest_port };
        let reply = crate::net::control(&self.dir(name), &crate::net::ControlRequest::Forward { forward }).map_err(
            |source| LifecycleError::Forward { name: name.into(), host: forward.host, guest: guest_port, source },
        )?;
        let bound = reply.forward.ok_or_else(|| LifecycleError::Forward {
            name: name.into(),
            host: forward.host,
            guest: guest_port,
            source: crate::net::NetError::Refused("it named no port".into()),
        })?;
        self.db().forward_add(name, bound)?;
        Ok(bound.host)
    }

    /// Sets an environment variable for login shells in the sandbox (persisted on the host and
    /// written to the guest's `/etc/profile.d/smolvm-env.sh` when it runs).
    pub fn env_set(&self, name: &str, key: &str, value: &str) -> Result<(), LifecycleError> {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(LifecycleError::VarName { name: name.into(), key: key.into() });
        }
        let _lock = self.lock(name)?;
        self.row(name)?;
        self.db().env_set(name, key, value)?;
        self.push_env(name)
    }

    pub fn env_unset(&self, name: &str, key: &str) -> Result<bool, LifecycleError> {
        let _lock = self.lock(name)?;
        self.row(name)?;
        let removed = self.db().env_unset(name, key)?;
        self.push_env(name)?;
        Ok(removed)
    }

    /// Every variable the guest's commands get: `env set`'s, then each secret's placeholder
    /// and where the sandbox's CA is.
    pub fn guest_env(&self, name: &str) -> Result<Vec<(String, String)>, SandboxError> {
        let mut vars = self.db().env(name)?;
        vars.extend(self.secret_env(name)?);
        Ok(vars)
    }

    pub fn env_list(&self, name: &str) -> Result<Vec<(String, String)>, LifecycleError> {
        self.row(name)?;
        Ok(self.db().env(name)?)
    }

    /// Hands the sandbox's variables to its guest through the agent (for login shells:
    /// `/etc/profile.d/smolvm-env.sh`), if it runs; a stopped one gets them at its next start.
    /// What a freshly booted guest is given: trust in the sandbox's CA if it has secrets, and
    /// its variables (placeholders included). Nothing is sent to a guest that has no
    /// variables yet when there are none to give (`fresh`): a round trip through the agent
    /// and a file written in the guest, which a restore would pay on a cold translation
    /// cache under emulation.
    pub(super) fn after_boot(&self, name: &str, fresh: bool) -> Result<(), LifecycleError> {
        self.install_ca(name)?;
        if fresh && self.guest_env(name)?.is_empty() {
            return Ok(());
        }
        self.push_env(name)
    }

    pub(super) fn push_env(&self, name: &str) -> Result<(), LifecycleError> {
        if Self::status_of(&self.row(name)?) != Status::Running {
            return Ok(());
        }
        let vars = self.guest_env(name)?;
        self.agent(name)
            .and_then(|c| c.set_env(vars))
            .map_err(|source| LifecycleError::Env { name: name.into(), source })
    }
}
