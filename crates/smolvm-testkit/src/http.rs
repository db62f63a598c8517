//! A small, real HTTP/1.1 server on 127.0.0.1 for benchmarks and download tests: serves a directory, honours
//! `Range: bytes=N-`, counts requests per path, and can misbehave on purpose (corrupt a file,
//! truncate it, or drop the connection part-way once).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A way to misbehave for one path.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Serve the file with one byte flipped in the middle.
    Corrupt,
    /// Serve only the first half (with a matching Content-Length).
    Truncate,
    /// On the first request, close the connection after this many body bytes.
    DropOnceAfter(u64),
}

#[derive(Debug, Default)]
struct State {
    requests: Vec<(String, Option<String>)>,
    faults: HashMap<String, Fault>,
}

/// The running server (it stops when the test process ends).
#[derive(Debug, Clone)]
pub struct Server {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    /// Serves `root` on a free port of 127.0.0.1 until the process ends.
    pub fn start(root: PathBuf) -> std::io::Result<Server> {
        Server::start_on(root, "127.0.0.1:0")
    }

    /// Serves `root` on `addr` until the process ends.
    pub fn start_on(root: PathBuf, addr: &str) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (root, st) = (root.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &root, &st);
                });
            }
        });
        Ok(Server { url, state })
    }

    pub fn fault(&self, path: &str, fault: Fault) {
        lock(&self.state).faults.insert(path.to_string(), fault);
    }

    /// GET requests for `path` so far, with their Range header.
    pub fn requests_for(&self, path: &str) -> Vec<Option<String>> {
        lock(&self.state).requests.iter().filter(|(p, _)| p == path).map(|(_, r)| r.clone()).collect()
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve(conn: TcpStream, root: &std::path::Path, st: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let fault = {
        let mut s = lock(st);
        s.requests.push((path.clone(), range.clone()));
        let f = s.faults.get(&path).copied();
        if let Some(Fault::DropOnceAfter(_)) = f {
            s.faults.remove(&path);
        }
        f
    };
    let mut out = conn;
    let file = root.join(path.trim_start_matches('/'));
    let Ok(mut body) = std::fs::read(&file) else {
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    match fault {
        Some(Fault::Corrupt) => {
            let mid = body.len() / 2;
            body[mid] ^= 0xff;
        }
        Some(Fault::Truncate) => body.truncate(body.len() / 2),
        _ => {}
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, slice) = match start {
        Some(s) if s >= body.len() => {
            let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", body.len());
            return out.write_all(head.as_bytes());
        }
        Some(s) => {
            (format!("206 Partial Content\r\nContent-Range: bytes {s}-{}/{}", body.len() - 1, body.len()), &body[s..])
        }
        None => ("200 OK".to_string(), &body[..]),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
        slice.len()
    );
    out.write_all(head.as_bytes())?;
    if let Some(Fault::DropOnceAfter(n)) = fault {
        out.write_all(&slice[..(n as usize).min(slice.len())])?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    out.write_all(slice)?;
    out.flush()
}
