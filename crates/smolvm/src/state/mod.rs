//! Host state in SQLite: one row per sandbox, with schema migrations.
//!
//! SQLite serialises writers across processes (WAL mode, a busy timeout), so two `smolvm`
//! commands never corrupt the state; per-sandbox operations additionally hold the sandbox's
//! lock file (see `sandbox::lock`).

mod migrations;

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, ToSql};
use serde::Serialize;

use crate::net::{Forward, NetworkMode, NetworkPolicy};
use crate::vm::accel::AccelKind;

impl ToSql for AccelKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for AccelKind {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        match v.as_str()? {
            "kvm" => Ok(AccelKind::Kvm),
            "tcg" => Ok(AccelKind::Tcg),
            other => Err(FromSqlError::Other(format!("unknown accelerator {other:?}").into())),
        }
    }
}

/// Why the state database failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("lock the state database {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("{path} can be written by other users (mode {mode:o}): smolvm keeps sandboxes' keys, secrets and disks there and refuses it (chmod 700 {path})")]
    SharedHome { path: String, mode: u32 },
    #[error("{path} belongs to another user (uid {owner})")]
    ForeignHome { path: String, owner: u32 },
    #[error("create {path}: {source}")]
    Home { path: String, source: std::io::Error },
    #[error("state database: {0}")]
    Query(#[from] rusqlite::Error),
    #[error(
        "state database {path} has schema version {found}, newer than this smolvm knows ({known}); upgrade smolvm"
    )]
    TooNew { path: String, found: i64, known: i64 },
    #[error("sandbox {name} is {} now and cannot become {} (another command changed it meanwhile?)", from.as_str(), to.as_str())]
    Transition { name: String, from: SandboxState, to: SandboxState },
}

/// The state recorded for a sandbox (a dead VMM is reported as crashed by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Stopped,
    /// Its memory and devices saved in `paused/`, its QEMU gone (`Smolvm::pause`).
    Paused,
}

impl SandboxState {
    /// Every recorded transition, in one place (cloud-hypervisor's `VmState::valid_transition`
    /// is the model). A state may always be written again with other fields changed.
    ///
    /// ```text
    /// creating --boot--> running --stop--> stopped --start--> running
    ///                    running --pause-> paused  --resume-> running
    ///                                      paused  --stop---> stopped (its memory forgotten)
    /// creating --failed--> stopped     (a crashed sandbox is a running row without its VM:
    ///                                   start boots it again, running -> running)
    /// ```
    pub fn valid_transition(self, to: SandboxState) -> bool {
        use SandboxState::*;
        self == to
            || matches!(
                (self, to),
                (Creating, Running)
                    | (Creating, Stopped)
                    | (Running, Stopped)
                    | (Running, Paused)
                    | (Stopped, Running)
                    | (Paused, Running)
                    | (Paused, Stopped)
            )
    }

    /// The states a row may be in to be written as `to`.
    pub fn valid_sources(to: SandboxState) -> Vec<SandboxState> {
        use SandboxState::*;
        [Creating, Running, Stopped, Paused].into_iter().filter(|from| from.valid_transition(to)).collect()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Stopped => "stopped",
            SandboxState::Paused => "paused",
        }
    }
}

impl ToSql for SandboxState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for SandboxState {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        match v.as_str()? {
            "creating" => Ok(SandboxState::Creating),
            "running" => Ok(SandboxState::Running),
            "stopped" => Ok(SandboxState::Stopped),
            "paused" => Ok(SandboxState::Paused),
            other => Err(FromSqlError::Other(format!("unknown sandbox state {other:?}").into())),
        }
    }
}

/// How a sandbox's guest last started. Stored as text: `boot`, `boot-snapshot`,
/// `snapshot:NAME`, `fork:NAME`, `resume` (what `status` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A cold boot of the kernel.
    Boot,
    /// `create` restored this home's boot snapshot.
    BootSnapshot,
    /// `create --from-snapshot NAME`.
    Snapshot(String),
    /// A fork of sandbox NAME.
    Fork(String),
    /// `resume` of its own paused state.
    Resume,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Boot => f.write_str("boot"),
            Origin::BootSnapshot => f.write_str("boot-snapshot"),
            Origin::Snapshot(n) => write!(f, "snapshot:{n}"),
            Origin::Fork(n) => write!(f, "fork:{n}"),
            Origin::Resume => f.write_str("resume"),
        }
    }
}

