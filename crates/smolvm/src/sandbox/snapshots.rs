//! `snapshot`, `fork` and the capture under them and under `pause` and the boot snapshot.
//!
//! A capture stops the guest, saves it, copies the disk while it is stopped (the two are one
//! moment), and lets the guest continue (or leaves it stopped for `pause` to end). How it is
//! saved depends on where its RAM is ([`Captured`]):
//! - restored from a snapshot (the usual case: `create` restores the boot snapshot): the
//!   pages it wrote over that snapshot's RAM image, read from outside QEMU (`vm::guest_ram`),
//!   and its devices alone (~40 ms stopped for a fresh guest); a snapshot's own RAM image is
//!   then made of the image and the pages, after the guest runs again;
//! - booted (its RAM QEMU's anonymous memory): a mapped-ram stream of the whole RAM written
//!   by its QEMU into its `run/` (~0.15 s for a fresh 512 MiB guest under emulation), sealed
//!   by a second QEMU (`snapshot::seal`) after the guest runs again.
//!
//! A killed command must not leave the source stopped: the capture writes a marker
//! ([`CAPTURING`]) before it stops the guest and removes it once the guest runs again (or is
//! recorded paused). Whoever next takes the sandbox's lock (or runs a command in it) and
//! finds the marker knows the capture's process died, and puts things right
//! ([`Smolvm::settle`]).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::boot::BootFiles;
use super::{LifecycleError, Smolvm, Status};
use crate::snapshot::{self, files, Images, Machine, SnapshotError, SnapshotMeta};
use crate::state::{SandboxRow, SandboxState};
use crate::vm::accel::{Accel, AccelKind};
use crate::vm::{guest_ram, process, Netdev, SaveRam, VmControl};

/// In the sandbox's directory while a capture may have its guest stopped.
pub(super) const CAPTURING: &str = "capturing";
/// The stream a capture has QEMU write, in its `run/`.
const CAPTURE_FILE: &str = "capture.mem";

/// What `snapshot list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub source: Option<String>,
    pub created_at: i64,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u64,
    pub preset: Option<String>,
    pub image_tag: String,
    /// Bytes its files take on the host's disk.
    pub bytes: u64,
    pub dir: PathBuf,
}

impl SnapshotInfo {
    fn of(dir: &Path, m: &SnapshotMeta) -> SnapshotInfo {
        SnapshotInfo {
            name: m.name.clone(),
            source: m.source.clone(),
            created_at: m.created_at,
            memory_mib: m.machine.memory_mib,
            cpus: m.machine.cpus,
            disk_mib: m.machine.disk_mib,
            preset: m.images.preset.clone(),
            image_tag: m.images.tag.clone(),
            bytes: SnapshotMeta::allocated_bytes(dir),
            dir: dir.to_path_buf(),
        }
    }
}

fn snap_io(snapshot: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (snapshot, what) = (snapshot.to_string(), what.into());
    move |source| SnapshotError::Io { snapshot, what, source }
}

/// What a capture leaves the guest as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum After {
    /// Running again (snapshot, fork, boot snapshot).
    Continue,
    /// Stopped, for the caller to record and end (pause).
    Stopped,
}

impl Smolvm {
    /// The images a sandbox's row names, from the cache.
    pub(super) fn files_of(&self, row: &SandboxRow) -> Result<BootFiles, LifecycleError> {
        let missing = |what: &'static str, sha: &str| LifecycleError::ImageGone {
            name: row.name.clone(),
            what,
            sha256: sha.into(),
            tag: row.tag.clone(),
        };
        let kernel =
            self.images().lookup_sha(&row.kernel_sha256).ok_or_else(|| missing("kernel", &row.kernel_sha256))?;
        let rootfs =
            self.images().lookup_sha(&row.rootfs_sha256).ok_or_else(|| missing("rootfs", &row.rootfs_sha256))?;
        let layers = row
            .layer_sha256s
            .iter()
            .map(|sha| self.images().lookup_sha(sha).ok_or_else(|| missing("layer", sha)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BootFiles { kernel, rootfs, layers })
    }

