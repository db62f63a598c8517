//! `smolvm create`: resolve and verify the images, make the sandbox's disk, boot, wait for the
//! guest's readiness line, pin its host key. Nothing half-made survives a failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::boot::{BootError, BootFiles, Restore, Start};
use super::{disk, names, ssh, AccelChoice, NetworkPolicy, SandboxError, SandboxInfo, Smolvm};
use crate::images::fetch::{FetchError, FetchEvent};
use crate::images::source::{ImageSource, SourceError};
use crate::net::PolicyError;
use crate::state::{SandboxRow, SandboxState, StateError};
use crate::timefmt::now_secs;
use crate::vm::accel::{detect, Accel, HostFacts};

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Default: a generated `sbx-xxxxxx`.
    pub name: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The sandbox's writable space (its own disk; the base is shared and read-only).
    pub disk_mib: u64,
    /// What the sandbox may reach (default: the internet, never the host or private ranges).
    pub network: NetworkPolicy,
    pub accel: AccelChoice,
    pub ready_timeout: Duration,
    /// A preset whose layer goes over the base (`codex`, `claude-code`, `hermes`, `pi`).
    pub preset: Option<String>,
    /// Secrets: the guest sees placeholders, the real values are added at the egress for
    /// their hosts only (`sandbox::secrets`).
    pub secrets: Vec<super::secrets::Secret>,
    /// Continue from this snapshot (`smolvm snapshot`) instead of booting: its memory size,
    /// vCPUs, disk size, images and preset are the snapshot's (the options must agree).
    pub from_snapshot: Option<String>,
    /// Boot the kernel even where a boot snapshot could be restored (and make none).
    pub cold: bool,
    /// A ceiling on its disk I/O (none by default).
    pub disk_limit: crate::state::DiskLimit,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            name: None,
            memory_mib: super::DEFAULT_MEMORY_MIB,
            cpus: super::DEFAULT_CPUS,
            disk_mib: super::DEFAULT_DISK_MIB,
            network: NetworkPolicy::default(),
            accel: AccelChoice::Auto,
            ready_timeout: super::DEFAULT_READY_TIMEOUT,
            preset: None,
            secrets: Vec::new(),
            from_snapshot: None,
            cold: false,
            disk_limit: crate::state::DiskLimit::default(),
        }
    }
}

/// Progress of a create, for the CLI to show (or not).
#[derive(Debug, Clone)]
pub enum CreateEvent {
    /// A one-line notice (pins overridden, TCG fallback).
    Notice(String),
    Fetch(FetchEvent),
    /// The VM is starting.
    Booting {
        accel: String,
    },
    /// The guest continues from a snapshot (`boot-snapshot`, `snapshot:NAME`, `fork:NAME`).
    Restoring {
        from: String,
    },
}

