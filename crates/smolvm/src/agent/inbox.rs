//! The receiving side of the agent client's requests: each request's queue, bounded whatever
//! the guest does, and the v5 flow control that renews the guest's window as the holder takes
//! data (`Credit`) and withdraws it when the holder goes (`Cancel`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smolvm_protocol::agent::{GuestMsg, HostMsg, INITIAL_WINDOW};

use super::{AgentClient, AgentError};

/// A request's queue, as the connection's reader and the request's holder share it: how many
/// data bytes wait in it, and whether the guest sent more than the queue may hold.
#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) bytes: std::sync::atomic::AtomicUsize,
    pub(super) overflowed: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) tx: Sender<GuestMsg>,
    pub(super) queue: Arc<Queue>,
}

pub(super) type Waiters = Arc<Mutex<HashMap<u32, Waiter>>>;

/// The most data a request's queue holds for a guest that does not speak v5 flow control
/// (one older than v5, or one that claims to be): past it the request is ended. A v5 guest
/// may send no more than [`INITIAL_WINDOW`] beyond what was taken; one that does is ended too.
pub(super) const UNCONTROLLED_QUEUE: usize = 64 << 20;

/// The receiving end of one request: takes its messages off the queue, grants the guest that
/// much again (v5 `Credit`, in halves of the window), and on drop tells the guest that an
/// unfinished request's data is no longer wanted (`Cancel`).
#[derive(Debug)]
pub(super) struct Inbox<'a> {
    pub(super) client: &'a AgentClient,
    pub(super) id: u32,
    pub(super) rx: Receiver<GuestMsg>,
    pub(super) queue: Arc<Queue>,
    /// Data taken since the last grant.
    pub(super) taken: std::cell::Cell<usize>,
    /// The request's last message was taken.
    pub(super) ended: std::cell::Cell<bool>,
}

impl Inbox<'_> {
    pub(super) fn took(&self, msg: GuestMsg) -> GuestMsg {
        let n = msg.flow_bytes();
        if n > 0 {
            self.queue.bytes.fetch_sub(n, Ordering::Relaxed);
            let taken = self.taken.get() + n;
            if self.client.version >= 5 && taken >= INITIAL_WINDOW as usize / 2 {
                // A grant that cannot be sent means the connection is gone, which the next
                // receive reports.
                let _ = self.client.send(&HostMsg::Credit { id: self.id, bytes: taken as u32 });
                self.taken.set(0);
            } else {
                self.taken.set(taken);
            }
        }
        if msg.ends_request() {
            self.ended.set(true);
        }
        msg
    }

    /// The next message; `None` once the request's messages ended without its last one (the
    /// connection closed, or the guest overran the queue: [`Inbox::gone`] says which).
    pub(super) fn recv(&self) -> Option<GuestMsg> {
        self.rx.recv().ok().map(|m| self.took(m))
    }

    pub(super) fn recv_timeout(&self, t: Duration) -> Result<GuestMsg, mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(t).map(|m| self.took(m))
    }

    pub(super) fn try_recv(&self) -> Option<GuestMsg> {
        self.rx.try_recv().ok().map(|m| self.took(m))
    }

    /// Why no more messages come.
    pub(super) fn gone(&self, what: &str) -> AgentError {
        if self.queue.overflowed.load(Ordering::Relaxed) {
            let limit = if self.client.version >= 5 { INITIAL_WINDOW as usize } else { UNCONTROLLED_QUEUE };
            self.client.lost(format!(
                "the guest sent more than {limit} bytes of data that had not been taken: {what} was ended"
            ))
        } else {
            self.client.lost(format!("the connection closed before {what}"))
        }
    }
}

impl Drop for Inbox<'_> {
    fn drop(&mut self) {
        lock(&self.client.waiters).remove(&self.id);
        if !self.ended.get() && self.client.version >= 5 && !self.client.is_closed() {
            let _ = self.client.send(&HostMsg::Cancel { id: self.id });
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
