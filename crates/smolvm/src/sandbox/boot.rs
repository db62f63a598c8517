//! Booting a sandbox from its row and its images: the one boot path of `create` and `start`.
//!
//! Order: the sandbox's `run/` directory and cgroup; the network process (it binds the SSH
//! forward and holds one end of the wire); the agent proxy (agent port and console); QEMU with
//! the other ends; then the readiness line on the console, then the agent. All three run as
//! the sandbox's own uid when smolvm is root. Any failure kills what was started; the caller
//! removes what it made.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use smolvm_protocol::ready::Ready;

use super::Smolvm;
use crate::child::Identity;
use crate::net::{self, Forward, NetConfig, NetError};
use crate::state::{SandboxRow, SandboxState};
use crate::vm::accel::Accel;
use crate::vm::cgroup::{self, Limits};
use crate::vm::machine::{kernel_cmdline, DiskCache, Incoming, MachineSpec, Memory, Netdev, Wiring};
use crate::vm::process;
use crate::vm::ready::{console_tail, wait_for_ready, WaitError};

/// The images one boot uses, as host paths.
#[derive(Debug, Clone)]
pub(super) struct BootFiles {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Read-only layers over the base, top first.
    pub layers: Vec<PathBuf>,
}

/// How a boot starts the guest.
#[derive(Debug, Clone)]
pub(super) enum Start {
    /// The kernel boots.
    Cold,
    /// The guest continues from a saved state (`super::restore`).
    Restore(Restore),
}

/// A saved state to continue from.
#[derive(Debug, Clone)]
pub(super) struct Restore {
    /// A sealed snapshot's RAM image, mapped copy-on-write, with `stream` its devices only;
    /// or `None`: `stream` is a mapped-ram stream, loaded into anonymous memory (a resume).
    pub ram: Option<PathBuf>,
    /// `ram`'s digest, as the snapshot's meta records it (`snapshot::RamImage`).
    pub ram_sha256: Option<String>,
    pub stream: PathBuf,
    /// What `stream` is: a migration stream, or the devices alone (`snapshot::StateForm`).
    pub incoming: Incoming,
    /// Pages to write over `ram` before the devices load: a paused guest's own
    /// (`snapshot::pages`), its `ram` the image it was restored from.
    pub pages: Option<PathBuf>,
    /// A clone gets a new identity (hostname, machine-id, SSH host key); a resume keeps its own.
    pub clone: bool,
    /// The SSH host key the guest had when it was saved (what a resume keeps).
    pub host_key: Option<String>,
    /// What the row records it started from (`boot-snapshot`, `snapshot:NAME`, `resume`).
    pub origin: crate::state::Origin,
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
    #[error(
        "smolvm runs as root, and this host has no range of uids for sandboxes: QEMU and its helpers never run as root"
    )]
    NoVmUsers,
    #[error("all {count} uids of the sandboxes' range are taken")]
    NoFreeUid { count: u32 },
    #[error("the guest did not continue from its saved state: {reason}\n--- qemu.log ---\n{qemu_log}")]
    Restore { reason: String, qemu_log: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootError {
    let what = what.into();
    move |source| BootError::Io { what, source }
}

/// The managed public key, base64 for the kernel command line.
pub(crate) fn public_key_b64(keys: &Path) -> Result<String, BootError> {
    let path = keys.join("id_ed25519.pub");
    let pubkey =
        std::fs::read_to_string(&path).map_err(io_err(format!("read the SSH public key {}", path.display())))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(pubkey.trim()))
}

/// Starts the VM detached: its own session (a Ctrl-C or a closed terminal does not reach it),
/// its output on `log` (the pipe the agent proxy keeps in `run/qemu.log`), confined like its
/// helpers (`Vmm::spawn`).
fn spawn_vm(
    vmm: &dyn crate::vm::Vmm,
    spec: &MachineSpec,
    wiring: Wiring,
    log: std::io::PipeWriter,
) -> Result<std::process::Child, BootError> {
    let log = std::fs::File::from(OwnedFd::from(log));
    vmm.spawn(spec, wiring, log)
        .map_err(|source| BootError::Spawn { qemu: vmm.program().display().to_string(), source })
}

/// The last `max` bytes of QEMU's output, escaped for a terminal.
pub(super) fn qemu_log_tail(dir: &Path, max: u64) -> String {
    let log = crate::agent::console::tail_of(&crate::paths::run_dir(dir), "qemu.log", max);
    crate::text::escape_controls(String::from_utf8_lossy(&log).trim())
}

