//! `pause` and `resume`: a sandbox's memory and devices saved to its directory and its QEMU
//! ended, so that it holds no host memory and survives a host reboot; and back.
//!
//! The paused state is `paused/` in the sandbox's directory, with `meta.json` (the digests and
//! the machine it needs): for a guest restored from a snapshot, the pages it wrote (`pages`),
//! the devices (`state`) and a second name of the RAM image the pages go over (`base`: a hard
//! link, so the snapshot may be removed meanwhile); for a booted guest, a mapped-ram stream
//! (`memory`, as large as the RAM in use). The disk stays where it is (nothing writes it
//! while no QEMU runs). Order, so that a process
//! killed at any step leaves a sandbox that runs or one that is cleanly paused: capture (the
//! guest stopped), `paused/` written and renamed into place, the row set to paused, QEMU
//! ended, the capture marker removed; `Smolvm::settle_locked` finishes or undoes what a killed
//! pause left.

use std::time::{Duration, Instant};

use super::boot::{Restore, Start};
use super::snapshots::{After, Captured, CAPTURING};
use super::{LifecycleError, SandboxError, Smolvm, Status};
use crate::snapshot::{self, SnapshotError, SnapshotMeta};
use crate::state::SandboxState;

/// The paused state's directory, in the sandbox's.
pub(super) const PAUSED_DIR: &str = "paused";
/// Where a pause writes `paused/` before it is complete.
pub(super) const PAUSED_TMP: &str = ".paused.tmp";

/// What a pause or resume measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PauseReport {
    pub name: String,
    pub millis: u64,
    /// Bytes the paused state takes on the host's disk.
    pub bytes: u64,
}

fn snap_io(name: &str, what: &str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (snapshot, what) = (name.to_string(), what.to_string());
    move |source| SnapshotError::Io { snapshot, what, source }
}

