//! The sandbox's root: the shared read-only base, with the sandbox's own writable disk on top.
//!
//! Every sandbox boots the same base image, attached read-only and shared by all of them; what
//! a sandbox writes goes to its own small disk. The init composes the two with overlayfs and
//! switches root into the result, so the base is never copied (creating a sandbox costs an
//! empty sparse file) and never modified.
//!
//! Layout once switched (all under `/run`, a tmpfs, so invisible to the disk):
//! `/run/smolvm/lower` the base (a read-only bind of the kernel's root), `/run/smolvm/upper`
//! the sandbox disk, holding `root/` (the overlay's upper directory) and `work/`.

use std::ffi::CString;
use std::io;

use crate::log;

const LOWER: &str = "/run/smolvm/lower";
const UPPER_MNT: &str = "/run/smolvm/upper";
const NEW_ROOT: &str = "/mnt";
/// Top-level mounts carried into the new root (submounts such as /dev/pts move with them).
const CARRIED: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];

fn c(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn mount(src: &str, target: &str, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let (src, target) = (c(src)?, c(target)?);
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    // SAFETY: every pointer is either null or a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn step<T>(what: &str, r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Mounts `upper_dev` and switches root into `overlay(lower = layers.. + /, upper = upper_dev)`.
/// `layers` are read-only ext4 devices stacked over the base, top first (a preset's tooling).
/// Called after the pseudo-filesystems are mounted (they are moved into the new root).
pub fn switch_to_overlay(upper_dev: &str, layers: &[&str]) -> Result<(), String> {
    for d in [LOWER, UPPER_MNT] {
        step(&format!("create {d}"), std::fs::create_dir_all(d))?;
    }
    // A non-recursive bind of the base: only the base filesystem, none of the mounts on it.
    step("bind the base", mount("/", LOWER, None, libc::MS_BIND, None))?;
    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
    step("make the base bind read-only", mount("none", LOWER, None, ro, None))?;
    // noauto_da_alloc: ext4 otherwise starts writing a file's data to the device whenever a
    // file is truncated or renamed over another (a guard for programs that replace files
    // without fsync against a power cut): a disk request per small write, ~1.3 ms each under
    // emulation, and most of what a restored guest's first writes cost. A sandbox's disk is
    // disposable, and fsync still means what it says.
    let upper_opts = Some("noauto_da_alloc");
    step(
        &format!("mount {upper_dev} (ext4)"),
        mount(upper_dev, UPPER_MNT, Some("ext4"), libc::MS_NOATIME, upper_opts),
    )?;
    for d in ["root", "work"] {
        step(&format!("create {UPPER_MNT}/{d}"), std::fs::create_dir_all(format!("{UPPER_MNT}/{d}")))?;
    }
    let mut lowers = Vec::new();
    for (i, dev) in layers.iter().enumerate() {
        let dir = format!("/run/smolvm/layer{i}");
        step(&format!("create {dir}"), std::fs::create_dir_all(&dir))?;
        let flags = libc::MS_RDONLY | libc::MS_NOATIME;
        step(&format!("mount layer {dev}"), mount(dev, &dir, Some("ext4"), flags, None))?;
        lowers.push(dir);
    }
    lowers.push(LOWER.to_string());
    let opts = format!("lowerdir={},upperdir={UPPER_MNT}/root,workdir={UPPER_MNT}/work", lowers.join(":"));
    step("mount the overlay root", mount("overlay", NEW_ROOT, Some("overlay"), 0, Some(&opts)))?;
    for m in CARRIED {
        let target = format!("{NEW_ROOT}{m}");
        step(&format!("move {m}"), mount(m, &target, None, libc::MS_MOVE, None))?;
    }
    step("enter the new root", std::env::set_current_dir(NEW_ROOT))?;
    step("move the new root onto /", mount(".", "/", None, libc::MS_MOVE, None))?;
    let dot = step("chroot", c("."))?;
    // SAFETY: `dot` is a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", io::Error::last_os_error()));
    }
    step("chdir /", std::env::set_current_dir("/"))?;
    log::info!("root is overlay({}base, {upper_dev})", layers.iter().map(|l| format!("{l}, ")).collect::<String>());
    Ok(())
}
