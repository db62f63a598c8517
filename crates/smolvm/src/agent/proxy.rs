//! The agent proxy: one connection to the guest, many local clients.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use smolvm_protocol::agent::{decode, encode, frame_id, read_frame, read_payload, GuestMsg, HostMsg, PROTOCOL_VERSION};
use smolvm_protocol::ready::Ready;

use super::outbox::Outbox;

/// Where a guest reply goes: a client's outbox and the id that client used.
struct Route {
    client: u64,
    local_id: u32,
    out: Arc<Outbox>,
    /// The client speaks a version without flow control to a guest that has it (v5): the
    /// proxy grants the guest what it hands to this client's queue, which is bounded itself
    /// (a client that leaves `CLIENT_QUEUE` unread is dropped).
    proxy_grants: bool,
    /// The version this client and the guest share: what the guest sends is passed on in
    /// the form this client reads (`GuestMsg::for_version`).
    version: u32,
}

/// Output queued for one client that does not read it, before the proxy drops that client
/// (and kills its processes) so that it cannot hold up the guest's other replies.
const CLIENT_QUEUE: usize = 16 << 20;
/// Requests queued for the guest before a client's thread waits for it to read them.
const GUEST_QUEUE: usize = 8 << 20;
/// How long a client waits for a guest that reads nothing of its port before its request is
/// refused (a guest that reads, however slowly, is waited for).
const GUEST_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Default)]
struct Routes {
    by_global: HashMap<u32, Route>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const HELLO_RESEND: std::time::Duration = std::time::Duration::from_millis(250);
/// As long as a boot may take under emulation (the sandbox's readiness timeout).
const READY_TIMEOUT: std::time::Duration = crate::sandbox::DEFAULT_READY_TIMEOUT;

/// Whether `s` has bytes to read within `t`.
fn readable_within(s: &UnixStream, t: std::time::Duration) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// Runs the proxy in the directory `dir` (the sandbox's `run/`) on `vm`, the agent port's
/// socket, until the VM's end closes. Clients are served only if they run as `owner`.
/// `ready` is called once the client socket is bound (the process prints its ready line).
pub fn run(dir: &Path, vm: UnixStream, owner: u32, ready: impl FnOnce()) -> std::io::Result<()> {
    let mut hello_out = vm.try_clone()?;
    let mut vm_in = vm.try_clone()?;
    // Guests of protocol v1 close their port between host connections and lose what arrives
    // meanwhile: a Hello that gets no answer within a moment is sent again (an extra answer is
    // ignored below: a Hello has no request id). A booting guest answers once it is ready.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        hello_out.write_all(&encode(&HostMsg::Hello { version: PROTOCOL_VERSION }))?;
        if readable_within(&vm_in, HELLO_RESEND)? {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the guest agent did not answer Hello within {READY_TIMEOUT:?}"),
            ));
        }
    }
    let reply = read_frame::<GuestMsg>(&mut vm_in);
    let hello = match reply.as_ref().ok().and_then(|m| m.as_ref()).and_then(GuestMsg::as_hello) {
        Some(Ok(h)) => h,
        Some(Err(e)) => return Err(std::io::Error::other(format!("the guest agent's Hello is unreadable: {e}"))),
        None => return Err(std::io::Error::other(format!("the guest agent did not answer Hello: {reply:?}"))),
    };

    let vm_out = Outbox::start(vm, GUEST_QUEUE)?;
    let sock = dir.join("agent.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let routes = Arc::new(Mutex::new(Routes::default()));
    let next_id = Arc::new(AtomicU32::new(1));
    let vm_gone = Arc::new(AtomicBool::new(false));

    // Guest -> clients.
    let (r, gone, grants_out) = (routes.clone(), vm_gone.clone(), vm_out.clone());
    let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    std::thread::spawn(move || {
        while let Ok(Some(mut msg)) = read_frame::<GuestMsg>(&mut vm_in) {
            let ends = msg.ends_request();
            let Some(id) = msg.id_mut() else { continue };
            let global = *id;
            let mut routes = lock(&r);
            let Some(route) = routes.by_global.get(&global) else { continue };
            *id = route.local_id;
            let out = route.out.clone();
            let version = route.version;
            let n = msg.flow_bytes();
            if route.proxy_grants && n > 0 {
                let _ = grants_out.push(encode(&HostMsg::Credit { id: global, bytes: n as u32 }));
            }
            if ends {
                routes.by_global.remove(&global);
            }
            drop(routes);
            if out.push(encode(&msg.for_version(version))).is_err() && !out.is_closed() {
                tracing::warn!("a client did not read {CLIENT_QUEUE} bytes of its output: dropped");
                out.close();
            }
        }
        // The VM is gone: so is the proxy. Wake the accept loop so that it sees it: shutting
        // the listening socket down makes accept fail at once (a connect by path would not
        // reach it once `delete` has removed the directory).
        gone.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on the listener's descriptor, which `run` keeps open (and owns)
        // until the accept loop below has ended.
        unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
    });
    ready();

    let mut client_no = 0u64;
    for conn in listener.incoming() {
        if vm_gone.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        if !crate::child::peer_is(&conn, owner) {
            tracing::warn!("refused a client of another user");
            continue;
        }
        client_no += 1;
        let (routes, vm_out, next_id, hello) = (routes.clone(), vm_out.clone(), next_id.clone(), hello.clone());
        let client = client_no;
        std::thread::spawn(move || serve_client(client, conn, &routes, &vm_out, &next_id, &hello));
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

fn serve_client(
    client: u64,
    conn: UnixStream,
    routes: &Mutex<Routes>,
    vm_out: &Outbox,
    next_id: &AtomicU32,
    hello: &(u32, Ready),
) {
    let Ok(mut input) = conn.try_clone() else { return };
    let Ok(out) = Outbox::start(conn, CLIENT_QUEUE) else { return };
    // This client's ids -> global ids, and which of them are execs (killed if it goes away).
    let mut ids: HashMap<u32, u32> = HashMap::new();
    // The version this client and the guest share (from its Hello).
    let mut shared = 1;
    let mut execs: Vec<u32> = Vec::new();
    while let Ok(Some(payload)) = read_payload(&mut input) {
        let mut msg = match decode::<HostMsg>(&payload) {
            Ok(m) => m,
            Err(e) => {
                // A newer client's message: an error for that request; the client stays.
                if let Some((kind, id)) = frame_id(&payload) {
                    let message = format!("this sandbox's agent proxy cannot read message kind {kind}: {e}");
                    let _ = out.push(encode(&GuestMsg::Error { id, message }));
                }
                continue;
            }
        };
        if let HostMsg::Hello { version } = msg {
            // Each client gets the answer in the form of the version it and the guest share.
            let (guest, ready) = hello;
            shared = version.min(*guest);
            let _ = out.push(encode(&GuestMsg::hello(shared, ready)));
            continue;
        }
        let opens = msg.opens_request();
        // Requests that go on until they are stopped (a v5 read waits for its reader's credit).
        let is_exec = matches!(msg, HostMsg::Exec { .. } | HostMsg::Watch { .. } | HostMsg::ReadFile { .. });
        if let Some(id) = msg.id_mut() {
            let global = if opens {
                let g = next_id.fetch_add(1, Ordering::Relaxed);
                ids.insert(*id, g);
                lock(routes).by_global.insert(
                    g,
                    Route {
                        client,
                        local_id: *id,
                        out: out.clone(),
                        proxy_grants: shared < 5 && hello.0 >= 5,
                        version: shared,
                    },
                );
                if is_exec {
                    execs.push(g);
                }
                g
            } else {
                match ids.get(id) {
                    Some(g) => *g,
                    None => continue, // an id this client never opened
                }
            };
            *id = global;
        }
        if vm_out.is_closed() {
            break;
        }
        if vm_out.push_wait(encode(&msg), GUEST_PATIENCE).is_err() {
            // The guest has read nothing of its port for a while: this request fails rather
            // than waiting on.
            if let Some(id) = msg.id_mut() {
                let global = *id;
                let local = lock(routes).by_global.remove(&global).map(|r| r.local_id);
                if let Some(local) = local {
                    let message = format!(
                        "the guest has read nothing of its agent port for {GUEST_PATIENCE:?} ({GUEST_QUEUE} bytes waiting); try again, or stop and start the sandbox"
                    );
                    let _ = out.push(encode(&GuestMsg::Error { id: local, message }));
                }
            }
        }
    }
    // The client went away: its processes go too, and its routes.
    let mut routes = lock(routes);
    for g in execs {
        if routes.by_global.contains_key(&g) {
            // A signal ends an exec (a watch or a read ignores it); a Cancel ends a watch and,
            // from v5, a read (a guest older than v4 cannot read it and answers an error no
            // one waits for).
            let _ = vm_out.push(encode(&HostMsg::Signal { id: g, signal: libc::SIGKILL }));
            let _ = vm_out.push(encode(&HostMsg::Cancel { id: g }));
        }
    }
    routes.by_global.retain(|_, r| r.client != client);
    drop(routes);
    out.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{client::ExecRequest, AgentClient, AgentError};
    use smolvm_protocol::agent::{read_payload, Command, ExitStatus};
    use smolvm_protocol::ready::BootPhases;

    /// A guest of protocol v1 on the VM socket: answers Hello, exits each Exec with its id as
    /// the exit code (so that routing mistakes show), and ends when told to.
    fn old_guest(mut s: UnixStream) -> std::thread::JoinHandle<Vec<HostMsg>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Ok(Some(p)) = read_payload(&mut s) {
                let msg: HostMsg = decode(&p).unwrap();
                let reply = match &msg {
                    HostMsg::Hello { version } => {
                        let ready = Ready { v: 1, host_key: "k".into(), boot_us: BootPhases::default() };
                        Some(GuestMsg::hello((*version).min(1), &ready))
                    }
                    HostMsg::Exec { id, request } if request.command == Command::Argv(vec!["quit".into()]) => {
                        seen.push(msg.clone());
                        let _ = id;
                        break;
                    }
                    // Output without end for one client (32 MiB, more than a client's queue).
                    HostMsg::Exec { id, request } if request.command == Command::Argv(vec!["flood".into()]) => {
                        let chunk = vec![b'x'; 16 * 1024];
                        for _ in 0..2048 {
                            if s.write_all(&encode(&GuestMsg::Stdout { id: *id, data: chunk.clone() })).is_err() {
                                break;
                            }
                        }
                        Some(GuestMsg::Exit { id: *id, status: ExitStatus::Code(0), timed_out: false })
                    }
                    // A guest that ignores the exec's timeout: never answers this one.
                    HostMsg::Exec { request, .. } if request.command == Command::Argv(vec!["hang".into()]) => None,
                    HostMsg::Exec { id, .. } => {
                        Some(GuestMsg::Exit { id: *id, status: ExitStatus::Code(*id as i32), timed_out: false })
                    }
                    _ => None,
                };
                seen.push(msg);
                if let Some(r) = reply {
                    s.write_all(&encode(&r)).unwrap();
                }
            }
            seen
        })
    }

    fn exec(argv: &str) -> ExecRequest {
        ExecRequest {
            command: Command::Argv(vec![argv.into()]),
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: None,
            pty: None,
        }
    }

    #[test]
    fn clients_are_multiplexed_onto_an_old_guest_and_the_version_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let guest = old_guest(theirs);
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_path_buf();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let proxy = std::thread::spawn(move || run(&d, ours, me, move || tx.send(()).unwrap()));
        rx.recv().unwrap();
        let sock = dir.path().join("agent.sock");
        let me = std::process::id() as i32;
        let a = AgentClient::connect("t", &sock, me).unwrap();
        let b = AgentClient::connect("t", &sock, me).unwrap();
        assert_eq!(a.version, 1, "the version both speak");
        // Renumbered ids, routed back to the right client: each exit code is the global id.
        let (ea, eb) = (a.exec_output(exec("x"), None).unwrap(), b.exec_output(exec("y"), None).unwrap());
        assert_ne!(ea.code(), eb.code());
        // A v2 message is refused before it is sent.
        match a.ping() {
            Err(AgentError::Unsupported { needs: 2, guest: 1, message: "Ping", .. }) => {}
            other => panic!("{other:?}"),
        }
        // A frame the proxy cannot decode is answered for its request only.
        let mut raw = UnixStream::connect(&sock).unwrap();
        raw.write_all(&encode(&HostMsg::Hello { version: 2 })).unwrap();
        let _hello: GuestMsg = read_frame(&mut raw).unwrap().unwrap();
        raw.write_all(&[0, 0, 0, 3, 0xc8, 0x01, 0x09]).unwrap(); // kind 200, id 9
        match read_frame::<GuestMsg>(&mut raw).unwrap().unwrap() {
            GuestMsg::Error { id: 9, message } => assert!(message.contains("kind 200"), "{message}"),
            other => panic!("{other:?}"),
        }
        let c = a.exec_output(exec("z"), None).unwrap();
        assert!(c.code() > 0, "the session survived the bad frame");
        // A client that never reads its output does not stall the others: it is dropped once
        // its queue is full, and the guest's other replies flow.
        let mut stalled = UnixStream::connect(&sock).unwrap();
        stalled.write_all(&encode(&HostMsg::Hello { version: 2 })).unwrap();
        stalled.write_all(&encode(&HostMsg::Exec { id: 1, request: exec("flood") })).unwrap();
        // Its Hello answer, then the first of the flood: the guest is flooding it now (and
        // answers the others only after the flood, all of it pushed while it does not read).
        stalled.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        let _hello: GuestMsg = read_frame(&mut stalled).unwrap().unwrap();
        assert!(readable_within(&stalled, std::time::Duration::from_secs(20)).unwrap(), "the flood never started");
        let t = std::time::Instant::now();
        for _ in 0..5 {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let out = b.exec(exec("y")).unwrap().collect_until(1024, Some(deadline)).unwrap();
            assert!(!out.timed_out, "another client's stalled output held this one up");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "the others waited {:?}", t.elapsed());
        let mut sink = Vec::new();
        let end = std::io::Read::read_to_end(&mut stalled, &mut sink);
        assert!(end.is_ok(), "the stalled client's connection was not closed: {end:?}");
        assert!(sink.len() < 2048 * 16 * 1024, "the stalled client was not dropped: it got all {} bytes", sink.len());
        // The host ends a call whose guest ignores its deadline, and kills the process.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let hung = a.exec(exec("hang")).unwrap().collect_until(1024, Some(deadline)).unwrap();
        assert!(hung.timed_out && hung.status == ExitStatus::Signal(libc::SIGKILL), "{hung:?}");
        // The guest goes away: the proxy ends (and removes its socket).
        let _ = a.exec(exec("quit"));
        let seen = guest.join().unwrap();
        assert!(!seen.iter().any(|m| matches!(m, HostMsg::Ping { .. })), "Ping never reached the v1 guest");
        assert!(
            seen.iter().any(|m| matches!(m, HostMsg::Signal { signal: libc::SIGKILL, .. })),
            "the hung process was not killed through the agent"
        );
        proxy.join().unwrap().unwrap();
        assert!(!sock.exists());
    }

    /// A v6 guest whose every exec fails with ENOSPC.
    fn failing_guest(mut s: UnixStream) {
        std::thread::spawn(move || {
            while let Ok(Some(p)) = read_payload(&mut s) {
                let reply = match decode::<HostMsg>(&p).unwrap() {
                    HostMsg::Hello { version } => {
                        let ready = Ready { v: 1, host_key: "k".into(), boot_us: BootPhases::default() };
                        GuestMsg::hello(version.min(6), &ready)
                    }
                    HostMsg::Exec { id, .. } => GuestMsg::Failed { id, message: "write /x: full".into(), errno: 28 },
                    _ => continue,
                };
                if s.write_all(&encode(&reply)).is_err() {
                    break;
                }
            }
        });
    }

    #[test]
    fn a_guests_errno_reaches_clients_that_read_it_and_older_ones_get_the_plain_error() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        failing_guest(theirs);
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_path_buf();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        std::thread::spawn(move || run(&d, ours, me, move || tx.send(()).unwrap()));
        rx.recv().unwrap();
        let sock = dir.path().join("agent.sock");
        let ask = |version: u32| {
            let mut c = UnixStream::connect(&sock).unwrap();
            c.write_all(&encode(&HostMsg::Hello { version })).unwrap();
            let _hello: GuestMsg = read_frame(&mut c).unwrap().unwrap();
            c.write_all(&encode(&HostMsg::Exec { id: 1, request: exec("x") })).unwrap();
            read_frame::<GuestMsg>(&mut c).unwrap().unwrap()
        };
        assert_eq!(ask(6), GuestMsg::Failed { id: 1, message: "write /x: full".into(), errno: 28 });
        assert_eq!(ask(5), GuestMsg::Error { id: 1, message: "write /x: full".into() });
        // And the library's client turns it into a kind.
        let me = std::process::id() as i32;
        let client = AgentClient::connect("t", &sock, me).unwrap();
        let err = client.exec_output(exec("x"), None).unwrap_err();
        use crate::error::Kind;
        assert_eq!((err.kind(), err.guest_errno()), (crate::error::ErrorKind::ResourceExhausted, Some(28)));
    }
}