    pub(super) fn accel_of(row: &SandboxRow) -> Accel {
        match row.accel {
            AccelKind::Kvm => Accel::Kvm,
            AccelKind::Tcg => Accel::Tcg { reason: "as created".into() },
        }
    }

    /// The machine a stream of `row`'s guest depends on.
    pub(super) fn machine_of(&self, row: &SandboxRow, files: &BootFiles) -> Result<Machine, SnapshotError> {
        let spec = self.machine_spec(row, &Self::accel_of(row), files, String::new(), Netdev::Wire);
        let id = self
            .vmm()
            .machine_id(&spec, &self.home().cache.join("qemu-version"))
            .map_err(snap_io(&row.name, "ask the VMM its version"))?;
        Ok(Machine {
            qemu_version: id.version,
            device_model_sha256: id.device_model_sha256,
            accel: row.accel,
            memory_mib: row.memory_mib,
            cpus: row.cpus,
            disk_mib: row.disk_mib,
        })
    }

    pub(super) fn images_of(row: &SandboxRow) -> Images {
        Images {
            tag: row.tag.clone(),
            kernel_sha256: row.kernel_sha256.clone(),
            rootfs_sha256: row.rootfs_sha256.clone(),
            layer_sha256s: row.layer_sha256s.clone(),
            preset: row.preset.clone(),
        }
    }

    /// Saves running `row`'s guest into `dest` (see [`Captured`]), and its disk into
    /// `dest/disk.ext4` if `copy_disk`. The caller holds the sandbox's lock. Returns the VM's
    /// control channel (the guest stopped with [`After::Stopped`]).
    pub(super) fn capture(
        &self,
        row: &SandboxRow,
        dest: &Path,
        copy_disk: bool,
        after: After,
    ) -> Result<(Box<dyn VmControl>, Captured), SnapshotError> {
        let name = row.name.as_str();
        let dir = self.dir(name);
        let marker = dir.join(CAPTURING);
        std::fs::write(&marker, std::process::id().to_string()).map_err(snap_io(name, "write the capture marker"))?;
        let mut q = match self.vmm().control(&dir, row.pid.unwrap_or(0)) {
            Ok(q) => q,
            Err(e) => {
                // Nothing was stopped: no marker for a later command to act on.
                let _ = std::fs::remove_file(&marker);
                return Err(snap_io(name, "connect to its VMM")(e));
            }
        };
        let t = std::time::Instant::now();
        // A stop that fails leaves the marker: whether the guest stopped is unknown, and the
        // next command settles it (`settle_locked` asks the VMM and lets it run).
        q.stop().map_err(snap_io(name, "stop the guest"))?;
        let saved = save_stopped(&mut *q, row, &dir, dest).and_then(|captured| {
            if copy_disk {
                let src =
                    crate::text::open_untrusted(&dir.join("disk.ext4")).map_err(snap_io(name, "open its disk"))?;
                files::copy_sparse(&src, &dest.join("disk.ext4")).map_err(snap_io(name, "copy its disk"))?;
            }
            Ok(captured)
        });
        tracing::debug!("{name}: saved (and disk copied: {copy_disk}) in {:?}", t.elapsed());
        if saved.is_err() || after == After::Continue {
            q.cont().map_err(snap_io(name, "let the guest run again"))?;
            let _ = std::fs::remove_file(&marker);
            tracing::debug!("{name}: running again after {:?}", t.elapsed());
        }
        Ok((q, saved?))
    }

