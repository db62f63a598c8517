//! `exec` and `cp` through the guest agent.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use smolvm::agent::client::{Command, ExecRequest};
use smolvm::agent::ExecEvent;

use super::sandbox::{exit_code, open};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn exec(name: &str, tty: bool, timeout: Option<u64>, command: &[String]) -> anyhow::Result<i32> {
    let sm = open()?;
    if tty {
        // Terminals go over SSH (the agent has no PTY support yet).
        let status = sm.ssh_command(name, command, true)?.status().context("run ssh")?;
        return Ok(exit_code(status));
    }
    let client = sm.agent(name)?;
    let pass_stdin = !std::io::stdin().is_terminal();
    let request = ExecRequest {
        command: Command::Argv(command.to_vec()),
        env: sm.guest_env(name)?,
        cwd: None,
        stdin: pass_stdin,
        timeout_ms: timeout.map(|s| s * 1000),
        pty: None,
    };
    let handle = client.exec(request)?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    std::thread::scope(|scope| -> anyhow::Result<i32> {
        if pass_stdin {
            let h = handle.input();
            scope.spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 || h.write_stdin(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = h.close_stdin();
            });
        }
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
        // The guest kills the command at its timeout; the host ends the call shortly after
        // even if the guest does not (exit 124 all the same).
        let deadline = timeout
            .map(|s| std::time::Instant::now() + Duration::from_secs(s) + smolvm::agent::client::HOST_TIMEOUT_GRACE);
        loop {
            if INTERRUPTED.swap(false, Ordering::SeqCst) {
                handle.signal(libc::SIGINT)?;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                let _ = handle.signal(libc::SIGKILL);
                let _ = out.flush();
                eprintln!("smolvm: the command was killed after its timeout of {} s", timeout.unwrap_or(0));
                // Not through the scope: a stdin pump may be blocked reading this process's stdin.
                std::process::exit(124);
            }
            match handle.next_event_timeout(Duration::from_millis(100))? {
                None => {}
                Some(ExecEvent::Stdout(d)) => {
                    out.write_all(&d)?;
                    out.flush()?;
                }
                Some(ExecEvent::Stderr(d)) => err.write_all(&d)?,
                Some(ExecEvent::Exit { status, timed_out }) => {
                    if timed_out {
                        eprintln!("smolvm: the command was killed after its timeout of {} s", timeout.unwrap_or(0));
                        return Ok(124);
                    }
                    return Ok(match status {
                        smolvm::agent::client::ExitStatus::Code(c) => c,
                        smolvm::agent::client::ExitStatus::Signal(s) => 128 + s,
                    });
                }
            }
        }
    })
}

/// `NAME:/path` -> (name, path).
fn remote(s: &str) -> Option<(&str, &str)> {
    let (n, p) = s.split_once(':')?;
    (smolvm::sandbox::names::validate(n).is_ok() && p.starts_with('/')).then_some((n, p))
}

pub fn cp(from: &str, to: &str) -> anyhow::Result<i32> {
    let sm = open()?;
    match (remote(from), remote(to)) {
        (None, Some((name, path))) => {
            if Path::new(from).is_dir() {
                let done = sm.copy_dir_in(name, Path::new(from), path)?;
                return tree_done(&done);
            }
            sm.copy_in(name, Path::new(from), path)?;
            Ok(0)
        }
        (Some((name, path)), None) => match sm.copy_out(name, path, Path::new(to)) {
            Ok(_) => Ok(0),
            Err(smolvm::sandbox::CopyError::Directory { .. }) => {
                let done = sm.copy_dir_out(name, path, Path::new(to))?;
                tree_done(&done)
            }
            Err(e) => Err(e.into()),
        },
        _ => anyhow::bail!(
            "cp {from} {to}: exactly one side must be NAME:/absolute/path (e.g. smolvm cp ./f box:/root/f)"
        ),
    }
}

/// A directory copy's summary, on stderr (stdout stays empty, as `cp`'s).
fn tree_done(t: &smolvm::sandbox::TreeCopy) -> anyhow::Result<i32> {
    #[allow(clippy::print_stderr)]
    if t.skipped > 0 {
        eprintln!(
            "{}: {} files, {} directories, {} links; {} entries skipped (devices, FIFOs, sockets; links going into a sandbox)",
            t.path, t.files, t.dirs, t.links, t.skipped
        );
    }
    Ok(0)
}
