//! Secrets added at the egress: TLS connections to a secret's hosts are terminated here, their
//! request heads rewritten (placeholder → real value), and sent on over a verified TLS
//! connection to the real host.
//!
//! Roles:
//! - **The network process** decides per connection: a TLS connection whose server name is one
//!   of a secret's hosts is handed to [`Interceptor::spawn`] over a socket pair (the stack
//!   pipes the guest's bytes into it as into any host connection); every other connection is
//!   never touched.
//! - **The interceptor thread** (one per such connection) is the TLS server the guest talks to,
//!   with a certificate for that name issued by the sandbox's own CA ([`ca`]), which the guest
//!   was told to trust, and offering HTTP/1.1 only; and the TLS client of the real host,
//!   verified against the host's roots (plus a test CA when configured). Guest → server
//!   plaintext goes through [`request::RequestGate`] (strict parse, the value only in the
//!   secret's own header, re-serialised heads); server → guest plaintext through
//!   [`response::ResponseScrub`] (every real value masked by its placeholder).
//!
//! A refused request is answered by this thread with an HTTP error naming why, recorded as a
//! refusal of the sandbox, and the connection is closed; the server never sees it.
//!
//! The real values live only in this process's memory (and the 0600 file of the sandbox's
//! host directory that the library keeps them in); they are never logged.

pub mod ca;
pub mod request;
pub mod response;
pub mod rules;
pub mod scrub;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use request::RequestGate;
use response::ResponseScrub;
use rules::{Binding, HeaderSlot};

/// How long the real host may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// An intercepted connection with no traffic either way for this long is closed.
const IDLE: Duration = Duration::from_secs(600);

/// How long the server may pause on bytes that could begin a secret before they go to the
/// guest masked (see `scrub.rs`).
const HOLD: Duration = Duration::from_millis(20);

/// One secret as the network process knows it: its value, its placeholder, where it may go
/// (hosts, and the headers it is bound to; none given: [`HeaderSlot::defaults`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct SecretRule {
    pub name: String,
    pub hosts: Vec<String>,
    pub placeholder: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderSlot>,
}

impl std::fmt::Debug for SecretRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRule").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

/// What the library hands the network process (over its control socket) for a sandbox with
/// secrets.
#[derive(Clone, Serialize, Deserialize)]
pub struct InterceptConfig {
    pub rules: Vec<SecretRule>,
    /// The sandbox CA's label (the sandbox's name), certificate and key (PEM).
    pub ca_label: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// Roots trusted for the real hosts besides the host's own (tests: their CA).
    #[serde(default)]
    pub extra_roots_pem: Option<String>,
}

impl std::fmt::Debug for InterceptConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptConfig").field("rules", &self.rules).finish_non_exhaustive()
    }
}

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("the sandbox CA: {0}")]
    Ca(String),
    #[error("the roots for the real hosts: {0}")]
    Roots(String),
}

/// Where the interceptor reports the requests it refuses (the network process's refusal log).
pub type RefusalSink = Arc<dyn Fn(crate::net::refusals::Refusal) + Send + Sync>;