    /// A capture whose process died leaves its marker: puts the sandbox back as it was meant
    /// to be (running, or paused with no QEMU). Called with the sandbox's lock held.
    pub(super) fn settle_locked(&self, name: &str) {
        let dir = self.dir(name);
        let marker = dir.join(CAPTURING);
        if !marker.exists() {
            return;
        }
        let Ok(Some(row)) = self.db().get(name) else { return };
        let alive = row.pid.is_some_and(|p| process::is_alive(p, row.pid_start));
        match row.state {
            SandboxState::Running if alive => {
                // The pause had not been recorded: it did not happen.
                let _ = std::fs::remove_dir_all(dir.join(super::pause::PAUSED_DIR));
                if let Ok(mut q) = self.vmm().control(&dir, row.pid.unwrap_or(0)) {
                    if q.is_running().is_ok_and(|r| !r) {
                        tracing::warn!("{name}: an interrupted capture left the guest stopped; it runs again");
                        let _ = q.cont();
                    }
                }
            }
            SandboxState::Paused => {
                // The row no longer names a pid once the pause was recorded: the QEMU it
                // ended is found by its pid file (`kill_vm` checks it is this sandbox's).
                tracing::warn!("{name}: an interrupted pause may have left its QEMU behind; it is ended");
                self.kill_vm(name, &row);
            }
            _ => {}
        }
        let _ = std::fs::remove_file(&marker);
    }

    /// [`Smolvm::settle_locked`] for a command that takes no lock (exec): only when a marker is
    /// there and nobody holds the lock (a capture in progress holds it; its guest continues
    /// shortly, and the command's request waits in the agent's port meanwhile).
    pub(super) fn settle(&self, name: &str) {
        if self.dir(name).join(CAPTURING).exists() {
            if let Ok(Some(_lock)) = crate::lock::FileLock::try_exclusive(&self.lock_path(name)) {
                self.settle_locked(name);
            }
        }
    }

