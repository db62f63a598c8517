//! Child exit statuses, shared between PID 1's reaping loop and the agent.
//!
//! PID 1 must reap every child (orphans included), so only the supervisor calls `waitpid(-1)`.
//! The agent, which needs the exit status of the processes it starts, registers each pid here
//! *while holding the registry lock across the spawn*: the supervisor dispatches a status under
//! the same lock, so a child that exits at once is never reaped before it is registered.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};

static WAITERS: Mutex<Option<HashMap<i32, SyncSender<i32>>>> = Mutex::new(None);

/// The registry, locked. Spawn, then [`Registry::register`], before dropping it.
pub struct Registry(MutexGuard<'static, Option<HashMap<i32, SyncSender<i32>>>>);

pub fn lock() -> Registry {
    Registry(WAITERS.lock().unwrap_or_else(|p| p.into_inner()))
}

impl Registry {
    /// Returns a receiver of `pid`'s raw wait status.
    pub fn register(&mut self, pid: i32) -> Receiver<i32> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.0.get_or_insert_with(HashMap::new).insert(pid, tx);
        rx
    }
}

/// Called by the supervisor for each reaped child.
pub fn exited(pid: i32, status: i32) {
    let mut reg = lock();
    if let Some(tx) = reg.0.as_mut().and_then(|m| m.remove(&pid)) {
        let _ = tx.send(status);
    }
}