/// See the module documentation.
pub struct Interceptor {
    ca: ca::Ca,
    /// Bindings by (normalised) host name.
    rules: RwLock<HashMap<String, Vec<Binding>>>,
    refusals: RefusalSink,
    upstream: Arc<rustls::ClientConfig>,
    /// Server configurations by name (a leaf certificate each), made on first use.
    servers: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self.rules.read().map(|r| r.keys().cloned().collect()).unwrap_or_default();
        f.debug_struct("Interceptor").field("hosts", &hosts).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rules_by_host(rules: &[SecretRule]) -> HashMap<String, Vec<Binding>> {
    let mut by_host: HashMap<String, Vec<Binding>> = HashMap::new();
    for r in rules {
        let slots = if r.headers.is_empty() { HeaderSlot::defaults() } else { r.headers.clone() };
        for h in &r.hosts {
            by_host.entry(crate::net::policy::normalize_name(h)).or_default().push(Binding {
                name: r.name.clone(),
                placeholder: r.placeholder.as_bytes().to_vec(),
                value: r.value.as_bytes().to_vec(),
                slots: slots.clone(),
            });
        }
    }
    by_host
}

impl Interceptor {
    pub fn new(cfg: &InterceptConfig, refusals: RefusalSink) -> Result<Interceptor, InterceptError> {
        let ca = ca::Ca::from_pem(&cfg.ca_label, &cfg.ca_cert_pem, &cfg.ca_key_pem).map_err(InterceptError::Ca)?;
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if let Some(pem) = &cfg.extra_roots_pem {
            for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
                let c: CertificateDer<'static> = c.map_err(|e| InterceptError::Roots(e.to_string()))?;
                roots.add(c).map_err(|e| InterceptError::Roots(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(InterceptError::Roots("no trusted roots on this host (/etc/ssl/certs)".into()));
        }
        let mut upstream = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| InterceptError::Roots(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        upstream.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Interceptor {
            ca,
            rules: RwLock::new(rules_by_host(&cfg.rules)),
            refusals,
            upstream: Arc::new(upstream),
            servers: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the secrets (a `secret set` or `unset` on a running sandbox): new
    /// connections use them.
    pub fn set_rules(&self, rules: &[SecretRule]) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules_by_host(rules);
    }

    /// Whether a TLS connection to `server_name` is intercepted.
    pub fn intercepts(&self, server_name: &str) -> bool {
        let name = crate::net::policy::normalize_name(server_name);
        self.rules.read().unwrap_or_else(|p| p.into_inner()).contains_key(&name)
    }

    fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = servers.get(name) {
            return Ok(c.clone());
        }
        let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = self.ca.leaf(name)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        // HTTP/1.1 only: its request heads are what the rewriter reads (an h2 client falls
        // back to it when the server offers nothing else).
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        servers.insert(name.to_string(), cfg.clone());
        Ok(cfg)
    }

    /// Serves one intercepted connection on its own thread: `guest` carries the guest's TLS
    /// bytes (from its ClientHello on), `dest` is where the guest was connecting.
    pub fn spawn(self: &Arc<Self>, guest: UnixStream, dest: SocketAddr, server_name: String) {
        let me = self.clone();
        std::thread::spawn(move || {
            let name = crate::net::policy::normalize_name(&server_name);
            match me.serve(guest, dest, &name) {
                Ok(Ended::Done { requests, filled, masked }) => tracing::info!(
                    "{name} ({dest}): {requests} request(s), {filled} secret header(s) added, {masked} echo(es) masked"
                ),
                Ok(Ended::Refused(r)) => {
                    tracing::info!("{name} ({dest}): refused ({}): {}", r.status, r.reason);
                    (me.refusals)(crate::net::refusals::Refusal {
                        time: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64),
                        proto: "https".into(),
                        dest: dest.to_string(),
                        name: Some(name.clone()),
                        rule: format!("secrets: {}", r.reason),
                    });
                }
                Err(e) => tracing::info!("{name} ({dest}): intercepted connection ended: {e}"),
            }
        });
    }

    fn serve(&self, guest: UnixStream, dest: SocketAddr, name: &str) -> io::Result<Ended> {
        let server = self.server_config(name).map_err(io::Error::other)?;
        let bindings = self.rules.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned().unwrap_or_default();
        let masks = bindings.iter().map(Binding::mask).collect();
        let up = TcpStream::connect_timeout(&dest, CONNECT_TIMEOUT)?;
        let _ = up.set_nodelay(true);
        let sni = ServerName::try_from(name.to_string()).map_err(|e| io::Error::other(e.to_string()))?;
        let client = rustls::ClientConnection::new(self.upstream.clone(), sni).map_err(io::Error::other)?;
        let guest_side = rustls::ServerConnection::new(server).map_err(io::Error::other)?;
        relay(guest, guest_side, up, client, RequestGate::new(name, bindings), ResponseScrub::new(masks))
    }
}

/// How an intercepted connection ended.
#[derive(Debug)]
enum Ended {
    Done {
        requests: u64,
        filled: u64,
        masked: u64,
    },
    /// A request (or the server's answer) was refused: the guest was told, the server
    /// connection dropped.
    Refused(request::Refusal),
}

/// The answer the guest gets for a refused request.
fn refusal_response(r: &request::Refusal) -> Vec<u8> {
    let reason = match r.status {
        400 => "Bad Request",
        403 => "Forbidden",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let body = format!("smolvm egress refused this request: {}\n", r.reason);
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\nX-Smolvm-Refused: secrets\r\n\r\n{body}",
        r.status,
        body.len()
    )
    .into_bytes()
}

/// One TLS endpoint over a non-blocking socket.
struct Side<S> {
    tls: rustls::Connection,
    sock: S,
    /// The peer closed (TCP end or close_notify).
    eof: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

impl<S: Read + Write> Side<S> {
    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what arrived and returns its plaintext.
    fn receive(&mut self) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        match self.tls.read_tls(&mut self.sock) {
            Ok(0) => self.eof = true,
            Ok(_) => {
                self.tls.process_new_packets().map_err(io::Error::other)?;
            }
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(e),
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.eof = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(plain)
    }
}

/// Waits until `fd` is readable or writable as asked, at most `ms` milliseconds; the
/// `revents` of each.
fn wait(fds: &mut [libc::pollfd], ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd structures of that length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
    }
    Ok(n as usize)
}

/// Answers the guest with `r` and closes its side (bounded: a guest that does not read gets
/// what fitted).
fn answer_refusal<S: Read + Write + AsRawFd>(g: &mut Side<S>, r: &request::Refusal) -> io::Result<()> {
    g.tls.writer().write_all(&refusal_response(r))?;
    g.tls.send_close_notify();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.tls.wants_write() && Instant::now() < deadline {
        g.flush()?;
        let mut fds = [libc::pollfd { fd: g.sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
        wait(&mut fds, 100)?;
    }
    Ok(())
}

/// Moves plaintext between the two TLS connections until both are done: guest to server
/// through `gate`, server to guest through `scrub`.
fn relay(
    guest: UnixStream,
    guest_tls: rustls::ServerConnection,
    up: TcpStream,
    up_tls: rustls::ClientConnection,
    mut gate: RequestGate,
    mut scrub: ResponseScrub,
) -> io::Result<Ended> {
    guest.set_nonblocking(true)?;
    up.set_nonblocking(true)?;
    let mut g = Side { tls: rustls::Connection::Server(guest_tls), sock: guest, eof: false };
    let mut u = Side { tls: rustls::Connection::Client(up_tls), sock: up, eof: false };
    let mut last = Instant::now();
    let (mut g_closed, mut u_closed) = (false, false);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        g.flush()?;
        u.flush()?;
        if g.eof && !u_closed {
            u.tls.send_close_notify();
            u.flush()?;
            let _ = u.sock.shutdown(std::net::Shutdown::Write);
            u_closed = true;
        }
        if u.eof && !g_closed {
            out.clear();
            scrub.end(&mut out);
            g.tls.writer().write_all(&out)?;
            g.tls.send_close_notify();
            g.flush()?;
            let _ = g.sock.shutdown(std::net::Shutdown::Write);
            g_closed = true;
        }
        if (g.eof && u.eof) || (u.eof && g_closed && !g.tls.wants_write()) {
            return Ok(Ended::Done { requests: gate.requests, filled: gate.filled, masked: scrub.replaced() });
        }
        // Back-pressure: a side is read only when what it would feed has been sent on.
        let read_g = !g.eof && !u.tls.wants_write();
        let read_u = !u.eof && !g.tls.wants_write();
        let mut fds = [
            libc::pollfd {
                fd: g.sock.as_raw_fd(),
                events: (if read_g { libc::POLLIN } else { 0 }) | (if g.tls.wants_write() { libc::POLLOUT } else { 0 }),
                revents: 0,
            },
            libc::pollfd {
                fd: u.sock.as_raw_fd(),
                events: (if read_u { libc::POLLIN } else { 0 }) | (if u.tls.wants_write() { libc::POLLOUT } else { 0 }),
                revents: 0,
            },
        ];
        let holding = scrub.holding();
        let n = wait(&mut fds, if holding { HOLD.as_millis() as i32 } else { 1000 })?;
        if n == 0 {
            if holding {
                // The server paused on bytes that could begin a secret: they go out masked.
                out.clear();
                scrub.pause(&mut out);
                g.tls.writer().write_all(&out)?;
            } else if last.elapsed() > IDLE {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle"));
            }
            continue;
        }
        last = Instant::now();
        let hup = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if fds[0].revents & hup != 0 {
            let plain = g.receive()?;
            if !plain.is_empty() {
                out.clear();
                if let Err(r) = gate.feed(&plain, &mut out) {
                    // Never forwarded: the server connection is dropped unsent.
                    drop(u);
                    answer_refusal(&mut g, &r)?;
                    return Ok(Ended::Refused(r));
                }
                u.tls.writer().write_all(&out)?;
            }
        }
        if fds[1].revents & hup != 0 {
            let plain = u.receive()?;
            if !plain.is_empty() {
                out.clear();
                match scrub.feed(&plain, &mut out, &mut gate.sent) {
                    Ok(ev) => {
                        g.tls.writer().write_all(&out)?;
                        if let Some(switched) = ev.upgrade_answered {
                            out.clear();
                            if let Err(r) = gate.upgrade_answered(switched, &mut out) {
                                drop(u);
                                answer_refusal(&mut g, &r)?;
                                return Ok(Ended::Refused(r));
                            }
                            u.tls.writer().write_all(&out)?;
                        }
                    }
                    Err(r) => {
                        drop(u);
                        answer_refusal(&mut g, &r)?;
                        return Ok(Ended::Refused(r));
                    }
                }
            }
        }
    }
}
