//! Pseudo-filesystems at boot; unmounting at shutdown.

use std::ffi::CString;
use std::io;

use crate::log;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// What a normal Linux userland expects. `/dev` comes first: the kernel mounts devtmpfs itself
/// only when `CONFIG_DEVTMPFS_MOUNT` is set, which a foreign kernel may lack.
const MOUNTS: &[Mount] = &[
    Mount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: libc::MS_NOSUID, data: "mode=0755" },
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: "" },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("a NUL byte in {s:?}")))
}

fn mount(m: &Mount) -> io::Result<()> {
    if let Err(e) = std::fs::create_dir_all(m.target) {
        // A read-only root still has the directories the image was built with.
        log::info!("cannot create {}: {e}", m.target);
    }
    let (src, tgt, fs, data) = (cstr(m.source)?, cstr(m.target)?, cstr(m.fstype)?, cstr(m.data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), m.flags, data.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts [`MOUNTS`]. Failures are logged, never fatal: PID 1 must not die.
pub fn mount_pseudo_filesystems() {
    for m in MOUNTS {
        match mount(m) {
            Ok(()) => {}
            // devtmpfs already mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log::error!("mount {} on {}: {e}", m.fstype, m.target),
        }
    }
    // /dev/ptmx must point at the devpts instance for ptys to work inside the guest.
    if std::fs::symlink_metadata("/dev/ptmx").map(|m| !m.file_type().is_symlink()).unwrap_or(true) {
        let _ = std::fs::remove_file("/dev/ptmx");
        if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
            log::error!("cannot link /dev/ptmx: {e}");
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
}

/// Unmounts everything but `/` in reverse mount order, then remounts `/` read-only, so that the
/// sandbox's disk is clean when the VM powers off.
pub fn unmount_all() {
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let targets: Vec<String> =
        table.lines().filter_map(|l| l.split_whitespace().nth(1)).map(|t| t.replace("\\040", " ")).collect();
    for target in targets.iter().rev().filter(|t| t.as_str() != "/") {
        let Ok(t) = cstr(target) else {
            log::info!("umount {target:?}: a NUL byte in the path");
            continue;
        };
        // SAFETY: `t` is a valid NUL-terminated path.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                log::info!("umount {target}: {e}");
            }
        }
    }
    let root = c"/";
    // SAFETY: valid NUL-terminated strings; NULL fstype and data are allowed with MS_REMOUNT.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        log::error!("remount / read-only: {}", io::Error::last_os_error());
    }
}
