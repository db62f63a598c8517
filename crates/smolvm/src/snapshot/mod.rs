//! Snapshots: a guest's memory and devices and its writable disk, saved at one moment, which
//! new sandboxes continue from (`create --from-snapshot`, `fork`, the boot snapshot of
//! `create`) and a paused sandbox resumes from.
//!
//! A snapshot is a directory, written under a temporary name and renamed when complete (a
//! directory whose name starts with `.` is never listed, and is swept once its writer is
//! gone), holding:
//! - `ram`: the RAM image (sparse), which clones map copy-on-write (`vm::Memory`);
//! - `state`: the devices' state, a QEMU migration stream without the RAM, or the devices
//!   alone ([`StateForm`]);
//! - `disk.ext4`: the sandbox's writable disk as it was; each clone gets a copy;
//! - `meta.json`: what it was taken from and with ([`SnapshotMeta`]), and each file's digest
//!   (`files::digest`), checked before every restore.
//!
//! A paused sandbox keeps another form in its own directory (`paused/`): for a guest restored
//! from a snapshot, the pages it wrote (`pages`), a second name of the RAM image they go over
//! (`base`) and the devices (`state`); for a booted guest, one mapped-ram stream (`memory`),
//! resumed into anonymous memory (`vm::migrate`). Each with the meta.

pub mod files;
pub mod pages;
pub mod seal;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vm::accel::AccelKind;

/// The layout of a snapshot directory and its meta. A reader refuses other formats.
pub const FORMAT: u32 = 1;

/// What must be the same for a stream to load: a restore compares each field and names those
/// that differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// `qemu-system-x86_64 -version`'s first line.
    pub qemu_version: String,
    /// SHA-256 of the machine and devices on QEMU's command line (`vm::MachineId`).
    pub device_model_sha256: String,
    pub accel: AccelKind,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u64,
}

/// The images the guest runs on: they must still be the ones attached at a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Images {
    pub tag: String,
    pub kernel_sha256: String,
    pub rootfs_sha256: String,
    pub layer_sha256s: Vec<String>,
    pub preset: Option<String>,
}

/// One file of a snapshot and its content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub size: u64,
    pub sha256_sparse: String,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    pub name: String,
    /// The sandbox it was taken of.
    pub source: Option<String>,
    pub created_at: i64,
    pub machine: Machine,
    pub images: Images,
    /// The guest's SSH host key at the moment (a resume keeps it; a clone makes its own).
    pub host_key: Option<String>,
    pub files: Vec<FileDigest>,
    /// How `state` was written (absent from older metas: a migration stream).
    #[serde(default)]
    pub state_form: StateForm,
}

/// The kind of devices' stream a snapshot holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateForm {
    /// A migration stream with its RAM left out (`x-ignore-shared`), written by a sealing
    /// QEMU; or, in a paused sandbox's `memory`, a whole mapped-ram stream.
    #[default]
    Migration,
    /// The devices alone (QMP `xen-save-devices-state`), written by the guest's own QEMU in a
    /// few milliseconds: for a guest whose RAM is a snapshot's image and the pages it wrote.
    Devices,
}

impl StateForm {
    pub fn incoming(self) -> crate::vm::Incoming {
        match self {
            StateForm::Migration => crate::vm::Incoming::Migration,
            StateForm::Devices => crate::vm::Incoming::Devices,
        }
    }
}

/// Which RAM image a restored guest's QEMU maps: recorded at the restore in the sandbox's
/// directory ([`RAM_IMAGE`], root's: QEMU cannot change it). A capture saves the guest's
/// written pages over the image only if the mapping it finds in QEMU is of this very file
/// (so a QEMU that mapped another file cannot have that linked or copied into a snapshot),
/// and reuses its digest while the file is as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamImage {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256_sparse: String,
}

/// [`RamImage`]'s file, in a sandbox's directory.
pub const RAM_IMAGE: &str = "ram-image.json";

