//! Flow control (protocol v5): a request's data (an exec's output, a file read) goes to the
//! host only as far as the host has granted. A host whose reader stops reading so stops the
//! process writing, here in the guest, instead of holding its output in memory.
//!
//! Each streaming request has a [`Window`]: it starts at `INITIAL_WINDOW` bytes, a sender
//! reserves what it may send before reading ([`Window::take`]), gives back what it did not use,
//! and the host's `Credit` adds what the host took off its queue. A host older than v5 grants
//! nothing: its windows are unlimited, as every request was before.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use smolvm_protocol::agent::INITIAL_WINDOW;

/// What a sender may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Send at most this many bytes (at least 1).
    Send(usize),
    /// The host takes no more of this request's data (it cancelled, or went away): read and
    /// drop it, so the process does not block on a full pipe.
    Discard,
}

#[derive(Debug)]
struct State {
    credit: u64,
    cancelled: bool,
    /// A sender is blocked in `take` (waiting for the host, not for its process).
    waiting: usize,
}

/// One request's window.
#[derive(Debug)]
pub struct Window {
    state: Mutex<State>,
    granted: Condvar,
}

impl Window {
    /// A window for a host speaking `version`: limited from v5, unlimited before.
    pub fn new(version: u32) -> Arc<Window> {
        let credit = if version >= 5 { u64::from(INITIAL_WINDOW) } else { u64::MAX };
        Arc::new(Window { state: Mutex::new(State { credit, cancelled: false, waiting: 0 }), granted: Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the host has granted something, and reserves up to `want` bytes of it.
    pub fn take(&self, want: usize) -> Grant {
        let mut s = self.lock();
        loop {
            if s.cancelled {
                return Grant::Discard;
            }
            if s.credit > 0 {
                let n = s.credit.min(want as u64);
                s.credit -= n;
                return Grant::Send(n as usize);
            }
            s.waiting += 1;
            s = self.granted.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
    }

    /// Gives back the part of a reservation that was not sent.
    pub fn unused(&self, bytes: usize) {
        self.grant(bytes as u64);
    }

    /// The host's `Credit`.
    pub fn grant(&self, bytes: u64) {
        let mut s = self.lock();
        s.credit = s.credit.saturating_add(bytes);
        self.granted.notify_all();
    }

    /// The host's `Cancel` (or the end of the session): senders discard from now on.
    pub fn cancel(&self) {
        self.lock().cancelled = true;
        self.granted.notify_all();
    }

    /// Whether a sender waits for the host (so a process that exited still has output to go).
    pub fn host_is_behind(&self) -> bool {
        self.lock().waiting > 0
    }
}

/// The windows of a session's running requests, by id.
pub type Windows = Arc<Mutex<HashMap<u32, Arc<Window>>>>;

pub fn lock(w: &Windows) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Window>>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_sender_waits_for_credit_and_two_never_overdraw() {
        let w = Window::new(5);
        let win = INITIAL_WINDOW as usize;
        let mut got = 0;
        while got < win {
            match w.take(64 * 1024) {
                Grant::Send(n) => got += n,
                Grant::Discard => panic!("not cancelled"),
            }
        }
        assert_eq!(got, win, "never more than the window");
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(100));
        std::thread::sleep(Duration::from_millis(50));
        assert!(w.host_is_behind(), "the sender waits for the host");
        w.grant(10);
        assert_eq!(t.join().ok(), Some(Grant::Send(10)), "at most what was granted");
        w.unused(4);
        assert_eq!(w.take(100), Grant::Send(4));
        w.cancel();
        assert_eq!(w.take(100), Grant::Discard);
    }

    #[test]
    fn an_old_host_grants_without_limit() {
        let w = Window::new(4);
        for _ in 0..1000 {
            assert_eq!(w.take(1 << 20), Grant::Send(1 << 20));
        }
    }
}
