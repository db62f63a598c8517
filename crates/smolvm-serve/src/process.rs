//! Processes started through the server: each is an agent exec pumped by a thread of its own
//! into every subscriber (the request that started it, and any `Connect` to it later), so the
//! process outlives the HTTP request that started it, as E2B's envd does.
//!
//! Every queue on the way is bounded: a follower's queue holds [`FOLLOWER_QUEUE`] chunks, and
//! a full one holds up the pumping thread, which so stops taking the exec's output, which
//! (agent protocol v5) stops the guest sending it and the process writing. A caller that reads
//! slowly slows the process, as a pipe would; one that leaves frees it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use smolvm::agent::client::{Command, ExecEvent, ExecRequest, ExitStatus};
use smolvm::agent::AgentError;
use tokio::sync::mpsc::{channel, Receiver, Sender};

use crate::app::{lock, Conn};

/// What a process was started with (reported by `List`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// How a process ended, in envd's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEnd {
    /// The exit code; -1 for a process killed by a signal (as envd reports it).
    pub exit_code: i32,
    /// Whether it exited by itself (not by a signal).
    pub exited: bool,
    /// `exit status N` or `signal: killed` (Go's wording, which the SDKs show).
    pub status: String,
    /// Set when it did not exit with 0.
    pub error: Option<String>,
    /// Killed at its deadline.
    pub timed_out: bool,
}

impl ProcEnd {
    fn of(status: ExitStatus, timed_out: bool) -> ProcEnd {
        match status {
            ExitStatus::Code(c) => {
                let s = format!("exit status {c}");
                ProcEnd { exit_code: c, exited: true, error: (c != 0).then(|| s.clone()), status: s, timed_out }
            }
            ExitStatus::Signal(sig) => {
                let s = match sig {
                    9 => "signal: killed".to_string(),
                    15 => "signal: terminated".to_string(),
                    2 => "signal: interrupt".to_string(),
                    n => format!("signal: {n}"),
                };
                ProcEnd { exit_code: -1, exited: false, error: Some(s.clone()), status: s, timed_out }
            }
        }
    }

    fn lost(reason: String) -> ProcEnd {
        ProcEnd { exit_code: -1, exited: false, status: "lost".into(), error: Some(reason), timed_out: false }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    End(ProcEnd),
}

/// A running process.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    /// The agent request id of its exec (stdin and signals go to it).
    pub exec_id: u32,
    pub config: ProcConfig,
    pub tag: Option<String>,
    subs: Mutex<Vec<Sender<ProcEvent>>>,
}

/// Chunks (of at most 64 KiB) a follower's queue holds.
pub const FOLLOWER_QUEUE: usize = 16;

impl Proc {
    /// Events from now on (until its end); `None` with [`crate::limits::MAX_FOLLOWERS`]
    /// following it already.
    pub fn subscribe(&self) -> Option<Receiver<ProcEvent>> {
        let mut subs = lock(&self.subs);
        subs.retain(|s| !s.is_closed());
        if subs.len() >= crate::limits::MAX_FOLLOWERS {
            return None;
        }
        let (tx, rx) = channel(FOLLOWER_QUEUE);
        subs.push(tx);
        Some(rx)
    }

    /// Hands `ev` to every follower, waiting while one's queue is full (from the pumping
    /// thread, never from the runtime). A follower that left is dropped.
    fn publish(&self, ev: &ProcEvent) {
        let subs = lock(&self.subs).clone();
        let gone: Vec<_> = subs.into_iter().filter(|s| s.blocking_send(ev.clone()).is_err()).collect();
        if !gone.is_empty() {
            lock(&self.subs).retain(|s| !gone.iter().any(|g| g.same_channel(s)));
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub config: ProcConfig,
    pub tag: Option<String>,
    /// The sandbox's own variables (under the request's).
    pub sandbox_env: Vec<(String, String)>,
    pub stdin: bool,
    /// Killed at this age (the Start request's `Connect-Timeout-Ms`).
    pub timeout: Option<Duration>,
}

/// Starts a process (blocking: call it from the blocking pool). The returned receiver gets
/// every event of it, from the first byte of output.
/// `slot` is the process's place among the sandbox's ([`crate::limits::MAX_PROCESSES`]), held
/// until it ends.
pub fn spawn(
    conn: &Arc<Conn>,
    s: Spawn,
    slot: crate::limits::Slot,
) -> Result<(Arc<Proc>, Receiver<ProcEvent>), AgentError> {
    let mut argv = vec![s.config.cmd.clone()];
    argv.extend(s.config.args.iter().cloned());
    let mut env = s.sandbox_env.clone();
    env.extend(s.config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    let req = ExecRequest {
        command: Command::Argv(argv),
        env,
        cwd: s.config.cwd.clone(),
        stdin: s.stdin,
        timeout_ms: s.timeout.map(|t| t.as_millis() as u64),
        pty: None,
    };
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let pid = conn.next_pid();
    let c = conn.clone();
    let (config, tag) = (s.config, s.tag);
    std::thread::Builder::new()
        .name(format!("proc-{pid}"))
        .spawn(move || {
            let h = match c.client.exec(req) {
                Ok(h) => h,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _slot = slot;
            let proc = Arc::new(Proc { pid, exec_id: h.id(), config, tag, subs: Mutex::default() });
            let (tx, first) = channel(FOLLOWER_QUEUE);
            lock(&proc.subs).push(tx);
            lock(&c.procs).insert(pid, proc.clone());
            if started_tx.send(Ok((proc.clone(), first))).is_err() {
                let _ = h.signal(libc::SIGKILL);
            }
            let end = loop {
                match h.next_event() {
                    Ok(ExecEvent::Stdout(d)) => proc.publish(&ProcEvent::Stdout(d.into())),
                    Ok(ExecEvent::Stderr(d)) => proc.publish(&ProcEvent::Stderr(d.into())),
                    Ok(ExecEvent::Exit { status, timed_out }) => break ProcEnd::of(status, timed_out),
                    Err(e) => break ProcEnd::lost(e.to_string()),
                }
            };
            lock(&c.procs).remove(&pid);
            proc.publish(&ProcEvent::End(end));
        })
        .map_err(AgentError::Io)?;
    started_rx.recv().unwrap_or_else(|_| {
        Err(AgentError::Lost { sandbox: conn.name.clone(), reason: "the exec thread ended".into() })
    })
}

/// The process `pid` of a connection, if it still runs.
pub fn find(conn: &Conn, pid: u32) -> Option<Arc<Proc>> {
    lock(&conn.procs).get(&pid).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_read_as_envd_reports_them() {
        let ok = ProcEnd::of(ExitStatus::Code(0), false);
        assert_eq!((ok.exit_code, ok.exited, ok.error.as_deref()), (0, true, None));
        let three = ProcEnd::of(ExitStatus::Code(3), false);
        assert_eq!(three.error.as_deref(), Some("exit status 3"));
        let killed = ProcEnd::of(ExitStatus::Signal(9), true);
        assert_eq!((killed.exit_code, killed.status.as_str(), killed.timed_out), (-1, "signal: killed", true));
    }
}