/// Why `create` failed. Each message says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error("a sandbox named {0:?} already exists")]
    Exists(String),
    #[error("memory of {0} MiB is below the minimum of 128 MiB")]
    Memory(u32),
    #[error("{0} vCPUs: the range is 1 to 64")]
    Cpus(u32),
    #[error("a disk of {0} MiB is below the minimum of 64 MiB")]
    DiskSize(u64),
    #[error("no preset named {0:?}")]
    NoPreset(String),
    #[error("invalid network policy: {0}")]
    Network(#[from] PolicyError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("KVM was asked for, but it cannot be used here: {0}")]
    NoKvm(String),
    #[error("make the sandbox's disk: {0}")]
    Disk(#[from] disk::DiskError),
    #[error("the managed SSH key: {0}")]
    Key(#[from] ssh::KeyError),
    #[error("create {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Secret(#[from] super::secrets::SecretError),
    #[error("setting the booted sandbox up: {0}")]
    Setup(Box<super::lifecycle::LifecycleError>),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("snapshot {snapshot} needs the {what} image sha256 {sha256}, which is no longer cached")]
    SnapshotImage { snapshot: String, what: &'static str, sha256: String },
    #[error("--preset cannot go with --from-snapshot: the snapshot's preset ({0}) is what it runs")]
    PresetWithSnapshot(String),
}

/// How a new sandbox's guest starts.
#[derive(Debug)]
pub(super) enum Plan {
    /// The kernel boots; then, holding this slot, a boot snapshot is saved.
    Cold(Option<super::boot_snapshot::Slot>),
    /// From a sealed snapshot's directory (verified), as `origin` (for the row); its `state`
    /// is of `form`.
    Restore { dir: PathBuf, origin: crate::state::Origin, form: crate::snapshot::StateForm, ram_sha256: Option<String> },
}

/// The verified images a boot needs.
#[derive(Debug, Clone)]
pub struct BootImages {
    pub tag: String,
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub rootfs: PathBuf,
    pub rootfs_sha256: String,
    /// Read-only layers over the base (a preset's), top first: (path, content SHA-256).
    pub layers: Vec<(PathBuf, String)>,
}

impl Smolvm {
    /// `ensure_kernel` and `ensure_rootfs`: the source's kernel and base rootfs, downloaded
    /// and verified once, from the cache after that.
    pub fn ensure_images(
        &self,
        src: &ImageSource,
        preset: Option<&str>,
        on: &mut dyn FnMut(FetchEvent),
    ) -> Result<BootImages, CreateError> {
        // A local manifest's assets are read from its directory; others are downloaded.
        let mut get = |a: &crate::images::Asset| match &src.local_dir {
            Some(dir) => self.images().import(a, &dir.join(&a.name)),
            None => self.images().ensure(a, &src.url(a), on),
        };
        let kernel = src.kernel()?;
        let rootfs = src.base_rootfs()?;
        let kernel_path = get(kernel)?;
        let rootfs_path = get(rootfs)?;
        let mut layers = Vec::new();
        if let Some(p) = preset {
            let layer = src.layer(p)?;
            layers.push((get(layer)?, layer.content_sha256().to_string()));
        }
        Ok(BootImages {
            tag: src.tag.clone(),
            kernel: kernel_path,
            kernel_sha256: kernel.content_sha256().to_string(),
            rootfs: rootfs_path,
            rootfs_sha256: rootfs.content_sha256().to_string(),
            layers,
        })
    }

    /// Creates and boots a sandbox; returns when SSH in the guest is ready.
    pub fn create(&self, opts: &CreateOptions, on: &mut dyn FnMut(CreateEvent)) -> Result<SandboxInfo, CreateError> {
        let name = match &opts.name {
            Some(n) => {
                names::validate(n)?;
                n.clone()
            }
            None => names::generate(),
        };
        if opts.memory_mib < 128 {
            return Err(CreateError::Memory(opts.memory_mib));
        }
        if opts.cpus == 0 || opts.cpus > 64 {
            return Err(CreateError::Cpus(opts.cpus));
        }
        if opts.disk_mib < 64 {
            return Err(CreateError::DiskSize(opts.disk_mib));
        }
        opts.network.validate()?;
        super::secrets::validate(&opts.secrets, &opts.network)?;
        if self.db().get(&name)?.is_some() {
            return Err(CreateError::Exists(name));
        }
        if let Some(snap) = &opts.from_snapshot {
            return self.create_from_snapshot(&name, snap, opts, on);
        }
        let src = self.image_source()?;
        if let Some(w) = &src.pins_overridden {
            on(CreateEvent::Notice(w.clone()));
        }
        let accel = match (opts.accel, detect(&HostFacts::probe())) {
            (AccelChoice::Tcg, _) => Accel::Tcg { reason: "--accel tcg".into() },
            (AccelChoice::Kvm, Accel::Tcg { reason }) => return Err(CreateError::NoKvm(reason)),
            (_, Accel::Kvm) => Accel::Kvm,
            (AccelChoice::Auto, tcg @ Accel::Tcg { .. }) => {
                if let Accel::Tcg { reason } = &tcg {
                    on(CreateEvent::Notice(format!(
                        "notice: using software emulation (TCG), which is slower: {reason}"
                    )));
                }
                tcg
            }
        };
        if let Some(p) = &opts.preset {
            if super::presets::find(p).is_none() {
                return Err(CreateError::NoPreset(p.clone()));
            }
        }
        let images = self.ensure_images(&src, opts.preset.as_deref(), &mut |e| on(CreateEvent::Fetch(e)))?;
        let row = SandboxRow {
            name: name.clone(),
            created_at: now_secs(),
            state: SandboxState::Creating,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            disk_mib: opts.disk_mib,
            disk_limit: opts.disk_limit,
            policy: opts.network.clone(),
            accel: accel.kind(),
            ssh_port: None,
            pid: None,
            pid_start: None,
            tag: images.tag.clone(),
            kernel_sha256: images.kernel_sha256.clone(),
            rootfs_sha256: images.rootfs_sha256.clone(),
            host_key: None,
            boot_json: None,
            ready_ms: None,
            preset: opts.preset.clone(),
            layer_sha256s: images.layers.iter().map(|(_, sha)| sha.clone()).collect(),
            started_from: None,
            host_boot: None,
        };
        let files = BootFiles {
            kernel: images.kernel.clone(),
            rootfs: images.rootfs.clone(),
            layers: images.layers.iter().map(|(p, _)| p.clone()).collect(),
        };
        let plan = if opts.cold { Plan::Cold(None) } else { self.boot_snapshot_plan(&row, &files, on) };
        tracing::debug!("{name}: images and plan ready");
        let boot_snapshot = match &plan {
            Plan::Restore { dir, origin: crate::state::Origin::BootSnapshot, .. } => Some(dir.clone()),
            _ => None,
        };
        match self.create_row(row.clone(), &files, &accel, opts, plan, on) {
            // A boot snapshot that does not continue (one an older smolvm made of a guest that
            // cannot be refreshed, say) is removed, and this create boots (and makes a new one).
            Err(CreateError::Boot(BootError::Restore { reason, .. })) if boot_snapshot.is_some() => {
                on(CreateEvent::Notice(format!(
                    "notice: the boot snapshot did not continue ({reason}); it is removed"
                )));
                if let Some(dir) = boot_snapshot {
                    let _ = std::fs::remove_dir_all(dir);
                }
                let plan = self.boot_snapshot_plan(&row, &files, on);
                self.create_row(row, &files, &accel, opts, plan, on)
            }
            other => other,
        }
    }

    /// Records `row` and brings its sandbox up as `plan` says; nothing is left of it if that
    /// fails.
    pub(super) fn create_row(
        &self,
        row: SandboxRow,
        files: &BootFiles,
        accel: &Accel,
        opts: &CreateOptions,
        plan: Plan,
        on: &mut dyn FnMut(CreateEvent),
    ) -> Result<SandboxInfo, CreateError> {
        let name = row.name.clone();
        let _lock = self.lock(&name)?;
        if !self.db().insert(&row)? {
            return Err(CreateError::Exists(name));
        }
        let started = Instant::now();
        match self.provision_and_boot(row, files, accel, opts, plan, on) {
            Ok(()) => {
                tracing::debug!("created {name} in {:?}", started.elapsed());
                Ok(self.info(&name)?)
            }
            Err(e) => {
                // Nothing half-made is left: the VM, the directory and the row go.
                self.discard(&name);
                Err(e)
            }
        }
    }

    fn provision_and_boot(
        &self,
        mut row: SandboxRow,
        files: &BootFiles,
        accel: &Accel,
        opts: &CreateOptions,
        plan: Plan,
        on: &mut dyn FnMut(CreateEvent),
    ) -> Result<(), CreateError> {
        let dir = self.dir(&row.name);
        std::fs::create_dir_all(&dir).map_err(|source| CreateError::Dir { path: dir.display().to_string(), source })?;
        let disk = dir.join("disk.ext4");
        match &plan {
            Plan::Cold(_) => disk::create_upper(&disk, opts.disk_mib)?,
            Plan::Restore { dir: snap, .. } => {
                let io = |source| CreateError::Dir { path: disk.display().to_string(), source };
                let src = crate::text::open_untrusted(&snap.join("disk.ext4")).map_err(io)?;
                crate::snapshot::files::copy_sparse(&src, &disk).map_err(io)?;
            }
        }
        tracing::debug!("{}: disk ready", row.name);
        if !opts.secrets.is_empty() {
            self.store_secrets(&row.name, &opts.secrets)?;
        }
        ssh::ensure_key(&self.home().keys())?;
        let start = match &plan {
            Plan::Cold(_) => {
                on(CreateEvent::Booting { accel: accel.qemu_name().into() });
                Start::Cold
            }
            Plan::Restore { dir: snap, origin, form, ram_sha256 } => {
                on(CreateEvent::Restoring { from: origin.to_string() });
                Start::Restore(Restore {
                    ram: Some(snap.join("ram")),
                    ram_sha256: ram_sha256.clone(),
                    stream: snap.join("state"),
                    incoming: form.incoming(),
                    pages: None,
                    clone: true,
                    host_key: None,
                    origin: origin.clone(),
                })
            }
        };
        self.boot_row(&mut row, accel, files, opts.ready_timeout, &start)?;
        // A guest that has never been given variables: booted on a new disk, or the boot
        // snapshot (saved before anything of a user's reached it).
        let no_variables_yet = match &plan {
            Plan::Cold(_) => true,
            Plan::Restore { origin, .. } => *origin == crate::state::Origin::BootSnapshot,
        };
        // A guest older than the Refresh message (a release from before agent protocol v3)
        // cannot be given a clone's identity: no boot snapshot is made of it.
        let refresh = smolvm_protocol::agent::HostMsg::Refresh { id: 0, json: String::new() }.since();
        let plan = match plan {
            Plan::Cold(Some(_)) if !self.agent(&row.name).is_ok_and(|c| c.version() >= refresh) => {
                on(CreateEvent::Notice(format!(
                    "notice: no boot snapshot: this release's guest agent predates protocol v{refresh}, which restores need"
                )));
                Plan::Cold(None)
            }
            other => other,
        };
        if let Plan::Cold(Some(slot)) = plan {
            // Before anything of the user's reaches the guest (its CA, its variables). A first
            // new identity ends the sshd the boot started, so that the snapshot holds none: a
            // restore then has no sshd start-up running beside its first command, nor one to
            // end (its own starts when SSH is first wanted).
            self.reidentify(&mut row)?;
            match self.save_boot_snapshot(&row, files, slot) {
                // Every restore of it reseeds and takes a new SSH host key: so does this
                // guest, so that none holds its key or its random state.
                Ok(()) => self.reidentify(&mut row)?,
                Err(e) => on(CreateEvent::Notice(format!(
                    "notice: no boot snapshot was saved ({e}); the next create boots too"
                ))),
            }
        }
        self.after_boot(&row.name, no_variables_yet).map_err(|e| CreateError::Setup(Box::new(e)))
    }
}
