//! The host side of the guest agent: commands and files without SSH.
//!
//! A virtio-serial port has one host-side client at a time, so each running sandbox has an
//! agent proxy ([`proxy`]): a small process (`smolvm __agent-proxy DIR`) that holds the one
//! connection to the guest for the VM's life and serves any number of local clients on
//! `<sandbox>/agent.sock`, renumbering their request ids onto the guest connection. Clients
//! ([`client`]) speak the same protocol to the proxy as the proxy speaks to the guest.

pub mod client;
pub mod proxy;

use std::path::{Path, PathBuf};

pub use client::{AgentClient, AgentError, ExecEvent, ExecHandle, ExecOutput};

/// QEMU's end of the agent port (one client: the proxy).
pub fn vm_socket(dir: &Path) -> PathBuf {
    dir.join("agent-vm.sock")
}

/// The proxy's socket, for any number of clients.
pub fn client_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// A proxy that was started; [`ProxyStart::ready`] waits for its word.
#[derive(Debug)]
pub struct ProxyStart {
    child: std::process::Child,
    stdout: Option<std::process::ChildStdout>,
    dir: PathBuf,
}

impl ProxyStart {
    /// Returns once the proxy holds the guest's connection and serves clients (it says so on
    /// a pipe), or fails after `timeout`.
    pub fn ready(mut self, timeout: std::time::Duration) -> std::io::Result<()> {
        let stdout = self.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let line = crate::child::read_line_timeout(stdout, timeout).map_err(|e| {
            let _ = self.child.kill();
            let log = std::fs::read_to_string(self.dir.join("agent-proxy.log")).unwrap_or_default();
            std::io::Error::new(
                e.kind(),
                format!(
                    "the agent proxy did not start: {e}\n--- agent-proxy.log ---\n{}",
                    crate::text::escape_controls(log.trim())
                ),
            )
        })?;
        if line.trim() != "ready" {
            return Err(std::io::Error::other(format!("the agent proxy said {line:?}")));
        }
        Ok(())
    }
}

/// Starts the proxy for the sandbox in `dir`, detached (its own session; its log in
/// `agent-proxy.log`). It exits by itself when the VM does.
pub fn spawn_proxy(dir: &Path, helper: &Path, log_filter: Option<&str>) -> std::io::Result<ProxyStart> {
    let log = std::fs::File::create(dir.join("agent-proxy.log"))?;
    let mut cmd = crate::child::helper_command(helper, "__agent-proxy", dir, log, log_filter);
    crate::child::inherit_fd(&mut cmd, -1, -1);
    let mut child = cmd.spawn()?;
    crate::child::record_pid(dir, "agent-proxy", child.id() as i32);
    let stdout = child.stdout.take();
    Ok(ProxyStart { child, stdout, dir: dir.to_path_buf() })
}

/// For `smolvm __agent-proxy DIR`: runs the proxy, printing its ready line on stdout.
pub fn proxy_main(dir: &Path) -> std::io::Result<()> {
    proxy::run(dir, || {
        #[allow(clippy::print_stdout)]
        {
            println!("ready");
        }
        crate::child::close_stdout();
    })
}
