//! The guest agent end to end: commands and files without SSH, through the real `smolvm`
//! binary and through the library on one connection. `#[ignore]`d for a plain `cargo test`;
//! `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{ok, release_dir, smolvm};
use sha2::{Digest, Sha256};
use smolvm::agent::client::{Command as AgentCommand, ExecRequest, ExitStatus};
use smolvm_testkit::http::Server;

struct Fixture {
    release: std::path::PathBuf,
    server: Server,
    home: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::cleanup(self.home.path());
    }
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let release = release_dir();
        let f = Fixture {
            server: Server::start(release.parent().unwrap().to_path_buf()).unwrap(),
            home: tempfile::tempdir().unwrap(),
            release,
        };
        ok(f.cmd().args(["create", "--name", name]));
        f
    }
    fn cmd(&self) -> Command {
        smolvm(self.home.path(), &self.server.url, &self.release)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        self.cmd().arg("exec").args(args).stdin(Stdio::null()).output().unwrap()
    }
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn exec_through_the_agent_exit_codes_output_stdin_timeout() {
    let f = Fixture::new("ag");
    // Exit codes 0, 1 and 137 (killed) come through.
    assert_eq!(f.exec(&["ag", "--", "true"]).status.code(), Some(0));
    assert_eq!(f.exec(&["ag", "--", "false"]).status.code(), Some(1));
    assert_eq!(f.exec(&["ag", "--", "sh", "-c", "kill -9 $$"]).status.code(), Some(137));

    // 10 MB of stdout arrives intact.
    let out =
        f.exec(&["ag", "--", "sh", "-c", "head -c 10000000 /dev/urandom | tee /tmp/big | sha256sum >&2; cat /tmp/big"]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 10_000_000);
    let want = String::from_utf8_lossy(&out.stderr).split_whitespace().next().unwrap().to_string();
    assert_eq!(hex(&Sha256::digest(&out.stdout)), want);

    // stdin is passed (when it is not a terminal).
    let mut child = f
        .cmd()
        .args(["exec", "ag", "--", "sh", "-c", "tr a-z A-Z; echo done >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello agent\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO AGENT\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "done\n");

    // A timeout kills the process (and what it started).
    let t = std::time::Instant::now();
    let out = f.exec(&["ag", "--timeout", "2", "--", "sh", "-c", "sleep 60; echo never"]);
    assert_eq!(out.status.code(), Some(124), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
    ok(f.cmd().args(["delete", "--force", "ag"]));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn files_round_trip_and_twenty_concurrent_execs_on_one_connection() {
    let f = Fixture::new("fs");
    // A 5 MB file goes in and comes back with the same SHA-256 and mode.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("five.bin");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    ok(f.cmd().args(["cp", src.to_str().unwrap(), "fs:/root/"]));
    let guest =
        ok(f.cmd().args(["exec", "fs", "--", "sh", "-c", "sha256sum /root/five.bin; stat -c %a /root/five.bin"]));
    assert!(guest.starts_with(&hex(&Sha256::digest(&data))), "{guest}");
    assert!(guest.ends_with("750\n"), "{guest}");
    let back = dir.path().join("back.bin");
    ok(f.cmd().args(["cp", "fs:/root/five.bin", back.to_str().unwrap()]));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&back).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o750);

    // The hostile guest (root inside) plants a setuid-root file, and the user copies it out to
    // a destination where a symlink points at a file of theirs: the copy is an ordinary file
    // (no setuid, setgid or sticky bit), the symlink is replaced, its target untouched.
    ok(f.cmd().args(["exec", "fs", "--", "sh", "-c", "printf evil > /root/suid && chmod 7755 /root/suid"]));
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"mine").unwrap();
    let dest = dir.path().join("dest");
    std::os::unix::fs::symlink(&victim, &dest).unwrap();
    ok(f.cmd().args(["cp", "fs:/root/suid", dest.to_str().unwrap()]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"mine", "the copy followed a host-side symlink");
    let meta = std::fs::symlink_metadata(&dest).unwrap();
    assert!(meta.file_type().is_file(), "the destination is still a symlink");
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    assert_eq!(mode & 0o7000, 0, "setuid/setgid/sticky came back from the guest: {mode:o}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"evil");

    // Directories go through the agent both ways, into a temporary name renamed at the end.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("top.txt"), b"top").unwrap();
    std::fs::write(tree.join("a/b/deep.bin"), &data[..70_000]).unwrap();
    ok(f.cmd().args(["cp", tree.to_str().unwrap(), "fs:/root/"]));
    let guest = ok(f.cmd().args([
        "exec",
        "fs",
        "--",
        "sh",
        "-c",
        "cat /root/tree/top.txt; sha256sum < /root/tree/a/b/deep.bin",
    ]));
    assert_eq!(guest, format!("top{}  -\n", hex(&Sha256::digest(&data[..70_000]))));
    // Out of a hostile guest: a setuid file, a link to a host file, a FIFO, a nested directory.
    ok(f.cmd().args([
        "exec",
        "fs",
        "--",
        "sh",
        "-c",
        "mkdir -p /root/evil/sub && printf x > /root/evil/suid && chmod 4755 /root/evil/suid && \
         ln -s /etc/passwd /root/evil/link && mkfifo /root/evil/fifo && printf deep > /root/evil/sub/f",
    ]));
    let out = dir.path().join("out");
    ok(f.cmd().args(["cp", "fs:/root/evil", out.to_str().unwrap()]));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(out.join("suid")).unwrap().permissions());
    assert_eq!(mode & 0o7000, 0, "a setuid bit came out of the guest: {mode:o}");
    assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("/etc/passwd"), "a link is a link");
    assert!(std::fs::symlink_metadata(out.join("fifo")).is_err(), "a FIFO was copied");
    assert_eq!(std::fs::read(out.join("sub/f")).unwrap(), b"deep");
    // A file the guest announces larger than the host's free space: refused before a byte is
    // read, and nothing is left behind.
    ok(f.cmd().args(["exec", "fs", "--", "truncate", "-s", "8T", "/root/huge"]));
    let refused = f.cmd().args(["cp", "fs:/root/huge", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("free"), "{}", String::from_utf8_lossy(&refused.stderr));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains("huge")), "{left:?}");

    // Twenty execs at once on one agent connection, each with its own id.
    let mut config = smolvm::config::Config::new(smolvm::paths::Home::at(f.home.path()));
    config.helper = env!("CARGO_BIN_EXE_smolvm").into();
    let sm = smolvm::sandbox::Smolvm::open(config).unwrap();
    let client = sm.agent("fs").unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let client = &client;
                s.spawn(move || {
                    let req = ExecRequest {
                        command: AgentCommand::Shell(format!(
                            "sleep 0.$(( {i} % 5 )); echo out-{i}; echo err-{i} >&2; exit {i}"
                        )),
                        env: vec![],
                        cwd: None,
                        stdin: false,
                        timeout_ms: None,
                        pty: None,
                    };
                    client.exec_output(req, None).unwrap()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let out = h.join().unwrap();
            assert_eq!(out.status, ExitStatus::Code(i as i32));
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out-{i}\n"));
            assert_eq!(String::from_utf8_lossy(&out.stderr), format!("err-{i}\n"));
        }
    });
    // Output past the cap: the beginning is kept, the process killed, the result marked.
    let flood = client
        .exec(ExecRequest {
            command: AgentCommand::Argv(vec!["yes".into()]),
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: None,
            pty: None,
        })
        .unwrap()
        .collect_capped(1 << 20)
        .unwrap();
    assert!(flood.truncated && flood.stdout.len() == 1 << 20, "{} bytes", flood.stdout.len());
    assert_eq!(flood.status, ExitStatus::Signal(9));
    drop(client);

    // A lost agent is an error that names the sandbox, not a hang; the CLI says what to check.
    let mut cli = f
        .cmd()
        .args(["exec", "fs", "--", "sh", "-c", "echo started; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(cli.stdout.take().unwrap()), &mut first).unwrap();
    assert_eq!(first, "started\n");
    let pid = serde_json::from_str::<serde_json::Value>(&ok(f.cmd().args(["status", "fs", "--json"]))).unwrap()["pid"]
        .as_i64()
        .unwrap();
    let client = sm.agent("fs").unwrap();
    let h = client
        .exec(ExecRequest {
            command: AgentCommand::Shell("sleep 600".into()),
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: None,
            pty: None,
        })
        .unwrap();
    ok(Command::new("kill").args(["-9", &pid.to_string()]));
    match h.collect() {
        Err(smolvm::agent::AgentError::Lost { sandbox, .. }) => assert_eq!(sandbox, "fs"),
        other => panic!("not a lost agent: {other:?}"),
    }
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fs") && err.contains("smolvm status fs"), "{err}");
    ok(f.cmd().args(["delete", "fs"]));
}

/// A full disk in the guest is known by its errno (agent protocol v6), not by its text: the
/// hint names it, and nothing is left of the file. Also a missing directory.
#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_full_disk_in_the_guest_is_reported_by_its_errno() {
    let f = Fixture::new("full");
    ok(f.cmd().args([
        "exec",
        "full",
        "--",
        "sh",
        "-c",
        "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small",
    ]));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("four.bin");
    std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
    let out = f.cmd().args(["cp", src.to_str().unwrap(), "full:/mnt/small/four.bin"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the sandbox's disk is full"), "the hint comes from the errno: {err}");
    let left = ok(f.cmd().args(["exec", "full", "--", "sh", "-c", "ls -A /mnt/small | wc -l"]));
    assert_eq!(left.trim(), "0", "no partial file is left");
    let out = f.cmd().args(["cp", src.to_str().unwrap(), "full:/no/such/dir/f"]).output().unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("disk is full"));
}
