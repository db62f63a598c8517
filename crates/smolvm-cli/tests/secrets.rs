//! Secrets that never enter the sandbox, end to end: the guest holds a placeholder, and the
//! real value reaches the secret's host only, added at the egress. The "provider" is the HTTPS
//! server of the test world (`networld`), with its own test CA, which the egress is told to
//! trust (`SMOLVM_EGRESS_EXTRA_CA`); the guest trusts only its sandbox's CA for it.
//!
//! Needs root (network namespaces), QEMU and a built release: `#[ignore]`d for a plain
//! `cargo test`; `scripts/test.sh` runs it.

#![allow(clippy::unwrap_used)]

mod common;
mod networld;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;

use networld::{world, World};

const REAL: &str = "sk-test-REAL-VALUE-7f3a9c1e5b2d4086";
const REAL2: &str = "other-REAL-VALUE-51c0e9a2d7b34f68";

impl World {
    fn with_secrets(&self) -> Command {
        let mut c = self.cmd();
        c.env("SMOLVM_EGRESS_EXTRA_CA", self.files.path().join("ca.pem")).env("OPENAI_API_KEY", REAL);
        c
    }
}

/// Runs QMP commands on a sandbox's QEMU (through its socket in `run/`): the last reply.
fn qmp(dir: &std::path::Path, commands: &[serde_json::Value]) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("run/qmp.sock")).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(300))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // the greeting
    let mut last = serde_json::Value::Null;
    for c in [&[serde_json::json!({ "execute": "qmp_capabilities" })], commands].concat() {
        writeln!(s, "{c}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                last = v;
                break;
            }
        }
    }
    last
}

