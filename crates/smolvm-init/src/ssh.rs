//! SSH bring-up: root's authorized key from the command line, a fresh host key, sshd.
//!
//! Readiness does not wait for sshd: most of what the host does goes through the agent, and
//! sshd's start-up (an exec and a config parse) is a large share of a boot under emulation.
//! The host key is made first (the readiness facts carry it); whoever needs SSH asks the agent
//! to wait for the listener ([`wait_listening`]).

use std::fs;
use std::io::{self, Write};
use std::ops::Not;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::log;

const SSHD: &str = "/usr/sbin/sshd";
/// The one host key sshd loads (the image's `sshd_config.d/smolvm.conf` names only this one).
const HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// sshd's pid (0 before it started): [`rekey`] signals it.
static SSHD_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Installs the authorized key (if any), creates a host key and starts sshd without waiting
/// for it to listen. Returns the host public key line.
pub fn bring_up(authorized_key_b64: Option<&str>) -> io::Result<String> {
    match authorized_key_b64 {
        None => log::info!("no smolvm.authorized_key_b64 on the command line; root has no SSH key"),
        Some(b64) => {
            if let Err(e) = install_authorized_keys(b64) {
                log::error!("smolvm.authorized_key_b64: {e}; root has no SSH key");
            }
        }
    }
    let public = generate_host_key()?;
    start_sshd()?;
    Ok(public)
}

/// The sshd a clone's [`rekey`] ended, whose successor is started by the first
/// [`wait_listening`] (0: none pending).
static REPLACED_PID: std::sync::Mutex<i32> = std::sync::Mutex::new(0);

/// The SSH identity a clone's [`rekey`] was given, written by the first [`wait_listening`]
/// (before its sshd starts): root's `authorized_keys` text and the host key pair.
type Pending = (String, smolvm_protocol::agent::HostKey);
static PENDING: std::sync::Mutex<Option<Pending>> = std::sync::Mutex::new(None);

