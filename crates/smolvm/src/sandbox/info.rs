//! What `list`, `status` and `logs` show of a sandbox: its status as seen now (the record
//! checked against its processes), its settings, its host side, its console and network log.

use std::path::PathBuf;

use serde::Serialize;
use smolvm_protocol::ready::BootPhases;

use super::{NetworkMode, NetworkPolicy, SandboxError, Smolvm};
use crate::state::{SandboxRow, SandboxState};
use crate::vm::process;

/// A sandbox's state as seen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Running,
    Stopped,
    /// Saved (memory, devices, disk) with no QEMU: `resume` continues it.
    Paused,
    /// The database says running, but the VMM is gone.
    Crashed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Paused => "paused",
            Status::Crashed => "crashed",
        })
    }
}

/// What `list` and `status` report.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub name: String,
    pub status: Status,
    pub created_at: i64,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u64,
    /// Its disk I/O ceiling (none by default).
    #[serde(skip_serializing_if = "crate::state::DiskLimit::is_none")]
    pub disk_limit: crate::state::DiskLimit,
    /// The network mode (`nat` or `none`); the whole policy is in `network_policy`.
    pub network: NetworkMode,
    pub network_policy: NetworkPolicy,
    /// Connections the policy refused: how many, and the last few.
    pub network_refusals: crate::net::NetStats,
    pub accel: crate::vm::accel::AccelKind,
    pub ssh_port: Option<u16>,
    pub pid: Option<i32>,
    pub image_tag: String,
    /// Whether its kernel, base and layers are all pinned in this binary.
    pub pinned: bool,
    pub preset: Option<String>,
    pub boot_us: Option<BootPhases>,
    /// Host-measured milliseconds from starting QEMU to the guest's readiness (last boot).
    pub ready_ms: Option<u64>,
    /// How the guest last started: `boot` (the kernel booted), `boot-snapshot` (`create`
    /// restored the boot snapshot), `snapshot:NAME`, `fork:NAME`, `resume`.
    pub started_from: Option<String>,
    pub forwards: Vec<crate::net::Forward>,
    /// Who its host processes run as, and what limits them.
    pub host: HostSide,
    pub dir: PathBuf,
}

/// The host side of a sandbox: QEMU and its helpers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSide {
    /// The uid of its QEMU (while it runs), else the one its next boot gets.
    pub uid: Option<u32>,
    /// The cgroup limits in force, read back from its group (while it runs).
    pub limits: Option<crate::vm::cgroup::Applied>,
    /// Why there are none, when it runs without.
    pub limits_note: Option<String>,
    /// What its QEMU and helpers are confined with (`crate::jail`).
    pub confinement: Vec<String>,
}

impl Smolvm {
    pub(super) fn status_of(row: &SandboxRow) -> Status {
        match row.state {
            SandboxState::Running if row.pid.is_some_and(|p| process::is_alive(p, row.pid_start)) => Status::Running,
            SandboxState::Running => Status::Crashed,
            SandboxState::Creating => Status::Creating,
            SandboxState::Stopped => Status::Stopped,
            SandboxState::Paused => Status::Paused,
        }
    }

    pub(super) fn info_of(&self, row: &SandboxRow) -> Result<SandboxInfo, SandboxError> {
        let status = Self::status_of(row);
        let live = status == Status::Running;
        Ok(SandboxInfo {
            name: row.name.clone(),
            status,
            created_at: row.created_at,
            memory_mib: row.memory_mib,
            cpus: row.cpus,
            disk_mib: row.disk_mib,
            disk_limit: row.disk_limit,
            network: row.policy.mode,
            network_policy: row.policy.clone(),
            network_refusals: crate::net::refusals::read_stats(&crate::paths::run_dir(&self.dir(&row.name))),
            accel: row.accel,
            ssh_port: row.ssh_port.filter(|_| live),
            pid: row.pid.filter(|_| live),
            image_tag: row.tag.clone(),
            pinned: crate::images::ReleasePins::compiled().is_ok_and(|p| {
                let pinned = |sha: &str| p.assets.iter().any(|a| a.content_sha256() == sha);
                pinned(&row.kernel_sha256) && pinned(&row.rootfs_sha256) && row.layer_sha256s.iter().all(|s| pinned(s))
            }),
            preset: row.preset.clone(),
            boot_us: row.boot_json.as_deref().and_then(|j| serde_json::from_str(j).ok()),
            ready_ms: row.ready_ms,
            started_from: row.started_from.as_ref().map(ToString::to_string),
            forwards: self.db.forwards(&row.name)?,
            host: self.host_side(row, live)?,
            dir: self.dir(&row.name),
        })
    }

    fn host_side(&self, row: &SandboxRow, live: bool) -> Result<HostSide, SandboxError> {
        let running_uid = row.pid.filter(|_| live).and_then(process::uid_of);
        let planned = || -> Result<Option<u32>, SandboxError> {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if me != 0 {
                return Ok(Some(me));
            }
            let slot = self.db.uid_slot_of(&row.name)?;
            Ok(slot.zip(self.config.vm_users).and_then(|(s, u)| u.identity(s)).map(|i| i.uid))
        };
        let uid = match running_uid {
            Some(u) => Some(u),
            None => planned()?,
        };
        let record = self.dir(&row.name).join(crate::vm::cgroup::RECORD);
        let limits =
            live.then(|| crate::vm::cgroup::applied(&self.cgroups, &self.cgroup_name(&row.name), &record)).flatten();
        let limits_note = match (&self.cgroups, live, &limits) {
            (crate::vm::cgroup::Support::Unavailable { reason }, true, _) => Some(reason.clone()),
            (_, true, None) => Some("its group could not be made (see the log of its start)".into()),
            // Made at the hierarchy's root: outside the limits of the unit that started it.
            (crate::vm::cgroup::Support::V2 { parent, unit: Some(_) }, true, Some(a))
                if a.groups.iter().all(|g| g.starts_with(parent)) =>
            {
                Some("its group is outside the limits of the unit that started it (see `smolvm doctor`)".into())
            }
            _ => None,
        };
        let confinement = crate::jail::confinement().into_iter().map(str::to_string).collect();
        Ok(HostSide { uid, limits, limits_note, confinement })
    }

    /// Every sandbox, oldest first.
    pub fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        for r in self.db.list()? {
            self.settle(&r.name);
        }
        self.db.list()?.iter().map(|r| self.info_of(r)).collect()
    }

    /// One sandbox.
    pub fn info(&self, name: &str) -> Result<SandboxInfo, SandboxError> {
        // What a killed pause or snapshot left is put right before it is reported.
        self.settle(name);
        let row = self.row(name)?;
        self.info_of(&row)
    }

    /// The console of a sandbox (kernel and init messages): its last `max` bytes, across the
    /// rotation (at most `agent::console::TOTAL_CAP` are kept). The guest's text, unescaped.
    pub fn console(&self, name: &str, max: u64) -> Result<Vec<u8>, SandboxError> {
        self.row(name)?;
        Ok(crate::agent::console::tail(&crate::paths::run_dir(&self.dir(name)), max))
    }

    /// The network process's log of refused connections (at most 2 MiB: the log and the one
    /// it rotated), the guest's names in it unescaped.
    pub fn network_log(&self, name: &str) -> Result<Vec<u8>, SandboxError> {
        self.row(name)?;
        let path = crate::net::refusals::log_path(&crate::paths::run_dir(&self.dir(name)));
        let mut out = Vec::new();
        for p in [path.with_extension("log.1"), path] {
            out.extend(crate::text::read_untrusted(&p, 1 << 20).unwrap_or_default());
        }
        Ok(out)
    }
}