impl RamImage {
    pub fn of(f: &std::fs::File, sha256_sparse: &str) -> std::io::Result<RamImage> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        Ok(RamImage {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            sha256_sparse: sha256_sparse.to_string(),
        })
    }

    /// True if `f` is this file, unchanged.
    pub fn is(&self, f: &std::fs::File) -> bool {
        RamImage::of(f, &self.sha256_sparse).is_ok_and(|now| &now == self)
    }

    pub fn read(dir: &Path) -> Option<RamImage> {
        serde_json::from_slice(&std::fs::read(dir.join(RAM_IMAGE)).ok()?).ok()
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{RAM_IMAGE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = crate::text::create_private(&tmp)?;
        std::io::Write::write_all(&mut f, serde_json::to_string(self).map_err(std::io::Error::other)?.as_bytes())?;
        std::fs::rename(&tmp, dir.join(RAM_IMAGE))
    }
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot named {0:?}")]
    NotFound(String),
    #[error("a snapshot named {0:?} already exists")]
    Exists(String),
    #[error("{0:?} is not a valid snapshot name (letters, digits, '-', '_' and '.', 1 to 63, not starting with '.')")]
    Name(String),
    #[error("snapshot {snapshot}: its {file} is corrupt: its digest is {actual}, the snapshot recorded {recorded}")]
    Corrupt { snapshot: String, file: String, recorded: String, actual: String },
    #[error("snapshot {snapshot} cannot be restored here: {}", differences.join("; "))]
    Mismatch { snapshot: String, differences: Vec<String> },
    #[error("snapshot {snapshot}: {what}: {source}")]
    Io { snapshot: String, what: String, source: std::io::Error },
    #[error("snapshot {snapshot}: its meta.json is unreadable: {reason}")]
    Meta { snapshot: String, reason: String },
}

impl SnapshotMeta {
    /// What differs between the machine this snapshot needs and `here`, one phrase each.
    pub fn differences(&self, here: &Machine, images: Option<&Images>) -> Vec<String> {
        let m = &self.machine;
        let mut d = Vec::new();
        let mut diff = |what: &str, then: String, now: String| {
            if then != now {
                d.push(format!("{what} was {then}, here it is {now}"));
            }
        };
        diff("the QEMU version", m.qemu_version.clone(), here.qemu_version.clone());
        diff("the accelerator", m.accel.to_string(), here.accel.to_string());
        diff("the memory size", format!("{} MiB", m.memory_mib), format!("{} MiB", here.memory_mib));
        diff("the vCPU count", m.cpus.to_string(), here.cpus.to_string());
        diff("the disk size", format!("{} MiB", m.disk_mib), format!("{} MiB", here.disk_mib));
        diff("the machine and devices (sha256)", m.device_model_sha256.clone(), here.device_model_sha256.clone());
        if let Some(i) = images {
            let s = &self.images;
            diff("the kernel (sha256)", s.kernel_sha256.clone(), i.kernel_sha256.clone());
            diff("the base rootfs (sha256)", s.rootfs_sha256.clone(), i.rootfs_sha256.clone());
            diff("the layers", s.layer_sha256s.join(","), i.layer_sha256s.join(","));
        }
        d
    }

    pub fn file(&self, name: &str) -> Option<&FileDigest> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Bytes on disk of its files (allocated, not apparent), those with other names left
    /// out: what removing the directory frees (a paused sandbox's `base` is often a second
    /// name of a snapshot's RAM image).
    pub fn allocated_bytes(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.nlink() == 1).map(|m| m.blocks() * 512).sum()
            })
            .unwrap_or(0)
    }
}

/// A snapshot name: like a sandbox name, plus '.'; never hidden.
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::Name(name.to_string()))
    }
}

/// Reads `dir/meta.json`.
pub fn read_meta(dir: &Path, snapshot: &str) -> Result<SnapshotMeta, SnapshotError> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SnapshotError::NotFound(snapshot.to_string())
        } else {
            SnapshotError::Io { snapshot: snapshot.into(), what: format!("read {}", path.display()), source: e }
        }
    })?;
    let meta: SnapshotMeta = serde_json::from_str(&text)
        .map_err(|e| SnapshotError::Meta { snapshot: snapshot.into(), reason: e.to_string() })?;
    if meta.format != FORMAT {
        return Err(SnapshotError::Meta {
            snapshot: snapshot.into(),
            reason: format!("format {} (this smolvm reads format {FORMAT})", meta.format),
        });
    }
    Ok(meta)
}