    /// Takes a snapshot of running (or paused) sandbox `name`, which keeps running (paused).
    pub fn snapshot(&self, name: &str, snapshot_name: Option<&str>) -> Result<SnapshotInfo, LifecycleError> {
        let snap = match snapshot_name {
            Some(s) => s.to_string(),
            None => format!("{name}-{}", crate::timefmt::now_secs()),
        };
        snapshot::validate_name(&snap)?;
        let parent = self.home().snapshots();
        snapshot::sweep(&parent);
        let final_dir = parent.join(&snap);
        if final_dir.exists() {
            return Err(SnapshotError::Exists(snap).into());
        }
        let tmp = snapshot::temp_dir(&parent).map_err(snap_io(&snap, "make its directory"))?;
        let made = self.snapshot_into(name, &snap, &tmp);
        let made = made.and_then(|meta| {
            std::fs::rename(&tmp, &final_dir).map_err(snap_io(&snap, "move it into place"))?;
            Ok(meta)
        });
        match made {
            Ok(meta) => Ok(SnapshotInfo::of(&final_dir, &meta)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// A sealed snapshot of `name` in `dir` (ram, state, disk.ext4, meta.json).
    pub(super) fn snapshot_into(&self, name: &str, snap: &str, dir: &Path) -> Result<SnapshotMeta, LifecycleError> {
        let _lock = self.lock(name)?;
        let row = self.row(name)?;
        let files = self.files_of(&row)?;
        let machine = self.machine_of(&row, &files)?;
        let captured = match Self::status_of(&row) {
            Status::Running => self.capture(&row, dir, true, After::Continue)?.1,
            Status::Paused => {
                // Its state is saved already, and the disk as it stands.
                let paused = self.dir(name).join(super::pause::PAUSED_DIR);
                let copy = |from: &str, to: &str| {
                    let src = crate::text::open_untrusted(&paused.join(from))
                        .map_err(snap_io(snap, format!("open its paused {from}")))?;
                    files::copy_sparse(&src, &dir.join(to)).map_err(snap_io(snap, format!("copy its paused {from}")))
                };
                let disk = crate::text::open_untrusted(&self.dir(name).join("disk.ext4"))
                    .map_err(snap_io(snap, "open its disk"))?;
                files::copy_sparse(&disk, &dir.join("disk.ext4")).map_err(snap_io(snap, "copy its disk"))?;
                if paused.join("pages").exists() {
                    copy("pages", "pages")?;
                    copy("state", "state")?;
                    let base = crate::text::open_untrusted(&paused.join("base"))
                        .map_err(snap_io(snap, "open its paused RAM image"))?;
                    let base_sha256 = snapshot::read_meta(&paused, name)?
                        .file("base")
                        .map(|f| f.sha256_sparse.clone())
                        .unwrap_or_default();
                    Captured::Pages { base, base_sha256 }
                } else {
                    copy("memory", "memory")?;
                    Captured::Stream
                }
            }
            status => return Err(super::SandboxError::NotRunning { name: name.into(), status }.into()),
        };
        self.seal_into(&row, &files, dir, snap, Some(name.to_string()), machine, captured)
    }

    /// Makes `dir` a snapshot from what a capture left there: `ram` (the RAM image) and
    /// `state` (the devices) out of `memory` by a sealing QEMU, or out of `pages` over its
    /// base image; with `dir/disk.ext4`, then the meta with every digest. The files are made
    /// readable by the sandboxes' group (clones run as other uids).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn seal_into(
        &self,
        row: &SandboxRow,
        files: &BootFiles,
        dir: &Path,
        snap: &str,
        source: Option<String>,
        machine: Machine,
        captured: Captured,
    ) -> Result<SnapshotMeta, LifecycleError> {
        let identity = self.identity_of(&row.name)?;
        let t = std::time::Instant::now();
        let state_form = match captured {
            Captured::Stream => {
                self.seal_stream(row, files, dir, snap, identity)?;
                snapshot::StateForm::Migration
            }
            Captured::Pages { base, .. } => {
                let ram_len = u64::from(row.memory_mib) << 20;
                let pages = snapshot::pages::Pages::open(&dir.join("pages"), ram_len)
                    .map_err(snap_io(snap, "read the saved pages"))?;
                snapshot::pages::materialize(&base, &dir.join("ram"), |each| pages.for_each_run(each))
                    .map_err(snap_io(snap, "make its RAM image"))?;
                let _ = std::fs::remove_file(dir.join("pages"));
                snapshot::StateForm::Devices
            }
        };
        tracing::debug!("{snap}: sealed in {:?}", t.elapsed());
        let meta = SnapshotMeta {
            format: snapshot::FORMAT,
            name: snap.to_string(),
            source,
            created_at: crate::timefmt::now_secs(),
            machine,
            images: Self::images_of(row),
            host_key: row.host_key.clone(),
            files: vec![],
            state_form,
        };
        let t = std::time::Instant::now();
        let meta = snapshot::write_meta(dir, meta, &["ram", "state", "disk.ext4"])?;
        tracing::debug!("{snap}: digests in {:?}", t.elapsed());
        for n in ["ram", "state", "disk.ext4", "meta.json"] {
            share_with_sandboxes(&dir.join(n), identity.map(|i| i.images_gid))
                .map_err(snap_io(snap, format!("share {n}")))?;
        }
        Ok(meta)
    }

    /// Seals `dir/memory` (a mapped-ram stream, with `dir/disk.ext4`) into `dir/ram` and
    /// `dir/state` with a second VM (`snapshot::seal`).
    fn seal_stream(
        &self,
        row: &SandboxRow,
        files: &BootFiles,
        dir: &Path,
        snap: &str,
        identity: Option<crate::child::Identity>,
    ) -> Result<(), LifecycleError> {
        let scratch = dir.join("seal");
        std::fs::create_dir(&scratch).map_err(snap_io(snap, "make the sealing directory"))?;
        if let Some(id) = identity {
            // The sealing QEMU reopens the stream as the sandbox's uid.
            let f = crate::text::open_untrusted(&dir.join("memory")).map_err(snap_io(snap, "open the saved state"))?;
            std::os::unix::fs::fchown(&f, Some(id.uid), Some(id.gid))
                .map_err(snap_io(snap, "chown the saved state"))?;
        }
        let mut spec = self.machine_spec(row, &Self::accel_of(row), files, String::new(), Netdev::Wire);
        spec.dir = scratch.clone();
        spec.upper = dir.join("disk.ext4");
        snapshot::seal::seal(self.vmm(), &spec, &dir.join("memory"), identity, dir)
            .map_err(snap_io(snap, "seal it"))?;
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::remove_file(dir.join("memory"));
        Ok(())
    }

    /// Every snapshot taken with `snapshot`, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        snapshot::list(&self.home().snapshots()).iter().map(|(d, m)| SnapshotInfo::of(d, m)).collect()
    }

    pub fn snapshot_info(&self, snap: &str) -> Result<SnapshotInfo, SnapshotError> {
        snapshot::validate_name(snap)?;
        let dir = self.home().snapshots().join(snap);
        let meta = snapshot::read_meta(&dir, snap)?;
        Ok(SnapshotInfo::of(&dir, &meta))
    }

    /// Deletes a snapshot. Sandboxes restored from it keep running: they hold its RAM image
    /// open, and their disks are their own.
    pub fn delete_snapshot(&self, snap: &str) -> Result<(), SnapshotError> {
        self.snapshot_info(snap)?;
        let dir = self.home().snapshots().join(snap);
        // Out of sight first (a rename is atomic), then removed.
        let gone = self.home().snapshots().join(format!(".tmp-{}-deleting-{snap}", std::process::id()));
        std::fs::rename(&dir, &gone).map_err(snap_io(snap, "move it aside"))?;
        std::fs::remove_dir_all(&gone).map_err(snap_io(snap, "remove it"))
    }
}

/// What a capture saved a guest's RAM as.
#[derive(Debug)]
pub(super) enum Captured {
    /// `memory`: a mapped-ram stream of the whole RAM and the devices. For a guest whose RAM
    /// is QEMU's anonymous memory (booted, or resumed from such a stream), or one whose pages
    /// cannot be read from outside (`vm::guest_ram`).
    Stream,
    /// `pages` (`snapshot::pages`) and `state` (the devices alone): the pages the guest wrote
    /// over `base`, the RAM image it was restored from (open: its name may be gone by now;
    /// `base_sha256` its digest). A few milliseconds instead of a read of the whole RAM.
    Pages { base: std::fs::File, base_sha256: String },
}

/// The devices' state the guest's QEMU writes, in its `run/`.
const DEVICES_FILE: &str = "capture.state";

/// Saves stopped `row`'s guest into `dest`: its written pages and devices when its RAM is the
/// snapshot image recorded at its restore, else a whole stream.
fn save_stopped(q: &mut dyn VmControl, row: &SandboxRow, dir: &Path, dest: &Path) -> Result<Captured, SnapshotError> {
    let name = row.name.as_str();
    let run = crate::paths::run_dir(dir);
    let ram_len = u64::from(row.memory_mib) << 20;
    let mapping = row.pid.map(|pid| guest_ram::RamMapping::find(pid, ram_len));
    if let (Some(Ok(Some(ram))), Some(image)) = (mapping, snapshot::RamImage::read(dir)) {
        match save_pages(q, &ram, &image, &run, dest) {
            Ok(base) => return Ok(Captured::Pages { base, base_sha256: image.sha256_sparse }),
            Err(e) => {
                tracing::debug!("{name}: its written pages cannot be saved ({e}); its whole RAM is");
                let _ = std::fs::remove_file(dest.join("pages"));
                let _ = std::fs::remove_file(dest.join("state"));
            }
        }
    }
    let _ = std::fs::remove_file(run.join(CAPTURE_FILE));
    q.save(CAPTURE_FILE, SaveRam::Included).map_err(snap_io(name, "save the guest"))?;
    take_file(&run.join(CAPTURE_FILE), &dest.join("memory")).map_err(snap_io(name, "keep the saved state"))?;
    Ok(Captured::Stream)
}

fn save_pages(
    q: &mut dyn VmControl,
    ram: &guest_ram::RamMapping,
    image: &snapshot::RamImage,
    run: &Path,
    dest: &Path,
) -> std::io::Result<std::fs::File> {
    let base = ram.open_file()?;
    if !image.is(&base) {
        return Err(std::io::Error::other("the file its QEMU maps is not the RAM image it was restored from"));
    }
    let t = std::time::Instant::now();
    let written = ram.written_pages()?;
    snapshot::pages::save(ram, &written, &dest.join("pages"))?;
    let _ = std::fs::remove_file(run.join(DEVICES_FILE));
    q.save_devices(DEVICES_FILE)?;
    take_file(&run.join(DEVICES_FILE), &dest.join("state"))?;
    tracing::debug!("{} written pages and the devices saved in {:?}", written.len(), t.elapsed());
    Ok(base)
}

/// Moves `from` (a file in a sandbox's `run/`, written by its QEMU) to `to` (in a directory
/// only root writes). `run/` is the sandbox uid's, so whatever is checked there by path can
/// be swapped before it is used (a hard link to a root file, say, which the chown that follows
/// would take over): the file is renamed first and checked where it now is, out of QEMU's
/// reach, and removed again unless it is a regular file with no other name. Across file systems
/// it is copied from the descriptor that was checked.
pub(super) fn take_file(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |what: &str| std::io::Error::other(format!("{}: {what}; not taken", from.display()));
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let f = crate::text::open_untrusted(from)?;
            let m = f.metadata()?;
            if !m.is_file() || m.nlink() != 1 {
                return Err(refuse("not a regular file with one name"));
            }
            files::copy_sparse(&f, to)?;
            return std::fs::remove_file(from);
        }
        Err(e) => return Err(e),
    }
    let checked = crate::text::open_untrusted(to).and_then(|f| f.metadata());
    match checked {
        Ok(m) if m.is_file() && m.nlink() == 1 => Ok(()),
        other => {
            let is_dir = std::fs::symlink_metadata(to).is_ok_and(|m| m.is_dir());
            let _ = if is_dir { std::fs::remove_dir_all(to) } else { std::fs::remove_file(to) };
            Err(match other {
                Ok(_) => refuse("not a regular file with one name"),
                Err(e) => refuse(&e.to_string()),
            })
        }
    }
}

