//! `smolvm serve` and `smolvm mcp` end to end, on real VMs, driven by the real clients: the
//! official E2B SDKs (Python from PyPI, JS from npm) and the MCP Python SDK, at the versions
//! pinned in `tests/clients/` (installed, cached, by `scripts/test-clients.sh`). The client
//! scripts assert each behaviour themselves; this file starts the server, runs them, and checks
//! what they cannot see: the CLI alongside, a restart of the server, the key file, the
//! OpenAPI document. `#[ignore]`d for a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{ok, release_dir, smolvm};
use smolvm_testkit::http::Server;

/// The pinned clients (a venv and node_modules), installed once per machine.
fn clients() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash").arg(root.join("scripts/test-clients.sh")).output().unwrap();
    assert!(out.status.success(), "scripts/test-clients.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

struct Fixture {
    release: PathBuf,
    images: Server,
    home: tempfile::TempDir,
    serve: Option<Child>,
    url: String,
    key: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop_serve();
        common::cleanup(self.home.path());
    }
}

impl Fixture {
    fn new() -> Fixture {
        let release = release_dir();
        let mut f = Fixture {
            images: Server::start(release.parent().unwrap().to_path_buf()).unwrap(),
            home: tempfile::tempdir().unwrap(),
            release,
            serve: None,
            url: String::new(),
            key: String::new(),
        };
        f.start_serve();
        f
    }

    fn cmd(&self) -> Command {
        smolvm(self.home.path(), &self.images.url, &self.release)
    }

    /// Starts `smolvm serve` on a free loopback port; its first line of output says where.
    fn start_serve(&mut self) {
        let (child, url, key) = common::start_serve(self.cmd());
        (self.url, self.key) = (url, key);
        self.serve = Some(child);
    }

    fn stop_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// A client process with the environment the server printed, and nothing else of E2B's.
    fn client(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("E2B_API_KEY", &self.key)
            .env("E2B_API_URL", &self.url)
            .env("E2B_SANDBOX_URL", &self.url)
            .env_remove("E2B_DEBUG")
            .env_remove("E2B_DOMAIN");
        c
    }

    /// One HTTP/1.1 request to the server: (status, body as JSON or null).
    fn http(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, serde_json::Value) {
        common::http(&self.url, method, path, body, key)
    }
}

/// Runs a client script, echoing its output; asserts it ended well and printed each check.
fn run_client(mut c: Command, checks: &[&str]) -> String {
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{c:?} failed ({})", out.status);
    for check in checks {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("ok: {check}"))), "no `ok: {check}` in the output");
    }
    assert!(stdout.lines().any(|l| l == "all ok"));
    stdout
}

#[test]
#[ignore = "boots real VMs and installs the pinned clients; run by scripts/test.sh"]
fn the_e2b_python_sdk_runs_unchanged_against_smolvm_serve() {
    let clients = clients();
    let f = Fixture::new();
    let mut c = f.client(&clients.join("venv/bin/python"));
    c.arg(client_script("e2b_sdk.py"));
    run_client(
        c,
        &[
            "commands.run",
            "failing command raises CommandExitException",
            "on_stdout streams",
            "background + kill",
            "commands.connect to a running command",
            "stdin",
            "files: write/read text and 5 MB binary",
            "files.watch_dir (recursive) sees create and remove",
            "Sandbox.list and get_info",
            "hostile: the guest cannot reach the server",
            "5 sandboxes, 20 concurrent commands",
            "bad input: wrong key, unknown template, malformed body, command after kill",
            "pause, then connect resumes it",
            "set_timeout expires the sandbox",
        ],
    );
}

