//! The sandbox network: a user-space TCP/IP endpoint owned by smolvm, enforcing the sandbox's
//! policy on every connection.
//!
//! Roles:
//! - **QEMU** gives the guest a virtio-net device whose frames travel over a socket pair
//!   (`-netdev stream` on an inherited descriptor). QEMU itself opens no host socket for the
//!   guest: its user-mode network (slirp), which maps the host's loopback at the gateway, is
//!   not used.
//! - **The network process** (`smolvm __netd DIR`, one per running sandbox, [`stack`]) holds
//!   the other end. It is the guest's gateway [`GATEWAY`] and resolver [`DNS`]: it terminates
//!   each guest TCP connection and UDP flow in smoltcp, asks the [`policy::Decider`], and only
//!   then opens the host-side socket. It also serves the host-to-guest forwards (SSH, `expose`)
//!   on 127.0.0.1, and refusals go to [`refusals`].
//! - **The library** writes the process's configuration ([`NetConfig`], `net.json` in the
//!   sandbox directory), starts it before QEMU ([`spawn`]) with that file as its standard
//!   input, and changes a running sandbox's policy or forwards over its control socket
//!   ([`control`]). The process runs as the sandbox's user in the sandbox's `run/` directory
//!   and reads no file of the home.
//!
//! Addresses are those of QEMU's user-mode network, so guests and tools see the familiar
//! layout: the guest is 10.0.2.15/24, the gateway 10.0.2.2, the resolver 10.0.2.3. The host is
//! reachable only at 10.0.2.2 and only on the ports of `--allow-host-port`.

pub mod dns;
mod frames;
pub mod intercept;
pub mod policy;
pub mod refusals;
pub mod sniff;
mod stack;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use policy::{Cidr, DomainPattern, NetworkMode, NetworkPolicy, PolicyError};
pub use refusals::{NetStats, Refusal};
pub use stack::run;

/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway: the network process. `--allow-host-port P` makes 10.0.2.2:P the host's
/// 127.0.0.1:P.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The resolver: the network process.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The name the resolver gives the gateway (for `--allow-host-port`).
pub const HOST_NAME: &str = "host.smolvm.internal";
/// The file descriptor on which QEMU and the network process each find their end of the wire.
pub const WIRE_FD: RawFd = 3;

/// A forward from the host's 127.0.0.1:`host` to the guest's `guest` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// 0: any free port (the one bound is reported back).
    pub host: u16,
    pub guest: u16,
}

/// What the network process of one sandbox is told (`net.json` in the sandbox directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub policy: NetworkPolicy,
    /// The SSH forward (its host port is usually 0: chosen at start).
    pub ssh: Forward,
    /// `expose` forwards, kept across stop/start.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// Hosts-file lines (`ADDRESS NAME...`) the resolver consults before the host's resolver
    /// (the text, not a path: the process cannot read the caller's files). For tests that
    /// build their own "internet"; unset in normal use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_hosts: Option<String>,
}

/// Why the network process could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the network process of this sandbox did not start: {0}")]
    Start(String),
    #[error("the network process of this sandbox is not running (is the sandbox running?): {0}")]
    NotRunning(std::io::Error),
    #[error("the network process refused: {0}")]
    Refused(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("net.json")
}

pub fn control_socket(dir: &Path) -> PathBuf {
    crate::paths::run_dir(dir).join(CONTROL_SOCKET)
}

/// The control socket's name in the process's working directory.
pub const CONTROL_SOCKET: &str = "net.sock";

pub fn process_log(dir: &Path) -> PathBuf {
    dir.join("netd.log")
}

/// Writes `net.json` atomically.
pub fn write_config(dir: &Path, cfg: &NetConfig) -> Result<(), NetError> {
    let path = config_path(dir);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(cfg)
        .map_err(|e| NetError::Io { what: "encode net.json".into(), source: e.into() })?;
    std::fs::write(&tmp, body).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("rename {}", path.display())))
}

pub fn read_config(dir: &Path) -> Result<NetConfig, NetError> {
    let path = config_path(dir);
    let body = std::fs::read(&path).map_err(io(format!("read {}", path.display())))?;
    serde_json::from_slice(&body)
        .map_err(|e| NetError::Io { what: format!("parse {}", path.display()), source: e.into() })
}

/// The first line the network process prints: where it listens, or why it could not start.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReadyLine {
    #[serde(default)]
    pub ssh_port: u16,
    #[serde(default)]
    pub forwards: Vec<Forward>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A started network process and QEMU's end of the wire.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    /// The host port of the SSH forward.
    pub ssh_port: u16,
    /// For QEMU (`-netdev stream` on [`WIRE_FD`]).
    pub qemu_end: OwnedFd,
}

