//! The host side against a hostile sandbox, on real VMs: what a guest (root inside) or a QEMU
//! it took over can reach of the host. `#[ignore]`d for a plain `cargo test`; `scripts/test.sh`
//! runs them (as root, the documented setup, so that sandboxes get uids of their own).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, release_dir, smolvm};
use smolvm_testkit::http::Server;

struct Fixture {
    release: PathBuf,
    server: Server,
    home: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::cleanup(self.home.path());
    }
}

impl Fixture {
    fn new() -> Fixture {
        let release = release_dir();
        Fixture {
            server: Server::start(release.parent().unwrap().to_path_buf()).unwrap(),
            home: tempfile::tempdir().unwrap(),
            release,
        }
    }
    fn cmd(&self) -> Command {
        smolvm(self.home.path(), &self.server.url, &self.release)
    }
    fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&ok(self.cmd().args(["status", name, "--json"]))).unwrap()
    }
    fn dir(&self, name: &str) -> PathBuf {
        self.home.path().join("sandboxes").join(name)
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The pids of sandbox `dir`'s helpers, from the pid files smolvm wrote.
fn helper_pid(dir: &Path, what: &str) -> i32 {
    std::fs::read_to_string(dir.join(format!("{what}.pid"))).unwrap().trim().parse().unwrap()
}

fn ps_user(pid: i32) -> String {
    ok(Command::new("ps").args(["-o", "user=", "-p", &pid.to_string()])).trim().to_string()
}

fn uid_gid_groups(pid: i32) -> (u32, u32, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_string();
    let first = |s: String| s.split_whitespace().next().unwrap().parse::<u32>().unwrap();
    (first(field("Uid:")), first(field("Gid:")), field("Groups:"))
}

/// `setpriv` to run as `pid`'s credentials (uid, gid, groups: a QEMU taken over by its guest).
fn as_credentials_of(pid: i32) -> Command {
    let (uid, gid, groups) = uid_gid_groups(pid);
    let groups = groups.split_whitespace().collect::<Vec<_>>().join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.args(["--groups", &groups]);
    }
    cmd
}

