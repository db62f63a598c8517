//! The secrets interceptor's cost, measured on the host in the same run (no VM: the guest's
//! own TLS cost under emulation would drown it): a real TLS "provider" on 127.0.0.1 with a
//! certificate of its own CA, and a TLS client that reaches it either
//!
//! - **passed through**: its bytes copied both ways over a socket pair, as the network
//!   process pipes every connection that is not a secret's (the client trusts the provider's
//!   CA), or
//! - **intercepted**: through the real `Interceptor` (the sandbox CA's certificate to the
//!   client, the request gate, the real value added, the response scrubbed, a verified TLS
//!   connection to the provider).
//!
//! Figures: a request on a new connection (handshakes included) and on a kept-alive one, each
//! way, and a 64 MiB response's throughput each way, with their ratios.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, ServerName};
use smolvm::net::intercept::{ca, InterceptConfig, Interceptor, SecretRule};

use crate::{ms, Report};

const NAME: &str = "bench.test";
const VALUE: &str = "sk-bench-REAL-VALUE-0123456789abcdefghij";
const PLACEHOLDER: &str = "sk-smolvm-placeholder-00112233445566778899";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider: HTTP/1.1 over TLS, keep-alive; `/small` answers 2 bytes, `/blob` `blob`
/// bytes. It checks that the intercepted requests carry the real value.
fn start_provider(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    blob: usize,
) -> anyhow::Result<SocketAddr> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for sock in l.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let _ = sock.set_nodelay(true);
                let conn = rustls::ServerConnection::new(cfg)?;
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let chunk = vec![0x5au8; 256 * 1024];
                loop {
                    let mut head = Vec::new();
                    let mut r = BufReader::new(&mut tls);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        head.extend_from_slice(line.as_bytes());
                        if line == "\r\n" {
                            break;
                        }
                    }
                    drop(r);
                    let head = String::from_utf8_lossy(&head);
                    let auth = head.lines().find_map(|l| l.strip_prefix("Authorization: ")).unwrap_or_default();
                    let ok = auth.is_empty() || auth == format!("Bearer {VALUE}");
                    let size = if head.starts_with("GET /blob") { blob } else { 2 };
                    let status = if ok { "200 OK" } else { "401 Unauthorized" };
                    write!(tls, "HTTP/1.1 {status}\r\nContent-Length: {size}\r\n\r\n")?;
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        tls.write_all(&chunk[..n])?;
                        left -= n;
                    }
                    tls.flush()?;
                }
            });
        }
    });
    Ok(addr)
}

/// Copies bytes both ways between `a` and `b` until either closes (the pass-through path).
fn pipe(a: UnixStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b, &mut a);
        let _ = a.shutdown(std::net::Shutdown::Write);
    });
}

/// A TLS client over `sock` trusting `roots`, for `NAME`.
fn client(
    sock: UnixStream,
    roots: &rustls::RootCertStore,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, UnixStream>> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from(NAME)?)?;
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// One request; returns the body's length.
fn request(
    tls: &mut rustls::StreamOwned<rustls::ClientConnection, UnixStream>,
    path: &str,
    auth: bool,
) -> anyhow::Result<usize> {
    let auth = if auth { format!("Authorization: Bearer {PLACEHOLDER}\r\n") } else { String::new() };
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n")?;
    tls.flush()?;
    let mut r = BufReader::new(tls);
    let mut status = String::new();
    r.read_line(&mut status)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "the provider answered {status:?}");
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.trim().parse()?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = r.read(&mut body[..left.min(256 * 1024)])?;
        anyhow::ensure!(n > 0, "the body ended early");
        left -= n;
    }
    Ok(len)
}

struct Paths {
    upstream: SocketAddr,
    interceptor: Arc<Interceptor>,
    provider_roots: rustls::RootCertStore,
    sandbox_roots: rustls::RootCertStore,
}

impl Paths {
    /// A new connection to the provider, intercepted or passed through.
    fn connect(&self, intercepted: bool) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, UnixStream>> {
        let (ours, theirs) = UnixStream::pair()?;
        if intercepted {
            self.interceptor.spawn(theirs, self.upstream, NAME.to_string());
            client(ours, &self.sandbox_roots)
        } else {
            let up = TcpStream::connect(self.upstream)?;
            up.set_nodelay(true)?;
            pipe(theirs, up);
            client(ours, &self.provider_roots)
        }
    }
}

fn roots(pem: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
        r.add(c?)?;
    }
    Ok(r)
}