/// Starts the network process for the sandbox in `dir` (configured by its `net.json`), with
/// `program` (the smolvm binary), confined to the sandbox's `run/` directory as `identity`
/// in the cgroup of `cgroup_procs`, and waits for its first line.
pub fn spawn(
    dir: &Path,
    program: &Path,
    log_filter: Option<&str>,
    identity: Option<crate::child::Identity>,
    cgroup_procs: Vec<RawFd>,
    timeout: Duration,
) -> Result<Started, NetError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(NetError::Io { what: "socketpair".into(), source: std::io::Error::last_os_error() });
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let log = std::fs::File::create(process_log(dir)).map_err(io("create netd.log"))?;
    let config = std::fs::File::open(config_path(dir)).map_err(io("open net.json"))?;
    let run = crate::paths::run_dir(dir);
    let exe = crate::child::Executable::open(program).map_err(io("the smolvm helper"))?;
    let mut cmd = crate::child::helper_command(&exe, "__netd", &run, log, log_filter);
    cmd.stdin(config);
    crate::child::Confine {
        fds: vec![(theirs.as_raw_fd(), WIRE_FD)],
        cwd: Some(run),
        identity,
        cgroup_procs,
        exe: Some(exe.file.as_raw_fd()),
        // It keeps the host's network (it is the sandbox's way out) and its mounts (the
        // host's resolver configuration).
        jail: None,
        no_namespaces: true,
        // It outlives the command that starts it, as the sandbox does.
        dies_with_caller: false,
    }
    .apply(&mut cmd);
    let mut child = cmd.spawn().map_err(io(format!("start {} __netd", program.display())))?;
    drop(theirs);
    let pid = child.id() as i32;
    crate::child::record_pid(dir, "netd", pid);
    let stdout = child.stdout.take().ok_or_else(|| NetError::Start("no stdout".into()))?;
    let line = crate::child::read_line_timeout(stdout, timeout).map_err(|e| {
        let _ = child.kill();
        let log = std::fs::read_to_string(process_log(dir)).unwrap_or_default();
        NetError::Start(format!("{e}\n--- netd.log ---\n{}", crate::text::escape_controls(log.trim())))
    })?;
    // Not waited for: it runs as long as the VM (it exits when QEMU closes the wire).
    drop(child);
    let ready: ReadyLine =
        serde_json::from_str(&line).map_err(|e| NetError::Start(format!("unreadable first line {line:?}: {e}")))?;
    if let Some(e) = ready.error {
        return Err(NetError::Start(e));
    }
    Ok(Started { pid, ssh_port: ready.ssh_port, qemu_end: ours })
}

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ControlRequest {
    /// Apply this policy to new connections.
    Reload { policy: NetworkPolicy },
    /// Add a forward; the reply names the host port bound.
    Forward { forward: Forward },
    /// The sandbox's secrets and CA: TLS to their hosts is intercepted from now on.
    Intercept { config: intercept::InterceptConfig },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ControlReply {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub forward: Option<Forward>,
}

/// For `smolvm __netd DIR --owner UID`: reads the configuration from standard input (at most
/// 1 MiB) and runs the process in its working directory.
pub fn netd_main(owner: u32) -> std::io::Result<()> {
    crate::child::not_dumpable();
    crate::child::cap_file_size();
    let mut body = Vec::new();
    std::io::stdin().take(1 << 20).read_to_end(&mut body)?;
    let cfg: NetConfig = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the configuration: {e}")))?;
    run(Path::new("."), cfg, owner)
}

/// Sends one request to a running sandbox's network process.
pub(crate) fn control(dir: &Path, req: &ControlRequest) -> Result<ControlReply, NetError> {
    let pid = crate::child::recorded_pid(dir, "netd").ok_or_else(|| {
        NetError::NotRunning(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no netd.pid: the network process is not running",
        ))
    })?;
    let mut s =
        crate::child::connect_served_by(&control_socket(dir), pid, "network process").map_err(NetError::NotRunning)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("control socket"))?;
    let mut line = serde_json::to_string(req).map_err(|e| NetError::Io { what: "encode".into(), source: e.into() })?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io("write to the network process"))?;
    let mut reply = String::new();
    BufReader::new(s.take(64 * 1024)).read_line(&mut reply).map_err(io("read from the network process"))?;
    let reply: ControlReply = serde_json::from_str(&reply)
        .map_err(|e| NetError::Io { what: format!("reply {reply:?}"), source: e.into() })?;
    match reply.error {
        Some(e) => Err(NetError::Refused(e)),
        None => Ok(reply),
    }
}
