//! Network figures: the enforced network (`nat`, and an `--allow-domain` list) next to QEMU's
//! plain user-mode network, measured in the same run against servers in a network namespace
//! this benchmark makes itself.
//!
//! ```text
//!  this process (own network and mount namespaces)         netns "inet"
//!   lo 127.0.0.1 (image server), QEMU, network processes     lo 198.51.100.10: HTTP :80 (/blob, /small)
//!   vb 192.0.2.1/24, default via 192.0.2.2  ---- veth ----   vi 192.0.2.2/24: DNS :53 (bench.test)
//!   /etc/resolv.conf -> nameserver 192.0.2.2 (bind mount)
//! ```
//! Both networks resolve through the host's resolver (slirp forwards to it; smolvm's network
//! process calls it), so the DNS figure compares like with like. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use smolvm::agent::client::{Command as AgentCommand, ExecRequest};
use smolvm::sandbox::{CreateOptions, NetworkPolicy, Smolvm};

use crate::Report;

const INET_IP: &str = "198.51.100.10";
const NAME: &str = "bench.test";

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("run {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Moves this process into new network and mount namespaces (before any thread starts) and
/// builds the "internet" next to it. Returns the inet namespace's name (for [`leave_world`]).
pub fn enter_world(blob_dir: &Path, blob_mib: usize) -> anyhow::Result<String> {
    // The inet namespace is named in the host's mount namespace, before we leave it.
    let inet = format!("smv-bench-{}", std::process::id());
    sh(&["ip", "netns", "add", &inet])?;
    // SAFETY: unshare takes flags only; called while the process has one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {} (the network figures need root)", std::io::Error::last_os_error());
    }
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&["ip", "link", "add", "vb", "type", "veth", "peer", "name", "vi", "netns", &inet])?;
    sh(&["ip", "addr", "add", "192.0.2.1/24", "dev", "vb"])?;
    sh(&["ip", "link", "set", "vb", "up"])?;
    sh(&["ip", "route", "add", "default", "via", "192.0.2.2"])?;
    let i = |a: &[&str]| sh(&[&["ip", "netns", "exec", &inet], a].concat());
    i(&["ip", "link", "set", "lo", "up"])?;
    i(&["ip", "addr", "add", "192.0.2.2/24", "dev", "vi"])?;
    i(&["ip", "link", "set", "vi", "up"])?;
    i(&["ip", "addr", "add", &format!("{INET_IP}/32"), "dev", "lo"])?;
    let blob = vec![0x5au8; blob_mib << 20];
    std::fs::write(blob_dir.join("blob"), blob)?;
    std::fs::write(blob_dir.join("small"), b"ok\n")?;
    // Our own view of /etc/resolv.conf: the inet namespace's DNS server.
    // SAFETY: unshare takes flags only; still one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
    }
    sh(&["mount", "--make-rprivate", "/"])?;
    let resolv = blob_dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.2\n")?;
    sh(&["mount", "--bind", &resolv.to_string_lossy(), "/etc/resolv.conf"])?;
    let me = std::env::current_exe()?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &inet])
        .arg(me)
        .arg("__serve-inet")
        .arg(blob_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().context("stdout")?), &mut line)?;
    anyhow::ensure!(line.trim() == "ready", "the inet servers did not start: {line:?}");
    // The world works from here, or nothing below means anything.
    sh(&["curl", "-sS", "--max-time", "5", "-o", "/dev/null", &format!("http://{INET_IP}/small")])
        .context("the inet namespace's server is not reachable from the benchmark's namespace")?;
    Ok(inet)
}

/// Removes the inet namespace (its servers go with it when this process ends).
pub fn leave_world(inet: &str) {
    let _ = Command::new("ip").args(["netns", "del", inet]).status();
}