/// Checks every file's digest against the meta (files in parallel: the RAM image dominates).
pub fn verify(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let results: Vec<(String, String, std::io::Result<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = meta
            .files
            .iter()
            .map(|f| {
                let path = dir.join(&f.name);
                s.spawn(move || (f.name.clone(), f.sha256_sparse.clone(), files::digest_path(&path)))
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if results.len() != meta.files.len() {
        return Err(SnapshotError::Meta { snapshot: meta.name.clone(), reason: "a digest thread failed".into() });
    }
    for (name, recorded, actual) in results {
        let actual = actual.map_err(|source| SnapshotError::Io {
            snapshot: meta.name.clone(),
            what: format!("read {name}"),
            source,
        })?;
        if actual != recorded {
            return Err(SnapshotError::Corrupt { snapshot: meta.name.clone(), file: name, recorded, actual });
        }
    }
    Ok(())
}

/// What a file looked like when its digest was last checked: a boot snapshot, restored by
/// every `create`, is hashed in full once and then checked by `stat` (as the image cache
/// does for images): its files are root's, written once, and any write changes the mtime.
/// Not the ctime: a pause links a paused guest's RAM image to the snapshot's (`sandbox::
/// pause`), and a link changes the ctime without changing a byte.
fn stamp_of(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok(format!("{} {} {} {}.{}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// [`verify`], skipped for files whose stamp (`verified.json`) says they are unchanged since
/// they were last verified.
pub fn verify_cached(dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let stamps_path = dir.join("verified.json");
    let current = || -> Option<Vec<String>> { meta.files.iter().map(|f| stamp_of(&dir.join(&f.name)).ok()).collect() };
    let recorded: Option<Vec<String>> = std::fs::read(&stamps_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if recorded.is_some() && recorded == current() {
        return Ok(());
    }
    verify(dir, meta)?;
    if let Some(now) = current() {
        let tmp = dir.join(".verified.json.tmp");
        let _ = std::fs::remove_file(&tmp);
        if let Ok(mut f) = crate::text::create_private(&tmp) {
            let ok = std::io::Write::write_all(&mut f, serde_json::to_string(&now).unwrap_or_default().as_bytes());
            if ok.is_ok() {
                let _ = std::fs::rename(&tmp, &stamps_path);
            }
        }
    }
    Ok(())
}

/// Writes `meta` into `dir` with the digests of `names` (files in `dir`).
pub fn write_meta(dir: &Path, meta: SnapshotMeta, names: &[&str]) -> Result<SnapshotMeta, SnapshotError> {
    write_meta_knowing(dir, meta, names, &[])
}

/// [`write_meta`], with the digests of some files known already (`(name, digest)`).
pub fn write_meta_knowing(
    dir: &Path,
    mut meta: SnapshotMeta,
    names: &[&str],
    known: &[(&str, String)],
) -> Result<SnapshotMeta, SnapshotError> {
    let io = |what: String| {
        let snapshot = meta.name.clone();
        move |source| SnapshotError::Io { snapshot, what, source }
    };
    meta.files.clear();
    for n in names {
        let p = dir.join(n);
        let f = crate::text::open_untrusted(&p).map_err(io(format!("open {}", p.display())))?;
        let size = f.metadata().map_err(io(format!("stat {}", p.display())))?.len();
        let sha256_sparse = match known.iter().find(|(k, _)| k == n) {
            Some((_, d)) => d.clone(),
            None => files::digest(&f).map_err(io(format!("digest {}", p.display())))?,
        };
        meta.files.push(FileDigest { name: n.to_string(), size, sha256_sparse });
    }
    let json = serde_json::to_string_pretty(&meta)
        .map_err(|e| SnapshotError::Meta { snapshot: meta.name.clone(), reason: e.to_string() })?;
    let p = dir.join("meta.json");
    let mut f = crate::text::create_private(&p).map_err(io(format!("create {}", p.display())))?;
    std::io::Write::write_all(&mut f, json.as_bytes()).map_err(io(format!("write {}", p.display())))?;
    Ok(meta)
}

/// A temporary directory for a snapshot being written, in `parent`: named `.tmp-<pid>-<n>`,
/// so that [`sweep`] can tell a live writer's from one whose writer died.
pub fn temp_dir(parent: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
    let mut b = [0u8; 6];
    crate::digest::random_bytes(&mut b);
    let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let dir = parent.join(format!(".tmp-{}-{suffix}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Removes the temporary directories in `parent` whose writer is gone (killed mid-write).
pub fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-") else { continue };
        let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| !crate::vm::process::is_alive(p, None)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The snapshots in `parent`, complete ones only, oldest first.
pub fn list(parent: &Path) -> Vec<(PathBuf, SnapshotMeta)> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut out: Vec<(PathBuf, SnapshotMeta)> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            read_meta(&e.path(), &name).ok().map(|m| (e.path(), m))
        })
        .collect();
    out.sort_by_key(|(_, m)| m.created_at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            qemu_version: "QEMU emulator version 10.0.2".into(),
            device_model_sha256: "aa".into(),
            accel: AccelKind::Tcg,
            memory_mib: 512,
            cpus: 1,
            disk_mib: 2048,
        }
    }

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            format: FORMAT,
            name: "s".into(),
            source: Some("box".into()),
            created_at: 1,
            machine: machine(),
            images: Images {
                tag: "t".into(),
                kernel_sha256: "k".into(),
                rootfs_sha256: "r".into(),
                layer_sha256s: vec![],
                preset: None,
            },
            host_key: None,
            files: vec![],
            state_form: StateForm::Devices,
        }
    }

    #[test]
    fn a_meta_from_before_the_state_form_reads_as_a_migration_stream() {
        let mut v = serde_json::to_value(meta()).unwrap();
        v.as_object_mut().unwrap().remove("state_form");
        let old: SnapshotMeta = serde_json::from_value(v).unwrap();
        assert_eq!(old.state_form, StateForm::Migration);
    }

    #[test]
    fn each_difference_is_named() {
        let m = meta();
        assert!(m.differences(&machine(), Some(&m.images)).is_empty());
        let other = Machine { memory_mib: 1024, qemu_version: "QEMU emulator version 9.2.0".into(), ..machine() };
        let d = m.differences(&other, None);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("QEMU version") && d[0].contains("10.0.2") && d[0].contains("9.2.0"), "{d:?}");
        assert!(d[1].contains("memory size was 512 MiB, here it is 1024 MiB"), "{d:?}");
    }

    #[test]
    fn a_corrupt_file_is_refused_naming_both_digests_and_a_partial_dir_is_not_listed() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("s");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ram"), vec![7u8; 10000]).unwrap();
        let m = write_meta(&dir, meta(), &["ram"]).unwrap();
        verify(&dir, &m).unwrap();
        verify_cached(&dir, &m).unwrap();
        assert!(dir.join("verified.json").is_file(), "a verified file is stamped");
        let recorded = m.files[0].sha256_sparse.clone();
        let f = std::fs::OpenOptions::new().write(true).open(dir.join("ram")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"\x08", 5000).unwrap();
        let e = verify(&dir, &m).unwrap_err().to_string();
        assert!(e.contains("ram is corrupt") && e.contains(&recorded), "{e}");
        // A write changes the file's stamp: the cached check hashes it again.
        let e = verify_cached(&dir, &m).unwrap_err().to_string();
        assert!(e.contains("ram is corrupt"), "{e}");
        assert_eq!(list(parent.path()).len(), 1);
        let tmp = temp_dir(parent.path()).unwrap();
        std::fs::copy(dir.join("meta.json"), tmp.join("meta.json")).unwrap();
        assert_eq!(list(parent.path()).len(), 1, "a temporary directory is never listed");
        sweep(parent.path());
        assert!(tmp.exists(), "its writer (this process) is alive");
    }

    #[test]
    fn a_ram_image_record_names_one_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"image").unwrap();
        std::fs::write(&b, b"image").unwrap();
        let rec = RamImage::of(&std::fs::File::open(&a).unwrap(), "d").unwrap();
        rec.write(dir.path()).unwrap();
        let back = RamImage::read(dir.path()).unwrap();
        assert_eq!(back, rec);
        assert!(back.is(&std::fs::File::open(&a).unwrap()));
        assert!(!back.is(&std::fs::File::open(&b).unwrap()), "another file with the same bytes");
        // A second name is the same file; a write makes it another.
        std::fs::hard_link(&a, dir.path().join("link")).unwrap();
        assert!(back.is(&std::fs::File::open(dir.path().join("link")).unwrap()));
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60)).unwrap();
        assert!(!back.is(&std::fs::File::open(&a).unwrap()), "changed since");
    }

    #[test]
    fn names() {
        validate_name("base-1.2_x").unwrap();
        for bad in ["", ".tmp", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
