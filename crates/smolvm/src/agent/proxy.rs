//! The agent proxy: one connection to the guest, many local clients.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smolvm_protocol::agent::{encode, read_frame, GuestMsg, HostMsg, PROTOCOL_VERSION};

/// Where a guest reply goes: a client's writer and the id that client used.
struct Route {
    client: u64,
    local_id: u32,
    out: Arc<Mutex<UnixStream>>,
}

#[derive(Default)]
struct Routes {
    by_global: HashMap<u32, Route>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the proxy for the sandbox directory `dir` until the VM's end of the port closes.
pub fn run(dir: &Path) -> std::io::Result<()> {
    let vm_path = super::vm_socket(dir);
    // QEMU creates its socket while starting; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let vm = loop {
        match UnixStream::connect(&vm_path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("waiting for {}: {e}", vm_path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    let vm_out = Arc::new(Mutex::new(vm.try_clone()?));
    lock(&vm_out).write_all(&encode(&HostMsg::Hello { version: PROTOCOL_VERSION }))?;
    let mut vm_in = vm;
    let hello = match read_frame::<GuestMsg>(&mut vm_in) {
        Ok(Some(h @ GuestMsg::Hello { .. })) => h,
        other => return Err(std::io::Error::other(format!("the guest agent did not answer Hello: {other:?}"))),
    };

    let sock = super::client_socket(dir);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let routes = Arc::new(Mutex::new(Routes::default()));
    let next_id = Arc::new(AtomicU32::new(1));

    // Guest -> clients.
    let r = routes.clone();
    let sock_for_exit = sock.clone();
    std::thread::spawn(move || {
        while let Ok(Some(mut msg)) = read_frame::<GuestMsg>(&mut vm_in) {
            let ends = msg.ends_request();
            let Some(id) = msg.id_mut() else { continue };
            let global = *id;
            let mut routes = lock(&r);
            let Some(route) = routes.by_global.get(&global) else { continue };
            *id = route.local_id;
            let out = route.out.clone();
            if ends {
                routes.by_global.remove(&global);
            }
            drop(routes);
            let _ = lock(&out).write_all(&encode(&msg));
        }
        // The VM is gone: so is the proxy.
        let _ = std::fs::remove_file(&sock_for_exit);
        std::process::exit(0);
    });

    let mut client_no = 0u64;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        client_no += 1;
        let (routes, vm_out, next_id, hello) = (routes.clone(), vm_out.clone(), next_id.clone(), hello.clone());
        let client = client_no;
        std::thread::spawn(move || serve_client(client, conn, &routes, &vm_out, &next_id, &hello));
    }
    Ok(())
}

fn serve_client(
    client: u64,
    conn: UnixStream,
    routes: &Mutex<Routes>,
    vm_out: &Mutex<UnixStream>,
    next_id: &AtomicU32,
    hello: &GuestMsg,
) {
    let Ok(out) = conn.try_clone() else { return };
    let out = Arc::new(Mutex::new(out));
    let mut input = conn;
    // This client's ids -> global ids, and which of them are execs (killed if it goes away).
    let mut ids: HashMap<u32, u32> = HashMap::new();
    let mut execs: Vec<u32> = Vec::new();
    while let Ok(Some(mut msg)) = read_frame::<HostMsg>(&mut input) {
        if let HostMsg::Hello { .. } = msg {
            let _ = lock(&out).write_all(&encode(hello));
            continue;
        }
        let opens = msg.opens_request();
        let is_exec = matches!(msg, HostMsg::Exec { .. });
        if let Some(id) = msg.id_mut() {
            let global = if opens {
                let g = next_id.fetch_add(1, Ordering::Relaxed);
                ids.insert(*id, g);
                lock(routes).by_global.insert(g, Route { client, local_id: *id, out: out.clone() });
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
        if lock(vm_out).write_all(&encode(&msg)).is_err() {
            break;
        }
    }
    // The client went away: its processes go too, and its routes.
    let mut routes = lock(routes);
    for g in execs {
        if routes.by_global.contains_key(&g) {
            let _ = lock(vm_out).write_all(&encode(&HostMsg::Signal { id: g, signal: libc::SIGKILL }));
        }
    }
    routes.by_global.retain(|_, r| r.client != client);
}