/// How the test server reports a header value that reached it (its SHA-256: the server never
/// sends a value back into the guest).
fn arrived(header: &str, value: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(value.as_bytes());
    format!("{header}: sha256={}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
#[ignore = "needs root, network namespaces and QEMU: run scripts/test.sh"]
fn a_secret_reaches_its_host_only_and_never_the_guest() {
    let w = world();
    // Bad input: a clear error each, and nothing created.
    for (args, says) in [
        (vec!["--secret", "OPENAI_API_KEY"], "no host"),
        (vec!["--secret", "NOT_SET_ANYWHERE_XYZ@a.test"], "not set"),
        (vec!["--secret", "OPENAI_API_KEY@a.test", "--network", "none"], "refuses"),
        (vec!["--secret", "OPENAI_API_KEY@a.test", "--allow-domain", "c.test"], "refuses"),
        (vec!["--secret", "OPENAI_API_KEY@a.test=sk-on-the-command-line"], "never given on the command line"),
    ] {
        let out = w.with_secrets().args(["create", "--name", "bad"]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    let listed = common::ok(w.cmd().args(["list", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&listed).unwrap().as_array().unwrap().len(), 0, "{listed}");

    // A sandbox whose OPENAI_API_KEY goes to a.test.
    common::ok(w.with_secrets().args(["create", "--name", "s", "--secret", "OPENAI_API_KEY@a.test"]));
    common::ok(w.cmd().args(["cp"]).arg(w.files.path().join("ca.pem")).arg("s:/root/ca.pem"));
    let (_, placeholder) = w.sh("s", "printf %s \"$OPENAI_API_KEY\"");
    assert!(placeholder.contains("smolvm-placeholder-") && !placeholder.contains(REAL), "{placeholder}");
    let (_, login) = w.sh("s", "bash -lc 'printf %s \"$OPENAI_API_KEY\"'");
    assert_eq!(login, placeholder, "login shells get the placeholder too");

    // The secret's host gets the real value, through the guest's trust in its sandbox's CA
    // (no --cacert: the system bundle has it).
    let (code, got) =
        w.sh("s", "curl -sS --max-time 20 https://a.test/headers -H \"Authorization: Bearer $OPENAI_API_KEY\"");
    assert_eq!(code, 0, "{got}");
    assert!(got.contains(&arrived("Authorization", &format!("Bearer {REAL}"))), "a.test got: {got}");
    // Python (urllib, the system bundle through SSL_CERT_FILE) and a keep-alive second request.
    let py = "python3 - 2>&1 <<'PY'\nimport os, http.client, ssl\nc = http.client.HTTPSConnection('a.test', context=ssl.create_default_context(), timeout=20)\nfor i in range(2):\n    c.request('GET', '/headers', headers={'x-api-key': os.environ['OPENAI_API_KEY']})\n    print(c.getresponse().read().decode())\nPY\n";
    let (code, got) = w.sh("s", py);
    assert_eq!(code, 0, "{got}");
    assert_eq!(got.matches(&arrived("x-api-key", REAL)).count(), 2, "both requests rewritten: {got}");
    // Another allowed host (same address, same certificate) is not intercepted: the
    // placeholder arrives as it is, and it is the test CA's certificate that the guest sees.
    let (code, got) = w.sh(
        "s",
        "curl -sS --max-time 20 --cacert /root/ca.pem https://b.test/headers -H \"Authorization: Bearer $OPENAI_API_KEY\"",
    );
    assert_eq!(code, 0, "{got}");
    assert!(got.contains(&arrived("Authorization", &format!("Bearer {placeholder}"))), "b.test got: {got}");
    // Plain HTTP to the secret's host is never given the value.
    let (_, got) =
        w.sh("s", "curl -sS --max-time 20 http://a.test/headers -H \"Authorization: Bearer $OPENAI_API_KEY\"");
    assert!(got.contains(&arrived("Authorization", &format!("Bearer {placeholder}"))), "{got}");

    // No trace of the value in the guest's memory, after all that traffic: a dump of all of it
    // has the placeholder (so the dump is real) and not the value. (First: the search of the
    // guest's files below has to hand the guest the value to look for.)
    let dir = w.home.path().join("sandboxes/s");
    let r = qmp(
        &dir,
        &[
            serde_json::json!({ "execute": "dump-guest-memory", "arguments": { "paging": false, "protocol": "file:mem.dump" } }),
        ],
    );
    assert!(r.get("return").is_some(), "{r}");
    let dump = std::fs::read(dir.join("run/mem.dump")).unwrap();
    assert!(dump.len() > 256 << 20, "{} bytes", dump.len());
    assert!(contains(&dump, &placeholder), "the dump does not even hold the placeholder");
    assert!(!contains(&dump, REAL), "the value is in the guest's memory");
    drop(dump);
    std::fs::remove_file(dir.join("run/mem.dump")).unwrap();
    // Nor in its files or any process's environment, searched as root; nor on its console.
    let (code, found) = w.sh(
        "s",
        &format!(
            "{}; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -F '{REAL}'; true",
            common::find_in_writable_files(REAL)
        ),
    );
    assert_eq!((code, found.trim()), (0, ""), "the value is in the guest");
    let console = common::ok(w.cmd().args(["logs", "s"]));
    assert!(!console.contains(REAL));
    // Nor on the host where it must not be: the process list, the database, status, logs.
    let ps = String::from_utf8(Command::new("ps").args(["-eww", "-o", "args="]).output().unwrap().stdout).unwrap();
    assert!(!ps.contains(REAL), "in ps");
    for f in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(w.home.path().join(f)).unwrap_or_default();
        assert!(!contains(&bytes, REAL), "in {f}");
    }
    for f in ["netd.log", "agent-proxy.log", "run/qemu.log", "net.json", "run/console.log", "run/network.log"] {
        let bytes = std::fs::read(dir.join(f)).unwrap_or_default();
        assert!(!contains(&bytes, REAL), "in {f}");
    }
    let status = common::ok(w.cmd().args(["status", "s", "--json"]));
    assert!(!status.contains(REAL));
    // The one place it is kept: the sandbox's own 0600 file.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("secrets.json")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let list = common::ok(w.cmd().args(["secret", "list", "s", "--json"]));
    assert!(list.contains("OPENAI_API_KEY") && list.contains("a.test") && !list.contains(REAL), "{list}");

    // Set on the running sandbox: a second secret for b.test, used at once.
    common::ok(w.with_secrets().env("OTHER_KEY", REAL2).args(["secret", "set", "s", "OTHER_KEY@b.test"]));
    let (code, got) = w.sh("s", "curl -sS --max-time 20 https://b.test/headers -H \"x-api-key: $OTHER_KEY\"");
    assert_eq!(code, 0, "{got}");
    assert!(got.contains(&arrived("x-api-key", REAL2)), "b.test got: {got}");
    // ... and it survives a restart.
    common::ok(w.with_secrets().args(["stop", "s"]));
    common::ok(w.with_secrets().args(["start", "s"]));
    let (code, got) =
        w.sh("s", "curl -sS --max-time 20 https://a.test/headers -H \"Authorization: Bearer $OPENAI_API_KEY\"");
    assert_eq!(code, 0, "{got}");
    assert!(got.contains(&arrived("Authorization", &format!("Bearer {REAL}"))), "after a restart: {got}");
    // A server for the secret's name that the egress cannot verify (here: the test CA not
    // trusted, as a man in the middle's would not be) gets nothing: the connection fails.
    common::ok(w.cmd().env("OPENAI_API_KEY", REAL).args([
        "create",
        "--name",
        "u",
        "--secret",
        "OPENAI_API_KEY@a.test",
    ]));
    let (code, got) =
        w.sh("u", "curl -sS --max-time 20 https://a.test/headers -H \"Authorization: Bearer $OPENAI_API_KEY\"");
    assert_ne!(code, 0, "a request went through to an unverified server: {got}");
    assert!(!got.contains("sha256="), "{got}");
    common::ok(w.cmd().args(["delete", "u"]));

    // Unset: the guest's variable is gone, and nothing is added any more.
    common::ok(w.cmd().args(["secret", "unset", "s", "OTHER_KEY"]));
    let (_, v) = w.sh("s", "printf %s \"${OTHER_KEY:-unset}\"");
    assert_eq!(v, "unset");
}

/// The guest (root inside) tries every way to make the secret's own host send the value back:
/// the placeholder in the path, the query, another header, another shape of the right header,
/// the body; request smuggling past the rewriter; another Host on a kept-alive connection; a
/// compressed echo; an echo split across chunks. The "provider" (`/reflect` of the test
/// world's HTTPS server) answers with everything it received. The guest never receives the
/// value; the host still gets it in the one header it belongs in.
#[test]
#[ignore = "needs root, network namespaces and QEMU: run scripts/test.sh"]
fn a_host_that_echoes_everything_never_hands_the_value_to_the_guest() {
    let w = world();
    common::ok(w.with_secrets().args(["create", "--name", "e", "--secret", "OPENAI_API_KEY@a.test"]));
    let (_, ph) = w.sh("e", "printf %s \"$OPENAI_API_KEY\"");
    assert!(ph.contains("smolvm-placeholder-") && ph.len() >= REAL.len(), "{ph}");
    // What an echo of the value becomes: the placeholder, cut to the value's length.
    let mask = &ph[..REAL.len()];
    let h = "Host: a.test\r\n";
    let next = format!("GET /reflect HTTP/1.1\r\n{h}X-Echo: Bearer {ph}\r\nConnection: close\r\n\r\n");
    let cases = serde_json::json!({
        "ok": format!("GET /reflect HTTP/1.1\r\n{h}Authorization: Bearer {ph}\r\nConnection: close\r\n\r\n"),
        "ok_chunked": format!("GET /reflect-chunked HTTP/1.1\r\n{h}x-api-key: {ph}\r\nConnection: close\r\n\r\n"),
        "ok_headers": format!("GET /headers HTTP/1.1\r\n{h}Authorization: Bearer {ph}\r\nConnection: close\r\n\r\n"),
        "gzip": format!("GET /reflect-gzip HTTP/1.1\r\n{h}Authorization: Bearer {ph}\r\nConnection: close\r\n\r\n"),
        "path": format!("GET /reflect/v1/{ph} HTTP/1.1\r\n{h}Authorization: Bearer {ph}\r\nConnection: close\r\n\r\n"),
        "query": format!("GET /reflect?key={ph} HTTP/1.1\r\n{h}\r\n"),
        "header": format!("GET /reflect HTTP/1.1\r\n{h}X-Echo: {ph}\r\nConnection: close\r\n\r\n"),
        "shape": format!("GET /reflect HTTP/1.1\r\n{h}Authorization: Basic {ph}\r\nConnection: close\r\n\r\n"),
        "body": format!("POST /reflect HTTP/1.1\r\n{h}Connection: close\r\nContent-Length: {}\r\n\r\n{{\"model\":\"{ph}\"}}", ph.len() + 12),
        "smuggle_lf": format!("POST /reflect HTTP/1.1\r\n{h}X: y\nContent-Length: {}\r\n\r\n{next}", next.len()),
        "smuggle_plus": format!("POST /reflect HTTP/1.1\r\n{h}Content-Length: +{}\r\n\r\n{next}", next.len()),
        "smuggle_te": format!("POST /reflect HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: {}\r\n\r\n{next}", next.len()),
        "second_host": format!("GET /reflect HTTP/1.1\r\n{h}\r\nGET /reflect HTTP/1.1\r\nHost: b.test\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"),
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raw_https.py");
    common::ok(w.cmd().args(["cp"]).arg(&script).arg("e:/root/raw_https.py"));
    let cases_file = w.files.path().join("cases.json");
    std::fs::write(&cases_file, cases.to_string()).unwrap();
    common::ok(w.cmd().args(["cp"]).arg(&cases_file).arg("e:/root/cases.json"));
    let run = w
        .cmd()
        .args(["exec", "e", "--timeout", "300", "--", "python3", "/root/raw_https.py", "a.test", "OPENAI_API_KEY"])
        .arg("/root/cases.json")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{out} {}", String::from_utf8_lossy(&run.stderr));
    let got: std::collections::HashMap<String, String> = serde_json::from_str(&out).unwrap();
    for (case, resp) in &got {
        assert!(!resp.contains(REAL), "{case}: the value reached the guest: {resp}");
        assert!(!resp.contains(&REAL[8..]), "{case}: part of the value reached the guest: {resp}");
    }
    let status = |case: &str| got[case].lines().next().unwrap_or_default().to_string();
    // Where it belongs: sent, and its echo arrives as the placeholder.
    assert!(status("ok").starts_with("HTTP/1.1 200"), "{}", got["ok"]);
    assert!(got["ok"].contains(&format!("Authorization: Bearer {mask}")), "{}", got["ok"]);
    assert!(got["ok_chunked"].contains("200") && got["ok_chunked"].contains(mask), "{}", got["ok_chunked"]);
    assert!(got["ok_headers"].contains(&arrived("Authorization", &format!("Bearer {REAL}"))), "{}", got["ok_headers"]);
    // A compressed echo cannot be checked: refused before any of it arrives.
    assert!(status("gzip").starts_with("HTTP/1.1 502"), "{}", got["gzip"]);
    // Everywhere else: refused by the egress, never sent.
    for case in ["path", "query", "header", "shape", "body"] {
        assert!(status(case).starts_with("HTTP/1.1 403"), "{case}: {}", got[case]);
        assert!(
            got[case].contains("X-Smolvm-Refused") && got[case].contains("OPENAI_API_KEY"),
            "{case}: {}",
            got[case]
        );
    }
    for case in ["smuggle_lf", "smuggle_plus", "smuggle_te"] {
        assert!(status(case).starts_with("HTTP/1.1 400"), "{case}: {}", got[case]);
    }
    // (Sent pipelined: the first answer may be cut by the refusal of the second.)
    assert!(got["second_host"].contains("HTTP/1.1 421"), "{}", got["second_host"]);
    // Each refusal is recorded, with why.
    let s = w.status("e");
    let recent = s["network_refusals"]["recent"].as_array().unwrap();
    let secrets: Vec<&serde_json::Value> =
        recent.iter().filter(|r| r["rule"].as_str().unwrap_or_default().starts_with("secrets:")).collect();
    assert!(secrets.len() >= 5, "refusals: {}", s["network_refusals"]);
    assert!(secrets.iter().all(|r| r["name"] == "a.test"), "{}", s["network_refusals"]);
}
