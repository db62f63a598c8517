//! What the typed lifecycle must hold when the host does not cooperate: a home whose disk is
//! full, and many commands at once. Real VMs through the `smolvm` binary. `#[ignore]`d for a
//! plain `cargo test`; `scripts/test.sh` runs them (they need root: a tmpfs home).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, release_dir, smolvm};
use smolvm_testkit::http::Server;

/// A home on a tmpfs of its own, so that the test can fill it.
struct SmallHome {
    dir: tempfile::TempDir,
    release: PathBuf,
    server: Server,
}

impl SmallHome {
    fn new(size: &str) -> SmallHome {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs (the test needs root)");
        let release = release_dir();
        SmallHome { server: Server::start(release.parent().unwrap().to_path_buf()).unwrap(), dir, release }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn cmd(&self) -> Command {
        smolvm(self.path(), &self.server.url, &self.release)
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded on a full disk");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{args:?} on a full disk: {err}");
        err
    }
    fn status(&self, name: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(&ok(self.cmd().args(["status", name, "--json"]))).unwrap();
        v["status"].as_str().unwrap().to_string()
    }
    /// Takes all but `leave` bytes of the file system's free space.
    fn fill(&self, leave: u64) -> PathBuf {
        // SAFETY: statvfs writes into the struct we pass; the path is a valid C string.
        let free = unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            let p = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(libc::statvfs(p.as_ptr(), &mut s), 0);
            s.f_bavail * s.f_frsize
        };
        let filler = self.path().join("filler");
        let take = free.saturating_sub(leave);
        ok(Command::new("fallocate").args(["-l", &take.to_string()]).arg(&filler));
        filler
    }
}

impl Drop for SmallHome {
    fn drop(&mut self) {
        common::cleanup(self.path());
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Nothing listed that is half-written: no snapshot, no temporary directory of one.
fn no_partial_snapshot(home: &SmallHome) {
    let listed: serde_json::Value = serde_json::from_str(&ok(home.cmd().args(["snapshot", "list", "--json"]))).unwrap();
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");
    let snaps = home.path().join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with(".tmp")).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temporary snapshot directories left: {left:?}");
}

#[test]
#[ignore = "boots the release under QEMU on a tmpfs home (root): run scripts/test.sh"]
fn a_full_disk_fails_snapshot_pause_and_create_cleanly_and_harms_nothing() {
    let home = SmallHome::new("3g");
    ok(home.cmd().args(["create", "--name", "src"]));
    ok(home.cmd().args(["exec", "src", "--", "sh", "-c", "echo before > /root/kept && sync"]));
    let filler = home.fill(4 << 20);

    let err = home.fails(&["snapshot", "src", "--name", "s1"]);
    assert!(err.to_lowercase().contains("no space") || err.contains("full"), "{err}");
    no_partial_snapshot(&home);
    assert_eq!(home.status("src"), "running", "a failed snapshot lets the guest run on");

    let err = home.fails(&["pause", "src"]);
    assert!(err.to_lowercase().contains("no space"), "{err}");
    assert_eq!(home.status("src"), "running", "a failed pause lets the guest run on");
    let dir = home.path().join("sandboxes/src");
    assert!(!dir.join("paused").exists() && !dir.join(".paused.tmp").exists(), "no half-written pause");

    let err = home.fails(&["create", "--name", "more"]);
    assert!(err.to_lowercase().contains("no space") || err.contains("disk is full"), "{err}");
    assert!(err.contains("hint") && err.contains("is full"), "the hint comes from the error's kind: {err}");
    let listed: serde_json::Value = serde_json::from_str(&ok(home.cmd().args(["list", "--json"]))).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["src"], "a failed create leaves no row");
    assert!(!home.path().join("sandboxes/more").exists(), "a failed create leaves no directory");

    // Space again: the source is unharmed and everything works.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(ok(home.cmd().args(["exec", "src", "--", "cat", "/root/kept"])).trim(), "before");
    ok(home.cmd().args(["snapshot", "src", "--name", "s1"]));
    ok(home.cmd().args(["pause", "src"]));
    ok(home.cmd().args(["resume", "src"]));
    assert_eq!(ok(home.cmd().args(["exec", "src", "--", "cat", "/root/kept"])).trim(), "before");
}
