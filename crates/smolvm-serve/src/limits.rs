//! What one sandbox's callers may hold on the server at once: running processes started
//! through the API, watches, and followers of one process. Each is a thread or a queue on the
//! server, so an API caller (one token reaches one sandbox) must not make them without end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Processes started through the API that are still running, per sandbox.
pub const MAX_PROCESSES: usize = 256;
/// Watches (streamed and polled), per sandbox.
pub const MAX_WATCHES: usize = 64;
/// Streams following one process (the one that started it and each `Connect`).
pub const MAX_FOLLOWERS: usize = 16;

/// A counter with a ceiling; [`Slots::take`] hands out a [`Slot`] that gives its place back
/// when dropped, so an early return or a panic cannot leak one.
#[derive(Debug, Default)]
pub struct Slots {
    used: Arc<AtomicUsize>,
}

#[derive(Debug)]
pub struct Slot {
    used: Arc<AtomicUsize>,
}

impl Slots {
    /// A place, or `None` with `max` already taken.
    pub fn take(&self, max: usize) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot { used: self.used.clone() })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a sandbox's connection counts.
#[derive(Debug, Default)]
pub struct Limits {
    pub processes: Slots,
    pub watches: Slots,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_stop_at_the_ceiling_and_come_back_when_dropped() {
        let s = Slots::default();
        let held: Vec<_> = (0..3).map(|_| s.take(3).unwrap()).collect();
        assert!(s.take(3).is_none());
        drop(held);
        assert_eq!(s.used(), 0);
        assert!(s.take(3).is_some());
    }
}
