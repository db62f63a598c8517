//! The restore half of the boot path: a QEMU started with `-incoming defer` loads a saved
//! state instead of booting its kernel, then the guest is refreshed before anyone may run a
//! command in it.
//!
//! Readiness is the same as for a cold boot: the agent answers. There is no readiness line
//! (the guest printed it long ago); the agent proxy's Hello (sent again until answered: a
//! restored guest's port can swallow the first) proves the path, then the guest is reseeded,
//! its clock stepped, and a clone renamed with a new SSH host key (`HostMsg::Refresh`).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use super::boot::{BootError, Restore, Start};
use super::Smolvm;
use crate::state::SandboxRow;
use crate::vm::{process, SaveRam};

/// The RAM image and the stream a restoring QEMU gets as descriptors (`Wiring::ram`,
/// `Wiring::incoming`), opened here: QEMU reaches them only through `/proc/self/fd`.
pub(super) fn open_inputs(start: &Start) -> Result<(Option<OwnedFd>, Option<OwnedFd>), BootError> {
    let Start::Restore(r) = start else { return Ok((None, None)) };
    let open = |p: &Path| {
        crate::text::open_untrusted(p)
            .map(OwnedFd::from)
            .map_err(|source| BootError::Io { what: format!("open {}", p.display()), source })
    };
    let ram = r.ram.as_deref().map(open).transpose()?;
    Ok((ram, Some(open(&r.stream)?)))
}

/// Records which RAM image the restoring QEMU maps (`snapshot::RamImage`), or that none is
/// (a boot, or a resume into anonymous memory). The image also gets a name in the sandbox's
/// directory ([`RAM_LINK`]): a fork's image keeps one after the fork's own directory is
/// gone, so that a pause can link it rather than copy it, and it is freed with the last
/// sandbox that maps it.
pub(super) fn record_ram_image(dir: &Path, start: &Start, ram: Option<&OwnedFd>) -> Result<(), BootError> {
    let io = |source| BootError::Io { what: format!("record {}", crate::snapshot::RAM_IMAGE), source };
    let sha = match start {
        Start::Restore(r) => r.ram_sha256.as_deref(),
        Start::Cold => None,
    };
    let _ = std::fs::remove_file(dir.join(RAM_LINK));
    match (ram, sha) {
        (Some(fd), Some(sha)) => {
            let f = std::fs::File::from(fd.try_clone().map_err(io)?);
            if let Err(e) = crate::snapshot::files::link_open_file(&f, &dir.join(RAM_LINK)) {
                // Another file system (a cache elsewhere): a pause copies the image instead.
                tracing::debug!("the RAM image gets no name in {}: {e}", dir.display());
            }
            crate::snapshot::RamImage::of(&f, sha).and_then(|r| r.write(dir)).map_err(io)
        }
        _ => match std::fs::remove_file(dir.join(crate::snapshot::RAM_IMAGE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        },
    }
}

/// A second name of the RAM image a restored sandbox's QEMU maps, in its directory.
pub(super) const RAM_LINK: &str = "ram.img";

fn qemu_log_tail(dir: &Path) -> String {
    super::boot::qemu_log_tail(dir, 8 * 1024)
}

impl Smolvm {
    /// Loads the state into the QEMU just started (`pid`), lets the guest run, and refreshes
    /// it. Returns the guest's SSH host key. On failure QEMU is killed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_restore(
        &self,
        row: &SandboxRow,
        dir: &Path,
        pid: i32,
        key_b64: &str,
        r: &Restore,
        proxy: crate::agent::ProxyStart,
        timeout: Duration,
    ) -> Result<String, BootError> {
        let fail = |reason: String| {
            let _ = process::signal(pid, libc::SIGKILL);
            // QEMU's last words, once it has written them.
            std::thread::sleep(Duration::from_millis(20));
            BootError::Restore { reason, qemu_log: qemu_log_tail(dir) }
        };
        let loaded = (|| {
            let mut q = self.vmm().control_when_up(dir, pid, Duration::from_secs(30))?;
            tracing::debug!("{}: VMM control connected", row.name);
            if let Some(pages) = &r.pages {
                // Before the devices: their load reads the virtqueues in guest memory.
                write_pages(pid, u64::from(row.memory_mib) << 20, pages)?;
                tracing::debug!("{}: its pages written", row.name);
            }
            q.load(if r.ram.is_some() { SaveRam::LeftOut } else { SaveRam::Included })?;
            tracing::debug!("{}: state loaded", row.name);
            q.cont()
        })();
        loaded.map_err(|e| fail(format!("load the saved state: {e}")))?;
        tracing::debug!("{}: loaded and running", row.name);
        proxy.ready(timeout).map_err(|e| fail(format!("the agent: {e}")))?;
        tracing::debug!("{}: agent proxy ready", row.name);
        let agent =
            crate::agent::AgentClient::connect_sandbox(&row.name, dir).map_err(|e| fail(format!("the agent: {e}")))?;
        tracing::debug!("{}: agent answers", row.name);
        let key = refresh(&agent, row, key_b64, r.clone, r.host_key.as_deref()).map_err(fail)?;
        tracing::debug!("{}: refreshed", row.name);
        Ok(key)
    }

    /// Gives running `row` a new identity and random state, as a clone gets: for the sandbox
    /// whose guest became the boot snapshot, so that no clone holds its SSH host key.
    pub(super) fn reidentify(&self, row: &mut SandboxRow) -> Result<(), BootError> {
        let dir = self.dir(&row.name);
        let key_b64 = super::boot::public_key_b64(&self.home().keys())?;
        let agent =
            crate::agent::AgentClient::connect_sandbox(&row.name, &dir).map_err(|e| BootError::Agent(e.to_string()))?;
        let host_key = refresh(&agent, row, &key_b64, true, None)
            .map_err(|reason| BootError::Restore { reason, qemu_log: String::new() })?;
        let port = row.ssh_port.unwrap_or(0);
        super::ssh::write_known_hosts(&dir.join("known_hosts"), port, &host_key)
            .map_err(|source| BootError::Io { what: "write known_hosts".into(), source })?;
        row.host_key = Some(host_key);
        self.db().update(row)?;
        Ok(())
    }
}