/// A connected pair of stream sockets: (ours, theirs).
fn socket_pair(what: &str) -> Result<(OwnedFd, OwnedFd), BootError> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(io_err(format!("socket pair for {what}")))?;
    Ok((a.into(), b.into()))
}

/// Makes the sandbox's `run/` directory afresh, owned by `identity` (the processes that work
/// in it), with an empty console log that the booting process opens before any of them runs.
pub(crate) fn make_run_dir(dir: &Path, identity: Option<Identity>) -> Result<PathBuf, BootError> {
    use std::os::unix::fs::DirBuilderExt;
    let run = crate::paths::run_dir(dir);
    // The network log and counts outlive a restart (`status`, `logs --network`): read back
    // from the old directory as the untrusted files they are, and written anew.
    let keep: Vec<(&str, Vec<u8>)> = ["network.log.1", "network.log", "network-stats.json"]
        .into_iter()
        .filter_map(|n| crate::text::read_untrusted(&run.join(n), 1 << 20).ok().map(|b| (n, b)))
        .collect();
    if run.exists() {
        std::fs::remove_dir_all(&run).map_err(io_err(format!("remove {}", run.display())))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&run).map_err(io_err(format!("create {}", run.display())))?;
    for (n, body) in keep {
        let p = run.join(n);
        let mut f = crate::text::create_private(&p).map_err(io_err(format!("create {}", p.display())))?;
        std::io::Write::write_all(&mut f, &body).map_err(io_err(format!("write {}", p.display())))?;
        if let Some(id) = identity {
            std::os::unix::fs::fchown(&f, Some(id.uid), Some(id.gid))
                .map_err(io_err(format!("chown {}", p.display())))?;
        }
    }
    let console = crate::paths::console_log(dir);
    let f = crate::text::create_private(&console).map_err(io_err(format!("create {}", console.display())))?;
    if let Some(id) = identity {
        let chown = |p: &Path| {
            std::os::unix::fs::chown(p, Some(id.uid), Some(id.gid)).map_err(io_err(format!("chown {}", p.display())))
        };
        chown(&run)?;
        std::os::unix::fs::fchown(&f, Some(id.uid), Some(id.gid)).map_err(io_err("chown console.log"))?;
    }
    Ok(run)
}

impl Smolvm {
    /// The machine that runs `row`'s sandbox (cold: anonymous memory, no saved state).
    pub(super) fn machine_spec(
        &self,
        row: &SandboxRow,
        accel: &Accel,
        files: &BootFiles,
        cmdline: String,
        netdev: Netdev,
    ) -> MachineSpec {
        let dir = self.dir(&row.name);
        MachineSpec {
            name: row.name.clone(),
            accel: accel.clone(),
            memory_mib: row.memory_mib,
            cpus: row.cpus,
            kernel: files.kernel.clone(),
            cmdline,
            base: files.rootfs.clone(),
            upper: dir.join("disk.ext4"),
            layers: files.layers.clone(),
            netdev,
            dir,
            upper_cache: if self.unsafe_disk_cache { DiskCache::Unsafe } else { DiskCache::Writeback },
            memory: Memory::Anonymous,
            incoming: None,
            disk_limit: row.disk_limit,
        }
    }

