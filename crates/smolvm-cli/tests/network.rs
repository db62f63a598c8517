//! The network policy, end to end: real sandboxes whose guests (root inside) try to reach what
//! they must not, in a small world of network namespaces this test builds itself (`networld`).
//!
//! Needs root (network namespaces), QEMU and a built release: `#[ignore]`d for a plain
//! `cargo test`; `scripts/test.sh` runs it.

#![allow(clippy::unwrap_used)]

mod common;
mod networld;

use std::process::Command;

use common::tag_of;
use networld::{world, World, A_TEST, C_TEST};

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
    // A kept-alive connection allowed for a.test: its second request, for b.test (same
    // address), is refused, as is an absolute-form target; the first is answered.
    let keepalive = "python3 - <<'PY'\nimport socket\nfor second in ['GET / HTTP/1.1\\r\\nHost: b.test\\r\\n\\r\\n', 'GET http://b.test/ HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n']:\n    s = socket.create_connection(('a.test', 80), timeout=8)\n    s.sendall(b'GET / HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n')\n    got = s.recv(65536)\n    s.sendall(second.encode())\n    try:\n        while True:\n            b = s.recv(65536)\n            if not b: break\n            got += b\n    except OSError as e:\n        got += ('[%s]' % type(e).__name__).encode()\n    print(repr(got))\nPY\n";
    let (code, out) = w.sh("narrow", keepalive);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("inet-a host=a.test").count(), 2, "the first requests are answered: {out}");
    assert!(!out.contains("host=b.test"), "a second request for b.test went through: {out}");

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
    // Under a CIDR-only list no name is resolved: a query's name would leave through the
    // host's resolver (DNS exfiltration).
    let (code, out) = w.sh("narrow", "getent hosts c2vjcmv0.c.test");
    assert_ne!(code, 0, "resolved under a CIDR-only list: {out}");
    w.assert_refused("narrow", "c2vjcmv0.c.test");

    // --- --allow-cidr 0.0.0.0/0 (E2B's allowOut for "everything"): still never the metadata
    // service, and no private range without --allow-private ---
    common::ok(w.cmd().args(["network", "set", "narrow", "--allow-cidr", "0.0.0.0/0"]));
    assert_eq!(w.fetch("narrow", "http://169.254.169.254/"), None, "the metadata service through 0.0.0.0/0");
    w.assert_refused("narrow", "169.254.169.254:80");
    assert_eq!(
        w.fetch("narrow", &format!("http://{C_TEST}/")).as_deref(),
        Some(format!("inet-c host={C_TEST}\n")).as_deref()
    );
    common::ok(w.cmd().args(["network", "set", "narrow", "--allow-cidr", "0.0.0.0/0", "--allow-private"]));
    assert_eq!(w.fetch("narrow", "http://169.254.169.254/"), None, "link-local stays refused");

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