/// Root's, readable by the sandboxes' group (0640), when smolvm is root; else the user's 0600.
pub(super) fn share_with_sandboxes(path: &Path, images_gid: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = crate::text::open_untrusted(path)?;
    if let Some(gid) = images_gid {
        std::os::unix::fs::fchown(&f, Some(0), Some(gid))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A taken-over QEMU swaps its capture file for a hard link to a file it does not own,
    /// over and over, while root takes the capture: what root ends up holding is never that
    /// file (by path, the check and the rename raced).
    #[test]
    fn a_capture_swapped_for_a_link_is_never_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (run, dest) = (dir.path().join("run"), dir.path().join("dest"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        let victim_ino = std::fs::metadata(&victim).unwrap().ino();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, v, s) = (run.clone(), victim.clone(), stop.clone());
        let swapper = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) && n < 50_000_000 {
                let tmp = r.join("tmp");
                let _ = std::fs::remove_file(&tmp);
                if std::fs::hard_link(&v, &tmp).is_ok() {
                    let _ = std::fs::rename(&tmp, r.join("capture"));
                }
                n += 1;
            }
        });
        let (mut taken, mut refused) = (0, 0);
        let t0 = std::time::Instant::now();
        for _ in 0..3000 {
            if t0.elapsed() > std::time::Duration::from_secs(20) {
                break;
            }
            // A fresh capture, as QEMU writes one (never through the name, which may be a link).
            std::fs::write(run.join("fresh"), b"guest memory").unwrap();
            std::fs::rename(run.join("fresh"), run.join("capture")).unwrap();
            let to = dest.join("memory");
            match take_file(&run.join("capture"), &to) {
                Ok(()) => {
                    taken += 1;
                    assert_ne!(std::fs::metadata(&to).unwrap().ino(), victim_ino, "took a link to the victim");
                }
                Err(_) => {
                    refused += 1;
                    assert!(!to.exists() || std::fs::metadata(&to).unwrap().ino() != victim_ino);
                }
            }
            let _ = std::fs::remove_file(&to);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        assert!(taken + refused > 0);
    }
}
