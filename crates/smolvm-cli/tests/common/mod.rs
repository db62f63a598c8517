//! Shared by the CLI's end-to-end tests: a real HTTP server on loopback serving a real release,
//! and the real `smolvm` binary with its own `SMOLVM_HOME`.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The release directory under test (`dist/<tag>`), from `SMOLVM_TEST_RELEASE`
/// (`scripts/test.sh` builds the release and sets it).
pub fn release_dir() -> PathBuf {
    let dir = std::env::var_os("SMOLVM_TEST_RELEASE").map(PathBuf::from).expect(
        "SMOLVM_TEST_RELEASE is not set: these tests boot a real release; run scripts/test.sh, which builds one (cached) and sets it",
    );
    assert!(dir.join("manifest.json").is_file(), "{} has no manifest.json", dir.display());
    dir
}

pub fn tag_of(release: &Path) -> String {
    release.file_name().unwrap().to_string_lossy().into_owned()
}

/// `smolvm` with an isolated home and the images served from `url` (the release's manifest
/// replaces the compiled-in pins, since a locally built release has its own digests).
pub fn smolvm(home: &Path, url: &str, release: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
    c.env("SMOLVM_HOME", home)
        .env("SMOLVM_IMAGES_URL", url)
        .env("SMOLVM_IMAGES_MANIFEST", release.join("manifest.json"))
        .env_remove("SMOLVM_LOG");
    c
}

/// Runs and asserts success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_success(cmd, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_success(cmd: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A guest shell script that prints every file holding `needle` on the file systems a guest
/// can write: its own disk (the overlay's upper) and its tmpfs mounts, each searched whole
/// without crossing into another mount. For a value the test made after the images were built:
/// the read-only base and layers cannot hold it (searching them too takes tens of seconds
/// under emulation).
pub fn find_in_writable_files(needle: &str) -> String {
    format!(
        "for m in /run/smolvm/upper /run /tmp /dev/shm /dev; do \
           find \"$m\" -xdev -type f -exec grep -lF '{needle}' {{}} + 2>/dev/null; done"
    )
}

/// Every file under `dir`, recursively (for "the cache holds nothing" checks).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Deletes (forcibly) every sandbox under `home`: a failed test must not leave VMs running.
pub fn cleanup(home: &Path) {
    let mut list = Command::new(env!("CARGO_BIN_EXE_smolvm"));
    list.env("SMOLVM_HOME", home).args(["list", "--json"]);
    let Ok(out) = list.output() else { return };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return };
    for s in v.as_array().into_iter().flatten() {
        if let Some(name) = s["name"].as_str() {
            let _ = Command::new(env!("CARGO_BIN_EXE_smolvm"))
                .env("SMOLVM_HOME", home)
                .args(["delete", "--force", name])
                .output();
        }
    }
}

/// Calls [`cleanup`] when dropped (also when the test panics).
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup(&self.0);
    }
}

/// One HTTP/1.1 request to `smolvm serve` at `url`: (status, body as JSON or null).
pub fn http(url: &str, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(300))).unwrap();
    let body = body.unwrap_or("");
    let auth = key.map(|k| format!("X-API-Key: {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let rest =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, serde_json::from_str(&rest).unwrap_or(serde_json::Value::Null))
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Starts `smolvm serve` on a free loopback port of `cmd`'s home: (the child, its URL, its
/// API key), from the first line it prints.
pub fn start_serve(mut cmd: Command) -> (std::process::Child, String, String) {
    use std::io::BufRead;
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve printed {line:?}: {e}"));
    let url = v["url"].as_str().unwrap().to_string();
    let key = v["env"]["E2B_API_KEY"].as_str().unwrap().to_string();
    assert_eq!(v["env"]["E2B_SANDBOX_URL"], v["env"]["E2B_API_URL"]);
    (child, url, key)
}

/// Every process on the host: (pid, its arguments).
pub fn processes() -> Vec<(i32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        out.push((pid, cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()));
    }
    out
}
