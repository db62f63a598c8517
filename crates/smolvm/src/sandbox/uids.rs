//! Host-wide uid leases: a sandbox's processes run as a uid of their own, and "their own"
//! must hold across every home on the host, not just within one database. Two homes (two
//! users of the library, parallel tests, a server and the CLI with different homes) would
//! otherwise give their first sandboxes the same uid, and one QEMU could reach the other's
//! processes through `/proc`.
//!
//! A uid is in use while any process runs as it (read from `/proc`, the truth whoever
//! started it), or while a lease on it is fresh: the lease covers the moment between choosing
//! a uid and starting the processes. Leases are files `<uid>` in a root-owned directory
//! (`Config::uid_leases`), chosen under a lock there; a lease is fresh while its taker runs and
//! for [`LEASE_FRESH`] at most. A uid that still has processes is never handed out.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use crate::config::VmUsers;

/// How long a lease keeps a uid without a process running as it.
pub const LEASE_FRESH: Duration = Duration::from_secs(120);

/// Which slot of `users` the sandbox `holder` (its home's database and name) may use: `want`
/// if no process runs as its uid (but its own last ones, `own`: a QEMU still quitting after a
/// pause) and no fresh lease of another holds it, else the lowest such slot that `taken`
/// (other sandboxes of this home) does not name. `None`: every slot is busy.
/// Must run under [`locked`], together with recording the slot chosen: the choice and the
/// record are one step for every process on the host (20 creates at once through the server
/// and the CLI found them apart: one process recorded a slot another had just been given).
pub fn lease(
    dir: &Path,
    users: &VmUsers,
    want: u32,
    own: &[i32],
    taken: impl Fn(u32) -> bool,
    holder: &str,
) -> std::io::Result<Option<u32>> {
    let busy = uids_with_processes(own);
    let candidates = std::iter::once(want).chain((0..users.count).filter(|s| *s != want && !taken(*s)));
    for slot in candidates {
        let Some(id) = users.identity(slot) else { continue };
        if busy.contains(&id.uid) {
            continue;
        }
        let path = dir.join(id.uid.to_string());
        if let Some(other) = fresh_holder(&path) {
            if other != holder {
                continue;
            }
        }
        let tmp = dir.join(format!(".{}.tmp", id.uid));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        writeln!(f, "{}\n{holder}", std::process::id())?;
        std::fs::rename(&tmp, &path)?;
        return Ok(Some(slot));
    }
    Ok(None)
}

/// Runs `f` holding the host-wide lock of the leases in `dir` (made if missing).
pub fn locked<T>(dir: &Path, f: impl FnOnce() -> T) -> std::io::Result<T> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let _lock = crate::lock::FileLock::exclusive(&dir.join(".lock"))?;
    Ok(f())
}

/// Gives up `uid`'s lease if `holder` holds it (a deleted sandbox): the uid is free at once
/// rather than after [`LEASE_FRESH`] (a long-lived holder, `smolvm serve`, keeps leases fresh).
pub fn release(dir: &Path, uid: u32, holder: &str) -> std::io::Result<()> {
    locked(dir, || {
        let path = dir.join(uid.to_string());
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.split_once('\n').is_some_and(|(_, h)| h.trim() == holder) {
            let _ = std::fs::remove_file(&path);
        }
    })
}

/// The holder of the lease at `path`, if it is fresh: its taker still runs and it is recent.
fn fresh_holder(path: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let age = meta.modified().ok()?.elapsed().unwrap_or_default();
    let text = std::fs::read_to_string(path).ok()?;
    let (pid, holder) = text.split_once('\n')?;
    let alive = pid.trim().parse::<i32>().is_ok_and(|p| crate::vm::process::is_alive(p, None));
    (alive && age < LEASE_FRESH).then(|| holder.trim().to_string())
}

/// Every uid (real, effective, saved or file system) that a process on this host runs as,
/// the processes `except` left out.
pub fn uids_with_processes(except: &[i32]) -> std::collections::HashSet<u32> {
    let mut uids = std::collections::HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return uids };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if except.contains(&pid) {
            continue;
        }
        // `/proc/PID/status` (not the directory's owner: a non-dumpable process's is root's).
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            uids.extend(line.split_whitespace().skip(1).filter_map(|u| u.parse::<u32>().ok()));
        }
    }
    uids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(base: u32) -> VmUsers {
        VmUsers { uid_base: base, gid_base: base, count: 4, images_gid: 0 }
    }

    #[test]
    fn two_homes_never_share_a_uid_and_a_uid_with_processes_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        // A range whose first uid is this test's own (it has processes: this one).
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let u = users(me);
        let a = lease(dir.path(), &u, 0, &[], |_| false, "home-a/box").unwrap();
        assert_eq!(a, Some(1), "slot 0 is this process's uid");
        let b = lease(dir.path(), &u, 1, &[], |_| false, "home-b/box").unwrap();
        assert_eq!(b, Some(2), "another home's first sandbox gets another uid");
        // The same holder again (a restart): its own lease is no obstacle.
        assert_eq!(lease(dir.path(), &u, 1, &[], |_| false, "home-a/box").unwrap(), Some(1));
        // Slots this home's other sandboxes hold are skipped too.
        assert_eq!(lease(dir.path(), &u, 1, &[], |s| s == 3, "home-c/box").unwrap(), None);
    }

    #[test]
    fn a_stale_lease_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let u = users(4_000_000_000);
        // A lease whose taker is gone (no such pid).
        std::fs::write(dir.path().join("4000000000"), "2147483646\nhome-x/gone\n").unwrap();
        assert_eq!(lease(dir.path(), &u, 0, &[], |_| false, "home-y/new").unwrap(), Some(0));
    }

    #[test]
    fn a_lease_is_released_by_its_holder_only() {
        let dir = tempfile::tempdir().unwrap();
        let u = users(4_000_000_100);
        assert_eq!(lease(dir.path(), &u, 0, &[], |_| false, "home-a/box").unwrap(), Some(0));
        let file = dir.path().join("4000000100");
        release(dir.path(), 4_000_000_100, "home-b/box").unwrap();
        assert!(file.exists(), "another holder's release leaves it");
        // Fresh (this process runs): another holder would not get it now.
        assert_eq!(lease(dir.path(), &u, 0, &[], |_| false, "home-b/box").unwrap(), Some(1));
        release(dir.path(), 4_000_000_100, "home-a/box").unwrap();
        assert!(!file.exists());
        assert_eq!(lease(dir.path(), &u, 0, &[], |_| false, "home-c/box").unwrap(), Some(0), "free at once");
    }
}
