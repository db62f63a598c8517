//! A bounded queue of frames in front of a socket, drained by one writer thread: the agent
//! proxy never blocks on a peer that does not read.
//!
//! Roles: the proxy's guest reader pushes replies into each client's outbox, and every
//! client's thread pushes requests into the guest's. The guest reader's push never waits:
//! when a client's queue holds more than its byte cap, that client is dropped, so one stalled
//! client cannot stall the others. A client's push into the guest's queue waits for room (a
//! guest slower than the host, say during a large copy, is back-pressure: the client's thread
//! stops reading its socket), but only while the guest makes progress: a guest that drains
//! nothing for [`Outbox::push_wait`]'s patience gets the request refused, so a guest that stops
//! reading its agent port cannot wedge the host side.

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
    /// Frames the writer has taken so far (progress, for `push_wait`).
    taken: u64,
}

/// See the module documentation.
pub struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled when the writer has taken a frame (room for [`Outbox::push_wait`]).
    room: Condvar,
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
        let o = Arc::new(Outbox {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            cap,
            sock,
        });
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

    /// Queues `frame`, waiting for room while the writer makes progress: `Err(Full)` once it
    /// has taken nothing for `patience` (or the outbox is closed).
    pub fn push_wait(&self, frame: Vec<u8>, patience: std::time::Duration) -> Result<(), Full> {
        let mut s = lock(&self.state);
        loop {
            if s.closed {
                return Err(Full);
            }
            if s.bytes == 0 || s.bytes + frame.len() <= self.cap {
                s.bytes += frame.len();
                s.frames.push_back(frame);
                self.wake.notify_one();
                return Ok(());
            }
            let before = s.taken;
            let (next, timeout) = self.room.wait_timeout(s, patience).unwrap_or_else(|p| p.into_inner());
            s = next;
            if timeout.timed_out() && s.taken == before {
                return Err(Full);
            }
        }
    }

    /// Stops the writer and shuts the socket down (its reader sees the end).
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_all();
        self.room.notify_all();
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
                s.taken += 1;
                self.room.notify_all();
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

    #[test]
    fn a_slow_peer_is_waited_for_and_a_stalled_one_is_not() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let o = Outbox::start(ours, 256 * 1024).unwrap();
        // A slow reader: 8 MiB through a 256 KiB queue, with waits, and nothing refused.
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while got < 8 << 20 {
                std::thread::sleep(std::time::Duration::from_millis(2));
                got += theirs.read(&mut buf).unwrap();
            }
            theirs
        });
        for _ in 0..128 {
            o.push_wait(vec![0u8; 64 * 1024], std::time::Duration::from_secs(10)).unwrap();
        }
        let theirs = reader.join().unwrap();
        // It stops reading: once the queue is full, a push gives up after its patience.
        let t = std::time::Instant::now();
        let mut refused = false;
        for _ in 0..1000 {
            if o.push_wait(vec![0u8; 64 * 1024], std::time::Duration::from_millis(300)).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused && t.elapsed() < std::time::Duration::from_secs(10), "{:?}", t.elapsed());
        drop(theirs);
    }
}