/// What a process with `pid`'s credentials can do to the paths and processes named: each
/// attempt's outcome, "ok" or the error.
fn attack_as(pid: i32, attempts: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let script = r#"
import json, os, socket, sys
out = {}
for name, (kind, target) in json.loads(sys.argv[1]).items():
    try:
        if kind == "read":
            with open(target, "rb") as f: f.read(1)
        elif kind == "write":
            with open(target, "ab") as f: f.write(b"x")
        elif kind == "list":
            os.listdir(target)
        elif kind == "signal":
            os.kill(int(target), 0)
        elif kind == "connect":
            s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(target)
            # Our agent protocol's Hello (length 3, kind 0, version 2): a proxy that serves us
            # answers it; one that refuses us closes the connection.
            s.sendall(bytes([0, 0, 0, 2, 0, 2]))
            if not s.recv(64): raise ConnectionError("closed without an answer")
        out[name] = "ok"
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;
    let out = ok(as_credentials_of(pid).args(["/usr/bin/python3", "-c", script, &attempts.to_string()]));
    serde_json::from_str::<serde_json::Value>(&out).unwrap().as_object().unwrap().clone()
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn the_host_processes_of_a_sandbox_are_not_root_and_reach_nothing_of_another() {
    if !is_root() {
        eprintln!("skipped: as an ordinary user the sandboxes run as that user (needs root to test)");
        return;
    }
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "a"]));
    ok(f.cmd().args(["create", "--name", "b"]));
    let (sa, sb) = (f.status("a"), f.status("b"));
    let qemu_a = sa["pid"].as_i64().unwrap() as i32;
    let qemu_b = sb["pid"].as_i64().unwrap() as i32;
    // QEMU and both helpers of each sandbox: not root (`ps -o user`), one uid per sandbox.
    let mut uids = Vec::new();
    for (name, qemu) in [("a", qemu_a), ("b", qemu_b)] {
        let dir = f.dir(name);
        let pids = [qemu, helper_pid(&dir, "netd"), helper_pid(&dir, "agent-proxy")];
        let users: Vec<String> = pids.iter().map(|p| ps_user(*p)).collect();
        assert!(users.iter().all(|u| u != "root" && u == &users[0]), "{name}: {users:?}");
        let (uid, gid, _) = uid_gid_groups(qemu);
        assert!(uid != 0 && gid != 0, "{name}: uid {uid} gid {gid}");
        assert_eq!(f.status(name)["host"]["uid"].as_u64(), Some(uid as u64));
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two sandboxes share a uid");

    // Its resource limits: a group that holds QEMU, and the limits read back in `status`.
    let limits = &sa["host"]["limits"];
    if !limits.is_null() {
        let cgroup = std::fs::read_to_string(format!("/proc/{qemu_a}/cgroup")).unwrap();
        assert!(cgroup.contains("/smolvm/a"), "QEMU is not in its group: {cgroup}");
        let mem = limits["memory_max_bytes"].as_u64().unwrap();
        assert!(mem > 512 << 20 && mem < 2048 << 20, "{limits}");
        assert_eq!(limits["pids_max"].as_u64(), Some(512));
    } else {
        eprintln!("no cgroup limits on this host: {}", sa["host"]["limits_note"]);
    }

    // Sandbox a's QEMU, taken over: nothing of the home, nothing of b, not even a's own
    // disk by its path (it has it as a descriptor), and not the host side of its own agent.
    let home = f.home.path();
    let via_cwd = format!("/proc/{qemu_a}/cwd");
    let attempts = serde_json::json!({
        "b's disk": ["read", f.dir("b").join("disk.ext4")],
        "a's own disk by path": ["write", f.dir("a").join("disk.ext4")],
        "b's run directory": ["list", f.dir("b").join("run")],
        "b's console": ["read", f.dir("b").join("run/console.log")],
        "b's agent socket": ["connect", f.dir("b").join("run/agent.sock")],
        "the state database": ["read", home.join("state.db")],
        "the SSH key": ["read", home.join("keys/id_ed25519")],
        "the image cache": ["list", home.join("cache/images/blobs")],
        "b's QEMU memory": ["read", format!("/proc/{qemu_b}/mem")],
        "b's QEMU environment": ["read", format!("/proc/{qemu_b}/environ")],
        "b's QEMU, signalled": ["signal", qemu_b.to_string()],
        "b's network process, signalled": ["signal", helper_pid(&f.dir("b"), "netd").to_string()],
        "a's agent proxy, from a's run directory": ["connect", format!("{via_cwd}/agent.sock")],
        "a's network control, from a's run directory": ["connect", format!("{via_cwd}/net.sock")],
        "a's agent proxy's memory": ["read", format!("/proc/{}/mem", helper_pid(&f.dir("a"), "agent-proxy"))],
        "root's files": ["read", "/etc/shadow"],
    });
    let outcome = attack_as(qemu_a, &attempts);
    eprintln!("{}", serde_json::to_string_pretty(&outcome).unwrap());
    for (what, result) in &outcome {
        assert_ne!(result, "ok", "as sandbox a's QEMU: {what} succeeded");
    }
    assert_eq!(outcome.len(), attempts.as_object().unwrap().len());
    // The same checks pass as the owner: what failed above failed for the uid, not the path.
    let own = f.dir("a").join("run/agent.sock");
    assert!(own.exists() && f.dir("b").join("disk.ext4").exists());
    ok(f.cmd().args(["exec", "a", "--", "true"]));
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_flood_of_console_or_qemu_output_is_capped_on_the_host() {
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "loud"]));
    // 9 MiB (more than the 8 MiB the host keeps), as root in the guest, then a last line.
    ok(f.cmd().args([
        "exec",
        "loud",
        "--",
        "sh",
        "-c",
        "head -c 9437184 /dev/zero | tr '\\0' x > /dev/console; echo; echo FLOOD-END > /dev/console",
    ]));
    // The last line reaches the log (the relay is behind the guest by a moment at most).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let logs = loop {
        let logs = ok(f.cmd().args(["logs", "loud"]));
        if logs.contains("FLOOD-END") || std::time::Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(logs.trim_end().ends_with("FLOOD-END"), "{}", &logs[logs.len().saturating_sub(200)..]);
    let run = f.dir("loud").join("run");
    let on_disk: u64 = ["console.log", "console.log.1"]
        .iter()
        .map(|n| std::fs::metadata(run.join(n)).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(on_disk <= smolvm::agent::console::TOTAL_CAP, "{on_disk} bytes of console on the host");
    assert!(on_disk > smolvm::agent::console::FILE_CAP, "the flood never reached the rotation: {on_disk}");
    assert!(logs.len() as u64 <= smolvm::agent::console::TOTAL_CAP + 1024);

    // A taken-over QEMU floods its own output (12 MiB on its stderr, a pipe the agent proxy
    // keeps in run/qemu.log): the host keeps at most the console's cap of it, the newest.
    let pid_file = std::fs::read_to_string(f.dir("loud").join("qemu.pid")).unwrap();
    let qemu: i32 = pid_file.split_whitespace().next().unwrap().parse().unwrap();
    {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(format!("/proc/{qemu}/fd/2")).unwrap();
        let chunk = vec![b'q'; 1 << 20];
        for _ in 0..12 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\nQEMU-FLOOD-END\n").unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let tail = loop {
        let tail = smolvm::agent::console::tail_of(&run, "qemu.log", 64);
        if tail.ends_with(b"QEMU-FLOOD-END\n") || std::time::Instant::now() > deadline {
            break tail;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(tail.ends_with(b"QEMU-FLOOD-END\n"), "{}", String::from_utf8_lossy(&tail));
    let on_disk: u64 =
        ["qemu.log", "qemu.log.1"].iter().map(|n| std::fs::metadata(run.join(n)).map(|m| m.len()).unwrap_or(0)).sum();
    assert!(on_disk <= smolvm::agent::console::TOTAL_CAP, "{on_disk} bytes of QEMU output on the host");

    // The sandbox is still fine.
    assert_eq!(ok(f.cmd().args(["exec", "loud", "--", "echo", "alive"])).trim(), "alive");

    // A user whose ssh config forwards their agent to every host, with an agent running:
    // `smolvm ssh` hands the guest neither (`-F /dev/null`, ForwardAgent=no, no SSH_AUTH_SOCK).
    let user = tempfile::tempdir().unwrap();
    std::fs::create_dir(user.path().join(".ssh")).unwrap();
    std::fs::write(user.path().join(".ssh/config"), "Host *\n  ForwardAgent yes\n  ForwardX11 yes\n").unwrap();
    let sock = user.path().join("agent.sock");
    let agent = ok(Command::new("ssh-agent").arg("-a").arg(&sock));
    let agent_pid = agent.split("SSH_AGENT_PID=").nth(1).and_then(|r| r.split(';').next()).unwrap().to_string();
    let seen = ok(f.cmd().env("HOME", user.path()).env("SSH_AUTH_SOCK", &sock).args([
        "ssh",
        "loud",
        "--",
        "sh",
        "-c",
        "echo sock=${SSH_AUTH_SOCK:-none} display=${DISPLAY:-none}",
    ]));
    let _ = Command::new("kill").arg(&agent_pid).status();
    assert_eq!(seen.trim(), "sock=none display=none", "the guest was handed the user's agent or display");
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_guest_that_ignores_its_timeout_or_stops_reading_its_agent_port_holds_nothing_up() {
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "deaf"]));
    // A process that ignores SIGTERM past --timeout: ended, exit 124, nothing of it left.
    let t = std::time::Instant::now();
    let out = f
        .cmd()
        .args(["exec", "deaf", "--timeout", "2", "--", "sh", "-c", "trap '' TERM; sleep 300; echo never"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
    eprintln!("a process ignoring SIGTERM ended {:?} after a 2 s timeout", t.elapsed());
    let left = ok(f.cmd().args(["exec", "deaf", "--", "sh", "-c", "pgrep -x sleep || true"]));
    assert!(left.trim().is_empty(), "still running in the guest: {left}");

    // Root in the guest unbinds the agent port's driver: the host side must not hang.
    let port = ok(f.cmd().args([
        "exec",
        "deaf",
        "--",
        "sh",
        "-c",
        "ls /sys/bus/virtio/drivers/virtio_console/ | grep '^virtio'",
    ]));
    let port = port.trim().to_string();
    assert!(port.starts_with("virtio"), "{port}");
    ok(f.cmd().args([
        "exec",
        "deaf",
        "--",
        "sh",
        "-c",
        &format!(
            "nohup sh -c 'sleep 1; echo {port} > /sys/bus/virtio/drivers/virtio_console/unbind' >/dev/null 2>&1 &"
        ),
    ]));
    std::thread::sleep(std::time::Duration::from_secs(3));
    // A command with a timeout ends when the host says so (timeout + 5 s), with exit 124.
    let t = std::time::Instant::now();
    let out = f.cmd().args(["exec", "deaf", "--timeout", "2", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < std::time::Duration::from_secs(30), "{:?}", t.elapsed());
    // More input than the host queues for it: waited for while it reads nothing, then ended
    // by the host deadline (or refused), never hanging.
    let mut big = f
        .cmd()
        .args(["exec", "deaf", "--timeout", "5", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = big.stdin.take().unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..20 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
    }
    let out = big.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Everything else still answers, and delete does not wait for the guest.
    assert_eq!(f.status("deaf")["status"], "running");
    let t = std::time::Instant::now();
    ok(f.cmd().args(["delete", "deaf"]));
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "delete took {:?}", t.elapsed());
}

/// Starts, as `pid`'s credentials (a taken-over QEMU) and in its working directory (the run
/// directory: the home above it is root's), a listener on `path` that writes whatever a
/// client sends it to `path.stolen`: a socket planted where root connects.
fn plant_listener(pid: i32, path: &Path) -> std::process::Child {
    let script = r#"
import os, socket, sys
path = sys.argv[1]
os.unlink(path)
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)
print("planted", flush=True)
while True:
    c, _ = s.accept(); c.settimeout(5)
    try:
        with open(path + ".stolen", "ab") as f:
            while True:
                b = c.recv(65536)
                if not b: break
                f.write(b); f.flush()
    except Exception:
        pass
"#;
    let mut child = as_credentials_of(pid)
        .current_dir(path.parent().unwrap())
        .args(["/usr/bin/python3", "-c", script])
        .arg(path.file_name().unwrap())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "planted");
    child
}

/// A taken-over QEMU owns its `run/` directory, where root connects by path: it plants its
/// own socket in place of the network process's (and would be handed every secret and the CA
/// key at the next `secret set`) or of the agent's (and be sent commands), or links its QMP
/// socket to another sandbox's (and the next `pause` would stop that one). Root checks who
/// serves a socket before it sends a byte.
#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_taken_over_qemu_cannot_plant_sockets_for_root() {
    if !is_root() {
        eprintln!("skipped: as an ordinary user the sandboxes run as that user (needs root to test)");
        return;
    }
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "a"]));
    ok(f.cmd().args(["create", "--name", "b"]));
    let qemu_a = f.status("a")["pid"].as_i64().unwrap() as i32;
    let run_a = f.dir("a").join("run");
    const VALUE: &str = "sk-planted-socket-test-9c1e5b2d40867f3a";

    let mut net = plant_listener(qemu_a, &run_a.join("net.sock"));
    let mut agent = plant_listener(qemu_a, &run_a.join("agent.sock"));
    let out =
        f.cmd().env("PLANT_KEY", VALUE).args(["secret", "set", "a", "PLANT_KEY@api.example.com"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "secret set through a planted socket succeeded");
    assert!(err.contains("refused") || err.contains("not by the sandbox"), "{err}");
    let out = f.cmd().args(["exec", "a", "--", "echo", "a command for the guest"]).output().unwrap();
    assert!(!out.status.success(), "exec through a planted socket succeeded");
    for l in [&mut net, &mut agent] {
        let _ = l.kill();
        let _ = l.wait();
    }
    for s in ["net.sock.stolen", "agent.sock.stolen"] {
        let stolen = std::fs::read(run_a.join(s)).unwrap_or_default();
        assert!(stolen.is_empty(), "{s}: root sent {} bytes to the planted socket", stolen.len());
    }

    // c's QMP socket replaced by a link to b's: pausing c must not touch b.
    ok(f.cmd().args(["create", "--name", "c"]));
    let (uid, gid, _) = uid_gid_groups(f.status("c")["pid"].as_i64().unwrap() as i32);
    let qmp = f.dir("c").join("run/qmp.sock");
    ok(Command::new("setpriv")
        .current_dir(qmp.parent().unwrap())
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups"])
        .args([
            "sh",
            "-c",
            &format!("rm -f qmp.sock && ln -s {} qmp.sock", f.dir("b").join("run/qmp.sock").display()),
        ]));
    let out = f.cmd().args(["pause", "c"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pause through another sandbox's QMP socket succeeded");
    assert!(err.contains("refused") || err.contains("not by the sandbox"), "{err}");
    assert_eq!(f.status("b")["status"], "running");
    assert_eq!(ok(f.cmd().args(["exec", "b", "--", "echo", "b-alive"])).trim(), "b-alive");
}

/// Two homes on one host (two users of the library, a server and the CLI): each one's first
/// sandbox had slot 0, hence the same uid, and one QEMU could reach the other through /proc.
/// uids are leased host-wide: never the same, and a uid with processes is never handed out.
#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn sandboxes_of_two_homes_never_share_a_uid() {
    if !is_root() {
        eprintln!("skipped: as an ordinary user the sandboxes run as that user (needs root to test)");
        return;
    }
    let (f1, f2) = (Fixture::new(), Fixture::new());
    ok(f1.cmd().args(["create", "--name", "a"]));
    ok(f2.cmd().args(["create", "--name", "a"]));
    let uid = |f: &Fixture| uid_gid_groups(f.status("a")["pid"].as_i64().unwrap() as i32).0;
    let (u1, u2) = (uid(&f1), uid(&f2));
    assert_ne!(u1, u2, "two homes' sandboxes run as one uid");
    assert_eq!(f2.status("a")["host"]["uid"].as_u64(), Some(u2 as u64), "status names the uid it runs as");
    // Each one's processes: all of its uid, none of the other's.
    for (f, u) in [(&f1, u1), (&f2, u2)] {
        let dir = f.dir("a");
        for pid in [helper_pid(&dir, "netd"), helper_pid(&dir, "agent-proxy")] {
            assert_eq!(uid_gid_groups(pid).0, u);
        }
    }
    // A restart keeps working (its own lease is no obstacle; the other's is).
    ok(f2.cmd().args(["stop", "a"]));
    ok(f2.cmd().args(["start", "a"]));
    assert_ne!(uid(&f2), u1);
}

/// A taken-over QEMU in the namespaces smolvm gives it: no network at all (a host service on
/// 127.0.0.1 is out of reach), a root with nothing of the host's but `/usr` and its own run
/// directory, a procfs with its own processes only, and a seccomp filter on top of QEMU's own.
/// The attack runs as QEMU's uid inside QEMU's network and mount namespaces, from its root
/// and working directory. The agent proxy gets the same.
#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_taken_over_qemu_has_no_network_no_host_files_and_sees_only_itself() {
    if !is_root() {
        eprintln!("skipped: needs root (namespaces are made as root)");
        return;
    }
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "a"]));
    let qemu = f.status("a")["pid"].as_i64().unwrap() as i32;
    let proxy = helper_pid(&f.dir("a"), "agent-proxy");
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host_service.local_addr().unwrap().port();
    for (what, pid) in [("QEMU", qemu), ("agent proxy", proxy)] {
        for ns in ["net", "mnt", "ipc"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{what} shares the host's {ns} namespace");
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"), "{what}: {status}");
    }
    let filters = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    assert!(filters.contains("Seccomp_filters:\t2"), "ours and QEMU's own: {filters}");
    let (uid, gid, _) = uid_gid_groups(qemu);
    let script = format!(
        r#"
import json, os, socket
out = {{}}
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=3); out["host service"] = "ok"
except Exception as e:
    out["host service"] = type(e).__name__
try:
    s = socket.create_connection(("169.254.169.254", 80), timeout=3); out["metadata"] = "ok"
except Exception as e:
    out["metadata"] = type(e).__name__
out["root"] = sorted(os.listdir("/"))
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["home"] = os.path.exists("{home}")
out["cwd"] = sorted(os.listdir("."))
print(json.dumps(out))
"#,
        home = f.home.path().display()
    );
    let out = ok(Command::new("nsenter")
        .args(["-t", &qemu.to_string(), "-n", "-m", "-r", "-w", "--", "setpriv"])
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", &script]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("as QEMU: {v}");
    assert_ne!(v["host service"], "ok", "reached 127.0.0.1:{port} on the host");
    assert_ne!(v["metadata"], "ok");
    assert_eq!(v["home"], false, "the home is visible");
    let root: Vec<&str> = v["root"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    for r in &root {
        assert!(
            ["bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "usr"].contains(r),
            "/{r} in QEMU's root: {root:?}"
        );
    }
    assert!(v["cwd"].as_array().unwrap().iter().any(|x| x == "qmp.sock"), "its run directory: {}", v["cwd"]);
    // Its own processes only: every pid listed runs as its uid.
    for p in v["pids"].as_array().unwrap() {
        let p = p.as_i64().unwrap() as i32;
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            let u =
                s.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap().to_string();
            assert_eq!(u, uid.to_string(), "pid {p} of uid {u} is visible to QEMU");
        }
    }
    assert!(!v["pids"].as_array().unwrap().iter().any(|p| p == 1), "init is visible");
    // The sandbox works through all of it.
    assert_eq!(ok(f.cmd().args(["exec", "a", "--", "echo", "fine"])).trim(), "fine");
    drop(host_service);
}

/// A guest (root inside) that writes and reads its disks without pause takes the host disk's
/// bandwidth from everything else; with a ceiling, QEMU holds all its disks together to it.
/// What QEMU enforces is read back from QEMU itself (its block devices' throttle settings);
/// what the ceiling costs or allows is smolvm-bench's to measure, not a test's.
#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn a_guests_disk_io_is_held_to_its_ceiling() {
    let f = Fixture::new();
    ok(f.cmd().args(["create", "--name", "io", "--disk-mbps", "4", "--disk-iops", "200"]));
    let status = f.status("io");
    assert_eq!(status["disk_limit"], serde_json::json!({"bytes_per_sec": 4 << 20, "iops": 200}), "{status}");
    let pid = status["pid"].as_i64().unwrap() as i32;
    let mut qmp = smolvm::vm::qemu::qmp::Qmp::connect(&f.dir("io").join("run/qmp.sock"), pid).unwrap();
    let blocks = qmp.execute("query-block", None).unwrap();
    let disks: Vec<_> = blocks.as_array().unwrap().iter().filter_map(|b| b.get("inserted")).collect();
    assert!(disks.len() >= 2, "{blocks}");
    for d in &disks {
        assert_eq!((d["bps"].as_u64(), d["iops"].as_u64()), (Some(4 << 20), Some(200)), "{d}");
        assert_eq!(d["group"], "disks", "{d}");
    }
    // The ceiling outlives a stop and start, and a sandbox without one has none.
    ok(f.cmd().args(["stop", "io"]));
    ok(f.cmd().args(["start", "io"]));
    let pid = f.status("io")["pid"].as_i64().unwrap() as i32;
    let mut qmp = smolvm::vm::qemu::qmp::Qmp::connect(&f.dir("io").join("run/qmp.sock"), pid).unwrap();
    let blocks = qmp.execute("query-block", None).unwrap();
    assert!(blocks.as_array().unwrap().iter().filter_map(|b| b.get("inserted")).all(|d| d["bps"] == 4 << 20));
    ok(f.cmd().args(["create", "--name", "free"]));
    assert!(f.status("free").get("disk_limit").is_none());
}
