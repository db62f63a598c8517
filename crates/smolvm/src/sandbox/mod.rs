//! Sandboxes: create, list, exec, stop, start, delete: the product, as a library.
//!
//! [`Smolvm`] is the handle an SDK user holds: it owns the host directories ([`Home`]), the
//! state database and the image cache. Each sandbox is a row in the database plus a directory
//! `<home>/sandboxes/<name>/` with its writable disk, console log, QMP socket and known_hosts.
//! Operations that change a sandbox hold its lock file, so two commands on one sandbox never
//! interleave; reads (list, status, exec) need no lock.

mod boot;
mod boot_snapshot;
mod create;
pub mod disk;
mod files;
mod fork;
mod info;
mod launch;
mod lifecycle;
pub mod names;
mod network;
mod pause;
pub mod presets;
mod reconcile;
mod restore;
#[cfg(test)]
mod seam_tests;
pub mod secrets;
mod snapshots;
pub mod ssh;
mod tree;
pub mod uids;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use boot::BootError;
pub use create::{CreateError, CreateEvent, CreateOptions};
pub use files::CopyError;
pub use info::{HostSide, SandboxInfo, Status};
pub use lifecycle::LifecycleError;
pub use pause::PauseReport;
pub use snapshots::SnapshotInfo;
pub use tree::TreeCopy;

use crate::images::fetch::ImageCache;
use crate::lock::FileLock;
use crate::paths::Home;
use crate::state::{Db, SandboxRow, StateError};

pub use crate::net::{NetworkMode, NetworkPolicy};

/// The accelerator a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM where it works, else TCG with a one-line notice.
    Auto,
    Kvm,
    Tcg,
}

