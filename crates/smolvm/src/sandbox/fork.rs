//! New sandboxes that continue from a saved state: `create --from-snapshot` and `fork`.
//!
//! Each gets its own disk (a copy of the snapshot's: a reflink where the file system has them,
//! else the snapshot's allocated blocks), maps the snapshot's RAM image copy-on-write (K
//! clones share the pages none of them wrote), and a fresh identity before any command runs
//! (`sandbox::restore`). A fork is a snapshot into a hidden directory and K restores from it;
//! the directory is removed at the end (the clones hold the RAM image open, and their disks
//! are their own).

use super::create::{CreateError, CreateEvent, CreateOptions, Plan};
use super::{names, LifecycleError, SandboxInfo, Smolvm};
use crate::snapshot::{self, SnapshotError, SnapshotMeta};
use crate::state::{SandboxRow, SandboxState};
use crate::vm::accel::{detect, Accel, AccelKind, HostFacts};

impl Smolvm {
    /// The row of a sandbox that continues from `meta`.
    fn row_from_snapshot(name: &str, meta: &SnapshotMeta, opts: &CreateOptions) -> SandboxRow {
        SandboxRow {
            name: name.to_string(),
            created_at: crate::timefmt::now_secs(),
            state: SandboxState::Creating,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            disk_mib: opts.disk_mib,
            disk_limit: opts.disk_limit,
            policy: opts.network.clone(),
            accel: meta.machine.accel,
            ssh_port: None,
            pid: None,
            pid_start: None,
            tag: meta.images.tag.clone(),
            kernel_sha256: meta.images.kernel_sha256.clone(),
            rootfs_sha256: meta.images.rootfs_sha256.clone(),
            host_key: None,
            boot_json: None,
            ready_ms: None,
            preset: meta.images.preset.clone(),
            layer_sha256s: meta.images.layer_sha256s.clone(),
            started_from: None,
            host_boot: None,
        }
    }

    /// Checks that `dir`'s snapshot can continue as `row` here; returns the images and accelerator.
    fn check_snapshot(
        &self,
        row: &SandboxRow,
        dir: &std::path::Path,
        meta: &SnapshotMeta,
        stamped: bool,
    ) -> Result<(super::boot::BootFiles, Accel), CreateError> {
        let accel = match meta.machine.accel {
            AccelKind::Tcg => Accel::Tcg { reason: "as the snapshot was taken".into() },
            AccelKind::Kvm => match detect(&HostFacts::probe()) {
                Accel::Kvm => Accel::Kvm,
                Accel::Tcg { reason } => return Err(CreateError::NoKvm(reason)),
            },
        };
        let files = self.files_of(row).map_err(|e| match e {
            LifecycleError::ImageGone { what, sha256, .. } => {
                CreateError::SnapshotImage { snapshot: meta.name.clone(), what, sha256 }
            }
            other => CreateError::Setup(Box::new(other)),
        })?;
        let here = self.machine_of(row, &files)?;
        let differences = meta.differences(&here, Some(&Self::images_of(row)));
        if !differences.is_empty() {
            return Err(SnapshotError::Mismatch { snapshot: meta.name.clone(), differences }.into());
        }
        // A fork's own snapshot, restored K times in a row, is hashed once (then checked by
        // stat: `snapshot::verify_cached`); a snapshot named by the user, every time.
        if stamped {
            snapshot::verify_cached(dir, meta)?;
        } else {
            snapshot::verify(dir, meta)?;
        }
        Ok((files, accel))
    }

    /// `create --from-snapshot`: called by `create` once the options are checked.
    pub(super) fn create_from_snapshot(
        &self,
        name: &str,
        snap: &str,
        opts: &CreateOptions,
        on: &mut dyn FnMut(CreateEvent),
    ) -> Result<SandboxInfo, CreateError> {
        snapshot::validate_name(snap)?;
        let dir = self.home().snapshots().join(snap);
        let meta = snapshot::read_meta(&dir, snap)?;
        if opts.preset.is_some() {
            return Err(CreateError::PresetWithSnapshot(meta.images.preset.clone().unwrap_or_else(|| "none".into())));
        }
        let row = Self::row_from_snapshot(name, &meta, opts);
        let (files, accel) = self.check_snapshot(&row, &dir, &meta, false)?;
        self.create_row(
            row,
            &files,
            &accel,
            opts,
            Plan::Restore {
                dir,
                origin: crate::state::Origin::Snapshot(snap.to_string()),
                form: meta.state_form,
                ram_sha256: ram_sha256(&meta),
            },
            on,
        )
    }

    /// `fork`: `names.len()` new sandboxes continuing from running (or paused) `name` as it is
    /// now, with its network policy, variables and secrets (their own placeholders and CA).
    /// All or nothing: if one fails, those made are deleted.
    pub fn fork(
        &self,
        name: &str,
        names: &[String],
        ready_timeout: std::time::Duration,
        on: &mut dyn FnMut(CreateEvent),
    ) -> Result<Vec<SandboxInfo>, LifecycleError> {
        for n in names {
            names::validate(n).map_err(|e| LifecycleError::Fork(Box::new(e.into())))?;
            if self.db().get(n)?.is_some() {
                return Err(LifecycleError::Fork(Box::new(CreateError::Exists(n.clone()))));
            }
        }
        let source = self.row(name)?;
        let parent = self.home().snapshots();
        snapshot::sweep(&parent);
        let tmp = snapshot::temp_dir(&parent).map_err(|source| SnapshotError::Io {
            snapshot: format!("fork of {name}"),
            what: "make it".into(),
            source,
        })?;
        let result = (|| {
            let meta = self.snapshot_into(name, &format!("fork-of-{name}"), &tmp)?;
            let opts = CreateOptions {
                memory_mib: source.memory_mib,
                cpus: source.cpus,
                disk_mib: source.disk_mib,
                disk_limit: source.disk_limit,
                network: source.policy.clone(),
                ready_timeout,
                secrets: self.stored_secrets(name)?,
                ..CreateOptions::default()
            };
            let env = self.db().env(name)?;
            let mut made: Vec<SandboxInfo> = Vec::new();
            for n in names {
                let row = Self::row_from_snapshot(n, &meta, &opts);
                let plan = Plan::Restore {
                    dir: tmp.clone(),
                    origin: crate::state::Origin::Fork(name.to_string()),
                    form: meta.state_form,
                    ram_sha256: ram_sha256(&meta),
                };
                let one = self
                    .check_snapshot(&row, &tmp, &meta, true)
                    .and_then(|(files, accel)| self.create_row(row, &files, &accel, &opts, plan, on));
                let one = one.map_err(|e| LifecycleError::Fork(Box::new(e))).and_then(|info| {
                    for (k, v) in &env {
                        self.db().env_set(n, k, v)?;
                    }
                    self.push_env(n)?;
                    Ok(info)
                });
                match one {
                    Ok(info) => made.push(info),
                    Err(e) => {
                        for m in &made {
                            let _ = self.delete(&m.name);
                        }
                        let _ = self.delete(n);
                        return Err(e);
                    }
                }
            }
            Ok(made)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }
}

fn ram_sha256(meta: &SnapshotMeta) -> Option<String> {
    meta.file("ram").map(|f| f.sha256_sparse.clone())
}