#[test]
#[ignore = "boots real VMs and installs the pinned clients; run by scripts/test.sh"]
fn the_e2b_js_sdk_runs_unchanged_against_smolvm_serve() {
    let clients = clients();
    let node = Command::new("node").arg("--version").output().expect("node is needed (scripts/install-host-deps.sh)");
    let version = String::from_utf8_lossy(&node.stdout).trim().to_string();
    let major: u32 = version.trim_start_matches('v').split('.').next().unwrap().parse().unwrap();
    assert!(major >= 20, "the E2B JS SDK needs Node 20 or newer; this host has {version}");
    let f = Fixture::new();
    // ES modules resolve packages beside the script: run a copy next to the installed ones.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(clients.join("node_modules"), dir.path().join("node_modules")).unwrap();
    std::fs::copy(client_script("e2b_sdk.mjs"), dir.path().join("e2b_sdk.mjs")).unwrap();
    let mut c = f.client(Path::new("node"));
    c.arg(dir.path().join("e2b_sdk.mjs"));
    run_client(
        c,
        &["create + commands.run", "failing command throws CommandExitError", "files.write / files.read", "kill"],
    );
}

#[test]
#[ignore = "boots real VMs and installs the pinned clients; run by scripts/test.sh"]
fn the_mcp_python_sdk_drives_smolvm_mcp_over_stdio_and_http() {
    let clients = clients();
    let f = Fixture::new();
    let python = clients.join("venv/bin/python");
    let mut stdio = f.cmd();
    stdio.env("SMOLVM_BIN", env!("CARGO_BIN_EXE_smolvm"));
    let mut c = Command::new(&python);
    c.envs(stdio.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))));
    c.arg(client_script("mcp_client.py")).arg("stdio").arg(env!("CARGO_BIN_EXE_smolvm"));
    let steps = [
        "list tools",
        "create_sandbox",
        "run_command (exit code, stdout, stderr, timeout)",
        "write_file / read_file",
        "list_sandboxes / delete_sandbox",
    ];
    run_client(c, &steps.map(|s| format!("stdio: {s}")).iter().map(String::as_str).collect::<Vec<_>>());
    let mut c = Command::new(&python);
    c.arg(client_script("mcp_client.py")).arg("http").arg(format!("{}/mcp", f.url)).arg(&f.key);
    let mut http: Vec<String> = steps.iter().map(|s| format!("http: {s}")).collect();
    http.push("http: 401 without the key".into());
    run_client(c, &http.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
#[ignore = "boots real VMs; run by scripts/test.sh"]
fn served_sandboxes_are_ordinary_and_outlive_a_restart_of_the_server() {
    let clients = clients();
    let mut f = Fixture::new();
    let key_file = f.home.path().join("serve/api-key");
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), f.key);

    let (status, doc) = f.http("GET", "/openapi.json", None, None);
    assert_eq!(status, 200);
    for p in [
        "/v2/sandboxes",
        "/sandboxes/{sandboxID}/timeout",
        "/smolvm/v1/templates",
        "/smolvm/v1/sandboxes/{sandboxID}/network",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} is not in /openapi.json");
    }

    let key = f.key.clone();
    let (status, body) = f.http(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID":"base","timeout":600,"metadata":{"who":"rust"}}"#),
        Some(&key),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(body["envdVersion"], "0.5.7");
    // The CLI sees it and works alongside.
    let list: serde_json::Value = serde_json::from_str(&ok(f.cmd().args(["list", "--json"]))).unwrap();
    assert!(list.as_array().unwrap().iter().any(|s| s["name"] == id.as_str()), "{list}");
    assert_eq!(
        ok(f.cmd().args(["exec", &id, "--", "sh", "-c", "echo from-cli > /root/cli.txt; echo ok"])).trim(),
        "ok"
    );

    // A restart of the server: the same key, the sandbox and its metadata are still there.
    f.stop_serve();
    f.start_serve();
    assert_eq!(f.key, key);
    let (status, body) = f.http("GET", &format!("/sandboxes/{id}"), None, Some(&key));
    assert_eq!((status, &body["metadata"]["who"]), (200, &serde_json::json!("rust")), "{body}");
    let mut c = f.client(&clients.join("venv/bin/python"));
    c.args(["-c", &format!("from e2b import Sandbox; s = Sandbox.connect({id:?}); print(s.files.read('/root/cli.txt'), end=''); print('all ok')")]);
    let out = run_client(c, &[]);
    assert!(out.starts_with("from-cli\n"), "{out}");

    // Unknown sandboxes and routes are E2B's 404s; a malformed timeout a 400.
    assert_eq!(f.http("GET", "/sandboxes/sbx-nope", None, Some(&key)).0, 404);
    assert_eq!(f.http("POST", &format!("/sandboxes/{id}/timeout"), Some(r#"{"timeout":"soon"}"#), Some(&key)).0, 400);
    assert_eq!(f.http("DELETE", &format!("/sandboxes/{id}"), None, Some(&key)).0, 204);
    let list: serde_json::Value = serde_json::from_str(&ok(f.cmd().args(["list", "--json"]))).unwrap();
    assert!(!list.as_array().unwrap().iter().any(|s| s["name"] == id.as_str()));

    // Beyond loopback only when asked.
    let out = f.cmd().args(["serve", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

/// A hostile API caller: an id that walks out of the home (made root create a lock file
/// anywhere before), the unauthenticated `/health` with such an id, and a metadata query that
/// panicked the server (and with `panic = "abort"`, ended every session). The server answers
/// each with a client error and keeps serving.
#[test]
#[ignore = "starts smolvm serve; run by scripts/test.sh"]
fn hostile_ids_and_queries_neither_reach_paths_nor_take_the_server_down() {
    let f = Fixture::new();
    let target = format!("/tmp/smolvm-hostile-{}", std::process::id());
    let walk = format!("%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..{}", target.replace('/', "%2F"));
    for (method, path) in [
        ("DELETE", format!("/sandboxes/{walk}")),
        ("GET", format!("/sandboxes/{walk}")),
        ("POST", format!("/sandboxes/{walk}/pause")),
    ] {
        let (status, body) = f.http(method, &path, None, Some(&f.key));
        assert_eq!(status, 400, "{method} {path}: {body}");
    }
    // envd's routes take the id from a header, /health without any key.
    let addr = f.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nE2b-Sandbox-Id: ../../../../../../../..{target}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(!resp.starts_with("HTTP/1.1 2"), "{resp}");
    for suffix in [".lock", "", ".json"] {
        assert!(!Path::new(&format!("{target}{suffix}")).exists(), "{target}{suffix} was created");
    }
    // Any caller holds the key: the host's ports and private networks are not theirs to open.
    for policy in [
        r#"{"mode":"nat","allow_host_ports":[22]}"#,
        r#"{"mode":"nat","allow_cidrs":["10.0.0.0/8"],"allow_private":true}"#,
    ] {
        let (status, body) = f.http("PUT", "/smolvm/v1/sandboxes/any-box/network", Some(policy), Some(&f.key));
        assert_eq!(status, 403, "{policy}: {body}");
    }
    let (status, body) = f.http("GET", "/v2/sandboxes?metadata=%25a%C3%A9%3Dx", None, Some(&f.key));
    assert_eq!(status, 200, "{body}");
    let (status, body) = f.http("GET", "/v2/sandboxes", None, Some(&f.key));
    assert_eq!(status, 200, "the server is still up: {body}");
}

/// A raw request to envd's routes for sandbox `id`; returns the socket after the request is
/// sent (the caller reads as much, and when, it likes).
fn envd(f: &Fixture, path: &str, id: &str, token: Option<&str>, ctype: &str, body: &[u8]) -> std::net::TcpStream {
    let addr = f.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let token = token.map(|t| format!("X-Access-Token: {t}\r\n")).unwrap_or_default();
    let method = if body.is_empty() && ctype.is_empty() { "GET" } else { "POST" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nE2b-Sandbox-Id: {id}\r\n{token}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    s
}

fn status_of(s: std::net::TcpStream) -> u16 {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A Connect streaming request's body: one envelope holding `json`.
fn envelope(json: &str) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json.as_bytes());
    b
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A hostile (or careless) API caller, with its sandbox's token: a process stream it never
/// reads (the server held all of it before: the output must instead wait in the guest, and
/// arrive whole once read), more processes than a server should keep threads for, and
/// `/health` asked without a token (which told whether a sandbox existed).
#[test]
#[ignore = "boots a real VM; run by scripts/test.sh"]
fn an_api_caller_can_neither_make_the_server_hold_output_nor_learn_what_exists() {
    let f = Fixture::new();
    let key = f.key.clone();
    let (status, body) = f.http("POST", "/v2/sandboxes", Some(r#"{"templateID":"base","timeout":900}"#), Some(&key));
    assert_eq!(status, 201, "{body}");
    let id = body["sandboxID"].as_str().unwrap().to_string();
    let token = body["envdAccessToken"].as_str().unwrap().to_string();

    // Without the token, a sandbox that exists and one that does not answer alike.
    let here = status_of(envd(&f, "/health", &id, None, "", b""));
    let nowhere = status_of(envd(&f, "/health", "sbx-nowhere", None, "", b""));
    assert_eq!((here, nowhere), (401, 401));
    assert_eq!(status_of(envd(&f, "/health", &id, Some("00"), "", b"")), 401);
    assert_eq!(status_of(envd(&f, "/health", &id, Some(&token), "", b"")), 204);

    // 64 MiB of output on a stream whose reader reads only the response's head.
    let total = 64u64 << 20;
    let start = format!(
        r#"{{"process":{{"cmd":"/bin/sh","args":["-c","dd if=/dev/zero bs=64k count={} status=progress 2>/tmp/dd.err"]}},"stdin":false}}"#,
        total >> 16
    );
    let serve_pid = f.serve.as_ref().unwrap().id();
    let rss_before = rss_kib(serve_pid);
    let stream = envd(&f, "/process.Process/Start", &id, Some(&token), "application/connect+json", &envelope(&start));
    std::thread::sleep(Duration::from_secs(20));
    // How far dd got: its last progress line (each second, after a write completed).
    let probe = "tr '\\r' '\\n' < /tmp/dd.err | grep copied | tail -n 1";
    let progress = ok(f.cmd().args(["exec", &id, "--", "sh", "-c", probe]));
    let written: u64 = progress.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    eprintln!("dd, unread for 20 s: {}", progress.trim());
    let grown = rss_kib(serve_pid).saturating_sub(rss_before);
    assert!(written < 40 << 20, "dd wrote {written} bytes with nobody reading: the output was held somewhere");
    assert!(grown < 96 * 1024, "the server grew by {grown} KiB holding an unread stream");

    // Read now: every byte arrives.
    let mut r = BufReader::new(stream);
    let mut head = String::new();
    while r.read_line(&mut head).unwrap() > 2 {}
    let mut got = 0u64;
    let mut body = Vec::new();
    r.read_to_end(&mut body).unwrap();
    let text = common::dechunk(&String::from_utf8_lossy(&body));
    let mut b = text.as_bytes();
    while b.len() >= 5 {
        let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let v: serde_json::Value = serde_json::from_slice(&b[5..5 + n]).unwrap();
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            got += smolvm_serve::envd::connect::decode_bytes(d).unwrap().len() as u64;
        }
        b = &b[5 + n..];
    }
    assert_eq!(got, total, "the output, read late, arrives whole");

    // Processes the server keeps a thread for are bounded per sandbox.
    let sleeper = envelope(r#"{"process":{"cmd":"/bin/sleep","args":["600"]},"stdin":false}"#);
    let mut held = Vec::new();
    // A Connect stream answers 200 either way: its first message says which.
    let refused = (0..400).find_map(|i| {
        let mut s = envd(&f, "/process.Process/Start", &id, Some(&token), "application/connect+json", &sleeper);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let text = loop {
            let n = s.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if n == 0 || text.contains("\"start\"") || text.contains("resource_exhausted") {
                break text;
            }
        };
        held.push(s);
        (!text.contains("\"start\"")).then_some((i, text))
    });
    let (i, text) = refused.expect("400 processes were all started");
    assert_eq!(i, smolvm_serve::limits::MAX_PROCESSES, "{text}");
    assert!(text.contains("resource_exhausted"), "{text}");
    drop(held);
    assert_eq!(f.http("DELETE", &format!("/sandboxes/{id}"), None, Some(&key)).0, 204);
    // The token of the sandbox just removed: told it is gone (as E2B's SDKs expect).
    assert_eq!(status_of(envd(&f, "/health", &id, Some(&token), "", b"")), 502);
}