pub fn figures(runs: usize, blob_mib: usize, report: &mut Report) -> anyhow::Result<()> {
    let (provider_cert, provider_key) = ca::generate("bench provider").map_err(anyhow::Error::msg)?;
    let provider_ca = ca::Ca::from_pem("bench provider", &provider_cert, &provider_key).map_err(anyhow::Error::msg)?;
    let (chain, key) = provider_ca.leaf(NAME).map_err(anyhow::Error::msg)?;
    let upstream = start_provider(chain, key, blob_mib << 20)?;
    let (sandbox_cert, sandbox_key) = ca::generate("bench").map_err(anyhow::Error::msg)?;
    let cfg = InterceptConfig {
        rules: vec![SecretRule {
            name: "BENCH_KEY".into(),
            hosts: vec![NAME.into()],
            placeholder: PLACEHOLDER.into(),
            value: VALUE.into(),
            headers: vec![],
        }],
        ca_label: "bench".into(),
        ca_cert_pem: sandbox_cert.clone(),
        ca_key_pem: sandbox_key,
        extra_roots_pem: Some(provider_cert.clone()),
    };
    let interceptor =
        Arc::new(Interceptor::new(&cfg, Arc::new(|_: smolvm::net::refusals::Refusal| {})).context("the interceptor")?);
    let p =
        Paths { upstream, interceptor, provider_roots: roots(&provider_cert)?, sandbox_roots: roots(&sandbox_cert)? };

    let (mut new_pass, mut new_icpt, mut ka_pass, mut ka_icpt) = (vec![], vec![], vec![], vec![]);
    let (mut tp_pass, mut tp_icpt, mut ratio_new, mut ratio_tp) = (vec![], vec![], vec![], vec![]);
    for run in 0..=runs {
        // Alternated in each run, so that a noisy moment weighs on both.
        let one = |intercepted: bool| -> anyhow::Result<(f64, f64, f64)> {
            let t = Instant::now();
            let mut c = p.connect(intercepted)?;
            request(&mut c, "/small", intercepted)?;
            let first = ms(t.elapsed());
            let t = Instant::now();
            for _ in 0..10 {
                request(&mut c, "/small", intercepted)?;
            }
            let kept = ms(t.elapsed()) * 1000.0 / 10.0;
            let t = Instant::now();
            let n = request(&mut c, "/blob", intercepted)?;
            let mibs = n as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
            Ok((first, kept, mibs))
        };
        let (pf, pk, pt) = one(false)?;
        let (i_f, ik, it) = one(true)?;
        if run == 0 {
            continue;
        }
        new_pass.push(pf);
        new_icpt.push(i_f);
        ka_pass.push(pk);
        ka_icpt.push(ik);
        tp_pass.push(pt);
        tp_icpt.push(it);
        ratio_new.push(i_f / pf);
        ratio_tp.push(it / pt);
    }
    report.add("https request, new conn, passed through", "ms", &new_pass);
    report.add("https request, new conn, intercepted", "ms", &new_icpt);
    report.add("https request, kept-alive, passed through", "us", &ka_pass);
    report.add("https request, kept-alive, intercepted", "us", &ka_icpt);
    report.add(&format!("{blob_mib} MiB response, passed through"), "MiB/s", &tp_pass);
    report.add(&format!("{blob_mib} MiB response, intercepted+scrubbed"), "MiB/s", &tp_icpt);
    // The scrubber alone (no TLS): a response framed and scanned in 16 KiB reads, as the
    // interceptor gets them.
    let mut alone = Vec::new();
    let body = vec![0x5au8; 16 * 1024];
    for run in 0..=runs {
        let mut s = smolvm::net::intercept::response::ResponseScrub::new(vec![smolvm::net::intercept::scrub::Mask {
            value: VALUE.as_bytes().to_vec(),
            mask: PLACEHOLDER.as_bytes()[..VALUE.len()].to_vec(),
        }]);
        let mut sent =
            std::collections::VecDeque::from([smolvm::net::intercept::request::Sent { head: false, upgrade: false }]);
        let mut out = Vec::with_capacity(64 * 1024);
        let t = Instant::now();
        s.feed(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob_mib << 20).as_bytes(),
            &mut out,
            &mut sent,
        )?;
        for _ in 0..(blob_mib << 20) / body.len() {
            out.clear();
            s.feed(&body, &mut out, &mut sent)?;
        }
        let mibs = blob_mib as f64 / t.elapsed().as_secs_f64();
        if run > 0 {
            alone.push(mibs);
        }
    }
    report.add(&format!("{blob_mib} MiB through the scrubber alone"), "MiB/s", &alone);
    report.add("  new conn: intercepted / passed", "x", &ratio_new);
    report.add("  throughput: intercepted / passed", "x", &ratio_tp);
    Ok(())
}
