//! The client against guests on a socket of the test's own: flow control with a guest that
//! keeps to it, and the bound that holds against one that does not (a guest is root-owned
//! code the host does not trust).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use smolvm_protocol::agent::{decode, encode, read_payload, GuestMsg, HostMsg, INITIAL_WINDOW};
use smolvm_protocol::ready::{BootPhases, Ready};

use super::*;

/// What the fake guest does with an exec.
#[derive(Clone, Copy)]
enum Guest {
    /// Sends `total` bytes of output as the window allows, then exits.
    Polite { total: usize },
    /// Sends `total` bytes at once, whatever it was granted, then exits.
    Flood { total: usize },
}

/// A guest speaking `version` on a listener in `dir`; reports every host message it read.
fn guest(dir: &Path, version: u32, how: Guest) -> (std::path::PathBuf, Receiver<HostMsg>) {
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (seen_tx, seen) = mpsc::channel();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let (credit_tx, credit_rx) = mpsc::channel::<u32>();
        let mut w = Some(s);
        while let Ok(Some(p)) = read_payload(&mut r) {
            let msg: HostMsg = decode(&p).unwrap();
            let _ = seen_tx.send(msg.clone());
            match msg {
                HostMsg::Hello { version: v } => {
                    let ready = Ready { v: 1, host_key: "k".into(), boot_us: BootPhases::default() };
                    w.as_mut().unwrap().write_all(&encode(&GuestMsg::hello(v.min(version), &ready))).unwrap();
                }
                HostMsg::Credit { bytes, .. } => {
                    let _ = credit_tx.send(bytes);
                }
                HostMsg::Exec { id, .. } => {
                    let mut out = w.take().unwrap();
                    let credits = credit_rx;
                    std::thread::spawn(move || send_output(&mut out, id, how, &credits));
                    // Only one exec per test: the rest of the messages are only reported.
                    break_after_exec(&mut r, &seen_tx, &credit_tx);
                    return;
                }
                _ => {}
            }
        }
    });
    (sock, seen)
}

/// Reads on after the exec started, passing credits to the sender.
fn break_after_exec(r: &mut UnixStream, seen: &Sender<HostMsg>, credits: &Sender<u32>) {
    while let Ok(Some(p)) = read_payload(r) {
        let msg: HostMsg = decode(&p).unwrap();
        if let HostMsg::Credit { bytes, .. } = msg {
            let _ = credits.send(bytes);
        }
        let _ = seen.send(msg);
    }
}

fn send_output(out: &mut UnixStream, id: u32, how: Guest, credits: &Receiver<u32>) {
    let chunk = 64 * 1024;
    let (total, polite) = match how {
        Guest::Polite { total } => (total, true),
        Guest::Flood { total } => (total, false),
    };
    let mut window = INITIAL_WINDOW as usize;
    let mut sent = 0;
    while sent < total {
        if polite {
            while window == 0 {
                match credits.recv_timeout(Duration::from_secs(10)) {
                    Ok(b) => window += b as usize,
                    Err(_) => return,
                }
            }
        }
        let n = chunk.min(total - sent).min(if polite { window } else { usize::MAX });
        if out.write_all(&encode(&GuestMsg::Stdout { id, data: vec![b'x'; n] })).is_err() {
            return;
        }
        sent += n;
        window = window.saturating_sub(n);
    }
    let _ = out.write_all(&encode(&GuestMsg::Exit { id, status: ExitStatus::Code(0), timed_out: false }));
}

fn request() -> ExecRequest {
    ExecRequest {
        command: Command::Argv(vec!["x".into()]),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: None,
        pty: None,
    }
}

/// Takes a flood's output until the client ends the request: (bytes taken, the error).
fn drain_until_cut(h: &ExecHandle<'_>) -> (usize, AgentError) {
    let mut got = 0;
    loop {
        match h.next_event() {
            Ok(ExecEvent::Stdout(d)) => got += d.len(),
            Ok(other) => panic!("the flood was not cut: {other:?} after {got} bytes"),
            Err(e) => return (got, e),
        }
    }
}

fn connect(sock: &Path) -> AgentClient {
    AgentClient::connect("t", sock, std::process::id() as i32).unwrap()
}

#[test]
fn a_polite_guest_is_granted_as_the_reader_takes_and_waits_while_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let total = 4 * INITIAL_WINDOW as usize;
    let (sock, seen) = guest(dir.path(), 5, Guest::Polite { total });
    let c = connect(&sock);
    assert_eq!(c.version(), 5);
    let h = c.exec(request()).unwrap();
    // Nothing taken yet: no credit goes out, however long the reader waits.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!seen.try_iter().any(|m| matches!(m, HostMsg::Credit { .. })), "credit before anything was taken");
    let out = h.collect_capped(usize::MAX).unwrap();
    assert_eq!(out.stdout.len(), total, "all of it, through the window");
    assert_eq!(out.status, ExitStatus::Code(0));
    let granted: u64 = seen
        .try_iter()
        .filter_map(|m| match m {
            HostMsg::Credit { bytes, .. } => Some(u64::from(bytes)),
            _ => None,
        })
        .sum();
    assert!(granted >= (total - INITIAL_WINDOW as usize) as u64, "granted {granted} of {total}");
}

#[test]
fn a_guest_that_ignores_its_window_has_the_request_ended_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = guest(dir.path(), 5, Guest::Flood { total: 8 * INITIAL_WINDOW as usize });
    let c = connect(&sock);
    let h = c.exec(request()).unwrap();
    // The reader takes nothing while the guest floods.
    std::thread::sleep(Duration::from_millis(500));
    let (got, err) = drain_until_cut(&h);
    assert!(got <= INITIAL_WINDOW as usize, "held {got} bytes, more than the window");
    assert!(err.to_string().contains("more than"), "{err}");
    drop(h);
    // The request is over for the host: the guest is told so.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cancelled = false;
    while !cancelled && Instant::now() < deadline {
        cancelled = matches!(seen.recv_timeout(Duration::from_millis(100)), Ok(HostMsg::Cancel { .. }));
    }
    assert!(cancelled, "no Cancel for the ended request");
}

#[test]
fn a_guest_claiming_an_old_version_is_bounded_all_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _seen) = guest(dir.path(), 4, Guest::Flood { total: UNCONTROLLED_QUEUE + (8 << 20) });
    let c = connect(&sock);
    assert_eq!(c.version(), 4);
    let h = c.exec(request()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (got, err) = drain_until_cut(&h);
    assert!(got <= UNCONTROLLED_QUEUE, "held {got} bytes");
    assert!(err.to_string().contains("more than"), "{err}");
}
