//! What opening a home does first: every row brought to the truth of its processes and files.
//!
//! - A row recorded running under another boot of the host (its `host_boot`) has no VM: the
//!   host restarted under it. It is recorded stopped (its disk is what the guest had synced;
//!   `start` boots it), and nothing of that boot is trusted: not its pid, not its sockets.
//!   Under the same boot a running row whose VM is gone stays running and shows as crashed:
//!   that is news the user should see (`status`, `list`).
//! - A row that is not running but names a VM (a create, start or resume killed before it
//!   recorded the sandbox running) has that VM ended: it was never the row's truth.
//! - What a killed capture or pause left (its marker, a half-written `paused/`) is settled by
//!   the same code as before any command (`Smolvm::settle`), for sandboxes nobody holds.

use super::pause::PAUSED_TMP;
use super::snapshots::CAPTURING;
use super::Smolvm;
use crate::state::SandboxState;

impl Smolvm {
    /// Brings every row to the truth (see the module's text). Never fails the open: a row it
    /// cannot fix now is left for the next open, and said in the log.
    pub(super) fn reconcile(&self) {
        let Ok(rows) = self.db().list() else { return };
        let this_boot = crate::vm::process::host_boot_id();
        for mut row in rows {
            let name = row.name.clone();
            let Ok(Some(_lock)) = crate::lock::FileLock::try_exclusive(&self.lock_path(&name)) else { continue };
            let other_boot = row.host_boot.is_some() && this_boot.is_some() && row.host_boot != this_boot;
            if row.state == SandboxState::Running && other_boot {
                tracing::info!("{name}: the host restarted since its VM started; it is stopped (start boots it)");
                row.state = SandboxState::Stopped;
                row.pid = None;
                row.pid_start = None;
                row.ssh_port = None;
                if let Err(e) = self.db().update(&row) {
                    tracing::warn!("{name}: could not record it stopped: {e}");
                    continue;
                }
                let dir = self.dir(&name);
                let _ = std::fs::remove_file(dir.join(CAPTURING));
                let _ = std::fs::remove_file(dir.join("ssh.ctl"));
            }
            // A VM no command owns: a create, start or resume killed before it recorded the
            // sandbox running leaves one (it never became this row's truth, and a second
            // boot on the same disk must not meet it). Under the lock no boot is under way.
            // Its helpers too: a start killed after the network process began and before the
            // VM did leaves only that (each recorded pid is checked to be ours before a kill).
            let dir = self.dir(&name);
            if row.state != SandboxState::Running {
                self.kill_vm(&name, &row);
                if row.pid.is_some() {
                    tracing::info!("{name}: a VM its killed boot left is ended; it stays {}", row.state.as_str());
                    row.pid = None;
                    row.pid_start = None;
                    row.ssh_port = None;
                    let _ = self.db().update(&row);
                }
                let _ = std::fs::remove_file(crate::paths::vm_pid_file(&dir));
            }
            // A half-written pause whose writer is gone (we hold the lock it held).
            let _ = std::fs::remove_dir_all(self.dir(&name).join(PAUSED_TMP));
            self.settle_locked(&name);
        }
    }
}
