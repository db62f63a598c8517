//! Processes started for the host: output streamed as it comes, exit status, timeout, signals.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command as StdCommand, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smolvm_protocol::agent::{Command, ExecRequest, ExitStatus, GuestMsg, CHUNK};

use super::flow::{Grant, Window};
use super::{Session, Writer};
use crate::reaper;

/// After the process exits, its output pipes may still be held open by children it left in the
/// background; their output is not waited for longer than this.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// A running exec.
pub struct Running {
    pid: i32,
    stdin: Option<Sender<Vec<u8>>>,
}

/// Starts `req`; replies `Exit` (or `Error`) later, from its own thread.
pub fn start(s: &mut Session, id: u32, req: ExecRequest) {
    if req.pty.is_some() {
        s.out.error(id, "PTY execs are not supported by this guest agent yet; use `smolvm ssh` for a terminal");
        return;
    }
    let mut cmd = match &req.command {
        Command::Argv(argv) if !argv.is_empty() => {
            let mut c = StdCommand::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Command::Argv(_) => return s.out.error(id, "empty argv"),
        Command::Shell(line) => {
            let mut c = StdCommand::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
    };
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LANG", "C.UTF-8")
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(req.cwd.as_deref().unwrap_or("/root"))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls: sigprocmask and setsid.
    unsafe {
        cmd.pre_exec(|| {
            crate::supervisor::unblock_signals_in_child()?;
            // Its own process group, so a signal or a timeout reaches everything it started.
            libc::setsid();
            Ok(())
        });
    }
    let mut registry = reaper::lock();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(registry);
            let what = match &req.command {
                Command::Argv(a) => a[0].clone(),
                Command::Shell(_) => "/bin/sh".into(),
            };
            return s.out.io_error(id, format!("cannot run {what}: {e}"), &e);
        }
    };
    let pid = child.id() as i32;
    let exited = registry.register(pid);
    drop(registry);
    let window = s.window(id);

    let pumps: Vec<_> = [
        child.stdout.take().map(|r| (Box::new(r) as Box<dyn Read + Send>, true)),
        child.stderr.take().map(|r| (Box::new(r) as Box<dyn Read + Send>, false)),
    ]
    .into_iter()
    .flatten()
    .map(|(r, is_out)| {
        let out = s.out.clone();
        let window = window.clone();
        std::thread::spawn(move || pump(r, &out, id, is_out, &window))
    })
    .collect();

    let stdin_tx = child.stdin.take().map(|mut w| {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for chunk in rx {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
            // Dropping `w` closes the process's stdin.
        });
        tx
    });
    s.procs.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Running { pid, stdin: stdin_tx });

    let out = s.out.clone();
    let procs = s.procs.clone();
    let windows = s.windows.clone();
    let timeout = req.timeout_ms.map(Duration::from_millis);
    std::thread::spawn(move || {
        let mut timed_out = false;
        let raw = match timeout {
            None => exited.recv().ok(),
            Some(t) => match exited.recv_timeout(t) {
                Ok(st) => Some(st),
                Err(_) => {
                    timed_out = true;
                    // SAFETY: kill(2) of the process group we created.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    exited.recv().ok()
                }
            },
        };
        let mut deadline = Instant::now() + DRAIN_AFTER_EXIT;
        for p in pumps {
            // A pump ends at EOF of its pipe, which a grandchild holding the pipe may delay
            // for ever: wait for it, but only until the deadline (JoinHandle has no timed join).
            // Output the host has not yet let through is not such a delay: the deadline
            // starts again while a pump waits for the host's credit.
            while !p.is_finished() {
                if window.host_is_behind() {
                    deadline = Instant::now() + DRAIN_AFTER_EXIT;
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        procs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        super::flow::lock(&windows).remove(&id);
        // No status (the reaper's channel closed) is not success: -1, as for a status that
        // is neither an exit nor a signal.
        let st = raw.map(std::process::ExitStatus::from_raw);
        let status = match st.map(|st| (st.code(), st.signal())) {
            Some((Some(c), _)) => ExitStatus::Code(c),
            Some((None, Some(sig))) => ExitStatus::Signal(sig),
            _ => {
                crate::log::error!("agent: no exit status for exec {id}");
                ExitStatus::Code(-1)
            }
        };
        out.send(&GuestMsg::Exit { id, status, timed_out });
        drop(child);
    });
}

/// Sends one of the process's outputs, as far as the host's window allows: while it is shut,
/// the pipe fills and the process blocks writing. Once the host cancels, the output is read
/// and dropped (the process is not held up by a reader that left).
fn pump(mut r: Box<dyn Read + Send>, out: &Writer, id: u32, is_stdout: bool, window: &Window) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let (may, send) = match window.take(CHUNK) {
            Grant::Send(n) => (n, true),
            Grant::Discard => (CHUNK, false),
        };
        match r.read(&mut buf[..may]) {
            Ok(0) => return,
            Ok(n) if send => {
                window.unused(may - n);
                let data = buf[..n].to_vec();
                let msg = if is_stdout { GuestMsg::Stdout { id, data } } else { GuestMsg::Stderr { id, data } };
                if !out.send(&msg) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if send {
                    window.unused(may);
                }
            }
            Err(_) => return,
        }
    }
}

/// Feeds (`Some`) or closes (`None`) an exec's stdin.
pub fn stdin(s: &mut Session, id: u32, data: Option<Vec<u8>>) {
    let mut procs = s.procs.lock().unwrap_or_else(|p| p.into_inner());
    let Some(p) = procs.get_mut(&id) else { return };
    match data {
        Some(d) => {
            if let Some(tx) = &p.stdin {
                let _ = tx.send(d);
            }
        }
        None => p.stdin = None,
    }
}

/// Delivers a signal to an exec's process group.
pub fn signal(s: &mut Session, id: u32, sig: i32) {
    let procs = s.procs.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = procs.get(&id) {
        // SAFETY: kill(2) of a process group this agent created.
        unsafe { libc::kill(-p.pid, sig) };
    }
}

/// Kills every process of a session that ended.
pub fn kill_all(procs: &Arc<Mutex<HashMap<u32, Running>>>) {
    let procs = procs.lock().unwrap_or_else(|p| p.into_inner());
    for p in procs.values() {
        // SAFETY: kill(2) of a process group this agent created.
        unsafe { libc::kill(-p.pid, libc::SIGKILL) };
    }
}
