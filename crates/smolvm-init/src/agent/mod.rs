//! The guest agent: commands and files for the host without SSH, over the virtio-serial port
//! named `smolvm.agent` (protocol: `smolvm_protocol::agent`).
//!
//! One thread reads requests from the port; each exec gets threads that pump its output and
//! wait for its exit; file reads get a thread; everything written back goes through one
//! locked writer, a frame at a time. The host keeps one connection open for the VM's life; if
//! it goes away, the session's processes are killed and the agent waits for the next one.

mod exec;
mod files;
mod flow;
mod fs;
mod watch;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use smolvm_protocol::agent::{decode, frame_id, read_payload, GuestMsg, HostMsg, AGENT_PORT_NAME, PROTOCOL_VERSION};
use smolvm_protocol::ready::Ready;

use crate::log;

/// Set by `main` once the guest is ready ([`set_ready`]); the agent's Hello carries it.
static READY: (Mutex<Option<Ready>>, Condvar) = (Mutex::new(None), Condvar::new());

/// Records the readiness facts (once) and wakes any Hello waiting for them.
pub fn set_ready(r: Ready) {
    let mut g = READY.0.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(r);
        READY.1.notify_all();
    }
}

/// Waits for [`set_ready`].
fn wait_ready() -> Ready {
    let mut g = READY.0.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(r) = g.as_ref() {
            return r.clone();
        }
        g = READY.1.wait(g).unwrap_or_else(|p| p.into_inner());
    }
}

/// Sends frames to the host; shared by every thread of a session.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<File>>, Arc<std::sync::atomic::AtomicU32>);

impl Writer {
    pub fn send(&self, msg: &GuestMsg) -> bool {
        let frame = smolvm_protocol::agent::encode(msg);
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&frame).is_ok()
    }

    /// The version agreed at Hello, for what is sent from other threads.
    pub fn set_version(&self, v: u32) {
        self.1.store(v, Ordering::Relaxed);
    }

    pub fn error(&self, id: u32, message: impl Into<String>) {
        self.send(&GuestMsg::Error { id, message: message.into() });
    }

    /// A failure of a system call: its errno travels with the text (v6 `Failed`).
    pub fn io_error(&self, id: u32, message: impl Into<String>, e: &std::io::Error) {
        let version = self.1.load(Ordering::Relaxed);
        let msg = GuestMsg::Failed { id, message: message.into(), errno: e.raw_os_error().unwrap_or(0) };
        self.send(&msg.for_version(version));
    }
}

/// State of one host connection.
pub struct Session {
    pub out: Writer,
    pub procs: Arc<Mutex<HashMap<u32, exec::Running>>>,
    pub writes: HashMap<u32, files::PendingWrite>,
    pub env: Vec<(String, String)>,
    /// Running watches' cancel flags.
    pub watches: HashMap<u32, Arc<AtomicBool>>,
    /// The protocol version agreed at Hello (flow control from v5).
    pub version: u32,
    /// The flow-control windows of running execs and reads.
    pub windows: flow::Windows,
}

impl Session {
    /// A window for a new streaming request `id`, registered so `Credit` and `Cancel` find it.
    pub fn window(&self, id: u32) -> Arc<flow::Window> {
        let w = flow::Window::new(self.version);
        flow::lock(&self.windows).insert(id, w.clone());
        w
    }
}

/// Finds the port's device: `/sys/class/virtio-ports/vportNpM/name` holds the name, and
/// devtmpfs provides `/dev/vportNpM` (there is no udev to make `/dev/virtio-ports/` links).
fn find_port() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    dir.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == AGENT_PORT_NAME).then(|| PathBuf::from("/dev").join(e.file_name()))
    })
}

/// Starts the agent thread if the VM has an agent port.
pub fn start() {
    let Some(port) = find_port() else {
        log::info!("no {AGENT_PORT_NAME} port: the agent is off (SSH only)");
        return;
    };
    let spawned = std::thread::Builder::new().name("agent".into()).spawn(move || serve(port));
    if let Err(e) = spawned {
        log::error!("cannot start the agent thread: {e}");
    }
}