/// A clone's new SSH identity: root's key (that of the home restoring it) and a fresh host key
/// (`given` by the host, or made here for an older host). The old sshd is killed, not asked to reload (SIGHUP): the guest may have been saved while
/// sshd was still starting, before it handles SIGHUP, which would end it (the boot snapshot
/// is taken as soon as the agent answers). Its successor starts when SSH is first wanted
/// ([`wait_listening`]): sshd's start-up is a large share of a restore under emulation, and
/// most sandboxes are only ever used through the agent. Returns the host public key.
///
/// A key `given` by the host is only checked here; it and root's key are written when SSH is
/// first wanted, with the new sshd ([`PENDING`]): each file write is a large share of a
/// restore under emulation (its first writes run on a cold translation cache).
pub fn rekey(authorized_key_b64: &str, given: Option<&smolvm_protocol::agent::HostKey>) -> io::Result<String> {
    let mut replaced = REPLACED_PID.lock().unwrap_or_else(|p| p.into_inner());
    let public = match given {
        Some(key) => {
            let keys = decode_authorized_keys(authorized_key_b64).map_err(io::Error::other)?;
            check_host_key(key)?;
            *PENDING.lock().unwrap_or_else(|p| p.into_inner()) = Some((keys, key.clone()));
            // The key this guest had (a clone's: its source's, private half included) goes now,
            // before any command runs; the new one is written with the sshd that needs it.
            for f in [HOST_KEY.to_string(), format!("{HOST_KEY}.pub")] {
                match fs::remove_file(&f) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            key.public.clone()
        }
        None => {
            install_authorized_keys(authorized_key_b64).map_err(io::Error::other)?;
            generate_host_key()?
        }
    };
    let old = SSHD_PID.swap(0, std::sync::atomic::Ordering::SeqCst);
    if old > 0 {
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        unsafe { libc::kill(old, libc::SIGKILL) };
        *replaced = old;
        // Gone before this returns (a second at most): a snapshot taken next must not hold a
        // dying sshd, and its end must not run on after, beside the host's first command.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !gone_or_zombie(old) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    } else if *replaced == 0 {
        // No sshd ran (it failed at boot, or an earlier rekey ended it): start one for the
        // new key all the same.
        *replaced = -1;
    }
    Ok(public)
}

/// Starts the sshd a [`rekey`] left pending, once its predecessor's listening socket is gone.
fn start_replacement() -> io::Result<()> {
    let mut replaced = REPLACED_PID.lock().unwrap_or_else(|p| p.into_inner());
    if *replaced == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while *replaced > 0 && gone_or_zombie(*replaced).not() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some((keys, key)) = PENDING.lock().unwrap_or_else(|p| p.into_inner()).take() {
        write_authorized_keys(&keys).map_err(io::Error::other)?;
        install_host_key(&key)?;
    }
    start_sshd()?;
    *replaced = 0;
    Ok(())
}

fn gone_or_zombie(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Waits until sshd accepts connections, at most `timeout`.
pub fn wait_listening(timeout: Duration) -> io::Result<()> {
    start_replacement()?;
    let start = Instant::now();
    loop {
        if listening_on_port_22() {
            return Ok(());
        }
        if SSHD_PID.load(std::sync::atomic::Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("sshd is not running in this guest (see its console)"));
        }
        if start.elapsed() > timeout {
            return Err(io::Error::other(format!("sshd did not listen on port 22 within {timeout:?}")));
        }
        // sshd (without systemd) sends no readiness notification, and connecting to it to
        // find out would make it log a spurious connection: so its listening socket is looked
        // up in /proc every 2 ms.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Decodes and checks the keys, then writes `/root/.ssh/authorized_keys` (0600, dir 0700).
fn install_authorized_keys(b64: &str) -> Result<(), String> {
    write_authorized_keys(&decode_authorized_keys(b64)?)
}

fn write_authorized_keys(keys: &str) -> Result<(), String> {
    let dir = Path::new("/root/.ssh");
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    write_private(&dir.join("authorized_keys"), keys.as_bytes()).map_err(|e| format!("write authorized_keys: {e}"))
}

/// Base64 of one or more `authorized_keys` lines; each must look like an OpenSSH public key.
pub fn decode_authorized_keys(b64: &str) -> Result<String, String> {
    let raw =
        base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| format!("not valid base64 ({e})"))?;
    let text = String::from_utf8(raw).map_err(|_| "decodes to non-UTF-8 bytes".to_string())?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    if lines.is_empty() {
        return Err("decodes to no key".into());
    }
    for l in &lines {
        if ssh_key::PublicKey::from_openssh(l).is_err() {
            let shown: String = l.chars().take(40).collect();
            return Err(format!("{shown:?}... is not an OpenSSH public key line"));
        }
    }
    Ok(lines.join("\n") + "\n")
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// One ed25519 key: the only type we offer, and the fastest to generate (no `ssh-keygen -A`,
/// which makes RSA and ECDSA keys too and costs seconds under emulation).
fn generate_host_key() -> io::Result<String> {
    let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| io::Error::other(format!("generate ed25519 host key: {e}")))?;
    let private =
        key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| io::Error::other(format!("encode host key: {e}")))?;
    let public = key.public_key().to_openssh().map_err(|e| io::Error::other(format!("encode public key: {e}")))?;
    write_host_key(&private, &public)
}

/// The host key the host made for this clone (a restore's `Refresh`), written as given: the
/// host is trusted, and checking that the halves match would cost what making a key costs.
/// Only their form is checked, so that a garbled message cannot leave sshd without a key.
fn install_host_key(key: &smolvm_protocol::agent::HostKey) -> io::Result<String> {
    check_host_key(key)?;
    write_host_key(&format!("{}\n", key.private.0.trim_end()), &key.public)
}

fn check_host_key(key: &smolvm_protocol::agent::HostKey) -> io::Result<()> {
    let private = key.private.0.trim_end();
    if !private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        || !private.ends_with("-----END OPENSSH PRIVATE KEY-----")
    {
        return Err(io::Error::other("the host key given is not an OpenSSH private key"));
    }
    if !key.public.starts_with("ssh-ed25519 ") || key.public.contains('\n') {
        return Err(io::Error::other("the host key given has no ed25519 public key line"));
    }
    Ok(())
}

fn write_host_key(private: &str, public: &str) -> io::Result<String> {
    fs::create_dir_all("/etc/ssh")?;
    write_private(Path::new(HOST_KEY), private.as_bytes())?;
    fs::write(format!("{HOST_KEY}.pub"), format!("{public}\n"))?;
    Ok(public.to_string())
}

fn start_sshd() -> io::Result<()> {
    // Privilege separation directory; /run is a fresh tmpfs.
    fs::create_dir_all("/run/sshd")?;
    fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755))?;
    let mut cmd = Command::new(SSHD);
    cmd.args(["-D", "-e"]).stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and calls only sigprocmask, which is
    // async-signal-safe. PID 1 blocks the signals it waits for; children must not inherit that.
    unsafe {
        cmd.pre_exec(crate::supervisor::unblock_signals_in_child);
    }
    let child = cmd.spawn().map_err(|e| io::Error::other(format!("start {SSHD}: {e}")))?;
    SSHD_PID.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    // Reaped by the supervisor (waitpid(-1)), like every child of PID 1.
    drop(child);
    Ok(())
}

/// True once a socket listens on TCP port 22. Read from `/proc/net/tcp{,6}` rather than by
/// connecting, which would make sshd log a spurious "connection closed" on the console.
fn listening_on_port_22() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|p| fs::read_to_string(p).map(|t| has_listener(&t, 22)).unwrap_or(false))
}

/// Parses `/proc/net/tcp` text: `sl local_address rem_address st ...`, where the local address
/// ends in `:PORT` (hex) and state `0A` is LISTEN.
fn has_listener(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let (local, state) = (f.nth(1), f.nth(1));
        local.is_some_and(|a| a.ends_with(&want)) && state == Some("0A")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_a_listener_in_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n";
        assert!(has_listener(t, 22));
        assert!(!has_listener(t, 2222));
        assert!(!has_listener(&t.replace(" 0A ", " 01 "), 22));
    }

    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn decodes_valid_keys() {
        assert_eq!(decode_authorized_keys(&b64(KEY)).unwrap(), format!("{KEY}\n"));
        let two = format!("{KEY}\n\n# comment\n{KEY}\n");
        assert_eq!(decode_authorized_keys(&b64(&two)).unwrap().lines().count(), 2);
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        assert!(decode_authorized_keys("!!!").unwrap_err().contains("base64"));
        assert!(decode_authorized_keys(&b64("\n")).unwrap_err().contains("no key"));
        assert!(decode_authorized_keys(&b64("ssh-ed25519 garbage")).unwrap_err().contains("not an OpenSSH"));
    }
}