    /// Who the sandbox's processes run as now: its own uid (its slot's) when we are root, else
    /// the caller. Takes no lease: for the processes of a running sandbox (a sealing QEMU).
    pub(super) fn identity_of(&self, name: &str) -> Result<Option<Identity>, BootError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let users = self.config().vm_users.ok_or(BootError::NoVmUsers)?;
        let slot = self.db().uid_slot(name)?;
        users.identity(slot).map(Some).ok_or(BootError::NoFreeUid { count: users.count })
    }

    /// Who holds a sandbox's uid lease: its home's database and its name.
    pub(super) fn lease_holder(&self, name: &str) -> String {
        format!("{}/{name}", self.home().database().display())
    }

    /// [`Smolvm::identity_of`] for a boot: the uid leased host-wide first (`uids.rs`), the
    /// sandbox moved to another slot if another home's sandbox holds its uid.
    fn lease_identity(&self, name: &str) -> Result<Option<Identity>, BootError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let users = self.config().vm_users.ok_or(BootError::NoVmUsers)?;
        // This home's slot, if no other home's sandbox (or any process) has its uid now.
        let holder = self.lease_holder(name);
        let db = self.db();
        // Its own last processes (a QEMU still quitting after a pause) do not make its uid busy.
        let dir = self.dir(name);
        let own: Vec<i32> =
            ["qemu", "netd", "agent-proxy"].iter().filter_map(|what| crate::child::recorded_pid(&dir, what)).collect();
        let leases = &self.config().uid_leases;
        let io = |source| BootError::Io { what: format!("lease a uid in {}", leases.display()), source };
        // The slot this home records and the lease are chosen as one step for the whole host.
        let leased = super::uids::locked(leases, || -> Result<Option<u32>, BootError> {
            let slot = db.uid_slot(name)?;
            let leased =
                super::uids::lease(leases, &users, slot, &own, |s| db.uid_slot_taken(name, s).unwrap_or(true), &holder)
                    .map_err(io)?;
            if let Some(l) = leased.filter(|l| *l != slot) {
                db.set_uid_slot(name, l)?;
            }
            Ok(leased)
        })
        .map_err(io)??
        .ok_or(BootError::NoFreeUid { count: users.count })?;
        users.identity(leased).map(Some).ok_or(BootError::NoFreeUid { count: users.count })
    }

    /// Boots `row`'s sandbox from `files` and waits until a command can run in it; on success
    /// the row says `running` with its pid, port, host key and boot figures.
    pub(super) fn boot_row(
        &self,
        row: &mut SandboxRow,
        accel: &Accel,
        files: &BootFiles,
        timeout: Duration,
        start: &Start,
    ) -> Result<(), BootError> {
        let dir = self.dir(&row.name);
        let key_b64 = public_key_b64(&self.home().keys())?;
        let identity = self.lease_identity(&row.name)?;
        let dns_hosts = match &self.config().resolver_hosts {
            Some(p) => Some(std::fs::read_to_string(p).map_err(io_err(format!("read {}", p.display())))?),
            None => None,
        };
        let netcfg = NetConfig {
            policy: row.policy.clone(),
            ssh: Forward { host: 0, guest: 22 },
            forwards: self.db().forwards(&row.name)?,
            dns_hosts,
        };
        let _ = std::fs::remove_file(crate::paths::vm_pid_file(&dir));
        make_run_dir(&dir, identity)?;
        let console = crate::paths::console_log(&dir);
        let limits = Limits::for_guest(row.memory_mib, accel);
        let group =
            match cgroup::create(&self.cgroups, &self.cgroup_name(&row.name), &limits, &dir.join(cgroup::RECORD)) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!("{}: no resource limits: {e}", row.name);
                    None
                }
            };
        let procs = group.as_ref().map(|g| g.procs_fds()).unwrap_or_default();
        let started = Instant::now();
        // Every process started from here is ended again on any early return.
        let mut launched = super::launch::Launched::default();
        let (cfg_netdev, wire, ssh_port) = if self.unrestricted_user_net {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(io_err("find a free port"))?
                .port();
            (Netdev::UnrestrictedUser { ssh_port: port }, None, port)
        } else {
            net::write_config(&dir, &netcfg)?;
            let c = self.config();
            let w =
                net::spawn(&dir, &c.helper, c.helper_log.as_deref(), identity, procs.clone(), Duration::from_secs(10))?;
            launched.started("network process", w.pid);
            // Its secrets before the guest can make a connection.
            self.send_intercept(&row.name)?;
            let port = w.ssh_port;
            (Netdev::Wire, Some(w), port)
        };
        tracing::debug!("{}: network helper up", row.name);
        // The agent proxy starts before QEMU, holding its ends of the agent and console pairs
        // and of QEMU's output pipe.
        let pairs = socket_pair("the agent port").and_then(|a| {
            let log = std::io::pipe().map_err(io_err("a pipe for QEMU's output"))?;
            Ok((a, socket_pair("the console")?, log))
        });
        let ((agent_ours, agent_qemu), (console_ours, console_qemu), (log_ours, log_qemu)) = pairs?;
        let proxy = crate::agent::spawn_proxy(
            &dir,
            &self.config().helper,
            self.config().helper_log.as_deref(),
            crate::agent::ProxyPlumbing {
                vm: agent_ours,
                console: console_ours,
                qemu_log: OwnedFd::from(log_ours),
                identity,
                cgroup_procs: procs.clone(),
            },
        );
        let proxy = proxy.map_err(io_err("start the agent proxy"))?;
        launched.started("agent proxy", proxy.pid());
        let mut cfg = self.machine_spec(
            row,
            accel,
            files,
            kernel_cmdline(&row.name, accel, files.layers.len(), &key_b64),
            cfg_netdev,
        );
        if let Start::Restore(r) = start {
            cfg.incoming = Some(r.incoming);
            if r.ram.is_some() {
                cfg.memory = Memory::SnapshotImage;
            }
        }
        let (ram, incoming) = super::restore::open_inputs(start)?;
        super::restore::record_ram_image(&dir, start, ram.as_ref())?;
        let qemu_end = wire.map(|w| w.qemu_end);
        let plumbing = Wiring {
            wire: qemu_end,
            agent: agent_qemu,
            console: console_qemu,
            identity,
            cgroup_procs: procs,
            ram,
            incoming,
            ends_with_caller: false,
        };
        // Our copies of QEMU's ends close when `plumbing` is dropped inside, so that the
        // helpers see QEMU's exit.
        let mut child = spawn_vm(self.vmm(), &cfg, plumbing, log_qemu)?;
        drop(group);
        let pid = child.id() as i32;
        launched.started("VM", pid);
        tracing::debug!("{}: QEMU spawned", row.name);
        let pid_start = process::start_time(pid);
        // Recorded at once: if this process dies now (Ctrl-C, SIGKILL), `delete` still finds
        // and stops the VM it started (the row, and a pid file that smolvm, not QEMU, writes).
        let _ = std::fs::write(crate::paths::vm_pid_file(&dir), format!("{pid} {}", pid_start.unwrap_or(0)));
        row.pid = Some(pid);
        row.pid_start = pid_start;
        self.db().update(row)?;
        let mut fail = |cause: WaitError| {
            // How QEMU ended, if it did (before we kill it).
            let status = child.try_wait().ok().flatten().map(|s| format!(" (QEMU {s})")).unwrap_or_default();
            let tail =
                format!("{}\n--- qemu.log{status} ---\n{}", console_tail(&console, 30), qemu_log_tail(&dir, 16 * 1024));
            BootError::NotReady { cause, console: console.display().to_string(), tail }
        };
        if let Start::Restore(r) = start {
            let host_key = self.finish_restore(row, &dir, pid, &key_b64, r, proxy, timeout)?;
            row.started_from = Some(r.origin.clone());
            let elapsed = started.elapsed();
            self.record_running(row, &dir, pid, pid_start, ssh_port, host_key, None, elapsed)?;
            launched.commit();
            return Ok(());
        }
        let pidfd = process::pidfd(pid).map_err(|e| fail(WaitError::Io(e)))?;
        let ready: Ready = wait_for_ready(&console, &pidfd, timeout).map_err(&mut fail)?;
        // Ready on the console means sshd and the agent are up. The proxy says so once it holds
        // the agent's connection and serves clients; one Hello through it proves the path.
        let agent = proxy
            .ready(timeout)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::agent::AgentClient::connect_sandbox(&row.name, &dir).map_err(|e| e.to_string()));
        agent.map_err(BootError::Agent)?;
        let elapsed = started.elapsed();
        tracing::debug!("{} ready in {elapsed:?}: {:?}", row.name, ready.boot_us);
        row.started_from = Some(crate::state::Origin::Boot);
        self.record_running(row, &dir, pid, pid_start, ssh_port, ready.host_key, Some(ready.boot_us), elapsed)?;
        launched.commit();
        Ok(())
    }

    /// The guest is ready: its host key pinned, its row says running.
    #[allow(clippy::too_many_arguments)]
    fn record_running(
        &self,
        row: &mut SandboxRow,
        dir: &Path,
        pid: i32,
        pid_start: Option<u64>,
        ssh_port: u16,
        host_key: String,
        boot_us: Option<smolvm_protocol::ready::BootPhases>,
        elapsed: Duration,
    ) -> Result<(), BootError> {
        super::ssh::write_known_hosts(&dir.join("known_hosts"), ssh_port, &host_key)
            .map_err(io_err("write known_hosts"))?;
        row.state = SandboxState::Running;
        row.pid = Some(pid);
        row.pid_start = pid_start;
        row.host_boot = process::host_boot_id();
        row.ssh_port = Some(ssh_port);
        row.host_key = Some(host_key);
        if boot_us.is_some() {
            row.boot_json = boot_us.and_then(|b| serde_json::to_string(&b).ok());
        }
        row.ready_ms = Some(elapsed.as_millis() as u64);
        self.db().update(row)?;
        Ok(())
    }
}
