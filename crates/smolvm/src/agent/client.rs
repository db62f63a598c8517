//! A client of the agent proxy: execs (collected or streamed), file writes and reads, stat.
//! One client carries any number of concurrent requests; it is `Sync`, so threads may share it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smolvm_protocol::agent::{encode, read_frame, GuestMsg, HostMsg, CHUNK, INITIAL_WINDOW, PROTOCOL_VERSION};
pub use smolvm_protocol::agent::{Command, ExecRequest, ExitStatus, FileStat, PtySize, WriteFile};
use smolvm_protocol::ready::Ready;

#[path = "inbox.rs"]
mod inbox;
use inbox::{lock, Inbox, Queue, Waiter, Waiters, UNCONTROLLED_QUEUE};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent of sandbox {sandbox}: {source}")]
    Connect { sandbox: String, source: std::io::Error },
    #[error("lost the agent connection of sandbox {sandbox}: {reason}")]
    Lost { sandbox: String, reason: String },
    /// The guest refused or failed the request; `errno` is the guest's (protocol v6).
    #[error("sandbox {sandbox}: {message}")]
    Guest { sandbox: String, message: String, errno: Option<i32> },
    /// The sandbox is not in a state to answer (not found, paused, stopped).
    #[error(transparent)]
    Sandbox(Box<crate::sandbox::SandboxError>),
    #[error("sandbox {sandbox}: its guest speaks agent protocol v{guest}, and {message} needs v{needs}")]
    Unsupported { sandbox: String, message: &'static str, needs: u32, guest: u32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How long a request that expects one answer waits for it by default: a guest that never
/// answers must not hold the caller's thread (a server's, say) for ever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to a sandbox's agent.
#[derive(Debug)]
pub struct AgentClient {
    sandbox: String,
    out: Mutex<UnixStream>,
    waiters: Waiters,
    next_id: AtomicU32,
    /// Set when the connection ended (the sandbox stopped, its proxy went away).
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The guest's readiness facts from its Hello.
    pub ready: Ready,
    pub version: u32,
}

impl AgentClient {
    /// Connects to the agent proxy of the sandbox whose directory is `dir` (its socket in
    /// `run/`, served by the pid its `agent-proxy.pid` names) and exchanges Hello.
    pub fn connect_sandbox(sandbox: &str, dir: &Path) -> Result<AgentClient, AgentError> {
        let pid = crate::child::recorded_pid(dir, "agent-proxy").ok_or_else(|| AgentError::Connect {
            sandbox: sandbox.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no agent-proxy.pid: its agent proxy is not running",
            ),
        })?;
        AgentClient::connect(sandbox, &super::client_socket(dir), pid)
    }

    /// Connects to `socket`, which the proxy of pid `proxy` serves (checked before a byte is
    /// sent), and exchanges Hello.
    pub fn connect(sandbox: &str, socket: &Path, proxy: i32) -> Result<AgentClient, AgentError> {
        AgentClient::connect_speaking(sandbox, socket, proxy, PROTOCOL_VERSION)
    }

    /// As [`AgentClient::connect_sandbox`], offering at most protocol `version`: for
    /// smolvm-bench, which measures what a newer version costs against an older one in the
    /// same run (v5's flow control against v4).
    #[doc(hidden)]
    pub fn connect_sandbox_speaking(sandbox: &str, dir: &Path, version: u32) -> Result<AgentClient, AgentError> {
        let pid = crate::child::recorded_pid(dir, "agent-proxy").ok_or_else(|| AgentError::Connect {
            sandbox: sandbox.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no agent-proxy.pid"),
        })?;
        AgentClient::connect_speaking(sandbox, &super::client_socket(dir), pid, version)
    }

    fn connect_speaking(sandbox: &str, socket: &Path, proxy: i32, version: u32) -> Result<AgentClient, AgentError> {
        let connect_err = |source| AgentError::Connect { sandbox: sandbox.to_string(), source };
        let mut stream = crate::child::connect_served_by(socket, proxy, "agent proxy").map_err(connect_err)?;
        stream.write_all(&encode(&HostMsg::Hello { version })).map_err(connect_err)?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(connect_err)?;
        let reply = read_frame::<GuestMsg>(&mut stream);
        let (version, ready) = match reply.as_ref().ok().and_then(|m| m.as_ref()).and_then(GuestMsg::as_hello) {
            Some(Ok((v, ready))) => (v.min(PROTOCOL_VERSION), ready),
            Some(Err(e)) => {
                return Err(AgentError::Lost {
                    sandbox: sandbox.into(),
                    reason: format!("the agent's Hello has unreadable readiness facts: {e}"),
                })
            }
            None => {
                return Err(AgentError::Lost {
                    sandbox: sandbox.into(),
                    reason: format!("no Hello from the agent ({reply:?})"),
                })
            }
        };
        stream.set_read_timeout(None).map_err(connect_err)?;
        let waiters: Waiters = Arc::default();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut input = stream.try_clone().map_err(connect_err)?;
        let w = waiters.clone();
        let c = closed.clone();
        let limit = if version >= 5 { INITIAL_WINDOW as usize } else { UNCONTROLLED_QUEUE };
        std::thread::spawn(move || {
            while let Ok(Some(mut msg)) = read_frame::<GuestMsg>(&mut input) {
                let ends = msg.ends_request();
                let Some(id) = msg.id_mut().copied() else { continue };
                let mut waiters = lock(&w);
                let Some(waiter) = waiters.get(&id) else { continue };
                // The queue is bounded whatever the guest does: one that sends past it has
                // its request ended (the holder learns why), and the rest of it is dropped.
                let n = msg.flow_bytes();
                if n > 0 && waiter.queue.bytes.fetch_add(n, Ordering::Relaxed) + n > limit {
                    waiter.queue.overflowed.store(true, Ordering::Relaxed);
                    waiters.remove(&id);
                    continue;
                }
                let _ = waiter.tx.send(msg);
                if ends {
                    waiters.remove(&id);
                }
            }
            // Dropping every sender tells each waiting request that the connection is gone.
            c.store(true, Ordering::Relaxed);
            lock(&w).clear();
        });
        Ok(AgentClient {
            sandbox: sandbox.to_string(),
            out: Mutex::new(stream),
            waiters,
            next_id: AtomicU32::new(1),
            closed,
            ready,
            version,
        })
    }

    /// The protocol version agreed with the guest.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Whether the connection has ended: a client that holds one for long (a server) makes a
    /// new one then.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn lost(&self, reason: impl Into<String>) -> AgentError {
        AgentError::Lost { sandbox: self.sandbox.clone(), reason: reason.into() }
    }

    /// Sends `msg` if the guest knows it (its protocol version is checked first).
    fn send(&self, msg: &HostMsg) -> Result<(), AgentError> {
        if msg.since() > self.version {
            return Err(AgentError::Unsupported {
                sandbox: self.sandbox.clone(),
                message: msg.kind(),
                needs: msg.since(),
                guest: self.version,
            });
        }
        lock(&self.out).write_all(&encode(msg)).map_err(|e| self.lost(e.to_string()))
    }

    /// Opens a request: registers its id before sending, so no reply is missed.
    fn open(&self, make: impl FnOnce(u32) -> HostMsg) -> Result<(u32, Inbox<'_>), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(Queue::default());
        lock(&self.waiters).insert(id, Waiter { tx, queue: queue.clone() });
        if let Err(e) = self.send(&make(id)) {
            lock(&self.waiters).remove(&id);
            return Err(e);
        }
        Ok((
            id,
            Inbox { client: self, id, rx, queue, taken: std::cell::Cell::new(0), ended: std::cell::Cell::new(false) },
        ))
    }

    /// A round trip to the guest agent (v2): it answers, so commands can run.
    pub fn ping(&self) -> Result<(), AgentError> {
        let (_, rx) = self.open(|id| HostMsg::Ping { id })?;
        match self.reply(&rx)? {
            GuestMsg::Done { .. } => Ok(()),
            other => Err(self.lost(format!("unexpected answer to Ping: {other:?}"))),
        }
    }

    /// Starts a process; events arrive on the returned handle.
    pub fn exec(&self, request: ExecRequest) -> Result<ExecHandle<'_>, AgentError> {
        let (id, rx) = self.open(|id| HostMsg::Exec { id, request })?;
        Ok(ExecHandle { client: self, id, rx })
    }

    /// Runs a command to completion, collecting its output.
    pub fn exec_output(&self, request: ExecRequest, stdin: Option<&[u8]>) -> Result<ExecOutput, AgentError> {
        let h = self.exec(request)?;
        if let Some(data) = stdin {
            for c in data.chunks(CHUNK) {
                h.write_stdin(c)?;
            }
            h.close_stdin()?;
        }
        h.collect()
    }

    /// Writes a file atomically (a temporary file renamed into place), with mode and owner.
    pub fn write_file(&self, path: &str, data: &mut dyn Read, mode: u32, uid: u32, gid: u32) -> Result<(), AgentError> {
        let file = WriteFile { path: path.to_string(), mode, uid, gid };
        let (id, rx) = self.open(|id| HostMsg::WriteFile { id, file })?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = data.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.send(&HostMsg::FileData { id, data: buf[..n].to_vec() })?;
            // An early error (no such directory) ends the request: stop sending.
            if let Some(e) = rx.try_recv().and_then(|m| self.failure(&m)) {
                return Err(e);
            }
        }
        self.send(&HostMsg::FileEnd { id })?;
        match self.reply(&rx)? {
            GuestMsg::Done { .. } => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// Reads a file into `sink`; returns its metadata.
    pub fn read_file(&self, path: &str, sink: &mut dyn Write) -> Result<FileStat, AgentError> {
        let (_, rx) = self.open(|id| HostMsg::ReadFile { id, path: path.to_string() })?;
        loop {
            match self.reply(&rx)? {
                GuestMsg::FileData { data, .. } => sink.write_all(&data)?,
                GuestMsg::FileEnd { stat, .. } => return Ok(stat),
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Metadata of a guest path, `None` if it does not exist.
    pub fn stat(&self, path: &str) -> Result<Option<FileStat>, AgentError> {
        let (_, rx) = self.open(|id| HostMsg::Stat { id, path: path.to_string() })?;
        match self.reply(&rx)? {
            GuestMsg::StatResult { stat, .. } => Ok(stat),
            other => Err(self.unexpected(other)),
        }
    }

    /// Sets the sandbox's variables (for later execs and login shells).
    pub fn set_env(&self, vars: Vec<(String, String)>) -> Result<(), AgentError> {
        let (_, rx) = self.open(|id| HostMsg::SetEnv { id, vars })?;
        match self.reply(&rx)? {
            GuestMsg::Done { .. } => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// After a restore (v3): reseeds the guest's random state, steps its clock, and gives a
    /// clone its identity (see `smolvm-init`'s `refresh`). Returns what the guest did.
    pub fn refresh(
        &self,
        r: &smolvm_protocol::agent::Refresh,
    ) -> Result<smolvm_protocol::agent::Refreshed, AgentError> {
        let json = serde_json::to_string(r).map_err(|e| self.lost(e.to_string()))?;
        let (_, rx) = self.open(|id| HostMsg::Refresh { id, json })?;
        match self.reply(&rx)? {
            GuestMsg::Refreshed { json, .. } => {
                serde_json::from_str(&json).map_err(|e| self.lost(format!("an unreadable Refreshed: {e}")))
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Waits until the guest's sshd accepts connections (readiness does not wait for it).
    /// A guest older than v3 waited for sshd before it was ready: nothing to wait for.
    pub fn wait_ssh(&self, timeout: Duration) -> Result<(), AgentError> {
        if self.version < 3 {
            return Ok(());
        }
        let (_, rx) = self.open(|id| HostMsg::WaitSsh { id, timeout_ms: timeout.as_millis() as u64 })?;
        match self.reply_within(&rx, timeout + REPLY_TIMEOUT)? {
            GuestMsg::Done { .. } => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// The next reply to a request, within [`REPLY_TIMEOUT`]: the guest's `Error`, a closed
    /// connection and silence become errors.
    fn reply(&self, rx: &Inbox<'_>) -> Result<GuestMsg, AgentError> {
        self.reply_within(rx, REPLY_TIMEOUT)
    }

    fn reply_within(&self, rx: &Inbox<'_>, timeout: Duration) -> Result<GuestMsg, AgentError> {
        match rx.recv_timeout(timeout) {
            Ok(msg) => self.failure(&msg).map_or(Ok(msg), Err),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(self.lost(format!("the guest did not answer within {}s", timeout.as_secs())))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(rx.gone("the guest answered")),
        }
    }

    /// The guest's failure (`Error`, or v6 `Failed` with its errno) as an error; `None` for
    /// any other message.
    fn failure(&self, msg: &GuestMsg) -> Option<AgentError> {
        msg.as_failure().map(|(message, errno)| AgentError::Guest {
            sandbox: self.sandbox.clone(),
            message: message.to_string(),
            errno,
        })
    }

    fn unexpected(&self, msg: GuestMsg) -> AgentError {
        self.lost(format!("unexpected reply {msg:?}"))
    }

    /// The input side of a running exec by its request id ([`ExecHandle::id`]), for a caller
    /// that feeds or signals it from elsewhere than the thread holding the handle.
    pub fn exec_input(&self, id: u32) -> ExecInput<'_> {
        ExecInput { client: self, id }
    }

    /// A file system operation (v4): lstat, list, mkdir -p, move, remove.
    pub fn fs(&self, req: &smolvm_protocol::agent::FsRequest) -> Result<smolvm_protocol::agent::FsReply, AgentError> {
        let json = serde_json::to_string(req).map_err(|e| self.lost(e.to_string()))?;
        let (_, rx) = self.open(|id| HostMsg::Fs { id, json })?;
        // A deep listing or a large removal may take a while on a slow disk.
        match self.reply_within(&rx, 5 * REPLY_TIMEOUT)? {
            GuestMsg::FsResult { json, .. } => {
                serde_json::from_str(&json).map_err(|e| self.lost(format!("an unreadable FsResult: {e}")))
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Watches a directory (v4); changes arrive on the handle until it is cancelled.
    pub fn watch(&self, path: &str, recursive: bool) -> Result<WatchHandle<'_>, AgentError> {
        let req = smolvm_protocol::agent::WatchRequest { path: path.to_string(), recursive };
        let json = serde_json::to_string(&req).map_err(|e| self.lost(e.to_string()))?;
        let (id, rx) = self.open(|id| HostMsg::Watch { id, json })?;
        Ok(WatchHandle { client: self, id, rx, cancelled: false })
    }

    /// Asks the guest to power off cleanly.
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.send(&HostMsg::Shutdown)
    }
}

/// What an exec produces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit { status: ExitStatus, timed_out: bool },
}

/// How much of an exec's output a collecting call keeps by default (stdout and stderr
/// together); a process that writes more is killed and its output marked truncated.
pub const DEFAULT_OUTPUT_CAP: usize = 64 << 20;

/// How long past an exec's own timeout the host waits for the guest to end it before ending
/// the call itself.
pub const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// A collected exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    pub timed_out: bool,
    /// The output passed the cap: what is here is its beginning, and the process was killed.
    pub truncated: bool,
}

impl ExecOutput {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn code(&self) -> i32 {
        match self.status {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// A running exec.
#[derive(Debug)]
pub struct ExecHandle<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: Inbox<'a>,
}

/// The input side of a running exec (stdin, signals); it can be moved to another thread.
#[derive(Debug, Clone, Copy)]
pub struct ExecInput<'a> {
    client: &'a AgentClient,
    id: u32,
}

impl ExecInput<'_> {
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.client.send(&HostMsg::Stdin { id: self.id, data: data.to_vec() })
    }

    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.client.send(&HostMsg::StdinClose { id: self.id })
    }

    /// Sends a signal to the process group (e.g. SIGINT for Ctrl-C).
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.client.send(&HostMsg::Signal { id: self.id, signal })
    }
}

/// A running directory watch; dropping it cancels the watch.
#[derive(Debug)]
pub struct WatchHandle<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: Inbox<'a>,
    cancelled: bool,
}

impl WatchHandle<'_> {
    /// The next batch of changes, `Ok(None)` after `timeout` with none, or an error once the
    /// watch ended (its directory removed, the connection lost, cancelled).
    pub fn next_timeout(&self, timeout: Duration) -> Result<Option<Vec<smolvm_protocol::agent::FsEvent>>, AgentError> {
        match self.rx.recv_timeout(timeout) {
            Ok(GuestMsg::FsEvents { json, .. }) => {
                serde_json::from_str(&json).map(Some).map_err(|e| self.client.lost(format!("unreadable FsEvents: {e}")))
            }
            Ok(GuestMsg::Done { .. }) => Err(self.client.lost("the watch ended")),
            Ok(other) => Err(self.client.failure(&other).unwrap_or_else(|| self.client.unexpected(other))),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.rx.gone("the watch ended")),
        }
    }

    /// Ends the watch.
    pub fn cancel(&mut self) {
        if !self.cancelled {
            self.cancelled = true;
            let _ = self.client.send(&HostMsg::Cancel { id: self.id });
        }
    }
}

impl Drop for WatchHandle<'_> {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl ExecHandle<'_> {
    /// The request id of this exec (for [`AgentClient::exec_input`]).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The handle's input side, for a thread that feeds stdin.
    pub fn input(&self) -> ExecInput<'_> {
        ExecInput { client: self.client, id: self.id }
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.input().write_stdin(data)
    }

    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.input().close_stdin()
    }

    /// Sends a signal to the process group (e.g. SIGINT for Ctrl-C).
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.input().signal(signal)
    }

    /// The next event; `Exit` is the last.
    pub fn next_event(&self) -> Result<ExecEvent, AgentError> {
        self.event(self.rx.recv())
    }

    /// As [`ExecHandle::next_event`], or `None` after `timeout` with nothing new.
    pub fn next_event_timeout(&self, timeout: Duration) -> Result<Option<ExecEvent>, AgentError> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => self.event(Some(m)).map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.event(None).map(Some),
        }
    }

    fn event(&self, msg: Option<GuestMsg>) -> Result<ExecEvent, AgentError> {
        match msg {
            Some(GuestMsg::Stdout { data, .. }) => Ok(ExecEvent::Stdout(data)),
            Some(GuestMsg::Stderr { data, .. }) => Ok(ExecEvent::Stderr(data)),
            Some(GuestMsg::Exit { status, timed_out, .. }) => Ok(ExecEvent::Exit { status, timed_out }),
            Some(other) => Err(self.client.failure(&other).unwrap_or_else(|| self.client.unexpected(other))),
            None => Err(self.rx.gone("the command finished")),
        }
    }

    /// Waits for the end, collecting the output.
    pub fn collect(self) -> Result<ExecOutput, AgentError> {
        self.collect_capped(DEFAULT_OUTPUT_CAP)
    }

    /// As [`ExecHandle::collect`], keeping at most `cap` bytes of output: past it the process
    /// is killed (SIGKILL), the rest discarded, and the result marked `truncated`.
    pub fn collect_capped(self, cap: usize) -> Result<ExecOutput, AgentError> {
        self.collect_until(cap, None)
    }

    /// As [`ExecHandle::collect_capped`], and ended by the host at `deadline` whatever the
    /// guest does: the process is killed through the agent and the result is `timed_out`
    /// (status SIGKILL) without waiting for the guest to confirm it.
    pub fn collect_until(self, cap: usize, deadline: Option<std::time::Instant>) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut truncated = false;
        loop {
            let event = match deadline {
                None => Some(self.next_event()?),
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => self.next_event_timeout(left)?,
                    _ => None,
                },
            };
            let Some(event) = event else {
                let _ = self.signal(libc::SIGKILL);
                let status = ExitStatus::Signal(libc::SIGKILL);
                return Ok(ExecOutput { stdout, stderr, status, timed_out: true, truncated });
            };
            let (is_stdout, d) = match event {
                ExecEvent::Stdout(d) => (true, d),
                ExecEvent::Stderr(d) => (false, d),
                ExecEvent::Exit { status, timed_out } => {
                    return Ok(ExecOutput { stdout, stderr, status, timed_out, truncated })
                }
            };
            let take = cap.saturating_sub(stdout.len() + stderr.len()).min(d.len());
            let buf = if is_stdout { &mut stdout } else { &mut stderr };
            buf.extend_from_slice(&d[..take]);
            if take < d.len() && !truncated {
                truncated = true;
                self.signal(libc::SIGKILL)?;
            }
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
