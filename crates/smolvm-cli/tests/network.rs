//! The network policy, end to end: real sandboxes whose guests (root inside) try to reach what
//! they must not, in a small world of network namespaces this test builds itself.
//!
//! ```text
//!  netns "host" (smolvm, QEMU, the network processes)        netns "inet" (the internet)
//!   lo: 127.0.0.1 -> HTTP :18777 (a host-only service)         lo: 198.51.100.10 -> HTTP :80, HTTPS :443
//!       169.254.169.254 -> HTTP :80 (a metadata service)           203.0.113.10  -> HTTP :80, echo :7 (TCP, UDP)
//!   vh: 192.0.2.1/24 -> HTTP 0.0.0.0:18778  ---- veth ----   vi: 192.0.2.2/24
//!   default route via 192.0.2.2
//! ```
//! The sandboxes' resolver gets a hosts file: a.test and b.test are 198.51.100.10 (one IP,
//! two names), c.test is 203.0.113.10, internal.test is 127.0.0.1 (DNS rebinding).
//!
//! Needs root (network namespaces), QEMU and a built release: `#[ignore]`d for a plain
//! `cargo test`; `scripts/test.sh` runs it.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{release_dir, tag_of};

const A_TEST: &str = "198.51.100.10";
const C_TEST: &str = "203.0.113.10";

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The two namespaces, their servers, and a home whose image cache holds the release.
struct World {
    host: String,
    inet: String,
    servers: Vec<Child>,
    home: tempfile::TempDir,
    files: tempfile::TempDir,
    release: PathBuf,
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

fn world() -> World {
    let id = std::process::id();
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
    fn cmd_root(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
        c.env("SMOLVM_HOME", self.home.path())
            .env("SMOLVM_IMAGES_MANIFEST", self.release.join("manifest.json"))
            .env("SMOLVM_IMAGES_URL", "http://127.0.0.1:9/unreachable")
            .env_remove("SMOLVM_LOG");
        c
    }

    /// `smolvm` in the "host" namespace, with the test resolver. No image variables: the
    /// release `image import` made this home's default is used.
    fn cmd(&self) -> Command {
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
    fn sh(&self, name: &str, script: &str) -> (i32, String) {
        let out = self.cmd().args(["exec", name, "--timeout", "60", "--", "bash", "-c", script]).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetches `url` from inside the sandbox with curl; the body if it worked.
    fn fetch(&self, name: &str, url: &str) -> Option<String> {
        let (code, out) = self.sh(name, &format!("curl -sS --max-time 8 --cacert /root/ca.pem {url}"));
        (code == 0).then_some(out)
    }

    fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&common::ok(self.cmd().args(["status", name, "--json"]))).unwrap()
    }

    /// Asserts the last refusals of `name` include one for `dest` (and its rule is not empty).
    fn assert_refused(&self, name: &str, dest: &str) {
        let s = self.status(name);
        let recent = s["network_refusals"]["recent"].as_array().unwrap();
        assert!(
            recent.iter().any(|r| r["dest"] == dest && !r["rule"].as_str().unwrap_or_default().is_empty()),
            "no refusal of {dest} in status --json: {}",
            s["network_refusals"]
        );
    }

    fn create(&self, name: &str, extra: &[&str]) {
        common::ok(self.cmd().args(["create", "--name", name]).args(extra));
        common::ok(self.cmd().args(["cp"]).arg(self.files.path().join("ca.pem")).arg(format!("{name}:/root/ca.pem")));
    }
}

/// From the host namespace itself, the host-only services answer: the refusals below are the
/// policy's doing, not a broken test world.
fn assert_host_services_up(w: &World) {
    for url in ["http://127.0.0.1:18777/", "http://192.0.2.1:18778/", "http://169.254.169.254/"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &w.host, "curl", "-sS", "--max-time", "5", url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{url} from the host: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
#[ignore = "needs root, network namespaces and QEMU: run scripts/test.sh"]
fn the_network_policy_holds_against_a_hostile_guest() {
    let w = world();
    let _ = tag_of(&w.release);
    assert_host_services_up(&w);
    w.create("open", &[]);
    w.create("narrow", &["--allow-domain", "a.test"]);

    // --- default (internet only) ---
    assert_eq!(w.fetch("open", "http://a.test/").as_deref(), Some("inet-a host=a.test\n"));
    assert_eq!(w.fetch("open", "https://a.test/").as_deref(), Some("inet-a-tls host=a.test\n"));
    assert_eq!(
        w.fetch("open", &format!("http://{C_TEST}/")).as_deref(),
        Some(format!("inet-c host={C_TEST}\n")).as_deref()
    );
    let (code, out) = w.sh("open", &format!("exec 3<>/dev/tcp/{C_TEST}/7 && echo ping >&3 && head -c 5 <&3"));
    assert_eq!((code, out.as_str()), (0, "ping\n"), "raw TCP to the internet");
    let udp = format!(
        "python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
         s.sendto(b\"dgram\", (\"{C_TEST}\", 7)); print(s.recv(100).decode())'"
    );
    assert_eq!(w.sh("open", &udp), (0, "dgram\n".into()), "UDP to the internet");

    // The host, by every address the guest could use.
    for (url, dest) in [
        ("http://10.0.2.2:18777/", "10.0.2.2:18777"),
        ("http://10.0.2.2:18778/", "10.0.2.2:18778"),
        ("http://192.0.2.1:18778/", "192.0.2.1:18778"),
        ("http://169.254.169.254/", "169.254.169.254:80"),
        ("http://10.0.2.3:80/", "10.0.2.3:80"),
    ] {
        assert_eq!(w.fetch("open", url), None, "{url} must be unreachable from the guest");
        w.assert_refused("open", dest);
    }
    // A name the host resolver maps to the host's loopback (DNS rebinding).
    assert_eq!(w.fetch("open", "http://internal.test:18777/"), None);
    w.assert_refused("open", "127.0.0.1");
    assert_eq!(w.fetch("open", "http://metadata.test/"), None);
    // The other sandbox's forwarded SSH port, by the gateway and by the host's veth address.
    let ssh_port = w.status("narrow")["ssh_port"].as_u64().unwrap();
    for host in ["10.0.2.2", "192.0.2.1"] {
        let (code, _) = w.sh("open", &format!("timeout 8 bash -c 'exec 3<>/dev/tcp/{host}/{ssh_port}'"));
        assert_ne!(code, 0, "another sandbox's SSH port via {host} must be unreachable");
        w.assert_refused("open", &format!("{host}:{ssh_port}"));
    }

    // --- --allow-domain a.test ---
    assert_eq!(w.fetch("narrow", "http://a.test/").as_deref(), Some("inet-a host=a.test\n"));
    assert_eq!(w.fetch("narrow", "https://a.test/").as_deref(), Some("inet-a-tls host=a.test\n"));
    // b.test is the same IP: refused by its name (SNI, Host), and so is the IP by itself.
    assert_eq!(w.fetch("narrow", "https://b.test/"), None, "SNI b.test is not allowed");
    assert_eq!(w.fetch("narrow", &format!("--resolve b.test:443:{A_TEST} https://b.test/")), None);
    w.assert_refused("narrow", &format!("{A_TEST}:443"));
    assert_eq!(w.fetch("narrow", &format!("-H 'Host: b.test' http://{A_TEST}/")), None, "Host b.test is not allowed");
    w.assert_refused("narrow", &format!("{A_TEST}:80"));
    let (code, _) =
        w.sh("narrow", &format!("timeout 8 bash -c 'exec 3<>/dev/tcp/{A_TEST}/80; echo x >&3; head -c1 <&3'"));
    assert_ne!(code, 0, "raw TCP to the allowed name's IP names no host");
    assert_eq!(w.fetch("narrow", &format!("http://{C_TEST}/")), None, "an IP no allowed name resolved to");
    w.assert_refused("narrow", &format!("{C_TEST}:80"));
    assert_eq!(w.fetch("narrow", "http://c.test/"), None, "a name not allowed does not even resolve");
    w.assert_refused("narrow", "c.test");
    // Domain fronting: the allowed name sent to another address.
    assert_eq!(w.fetch("narrow", &format!("--resolve a.test:80:{C_TEST} http://a.test/")), None);

    // Adding b.test applies without a restart.
    let pid_before = w.status("narrow")["pid"].clone();
    common::ok(w.cmd().args(["network", "set", "narrow", "--allow-domain", "a.test", "--allow-domain", "b.test"]));
    assert_eq!(w.status("narrow")["pid"], pid_before, "no restart");
    assert_eq!(w.fetch("narrow", "https://b.test/").as_deref(), Some("inet-a-tls host=b.test\n"));
    assert_eq!(w.fetch("narrow", "http://b.test/").as_deref(), Some("inet-a host=b.test\n"));

    // --- --allow-cidr 203.0.113.0/24: that range only ---
    common::ok(w.cmd().args(["network", "set", "narrow", "--allow-cidr", "203.0.113.0/24"]));
    assert_eq!(
        w.fetch("narrow", &format!("http://{C_TEST}/")).as_deref(),
        Some(format!("inet-c host={C_TEST}\n")).as_deref()
    );
    assert_eq!(w.fetch("narrow", &format!("http://{A_TEST}/")), None);
    assert_eq!(w.fetch("narrow", "http://10.0.2.2:18777/"), None);

    // --- --allow-host-port 18777: exactly that port of the host ---
    common::ok(w.cmd().args(["network", "set", "narrow", "--allow-host-port", "18777"]));
    assert_eq!(w.fetch("narrow", "http://10.0.2.2:18777/").as_deref(), Some("host-loopback host=10.0.2.2:18777\n"));
    assert_eq!(
        w.fetch("narrow", "http://host.smolvm.internal:18777/").as_deref(),
        Some("host-loopback host=host.smolvm.internal:18777\n")
    );
    assert_eq!(w.fetch("narrow", "http://10.0.2.2:18778/"), None, "only the allowed port");
    assert_eq!(w.fetch("narrow", "http://192.0.2.1:18777/"), None, "only through the gateway");

    // --- --network none: nothing out, forwards in still work ---
    common::ok(w.cmd().args(["network", "set", "narrow", "--network", "none"]));
    assert_eq!(w.fetch("narrow", &format!("http://{C_TEST}/")), None);
    w.assert_refused("narrow", &format!("{C_TEST}:80"));
    assert_eq!(w.fetch("narrow", "http://a.test/"), None);
    let (code, out) = w.sh("narrow", "echo still-here");
    assert_eq!((code, out.as_str()), (0, "still-here\n"), "the agent still works");

    // The policy survives stop/start and is shown by status.
    common::ok(w.cmd().args(["stop", "narrow"]));
    common::ok(w.cmd().args(["start", "narrow"]));
    let s = w.status("narrow");
    assert_eq!(s["network"], "none", "{s}");
    // Booted from the imported release (no manifest variable); status and image show agree on
    // whether that release is the one pinned in this binary.
    let show: serde_json::Value = serde_json::from_str(&common::ok(w.cmd().args(["image", "show", "--json"]))).unwrap();
    assert_eq!(show["in_use"]["origin"]["kind"], "imported", "{show}");
    assert_eq!(s["pinned"], show["in_use"]["pinned"], "{s}");
    assert_eq!(s["network_policy"]["mode"], "none", "{s}");
    assert!(s["network_refusals"]["refused"].as_u64().unwrap() >= 8, "{s}");
    assert_eq!(w.fetch("narrow", &format!("http://{C_TEST}/")), None);
    let log = common::ok(w.cmd().args(["logs", "narrow", "--network"]));
    assert!(log.lines().count() >= 8 && log.contains("\"rule\""), "{log}");
}
