//! What a boot started, ended again unless the boot completes: the network process, the
//! agent proxy and the VM are recorded here as each starts, and every early return of the
//! boot (there are a dozen ways to fail between the first spawn and the guest's readiness)
//! kills them by dropping the guard. Firecracker's builder and crosvm's `TestVm` keep the same
//! rule: whoever starts a process owns its end until it hands it over.

use crate::vm::process;

/// The processes a boot has started so far.
#[derive(Debug, Default)]
pub(super) struct Launched {
    started: Vec<(&'static str, i32)>,
    committed: bool,
}

impl Launched {
    /// Records `pid` (our child, so that its pid cannot be reused before we reap or kill it).
    pub(super) fn started(&mut self, what: &'static str, pid: i32) {
        self.started.push((what, pid));
    }

    /// The boot completed: what it started is the sandbox's now.
    pub(super) fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The VM first: the helpers end by themselves once its ends of their sockets close,
        // but not leaving that to chance keeps a failed boot's processes from outliving it.
        for (what, pid) in self.started.iter().rev() {
            tracing::debug!("the boot failed: its {what} (pid {pid}) is ended");
            let _ = process::signal(*pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_failed_boot_started_is_killed_and_a_committed_one_is_kept() {
        let mut kept = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let mut killed = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        {
            let mut l = Launched::default();
            l.started("VM", killed.id() as i32);
        }
        let mut l = Launched::default();
        l.started("VM", kept.id() as i32);
        l.commit();
        let status = killed.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert!(kept.try_wait().unwrap().is_none(), "a committed boot's VM runs on");
        kept.kill().unwrap();
        kept.wait().unwrap();
    }
}