/// `smolvm-bench __serve-inet DIR`: the HTTP and DNS servers of the inet namespace.
pub fn serve_inet(dir: &Path) -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number: we end with the benchmark.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    smolvm_testkit::http::Server::start_on(dir.to_path_buf(), &format!("{INET_IP}:80"))?;
    let dns = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 53))?;
    #[allow(clippy::print_stdout)]
    {
        println!("ready");
    }
    let ip: Ipv4Addr = INET_IP.parse()?;
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = dns.recv_from(&mut buf)?;
        let Some(q) = smolvm::net::dns::parse_query(&buf[..n]) else { continue };
        let (rcode, addrs) = match (q.name.as_str(), q.qtype) {
            (NAME, smolvm::net::dns::TYPE_A) => (smolvm::net::dns::Rcode::NoError, vec![ip]),
            (NAME, _) => (smolvm::net::dns::Rcode::NoError, vec![]),
            _ => (smolvm::net::dns::Rcode::NxDomain, vec![]),
        };
        let _ = dns.send_to(&smolvm::net::dns::response(&q, rcode, &addrs), peer);
    }
}

/// Runs in the guest: N request round trips, N lookups, `runs` downloads; prints JSON.
const PROBE: &str = r#"
import json, socket, subprocess, sys, time
n, runs, ip, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rtt():
    t = time.perf_counter()
    s = socket.create_connection((ip, 80))
    s.sendall(b"GET /small HTTP/1.1\r\nHost: " + name.encode() + b"\r\nConnection: close\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
    return (time.perf_counter() - t) * 1000
def lookup():
    t = time.perf_counter()
    socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    return (time.perf_counter() - t) * 1000
lookup(); rtt()  # the lookup first: under --allow-domain an address counts once a name resolved to it
r = [rtt() for _ in range(n)]
d = [lookup() for _ in range(n)]
mib = []
for _ in range(runs + 1):
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                          "http://" + name + "/blob"], capture_output=True, text=True, check=True).stdout.split()
    mib.append(float(out[1]) / 1048576 / float(out[0]))
print(json.dumps({"rtt": r, "dns": d, "mib_s": mib[1:]}))
"#;

/// Measures each network in turn, one sandbox at a time.
pub fn figures(work: &Path, runs: usize, report: &mut Report) -> anyhow::Result<()> {
    let allow = NetworkPolicy { allow_domains: vec![NAME.parse()?], ..NetworkPolicy::default() };
    let mut throughput = Vec::new();
    for (label, policy, unrestricted) in [
        ("qemu user-mode (unrestricted)", NetworkPolicy::default(), true),
        ("smolvm nat", NetworkPolicy::default(), false),
        ("smolvm --allow-domain", allow, false),
    ] {
        let home = work.join(format!("net-{}", throughput.len()));
        let mut sm = crate::open(&home)?;
        if unrestricted {
            sm = sm.with_unrestricted_network_for_benchmarks();
        }
        let opts = CreateOptions { name: Some("net".into()), network: policy, ..CreateOptions::default() };
        sm.create(&opts, &mut |_| {})?;
        let res = probe(&sm, runs);
        sm.delete("net")?;
        let v = res?;
        let get = |k: &str| -> Vec<f64> {
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
        };
        report.add(&format!("net {label}: 64 MiB download"), "MiB/s", &get("mib_s"));
        report.add(&format!("net {label}: connect+request RTT"), "ms", &get("rtt"));
        report.add(&format!("net {label}: DNS lookup"), "ms", &get("dns"));
        throughput.push(get("mib_s"));
    }
    // The ratio the enforced network must keep (>= 0.8 of plain user-mode), from the medians.
    let median = |v: &[f64]| smolvm_bench::stats::Summary::of(v).map(|s| s.median).unwrap_or(0.0);
    let base = median(&throughput[0]);
    if base > 0.0 {
        report.add("net throughput ratio nat / user-mode", "x", &[median(&throughput[1]) / base]);
        report.add("net throughput ratio allow-list / user-mode", "x", &[median(&throughput[2]) / base]);
    }
    Ok(())
}

fn probe(sm: &Smolvm, runs: usize) -> anyhow::Result<serde_json::Value> {
    let client = sm.agent("net")?;
    let req = ExecRequest {
        command: AgentCommand::Argv(
            ["python3", "-c", PROBE, "20", &runs.to_string(), INET_IP, NAME].iter().map(|s| s.to_string()).collect(),
        ),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: Some(600_000),
        pty: None,
    };
    let out = client.exec_output(req, None)?;
    anyhow::ensure!(out.code() == 0, "the probe failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}
