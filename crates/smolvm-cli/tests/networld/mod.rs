//! A small world of network namespaces, built by the tests that need one (the network policy,
//! secrets at the egress):
//!
//! ```text
//!  netns "host" (smolvm, QEMU, the network processes)        netns "inet" (the internet)
//!   lo: 127.0.0.1 -> HTTP :18777 (a host-only service)         lo: 198.51.100.10 -> HTTP :80, HTTPS :443
//!       169.254.169.254 -> HTTP :80 (a metadata service)           203.0.113.10  -> HTTP :80, echo :7 (TCP, UDP)
//!   vh: 192.0.2.1/24 -> HTTP 0.0.0.0:18778  ---- veth ----   vi: 192.0.2.2/24
//!   default route via 192.0.2.2
//! ```
//! The sandboxes' resolver gets a hosts file: a.test and b.test are 198.51.100.10 (one IP,
//! two names; the HTTPS server has a test CA's certificate for both, `ca.pem` in `files`),
//! c.test is 203.0.113.10, internal.test is 127.0.0.1 (DNS rebinding). `GET /headers` on
//! the HTTP(S) servers answers with the request's headers.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::common::{self, release_dir};

pub const A_TEST: &str = "198.51.100.10";
pub const C_TEST: &str = "203.0.113.10";

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The two namespaces, their servers, and a home whose image cache holds the release.
pub struct World {
    pub host: String,
    pub inet: String,
    pub servers: Vec<Child>,
    pub home: tempfile::TempDir,
    pub files: tempfile::TempDir,
    pub release: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        common::cleanup(self.home.path());
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.host, &self.inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA and a certificate for a.test and b.test signed by it.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=smolvm test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=a.test",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:a.test,DNS:b.test\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "srv.pem",
        ],
    );
}

fn start_servers(ns: &str, specs: &[String]) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/netns_servers.py");
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(script)
        .args(specs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "servers in {ns} did not start");
    c
}

pub fn world() -> World {
    // Two worlds of one test process (tests run in parallel) need names of their own.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!("{}{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let (host, inet) = (format!("smv-host-{id}"), format!("smv-inet-{id}"));
    let (vh, vi) = (format!("smvh{id}"), format!("smvi{id}"));
    let files = tempfile::tempdir().unwrap();
    certificates(files.path());
    let mut w = World {
        host: host.clone(),
        inet: inet.clone(),
        servers: vec![],
        home: tempfile::tempdir().unwrap(),
        files,
        release: release_dir(),
    };
    run(&["ip", "netns", "add", &host]);
    run(&["ip", "netns", "add", &inet]);
    run(&["ip", "link", "add", &vh, "type", "veth", "peer", "name", &vi]);
    run(&["ip", "link", "set", &vh, "netns", &host]);
    run(&["ip", "link", "set", &vi, "netns", &inet]);
    let h = |args: &[&str]| run(&[&["ip", "netns", "exec", &host], args].concat());
    let i = |args: &[&str]| run(&[&["ip", "netns", "exec", &inet], args].concat());
    h(&["ip", "link", "set", "lo", "up"]);
    h(&["ip", "addr", "add", "192.0.2.1/24", "dev", &vh]);
    h(&["ip", "link", "set", &vh, "up"]);
    h(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    h(&["ip", "route", "add", "default", "via", "192.0.2.2"]);
    i(&["ip", "link", "set", "lo", "up"]);
    i(&["ip", "addr", "add", "192.0.2.2/24", "dev", &vi]);
    i(&["ip", "link", "set", &vi, "up"]);
    i(&["ip", "addr", "add", &format!("{A_TEST}/32"), "dev", "lo"]);
    i(&["ip", "addr", "add", &format!("{C_TEST}/32"), "dev", "lo"]);

    let f = w.files.path();
    let (cert, key) = (f.join("srv.pem"), f.join("srv.key"));
    w.servers.push(start_servers(
        &inet,
        &[
            format!("http:{A_TEST}:80:inet-a"),
            format!("https:{A_TEST}:443:inet-a-tls:{}:{}", cert.display(), key.display()),
            format!("http:{C_TEST}:80:inet-c"),
            format!("echo:{C_TEST}:7"),
            format!("udpecho:{C_TEST}:7"),
        ],
    ));
    w.servers.push(start_servers(
        &host,
        &[
            "http:127.0.0.1:18777:host-loopback".into(),
            "http:0.0.0.0:18778:host-any".into(),
            "http:169.254.169.254:80:metadata".into(),
        ],
    ));
    std::fs::write(
        f.join("hosts"),
        format!("{A_TEST} a.test b.test\n{C_TEST} c.test\n127.0.0.1 internal.test\n169.254.169.254 metadata.test\n"),
    )
    .unwrap();
    // The images go into the cache from the release directory: no download in the namespace.
    common::ok(w.cmd_root().args(["image", "import"]).arg(&w.release));
    w
}

impl World {
    /// `smolvm` in the root namespace (no network needed).
    pub fn cmd_root(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
        c.env("SMOLVM_HOME", self.home.path())
            .env("SMOLVM_IMAGES_MANIFEST", self.release.join("manifest.json"))
            .env("SMOLVM_IMAGES_URL", "http://127.0.0.1:9/unreachable")
            .env_remove("SMOLVM_LOG");
        c
    }

    /// `smolvm` in the "host" namespace, with the test resolver. No image variables: the
    /// release `image import` made this home's default is used.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host, env!("CARGO_BIN_EXE_smolvm")])
            .env("SMOLVM_HOME", self.home.path())
            .env_remove("SMOLVM_IMAGES_MANIFEST")
            .env_remove("SMOLVM_IMAGES_URL")
            .env("SMOLVM_RESOLVER_HOSTS", self.files.path().join("hosts"))
            .env_remove("SMOLVM_LOG");
        c
    }

    /// Runs `bash -c script` in a sandbox: (exit code, stdout).
    pub fn sh(&self, name: &str, script: &str) -> (i32, String) {
        let out = self.cmd().args(["exec", name, "--timeout", "60", "--", "bash", "-c", script]).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetches `url` from inside the sandbox with curl; the body if it worked.
    pub fn fetch(&self, name: &str, url: &str) -> Option<String> {
        let (code, out) = self.sh(name, &format!("curl -sS --max-time 8 --cacert /root/ca.pem {url}"));
        (code == 0).then_some(out)
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&common::ok(self.cmd().args(["status", name, "--json"]))).unwrap()
    }

    /// Asserts the last refusals of `name` include one for `dest` (and its rule is not empty).
    pub fn assert_refused(&self, name: &str, dest: &str) {
        let s = self.status(name);
        let recent = s["network_refusals"]["recent"].as_array().unwrap();
        assert!(
            recent.iter().any(|r| r["dest"] == dest && !r["rule"].as_str().unwrap_or_default().is_empty()),
            "no refusal of {dest} in status --json: {}",
            s["network_refusals"]
        );
    }

    pub fn create(&self, name: &str, extra: &[&str]) {
        common::ok(self.cmd().args(["create", "--name", name]).args(extra));
        common::ok(self.cmd().args(["cp"]).arg(self.files.path().join("ca.pem")).arg(format!("{name}:/root/ca.pem")));
    }
}