impl Smolvm {
    /// Saves running `name` (memory, devices; its disk stays) and ends its QEMU.
    pub fn pause(&self, name: &str) -> Result<PauseReport, LifecycleError> {
        let started = Instant::now();
        let _lock = self.lock(name)?;
        let mut row = self.running(name)?;
        let files = self.files_of(&row)?;
        let machine = self.machine_of(&row, &files)?;
        let dir = self.dir(name);
        let tmp = dir.join(PAUSED_TMP);
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(dir.join(PAUSED_DIR));
        std::fs::create_dir(&tmp).map_err(snap_io(name, "make paused/"))?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let images_gid = self.config().vm_users.filter(|_| root).map(|u| u.images_gid);
        let written = (|| {
            let (q, captured) = self.capture(&row, &tmp, false, After::Stopped)?;
            let (names, state_form, known): (&[&str], _, _) = match captured {
                Captured::Stream => (&["memory"], snapshot::StateForm::Migration, vec![]),
                Captured::Pages { base, base_sha256 } => {
                    keep_base(&base, &tmp.join("base"), images_gid).map_err(snap_io(name, "keep its RAM image"))?;
                    (&["base", "pages", "state"], snapshot::StateForm::Devices, vec![("base", base_sha256)])
                }
            };
            // What QEMU wrote is its uid's: made root's (group-readable by the sandboxes'
            // group), so that the QEMU that resumes it reads it whichever uid it is leased.
            for n in names.iter().filter(|n| **n != "base") {
                super::snapshots::share_with_sandboxes(&tmp.join(n), images_gid)
                    .map_err(snap_io(name, "hand the paused state to root"))?;
            }
            let meta = SnapshotMeta {
                format: snapshot::FORMAT,
                name: name.to_string(),
                source: Some(name.to_string()),
                created_at: crate::timefmt::now_secs(),
                machine,
                images: Self::images_of(&row),
                host_key: row.host_key.clone(),
                files: vec![],
                state_form,
            };
            snapshot::write_meta_knowing(&tmp, meta, names, &known)?;
            // On the host's disk before the guest is given up: a paused sandbox survives a
            // host crash, not only a clean reboot. (Its disk is flushed by QEMU as it quits.)
            for f in names.iter().chain(&["meta.json"]) {
                crate::text::open_untrusted(&tmp.join(f))
                    .and_then(|f| f.sync_all())
                    .map_err(snap_io(name, "sync the paused state"))?;
            }
            std::fs::rename(&tmp, dir.join(PAUSED_DIR)).map_err(snap_io(name, "move paused/ into place"))?;
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(snap_io(name, "sync paused/"))?;
            Ok::<_, LifecycleError>(q)
        })();
        let mut q = match written {
            Ok(q) => q,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                // The guest runs on, unpaused.
                if let Ok(mut q) = self.vmm().control(&dir, row.pid.unwrap_or(0)) {
                    let _ = q.cont();
                }
                let _ = std::fs::remove_file(dir.join(CAPTURING));
                return Err(e);
            }
        };
        tracing::debug!("{name}: paused state written after {:?}", started.elapsed());
        let old = row.clone();
        row.state = SandboxState::Paused;
        row.pid = None;
        row.pid_start = None;
        row.ssh_port = None;
        self.db().update(&row)?;
        q.quit();
        self.kill_vm(name, &old);
        let _ = std::fs::remove_file(dir.join("ssh.ctl"));
        let _ = std::fs::remove_file(dir.join(CAPTURING));
        Ok(PauseReport {
            name: name.into(),
            millis: started.elapsed().as_millis() as u64,
            bytes: SnapshotMeta::allocated_bytes(&dir.join(PAUSED_DIR)),
        })
    }

    /// Continues paused `name` where it was; returns when a command can run in it.
    pub fn resume(&self, name: &str, timeout: Duration) -> Result<PauseReport, LifecycleError> {
        let started = Instant::now();
        let _lock = self.lock(name)?;
        let mut row = self.row(name)?;
        let status = Self::status_of(&row);
        if status != Status::Paused {
            return Err(SandboxError::NotRunning { name: name.into(), status }.into()).map_err(|e: LifecycleError| {
                if status == Status::Running {
                    LifecycleError::NotPaused { name: name.into() }
                } else {
                    e
                }
            });
        }
        let files = self.files_of(&row)?;
        let paused = self.dir(name).join(PAUSED_DIR);
        let meta = snapshot::read_meta(&paused, name)?;
        let differences = meta.differences(&self.machine_of(&row, &files)?, Some(&Self::images_of(&row)));
        if !differences.is_empty() {
            return Err(SnapshotError::Mismatch { snapshot: format!("{name} (paused)"), differences }.into());
        }
        snapshot::verify(&paused, &meta)?;
        tracing::debug!("{name}: checked after {:?}", started.elapsed());
        let bytes = SnapshotMeta::allocated_bytes(&paused);
        let diff = meta.file("pages").is_some();
        let restore = Restore {
            ram: diff.then(|| paused.join("base")),
            ram_sha256: meta.file("base").map(|f| f.sha256_sparse.clone()),
            stream: paused.join(if diff { "state" } else { "memory" }),
            incoming: meta.state_form.incoming(),
            pages: diff.then(|| paused.join("pages")),
            clone: false,
            host_key: meta.host_key.clone(),
            origin: crate::state::Origin::Resume,
        };
        let accel = Self::accel_of(&row);
        self.boot_row(&mut row, &accel, &files, timeout, &Start::Restore(restore))?;
        // QEMU has loaded the stream and still holds it open: unlinked, its blocks would be
        // freed only when QEMU exits, on `delete`'s path (and slow there on a file system
        // mounted with `discard`). Emptied now, they are freed here, while nothing waits.
        // (`base` is never emptied: it is the RAM image QEMU maps, and often a snapshot's.)
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(paused.join("memory")) {
            let _ = f.set_len(0);
        }
        let _ = std::fs::remove_dir_all(&paused);
        self.push_env(name)?;
        Ok(PauseReport { name: name.into(), millis: started.elapsed().as_millis() as u64, bytes })
    }
}

/// Puts the RAM image a paused guest's pages go over at `to`: a second name for it (instant,
/// no space: the image is a snapshot's, written once and never changed), else, when it has
/// no name left (a fork's, removed) or lives on another file system, a copy.
/// A copy is made readable by the sandboxes' group, as a snapshot's image is: the resuming
/// QEMU opens it again as the sandbox's uid.
fn keep_base(base: &std::fs::File, to: &std::path::Path, images_gid: Option<u32>) -> std::io::Result<()> {
    let Err(e) = snapshot::files::link_open_file(base, to) else { return Ok(()) };
    tracing::debug!("the RAM image is copied, not linked: {e}");
    snapshot::files::copy_sparse(base, to)?;
    super::snapshots::share_with_sandboxes(to, images_gid)
}