fn serve(port: PathBuf) {
    // The port stays open across host connections: while it is open, what the host sends
    // before we read again is queued by the kernel; a closed port would drop it (the first
    // Hello after a reconnect was lost that way).
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(&port) {
        Ok(f) => f,
        Err(e) => {
            log::error!("open {}: {e}; agent stopped", port.display());
            return;
        }
    };
    loop {
        let writer = match file.try_clone() {
            Ok(w) => Writer(Arc::new(Mutex::new(w)), Arc::new(std::sync::atomic::AtomicU32::new(1))),
            Err(e) => {
                log::error!("agent: {e}");
                return;
            }
        };
        let mut session = Session {
            out: writer,
            procs: Arc::default(),
            writes: HashMap::new(),
            env: Vec::new(),
            watches: HashMap::new(),
            version: 1,
            windows: Arc::default(),
        };
        let mut reader = &file;
        let mut got_any = false;
        loop {
            match read_payload(&mut reader) {
                Ok(Some(payload)) => {
                    got_any = true;
                    match decode::<HostMsg>(&payload) {
                        Ok(msg) => handle(&mut session, msg),
                        Err(e) => unknown(&session, &payload, &e),
                    }
                }
                // End of stream: the host is not (or no longer) connected.
                Ok(None) => break,
                Err(e) => {
                    log::error!("agent: {e}; dropping the session");
                    break;
                }
            }
        }
        exec::kill_all(&session.procs);
        files::discard_all(&mut session);
        for (_, cancel) in session.watches.drain() {
            cancel.store(true, Ordering::Relaxed);
        }
        for (_, w) in flow::lock(&session.windows).drain() {
            w.cancel();
        }
        if got_any {
            log::info!("agent: host disconnected");
        }
        // virtio-serial has no event for "a host connected": poll() reports EPOLLHUP while no
        // host is there, so there is nothing to wait on. Read again shortly (the port stays
        // open, so nothing sent meanwhile is lost).
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A frame this guest cannot decode (a newer host's message): an error for its request
/// only, and the session goes on.
fn unknown(s: &Session, payload: &[u8], e: &smolvm_protocol::agent::FrameError) {
    match frame_id(payload) {
        Some((kind, id)) => s
            .out
            .error(id, format!("this guest (agent protocol v{PROTOCOL_VERSION}) cannot read message kind {kind}: {e}")),
        None => log::error!("agent: an undecodable frame without a request id: {e}"),
    }
}

fn handle(s: &mut Session, msg: HostMsg) {
    match msg {
        HostMsg::Hello { version } => {
            // Hello waits for readiness: a host that connects during boot learns the guest is
            // ready from this answer.
            let ready = wait_ready();
            s.version = version.min(PROTOCOL_VERSION);
            s.out.set_version(s.version);
            s.out.send(&GuestMsg::hello(s.version, &ready));
        }
        HostMsg::Exec { id, request } => exec::start(s, id, request),
        HostMsg::Stdin { id, data } => exec::stdin(s, id, Some(data)),
        HostMsg::StdinClose { id } => exec::stdin(s, id, None),
        HostMsg::Signal { id, signal } => exec::signal(s, id, signal),
        HostMsg::WriteFile { id, file } => files::write_start(s, id, file),
        HostMsg::FileData { id, data } => files::write_data(s, id, &data),
        HostMsg::FileEnd { id } => files::write_end(s, id),
        HostMsg::ReadFile { id, path } => files::read(s, id, path),
        HostMsg::Stat { id, path } => {
            let stat = files::stat(&path);
            s.out.send(&GuestMsg::StatResult { id, stat });
        }
        HostMsg::SetEnv { id, vars } => {
            s.env = vars;
            match files::write_profile_env(&s.env) {
                Ok(()) => s.out.send(&GuestMsg::Done { id }),
                Err(e) => {
                    s.out.io_error(id, format!("write /etc/profile.d/smolvm-env.sh: {e}"), &e);
                    true
                }
            };
        }
        HostMsg::Ping { id } => {
            s.out.send(&GuestMsg::Done { id });
        }
        HostMsg::Refresh { id, json } => {
            // Inline, not in a thread: nothing else the host sent after it may run before the
            // guest is reseeded and renamed.
            match serde_json::from_str::<smolvm_protocol::agent::Refresh>(&json) {
                Ok(r) => {
                    let done = crate::refresh::apply(&r);
                    let json = serde_json::to_string(&done).unwrap_or_default();
                    s.out.send(&GuestMsg::Refreshed { id, json });
                }
                Err(e) => s.out.error(id, format!("an unreadable Refresh: {e}")),
            }
        }
        HostMsg::WaitSsh { id, timeout_ms } => {
            let out = s.out.clone();
            let _ = std::thread::Builder::new().name("wait-ssh".into()).spawn(move || {
                match crate::ssh::wait_listening(Duration::from_millis(timeout_ms)) {
                    Ok(()) => out.send(&GuestMsg::Done { id }),
                    Err(e) => out.send(&GuestMsg::Error { id, message: e.to_string() }),
                };
            });
        }
        HostMsg::Fs { id, json } => {
            // Its own thread: a deep listing or a large remove does not hold up other requests.
            let out = s.out.clone();
            let _ = std::thread::Builder::new().name("fs".into()).spawn(move || {
                match serde_json::from_str::<smolvm_protocol::agent::FsRequest>(&json) {
                    Ok(req) => {
                        let json = serde_json::to_string(&fs::run(&req)).unwrap_or_default();
                        out.send(&GuestMsg::FsResult { id, json });
                    }
                    Err(e) => out.error(id, format!("an unreadable Fs request: {e}")),
                }
            });
        }
        HostMsg::Watch { id, json } => {
            s.watches.retain(|_, c| !c.load(Ordering::Relaxed));
            let cancel = Arc::new(AtomicBool::new(false));
            s.watches.insert(id, cancel.clone());
            watch::start(s.out.clone(), id, &json, cancel);
        }
        HostMsg::Cancel { id } => {
            if let Some(c) = s.watches.remove(&id) {
                c.store(true, Ordering::Relaxed);
            }
            if let Some(w) = flow::lock(&s.windows).remove(&id) {
                w.cancel();
            }
        }
        HostMsg::Credit { id, bytes } => {
            if let Some(w) = flow::lock(&s.windows).get(&id) {
                w.grant(u64::from(bytes));
            }
        }
        HostMsg::Shutdown => {
            // SAFETY: kill(2) on our own pid; the supervisor turns SIGTERM into a power-off.
            unsafe { libc::kill(1, libc::SIGTERM) };
        }
    }
}