impl std::str::FromStr for Origin {
    type Err = String;
    fn from_str(s: &str) -> Result<Origin, String> {
        Ok(match s {
            "boot" => Origin::Boot,
            "boot-snapshot" => Origin::BootSnapshot,
            "resume" => Origin::Resume,
            _ => match s.split_once(':') {
                Some(("snapshot", n)) => Origin::Snapshot(n.to_string()),
                Some(("fork", n)) => Origin::Fork(n.to_string()),
                _ => return Err(format!("unknown origin {s:?}")),
            },
        })
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl ToSql for Origin {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_string()))
    }
}

impl FromSql for Origin {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        v.as_str()?.parse().map_err(|e: String| FromSqlError::Other(e.into()))
    }
}

/// A network policy in its column: JSON (`NULL` in rows older than migration 4, whose
/// policy is their `network` mode alone).
struct PolicyColumn(NetworkPolicy);

impl ToSql for PolicyColumn {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        serde_json::to_string(&self.0)
            .map(ToSqlOutput::from)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
    }
}

/// What was recorded about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxRow {
    pub name: String,
    pub created_at: i64,
    pub state: SandboxState,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u64,
    /// What the sandbox may reach.
    pub policy: NetworkPolicy,
    pub accel: AccelKind,
    pub ssh_port: Option<u16>,
    pub pid: Option<i32>,
    /// The VMM's start time (clock ticks since host boot), so a recycled PID is not mistaken
    /// for our VMM.
    pub pid_start: Option<u64>,
    pub tag: String,
    pub kernel_sha256: String,
    pub rootfs_sha256: String,
    pub host_key: Option<String>,
    /// The guest's boot phases of the last boot (JSON of `smolvm_protocol::ready::BootPhases`).
    pub boot_json: Option<String>,
    /// Host-measured milliseconds from starting the VMM to the guest's readiness (last boot).
    pub ready_ms: Option<u64>,
    /// The preset this sandbox was started with, if any.
    pub preset: Option<String>,
    /// SHA-256 of its read-only layers over the base, top first.
    pub layer_sha256s: Vec<String>,
    /// How its guest last started: `boot`, `boot-snapshot`, `snapshot:NAME`, `fork:NAME`,
    /// `resume` (`NULL` before migration 6).
    pub started_from: Option<Origin>,
    /// Its disk I/O ceiling, all its disks together.
    pub disk_limit: DiskLimit,
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`) when its VM was started: a
    /// running row from another boot of the host is stopped, not crashed (`Smolvm::open`).
    pub host_boot: Option<String>,
}

/// A ceiling on a sandbox's disk I/O, all its disks together, enforced by QEMU's block
/// throttling (so it holds whatever the host's cgroup setup and disk layout); none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskLimit {
    /// Bytes per second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// Operations per second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
}

impl DiskLimit {
    pub fn is_none(&self) -> bool {
        self.bytes_per_sec.is_none() && self.iops.is_none()
    }
}

/// Creates `dir` (0700) if needed and refuses it if another user owns it or can write it.
pub fn private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let err = |source| StateError::Home { path: dir.display().to_string(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let meta = std::fs::metadata(dir).map_err(err)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(StateError::ForeignHome { path: dir.display().to_string(), owner: meta.uid() });
    }
    // Writable by others: someone else may have put anything there already; refused.
    if meta.mode() & 0o022 != 0 {
        return Err(StateError::SharedHome { path: dir.display().to_string(), mode: meta.mode() & 0o7777 });
    }
    // Readable by others (0755, what `mkdir` makes): ours, so made 0700, as documented.
    // Sandbox names, logs and snapshot lists are the owner's business too.
    if meta.mode() & 0o055 != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        tracing::info!("{}: made 0700 (it was {:o})", dir.display(), meta.mode() & 0o777);
    }
    Ok(())
}

/// The state database.
#[derive(Debug)]
pub struct Db {
    /// One connection, taken for one statement at a time: `Smolvm` is shared by threads, and
    /// SQLite serialises writers anyway (processes are kept apart by its file locks).
    conn: std::sync::Mutex<Connection>,
}

const COLUMNS: &str = "name, created_at, state, memory_mib, cpus, disk_mib, network, accel, ssh_port, pid, pid_start, \
                       tag, kernel_sha256, rootfs_sha256, host_key, boot_json, ready_ms, preset, layer_sha256s, \
                       network_policy, started_from, disk_limit, host_boot";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        name: r.get(0)?,
        created_at: r.get(1)?,
        state: r.get(2)?,
        memory_mib: r.get(3)?,
        cpus: r.get(4)?,
        disk_mib: r.get(5)?,
        policy: match r.get::<_, Option<String>>(19)? {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(19, rusqlite::types::Type::Text, e.into()))?,
            None => {
                let mode: String = r.get(6)?;
                NetworkPolicy {
                    mode: mode.parse::<NetworkMode>().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
                    })?,
                    ..NetworkPolicy::default()
                }
            }
        },
        accel: r.get(7)?,
        ssh_port: r.get(8)?,
        pid: r.get(9)?,
        pid_start: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        tag: r.get(11)?,
        kernel_sha256: r.get(12)?,
        rootfs_sha256: r.get(13)?,
        host_key: r.get(14)?,
        boot_json: r.get(15)?,
        ready_ms: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        preset: r.get(17)?,
        layer_sha256s: r.get::<_, String>(18)?.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        started_from: r.get(20)?,
        disk_limit: match r.get::<_, Option<String>>(21)? {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(21, rusqlite::types::Type::Text, e.into()))?,
            None => DiskLimit::default(),
        },
        host_boot: r.get(22)?,
    })
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, StateError> {
        let open_err = |source| StateError::Open { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // Creating the file, switching it to WAL and migrating it are serialised across
        // processes (SQLite's busy handler does not cover the journal-mode switch).
        let lock_path = path.with_extension("db.lock");
        let _guard = crate::lock::FileLock::exclusive(&lock_path)
            .map_err(|source| StateError::Lock { path: lock_path.display().to_string(), source })?;
        let conn = Connection::open(path).map_err(open_err)?;
        // The database names every sandbox and its keys' paths: the owner's only.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        conn.busy_timeout(Duration::from_secs(30)).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        let mut conn = conn;
        migrations::migrate(&mut conn, path)?;
        let db = Db { conn: std::sync::Mutex::new(conn) };
        Ok(db)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while it was held leaves the connection as SQLite left it: usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a new sandbox; `false` if the name is taken.
    pub fn insert(&self, s: &SandboxRow) -> Result<bool, StateError> {
        let n = self.conn().execute(
            &format!("INSERT OR IGNORE INTO sandboxes ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23)"),
            params![
                s.name, s.created_at, s.state, s.memory_mib, s.cpus, s.disk_mib as i64, s.policy.mode.as_str(), s.accel,
                s.ssh_port, s.pid, s.pid_start.map(|v| v as i64), s.tag, s.kernel_sha256, s.rootfs_sha256,
                s.host_key, s.boot_json, s.ready_ms.map(|v| v as i64), s.preset, s.layer_sha256s.join(","),
                PolicyColumn(s.policy.clone()),
                s.started_from,
                (!s.disk_limit.is_none()).then(|| serde_json::to_string(&s.disk_limit).unwrap_or_default()),
                s.host_boot
            ],
        )?;
        Ok(n == 1)
    }

    /// Overwrites the mutable fields of an existing sandbox. The state is checked against the
    /// one recorded, in the same statement ([`SandboxState::valid_transition`]): a transition
    /// that is not valid from what another process recorded meanwhile is refused, not written.
    pub fn update(&self, s: &SandboxRow) -> Result<(), StateError> {
        let from: Vec<&str> = SandboxState::valid_sources(s.state).into_iter().map(SandboxState::as_str).collect();
        let from = from.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(",");
        let n = self.conn().execute(
            &format!(
                "UPDATE sandboxes SET state=?2, ssh_port=?3, pid=?4, pid_start=?5, host_key=?6, boot_json=?7, accel=?8, \
                 ready_ms=?9, started_from=?10, host_boot=?11 WHERE name=?1 AND state IN ({from})"
            ),
            params![
                s.name,
                s.state,
                s.ssh_port,
                s.pid,
                s.pid_start.map(|v| v as i64),
                s.host_key,
                s.boot_json,
                s.accel,
                s.ready_ms.map(|v| v as i64),
                s.started_from,
                s.host_boot
            ],
        )?;
        if n == 0 {
            if let Some(now) = self.get(&s.name)? {
                return Err(StateError::Transition { name: s.name.clone(), from: now.state, to: s.state });
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Option<SandboxRow>, StateError> {
        Ok(self.conn().query_row(&format!("SELECT {COLUMNS} FROM sandboxes WHERE name=?1"), [name], row).optional()?)
    }

    pub fn list(&self) -> Result<Vec<SandboxRow>, StateError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLUMNS} FROM sandboxes ORDER BY created_at, name"))?;
        let rows = st.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The sandbox's uid slot, given the lowest free one the first time (one statement, so
    /// two sandboxes booting at once cannot get the same; the unique index guards it too).
    pub fn uid_slot(&self, name: &str) -> Result<u32, StateError> {
        self.conn().execute(
            "UPDATE sandboxes SET uid_slot = (
                SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM sandboxes WHERE uid_slot = 0) THEN 0
                ELSE (SELECT MIN(a.uid_slot) + 1 FROM sandboxes a WHERE a.uid_slot IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM sandboxes b WHERE b.uid_slot = a.uid_slot + 1)) END)
             WHERE name = ?1 AND uid_slot IS NULL",
            [name],
        )?;
        Ok(self.conn().query_row("SELECT uid_slot FROM sandboxes WHERE name=?1", [name], |r| r.get(0))?)
    }

    /// Moves a sandbox to another uid slot (the host-wide lease gave it another).
    pub fn set_uid_slot(&self, name: &str, slot: u32) -> Result<(), StateError> {
        self.conn().execute("UPDATE sandboxes SET uid_slot = ?2 WHERE name = ?1", rusqlite::params![name, slot])?;
        Ok(())
    }

    /// Whether another sandbox of this home holds slot `slot`.
    pub fn uid_slot_taken(&self, name: &str, slot: u32) -> Result<bool, StateError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM sandboxes WHERE uid_slot = ?2 AND name <> ?1",
                rusqlite::params![name, slot],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The slot a sandbox holds, if any (for `status`).
    pub fn uid_slot_of(&self, name: &str) -> Result<Option<u32>, StateError> {
        Ok(self
            .conn()
            .query_row("SELECT uid_slot FROM sandboxes WHERE name=?1", [name], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn delete(&self, name: &str) -> Result<(), StateError> {
        self.conn().execute("DELETE FROM sandboxes WHERE name=?1", [name])?;
        Ok(())
    }

    /// The SHA-256 of every image some sandbox uses (kept by `image prune`): kernels, base
    /// rootfs and preset layers.
    pub fn images_in_use(&self) -> Result<Vec<String>, StateError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT kernel_sha256, rootfs_sha256, layer_sha256s FROM sandboxes")?;
        let mut out = Vec::new();
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))? {
            let (k, b, layers) = r?;
            out.push(k);
            out.push(b);
            out.extend(layers.split(',').filter(|s| !s.is_empty()).map(str::to_string));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Environment variables set with `smolvm env set`.
    pub fn env(&self, name: &str) -> Result<Vec<(String, String)>, StateError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT key, value FROM env WHERE sandbox=?1 ORDER BY key")?;
        let rows = st.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn env_set(&self, name: &str, key: &str, value: &str) -> Result<(), StateError> {
        self.conn().execute(
            "INSERT INTO env (sandbox, key, value) VALUES (?1,?2,?3) ON CONFLICT(sandbox, key) DO UPDATE SET value=excluded.value",
            params![name, key, value],
        )?;
        Ok(())
    }

    /// Port forwards added with `smolvm expose`.
    pub fn forwards(&self, name: &str) -> Result<Vec<Forward>, StateError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT guest_port, host_port FROM forwards WHERE sandbox=?1 ORDER BY guest_port")?;
        let rows = st
            .query_map([name], |r| Ok(Forward { guest: r.get(0)?, host: r.get(1)? }))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Replaces a sandbox's network policy.
    pub fn set_policy(&self, name: &str, policy: &NetworkPolicy) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE sandboxes SET network=?2, network_policy=?3 WHERE name=?1",
            params![name, policy.mode.as_str(), PolicyColumn(policy.clone())],
        )?;
        Ok(())
    }

    pub fn forward_add(&self, name: &str, f: Forward) -> Result<(), StateError> {
        let (guest_port, host_port) = (f.guest, f.host);
        self.conn().execute(
            "INSERT INTO forwards (sandbox, guest_port, host_port) VALUES (?1,?2,?3) \
             ON CONFLICT(sandbox, guest_port) DO UPDATE SET host_port=excluded.host_port",
            params![name, guest_port, host_port],
        )?;
        Ok(())
    }

    pub fn env_unset(&self, name: &str, key: &str) -> Result<bool, StateError> {
        Ok(self.conn().execute("DELETE FROM env WHERE sandbox=?1 AND key=?2", params![name, key])? == 1)
    }
}

#[cfg(test)]
pub(crate) mod tests;