/// Errors shared by every operation on an existing sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox named {0:?}")]
    NotFound(String),
    /// A name that no sandbox can have (checked before it touches a path or the database).
    #[error(transparent)]
    BadName(#[from] names::NameError),
    #[error("sandbox {name} is {status}, not running")]
    NotRunning { name: String, status: Status },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// Makes a sandbox directory's `run/` as a boot does (for tests that start QEMU themselves).
#[doc(hidden)]
pub fn boot_run_dir(dir: &Path, identity: Option<crate::child::Identity>) -> Result<PathBuf, BootError> {
    boot::make_run_dir(dir, identity)
}

/// The handle to one smolvm installation.
#[derive(Debug)]
pub struct Smolvm {
    config: crate::config::Config,
    db: Db,
    images: ImageCache,
    /// Boot with QEMU's unrestricted user-mode network instead (the benchmark's baseline).
    unrestricted_user_net: bool,
    /// What this host offers for sandboxes' resource limits.
    cgroups: crate::vm::cgroup::Support,
    /// Boot with the sandbox disk's flushes ignored (the benchmark's baseline).
    unsafe_disk_cache: bool,
    /// The VMM that runs the sandboxes (QEMU: `config.qemu`).
    vmm: std::sync::Arc<dyn crate::vm::Vmm>,
}

impl Smolvm {
    /// Opens the installation `config` describes (creating its state on first use).
    pub fn open(config: crate::config::Config) -> Result<Smolvm, StateError> {
        crate::state::private_dir(&config.home.data)?;
        crate::state::private_dir(&config.home.cache)?;
        let db = Db::open(&config.home.database())?;
        let images = ImageCache::new(config.home.images());
        let cgroups = crate::vm::cgroup::detect();
        let vmm = std::sync::Arc::new(crate::vm::qemu::Qemu::new(config.qemu.clone()));
        let sm = Smolvm { config, db, images, unrestricted_user_net: false, cgroups, unsafe_disk_cache: false, vmm };
        sm.reconcile();
        Ok(sm)
    }

    /// [`Smolvm::open`] with the defaults for `home` (`config::Config::new`).
    pub fn open_at(home: Home) -> Result<Smolvm, StateError> {
        Smolvm::open(crate::config::Config::new(home))
    }

    pub fn config(&self) -> &crate::config::Config {
        &self.config
    }

    pub(crate) fn vmm(&self) -> &dyn crate::vm::Vmm {
        &*self.vmm
    }

    /// This handle with another VMM behind the seam (the unit tests' fake).
    #[cfg(test)]
    pub(crate) fn with_vmm(mut self, vmm: std::sync::Arc<dyn crate::vm::Vmm>) -> Smolvm {
        self.vmm = vmm;
        self
    }

    /// Boots sandboxes from this handle on QEMU's stock user-mode network, **which reaches the
    /// host and everything the host reaches**: no policy, no refusals. It exists so that
    /// smolvm-bench can measure the enforced network against it in the same run; never use it
    /// for code you do not trust.
    #[doc(hidden)]
    pub fn with_unrestricted_network_for_benchmarks(mut self) -> Smolvm {
        self.unrestricted_user_net = true;
        self
    }

    /// Boots sandboxes from this handle with their disk's flushes ignored (`cache=unsafe`): a
    /// host crash can then corrupt their file systems. For smolvm-bench, to measure what the
    /// durable default costs, in the same run.
    #[doc(hidden)]
    pub fn with_unsafe_disk_cache_for_benchmarks(mut self) -> Smolvm {
        self.unsafe_disk_cache = true;
        self
    }

    /// How sandboxes' host processes are limited on this host (`doctor`).
    pub fn cgroup_support(&self) -> &crate::vm::cgroup::Support {
        &self.cgroups
    }

    /// The cgroup of sandbox `name`: its name and this home's (a hash of its data directory),
    /// since cgroups are the host's and two homes may each have a sandbox of one name.
    pub(crate) fn cgroup_name(&self, name: &str) -> String {
        let home = crate::digest::sha256_hex(self.home().data.as_os_str().as_encoded_bytes());
        format!("{name}.{}", &home[..8])
    }

    pub fn home(&self) -> &Home {
        &self.config.home
    }

    pub fn images(&self) -> &ImageCache {
        &self.images
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn dir(&self, name: &str) -> PathBuf {
        // Fail closed: a name that is not a sandbox name (an API caller's `../..`) gets a path
        // with a NUL in it, which every file operation refuses. The public entries refuse such
        // names with a clear error first (`lock`, `row`); this covers any path built before.
        if names::validate(name).is_err() {
            return self.config.home.sandboxes().join("\0not-a-sandbox-name");
        }
        self.config.home.sandboxes().join(name)
    }

    /// Serialises changes to one sandbox across processes. The lock file sits beside the
    /// sandbox directory so that `delete` can remove the directory while holding it.
    fn lock(&self, name: &str) -> Result<FileLock, SandboxError> {
        // The name becomes a path: nothing but a valid name gets that far.
        names::validate(name)?;
        let path = self.lock_path(name);
        let lock = FileLock::exclusive(&path)
            .map_err(|source| SandboxError::Io { what: format!("lock {}", path.display()), source })?;
        // A snapshot or pause killed half-way is put right by the next holder.
        self.settle_locked(name);
        Ok(lock)
    }

    /// The lock file of sandbox `name` (see [`Smolvm::dir`] for a name that is none).
    fn lock_path(&self, name: &str) -> PathBuf {
        if names::validate(name).is_err() {
            return self.config.home.sandboxes().join("\0not-a-sandbox-name.lock");
        }
        self.config.home.sandboxes().join(format!(".{name}.lock"))
    }

    fn row(&self, name: &str) -> Result<SandboxRow, SandboxError> {
        names::validate(name)?;
        self.db.get(name)?.ok_or_else(|| SandboxError::NotFound(name.to_string()))
    }

    /// The images `create` uses now: the configured overrides, else this home's default
    /// release (`import_release`), else the compiled-in pins.
    pub fn image_source(&self) -> Result<crate::images::source::ImageSource, crate::images::source::SourceError> {
        use crate::images::source::ImageSource;
        let o = &self.config.images;
        if let Some(m) = o.manifest.as_deref().filter(|m| m.starts_with("http://") && !o.allow_insecure_manifest) {
            return Err(crate::images::source::SourceError::InsecureManifest { url: m.to_string() });
        }
        let default = self.config.home.default_release();
        if o.manifest.is_none() && default.is_file() {
            let mut src = ImageSource::imported(&default)?;
            if let Some(prefix) = &o.url_prefix {
                src = ImageSource::resolve(default.to_str(), Some(prefix))?;
                src.origin = crate::images::source::ReleaseOrigin::Imported(src.tag.clone());
                src.pins_overridden = None;
            }
            return Ok(src);
        }
        ImageSource::resolve(o.manifest.as_deref(), o.url_prefix.as_deref())
    }

    /// Loads a built release (`DIR/<tag>`, already checked against its SHA256SUMS) into the
    /// cache, verifying each asset's digest, and makes it this home's default release.
    pub fn import_release(&self, dir: &Path, manifest: &crate::images::Manifest) -> Result<(), CreateError> {
        for a in &manifest.assets {
            self.images.import(a, &dir.join(&a.name))?;
        }
        let path = self.config.home.default_release();
        let tmp = path.with_extension("json.tmp");
        let io =
            |source| SandboxError::Io { what: format!("record the default release in {}", path.display()), source };
        std::fs::write(&tmp, manifest.to_json()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    /// Where the sandbox's SSH files are: (key, known_hosts, control socket).
    fn ssh_paths(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.dir(name);
        (self.config.home.keys().join("id_ed25519"), dir.join("known_hosts"), dir.join("ssh.ctl"))
    }

    /// A running sandbox's row, or a clear error.
    fn running(&self, name: &str) -> Result<SandboxRow, SandboxError> {
        let row = self.row(name)?;
        match Self::status_of(&row) {
            Status::Running => Ok(row),
            status => Err(SandboxError::NotRunning { name: name.to_string(), status }),
        }
    }

    /// A connection to a running sandbox's agent (commands and files without SSH). The proxy
    /// holds QEMU's agent port from boot (a socket pair), so a proxy that is gone cannot be
    /// replaced: the sandbox needs a stop and start.
    pub fn agent(&self, name: &str) -> Result<crate::agent::AgentClient, crate::agent::AgentError> {
        self.settle(name);
        self.running(name).map_err(|e| crate::agent::AgentError::Sandbox(Box::new(e)))?;
        crate::agent::AgentClient::connect_sandbox(name, &self.dir(name))
    }

    /// Runs `argv` in a running sandbox through its agent and collects the output.
    pub fn exec(
        &self,
        name: &str,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<crate::agent::ExecOutput, crate::agent::AgentError> {
        let client = self.agent(name)?;
        let env = self.guest_env(name).map_err(|e| crate::agent::AgentError::Sandbox(Box::new(e)))?;
        let h = client.exec(crate::agent::client::ExecRequest {
            command: crate::agent::client::Command::Argv(argv.to_vec()),
            env,
            cwd: None,
            stdin: stdin.is_some(),
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            pty: None,
        })?;
        if let Some(data) = stdin {
            for c in data.chunks(smolvm_protocol::agent::CHUNK) {
                h.write_stdin(c)?;
            }
            h.close_stdin()?;
        }
        // The guest kills the process at its timeout; the host ends the call shortly after
        // even if the guest does not.
        let deadline = timeout.map(|t| std::time::Instant::now() + t + crate::agent::client::HOST_TIMEOUT_GRACE);
        h.collect_until(crate::agent::client::DEFAULT_OUTPUT_CAP, deadline)
    }

    /// Readiness does not wait for the guest's sshd: what needs SSH asks the agent to wait for
    /// it first. Best effort: with the agent unreachable, SSH is still tried (it is the way in
    /// to debug such a guest), and says itself what is wrong.
    fn wait_sshd(&self, name: &str) {
        if let Err(e) = self.agent(name).and_then(|c| c.wait_ssh(SSHD_TIMEOUT)) {
            tracing::debug!("{name}: waiting for sshd through the agent: {e}");
        }
    }

    /// An `ssh` command into a running sandbox: strict host key, the managed key. With `argv`
    /// it runs that command (each word quoted); without, an interactive login shell. `tty`
    /// forces a terminal (`-t`).
    pub fn ssh_command(&self, name: &str, argv: &[String], tty: bool) -> Result<std::process::Command, SandboxError> {
        let row = self.running(name)?;
        self.wait_sshd(name);
        let (key, known, control) = self.ssh_paths(name);
        let mut c = std::process::Command::new("ssh");
        ssh::child_env(&mut c);
        c.args(ssh::common_options(&key, &known, &control));
        c.args(["-p", &row.ssh_port.unwrap_or(22).to_string()]);
        if tty {
            c.arg("-t");
        }
        c.arg("root@127.0.0.1");
        if !argv.is_empty() {
            c.arg("--").arg(ssh::remote_command(argv));
        }
        Ok(c)
    }

    /// An `scp` command copying `from` to `to`, where a `NAME:/path` side names a sandbox path.
    pub fn cp_command(&self, from: &str, to: &str) -> Result<std::process::Command, SandboxError> {
        let remote = |s: &str| -> Option<(String, String)> {
            let (n, p) = s.split_once(':')?;
            (names::validate(n).is_ok() && p.starts_with('/')).then(|| (n.to_string(), p.to_string()))
        };
        let (name, from_arg, to_arg) = match (remote(from), remote(to)) {
            (Some((n, p)), None) => (n, format!("root@127.0.0.1:{p}"), to.to_string()),
            (None, Some((n, p))) => (n, from.to_string(), format!("root@127.0.0.1:{p}")),
            _ => {
                return Err(SandboxError::Io {
                    what: format!("cp {from} {to}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "exactly one side must be NAME:/absolute/path (e.g. smolvm cp ./f box:/root/f)",
                    ),
                })
            }
        };
        let row = self.running(&name)?;
        self.wait_sshd(&name);
        let (key, known, control) = self.ssh_paths(&name);
        let mut c = std::process::Command::new("scp");
        ssh::child_env(&mut c);
        c.args(ssh::common_options(&key, &known, &control));
        c.args(["-q", "-r", "-p", "-P", &row.ssh_port.unwrap_or(22).to_string()]);
        c.arg(from_arg).arg(to_arg);
        Ok(c)
    }
}

/// What `prune_images` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// SHA-256 of each image removed.
    pub removed: Vec<String>,
    pub bytes_freed: u64,
}

impl Smolvm {
    /// Removes cached images that no sandbox uses (kernels, base rootfs, preset layers) and
    /// partial downloads.
    pub fn prune_images(&self) -> Result<PruneReport, SandboxError> {
        let keep = self.db.images_in_use()?;
        let mut r = PruneReport { bytes_freed: self.images.remove_partials(), ..PruneReport::default() };
        // Boot snapshots go with the images (they are made of them, and remade on demand).
        r.bytes_freed += self.prune_boot_snapshots();
        for i in self.images.list() {
            if !keep.contains(&i.sha256) {
                self.images
                    .remove(&i.sha256)
                    .map_err(|source| SandboxError::Io { what: format!("remove image {}", i.sha256), source })?;
                r.bytes_freed += i.allocated;
                r.removed.push(i.sha256);
            }
        }
        Ok(r)
    }
}

/// Removes `path` if it exists, ignoring "not found".
fn remove_all(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// A hidden name in the sandboxes' directory for what a delete threw away.
const TRASH_PREFIX: &str = ".trash-";
/// A thrown-away directory still there after this long lost its remover (killed, or the host
/// went down): the next delete removes it.
const TRASH_STALE: Duration = Duration::from_secs(600);

/// Takes `dir` (a sandbox's) out of sight at once and frees its files in the background:
/// freeing a disk or a RAM image of tens of MiB costs tens of milliseconds on a file system
/// mounted with `discard` (and seconds for a disk the guest filled), none of which a delete
/// needs to wait for. The remover is `rm` in its own process group (it outlives a CLI that
/// exits at once); a server reaps it from a thread. Falls back to removing here.
fn throw_away(dir: &Path) {
    use rand_core::RngCore;
    let Some(parent) = dir.parent() else { return remove_all(dir) };
    sweep_trash(parent);
    if !dir.exists() {
        return;
    }
    let trash = parent.join(format!("{TRASH_PREFIX}{:016x}", rand_core::OsRng.next_u64()));
    if std::fs::rename(dir, &trash).is_err() {
        return remove_all(dir);
    }
    use std::os::unix::process::CommandExt;
    let spawned = std::process::Command::new("rm")
        .args(["-rf", "--"])
        .arg(&trash)
        .env_clear()
        .env("PATH", crate::child::CHILD_PATH)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(mut child) => {
            let _ = std::thread::Builder::new().name("trash".into()).spawn(move || child.wait());
        }
        Err(e) => {
            tracing::debug!("no background rm ({e}): {} is removed here", trash.display());
            remove_all(&trash);
        }
    }
}

/// Removes thrown-away directories whose remover is long gone.
fn sweep_trash(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let stale = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with(TRASH_PREFIX) && stale.is_some_and(|s| s > TRASH_STALE) {
            remove_all(&e.path());
        }
    }
}

/// Guest readiness timeout: generous under emulation, where a boot takes seconds.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long SSH waits for the guest's sshd to listen (it starts with the guest: a fraction of
/// a second under emulation, milliseconds on KVM).
pub const SSHD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits for a clean power-off before it terminates the VM.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// A sandbox's guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_CPUS: u32 = 1;
/// A sandbox's own writable disk, MiB (the base is shared and read-only).
pub const DEFAULT_DISK_MIB: u64 = 2048;

// `Smolvm` is shared by threads (the server's blocking pool, a future language binding): it
// must stay `Send + Sync`. A compile-time check, not a test that could be skipped.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Smolvm>();
};

#[cfg(test)]
mod tests {
    #[test]
    fn a_thrown_away_directory_is_gone_at_once_and_freed_in_the_background() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("box");
        std::fs::create_dir_all(dir.join("run")).unwrap();
        std::fs::write(dir.join("disk.ext4"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("run/link")).unwrap();
        super::throw_away(&dir);
        assert!(!dir.exists(), "its name is free at once");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_dir(parent.path()).unwrap().next().is_some() {
            assert!(std::time::Instant::now() < deadline, "the trash was never removed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::path::Path::new("/etc/passwd").exists(), "a link is removed, never followed");
        // A trash directory left by a remover that died long ago goes with the next delete.
        let stale = parent.path().join(format!("{}old", super::TRASH_PREFIX));
        std::fs::create_dir(&stale).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&stale).unwrap().set_modified(old).unwrap();
        super::sweep_trash(parent.path());
        assert!(!stale.exists());
    }

    /// An API caller's id that walks out of the home: every public entry refuses it as a name
    /// before any path is made of it (a lock file was created wherever it pointed).
    #[test]
    fn hostile_names_never_become_paths() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        let sm = super::Smolvm::open_at(crate::paths::Home::at(&home)).unwrap();
        let target = root.path().join("outside");
        let walk = format!("/../../../../../../../..{}", target.display());
        for name in [walk.as_str(), "../outside", ".hidden", "a/b", "UPPER"] {
            assert!(matches!(sm.info(name), Err(super::SandboxError::BadName(_))), "info {name}");
            let deleted = sm.delete(name);
            assert!(
                matches!(deleted, Err(super::LifecycleError::Sandbox(super::SandboxError::BadName(_)))),
                "delete {name}: {deleted:?}"
            );
            assert!(sm.secrets(name).is_err(), "secrets {name}");
            assert!(sm.stop(name, std::time::Duration::from_secs(1)).is_err(), "stop {name}");
        }
        for suffix in ["", ".lock", ".json"] {
            let p = format!("{}{suffix}", target.display());
            assert!(!std::path::Path::new(&p).exists(), "{p} was created");
        }
        let stray: Vec<_> = std::fs::read_dir(root.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(stray, vec![std::ffi::OsString::from("home")], "only the home was written");
    }
}
