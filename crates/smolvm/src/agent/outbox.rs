//! A bounded queue of frames in front of a socket, drained by one writer thread: the agent
//! proxy never blocks on a peer that does not read.
//!
//! Roles: the proxy's guest reader pushes replies into each client's outbox, and every
//! client's thread pushes requests into the guest's. A push never waits: when the queue holds
//! more than its byte cap, the push fails and the caller decides (a client that does not read
//! its output is dropped; a request to a guest that does not read its port is answered with an
//! error). So one stalled client cannot stall the others, and a guest that stops reading its
//! agent port cannot wedge the host side.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

/// The queue is full (or closed): the frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
struct State {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

/// See the module documentation.
pub struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
    cap: usize,
    /// The socket, for shutting it down when the outbox is closed.
    sock: UnixStream,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox {
    /// An outbox of at most `cap` queued bytes in front of `sock`, and its writer thread.
    pub fn start(sock: UnixStream, cap: usize) -> std::io::Result<Arc<Outbox>> {
        let writer = sock.try_clone()?;
        let o = Arc::new(Outbox { state: Mutex::new(State::default()), wake: Condvar::new(), cap, sock });
        let me = o.clone();
        std::thread::spawn(move || me.drain(writer));
        Ok(o)
    }

    /// Queues `frame` without waiting. A frame is always taken into an empty queue (so a
    /// frame larger than the cap still goes through).
    pub fn push(&self, frame: Vec<u8>) -> Result<(), Full> {
        let mut s = lock(&self.state);
        if s.closed || (s.bytes > 0 && s.bytes + frame.len() > self.cap) {
            return Err(Full);
        }
        s.bytes += frame.len();
        s.frames.push_back(frame);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops the writer and shuts the socket down (its reader sees the end).
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_all();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    fn drain(&self, mut out: UnixStream) {
        loop {
            let frame = {
                let mut s = lock(&self.state);
                while s.frames.is_empty() && !s.closed {
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                if s.closed {
                    return;
                }
                let f = s.frames.pop_front().unwrap_or_default();
                s.bytes -= f.len();
                f
            };
            if out.write_all(&frame).is_err() {
                self.close();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_peer_that_does_not_read_fills_the_queue_and_nothing_blocks() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let o = Outbox::start(ours, 1 << 20).unwrap();
        // The socket buffer takes some, the queue 1 MiB, then pushes fail at once.
        let t = std::time::Instant::now();
        let mut queued = 0usize;
        while o.push(vec![0u8; 64 * 1024]).is_ok() {
            queued += 1;
            assert!(queued < 1000, "never full");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // Once the peer reads, it gets everything queued, in order and whole.
        let mut got = vec![0u8; 64 * 1024];
        theirs.read_exact(&mut got).unwrap();
        o.close();
        assert!(o.is_closed() && o.push(vec![1]).is_err());
    }
}
