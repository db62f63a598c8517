//! The boot snapshot: `create` restores a guest that was booted once and saved, instead of
//! booting the kernel.
//!
//! One per configuration the guest can tell apart: QEMU's version, the machine and devices,
//! accelerator, memory, vCPUs, disk size, kernel, base and layers (the key is the SHA-256 of
//! all of them). The network policy is not in it: the guest is configured the same whatever
//! its policy, which the host enforces. It lives in the cache (`Home::boot_snapshots`), beside
//! the images it is made of, and `image prune` removes it with them.
//!
//! The first `create` of a configuration boots, and before anything of the user's reaches the
//! guest (CA, variables, commands) saves it ([`Smolvm::save_boot_snapshot`]); it is then an
//! ordinary sandbox. Concurrent first creates: the one that takes the slot's lock saves, the
//! others boot on their own and save nothing; a snapshot is renamed into place only when
//! complete, so none is ever restored half-written. A boot snapshot that fails its check (a
//! changed QEMU, a corrupt file) is removed and the create boots.

use std::path::PathBuf;

use super::boot::BootFiles;
use super::create::{CreateEvent, Plan};
use super::snapshots::After;
use super::Smolvm;
use crate::lock::FileLock;
use crate::snapshot::{self, SnapshotError};
use crate::state::SandboxRow;

/// The right to save a configuration's boot snapshot (its lock), and where.
#[derive(Debug)]
pub struct Slot {
    dir: PathBuf,
    machine: snapshot::Machine,
    _lock: FileLock,
}

impl Smolvm {
    /// Restore the boot snapshot of `row`'s configuration if there is a sound one; else boot,
    /// and save one if no other create is saving it.
    pub(super) fn boot_snapshot_plan(
        &self,
        row: &SandboxRow,
        files: &BootFiles,
        on: &mut dyn FnMut(CreateEvent),
    ) -> Plan {
        let machine = match self.machine_of(row, files) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("no boot snapshot: {e}");
                return Plan::Cold(None);
            }
        };
        let images = Self::images_of(row);
        let key_src = serde_json::json!({ "format": snapshot::FORMAT, "machine": &machine, "kernel": images.kernel_sha256,
            "rootfs": images.rootfs_sha256, "layers": images.layer_sha256s });
        let key = crate::digest::sha256_hex(key_src.to_string().as_bytes());
        let parent = self.home().boot_snapshots();
        let dir = parent.join(&key[..32]);
        if dir.exists() {
            let sound = snapshot::read_meta(&dir, "boot").and_then(|m| {
                let d = m.differences(&machine, Some(&images));
                if !d.is_empty() {
                    return Err(SnapshotError::Mismatch { snapshot: "boot".into(), differences: d });
                }
                snapshot::verify_cached(&dir, &m).map(|()| m)
            });
            match sound {
                Ok(m) => {
                    let ram_sha256 = m.file("ram").map(|f| f.sha256_sparse.clone());
                    return Plan::Restore {
                        dir,
                        origin: crate::state::Origin::BootSnapshot,
                        form: m.state_form,
                        ram_sha256,
                    };
                }
                Err(e) => {
                    on(CreateEvent::Notice(format!("notice: the boot snapshot is unusable and is removed: {e}")));
                    let aside = parent.join(format!(".tmp-{}-bad-{}", std::process::id(), &key[..8]));
                    if std::fs::rename(&dir, &aside).is_ok() {
                        let _ = std::fs::remove_dir_all(&aside);
                    }
                }
            }
        }
        let lock = std::fs::create_dir_all(&parent)
            .and_then(|()| FileLock::try_exclusive(&parent.join(format!(".{}.lock", &key[..32]))));
        match lock {
            // Another create may have finished it meanwhile: then this one boots (and saves
            // nothing); the next restores it.
            Ok(Some(l)) if !dir.exists() => Plan::Cold(Some(Slot { dir, machine, _lock: l })),
            _ => Plan::Cold(None),
        }
    }

    /// Saves `row`'s just-booted guest as the boot snapshot of the slot's configuration; the
    /// guest runs on as `row`'s sandbox.
    pub(super) fn save_boot_snapshot(
        &self,
        row: &SandboxRow,
        files: &BootFiles,
        slot: Slot,
    ) -> Result<(), super::LifecycleError> {
        let parent = self.home().boot_snapshots();
        snapshot::sweep(&parent);
        let tmp = snapshot::temp_dir(&parent).map_err(|source| SnapshotError::Io {
            snapshot: "boot".into(),
            what: "make its directory".into(),
            source,
        })?;
        let made = (|| {
            let (_, captured) = self.capture(row, &tmp, true, After::Continue)?;
            // The host key is the first sandbox's; every restore makes its own.
            let mut anonymous = row.clone();
            anonymous.host_key = None;
            self.seal_into(&anonymous, files, &tmp, "boot", None, slot.machine.clone(), captured)?;
            std::fs::rename(&tmp, &slot.dir).map_err(|source| SnapshotError::Io {
                snapshot: "boot".into(),
                what: "move it into place".into(),
                source,
            })?;
            Ok(())
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Removes every boot snapshot (`image prune`): they are remade by the next create.
    pub(super) fn prune_boot_snapshots(&self) -> u64 {
        let parent = self.home().boot_snapshots();
        let mut freed = 0;
        for (dir, _) in snapshot::list(&parent) {
            freed += snapshot::SnapshotMeta::allocated_bytes(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
        snapshot::sweep(&parent);
        freed
    }
}