/// Writes a paused guest's pages (`snapshot::pages`) into the RAM of `pid`, a QEMU that has
/// mapped the image they go over and not yet run the guest.
fn write_pages(pid: i32, ram_len: u64, pages: &Path) -> std::io::Result<()> {
    let ram = crate::vm::guest_ram::RamMapping::find(pid, ram_len)?
        .ok_or_else(|| std::io::Error::other("QEMU has not mapped the RAM image"))?;
    crate::snapshot::pages::Pages::open(pages, ram_len)?
        .apply(&ram)
        .map_err(|e| std::io::Error::new(e.kind(), format!("write the saved pages into the guest's RAM: {e}")))
}

/// Reseeds, steps the clock and (`clone`) renames the guest; returns its SSH host key (`kept`
/// when not a clone).
fn refresh(
    agent: &crate::agent::AgentClient,
    row: &SandboxRow,
    key_b64: &str,
    clone: bool,
    kept: Option<&str>,
) -> Result<String, String> {
    {
        let mut seed = [0u8; 64];
        crate::digest::random_bytes(&mut seed);
        let refresh = smolvm_protocol::agent::Refresh {
            seed_hex: seed.iter().map(|b| format!("{b:02x}")).collect(),
            unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            identity: match clone {
                true => Some(smolvm_protocol::agent::Identity {
                    hostname: row.name.clone(),
                    authorized_key_b64: key_b64.to_string(),
                    host_key: Some(new_host_key()?),
                }),
                false => None,
            },
        };
        let done = agent.refresh(&refresh).map_err(|e| format!("refresh the guest: {e}"))?;
        tracing::debug!("{}: the guest's refresh took (µs) {:?}", row.name, done.steps_us);
        // A guest that could not be reseeded or renamed must not run anyone's commands.
        if !done.errors.is_empty() {
            return Err(format!("refresh the guest: {}", done.errors.join("; ")));
        }
        let host_key = if clone { done.host_key } else { kept.map(str::to_string) };
        host_key.ok_or_else(|| "the guest reported no SSH host key".into())
    }
}

/// A clone's SSH host key, made here rather than in the guest: the same ed25519 key the guest
/// would make, in microseconds instead of the ~0.2 s its curve arithmetic takes on a guest's
/// cold translation cache under emulation. Sent once through the agent's port; never logged
/// (`PrivateText`), never stored by the host.
fn new_host_key() -> Result<smolvm_protocol::agent::HostKey, String> {
    let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| format!("make an SSH host key: {e}"))?;
    let text = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| format!("encode the SSH host key: {e}"))?;
    let public = key.public_key().to_openssh().map_err(|e| format!("encode the SSH host key: {e}"))?;
    Ok(smolvm_protocol::agent::HostKey { private: smolvm_protocol::agent::PrivateText(text.to_string()), public })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_host_made_key_is_one_plain_ed25519_key_and_never_shown_by_debug() {
        let k = super::new_host_key().unwrap();
        let parsed = ssh_key::PrivateKey::from_openssh(&k.private.0).unwrap();
        assert_eq!(parsed.algorithm(), ssh_key::Algorithm::Ed25519);
        assert!(!parsed.is_encrypted());
        assert_eq!(parsed.public_key().to_openssh().unwrap(), k.public, "the halves match");
        let shown = format!("{k:?}");
        assert!(!shown.contains("PRIVATE KEY") && !shown.contains(&k.private.0[40..80]), "{shown}");
        assert_ne!(super::new_host_key().unwrap(), k, "two clones never share a key");
    }
}
