//! `smolvm-init`: PID 1 of every smolvm guest.
//!
//! The boot path is deliberately linear and synchronous: every millisecond between the kernel
//! handing over and sshd listening is time the user waits for `smolvm create`. In order:
//!
//! 1. [`mounts`]: proc, sys, dev, devpts, run, tmp (and cgroup2), so that everything else works;
//!    then [`rootfs`]: the overlay of the shared base and the sandbox's own disk, if asked for;
//! 2. [`net`]: hostname, `lo`, and the interface from the kernel's `ip=` argument, via netlink;
//! 3. [`ssh`]: root's `authorized_keys` from `smolvm.authorized_key_b64`, a fresh ed25519 host
//!    key, a machine-id, sshd started (not awaited: readiness means "the agent answers", and
//!    the host asks the agent to wait for sshd when it needs SSH);
//! 4. [`agent`] started (before sshd), then the readiness line (see `smolvm_protocol::ready`)
//!    on the console and in the agent's Hello;
//! 5. [`supervisor`]: reap orphans until SIGTERM or Ctrl-Alt-Del, then sync, unmount, power off.
//!
//! A step that fails logs one clear line and the boot goes on: a guest with a broken network is
//! still debuggable on its console, and one with a bad key still shuts down cleanly.

mod agent;
mod clock;
mod log;
mod mounts;
mod net;
mod reaper;
mod refresh;
mod rootfs;
mod ssh;
mod supervisor;

use smolvm_protocol::cmdline;
use smolvm_protocol::ready::{BootPhases, Ready, READY_VERSION};

fn main() {
    let mut phases = BootPhases { init: clock::boottime_us(), ..BootPhases::default() };
    if std::process::id() != 1 {
        log::error!("must run as PID 1 (running as pid {}); exiting", std::process::id());
        std::process::exit(2);
    }
    // Signals are blocked first so that a SIGTERM during boot is queued, not lost.
    supervisor::block_signals();

    mounts::mount_pseudo_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        log::error!("cannot read /proc/cmdline: {e}; booting with defaults");
        String::new()
    });
    if let Some(upper) = cmdline::get(&cmdline, cmdline::UPPER) {
        let layers: Vec<&str> = cmdline::get(&cmdline, cmdline::LAYERS)
            .map(|l| l.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        if let Err(e) = rootfs::switch_to_overlay(upper, &layers) {
            // The base is read-only: the guest still boots and can be inspected, but writes fail.
            log::error!("overlay root on {upper} failed: {e}; staying on the read-only base");
        }
    }
    phases.mounts = clock::boottime_us();
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");

    net::configure(&cmdline);
    phases.network = clock::boottime_us();
    // The agent listens before sshd starts; it answers a host's Hello once the guest is ready.
    agent::start();

    if let Err(e) = refresh::write_machine_id() {
        log::error!("write /etc/machine-id: {e}");
    }
    let host_key = ssh::bring_up(cmdline::get(&cmdline, cmdline::AUTHORIZED_KEY_B64));
    phases.sshd = clock::boottime_us();

    match host_key {
        Ok(host_key) => {
            let ready = Ready { v: READY_VERSION, host_key, boot_us: phases };
            agent::set_ready(ready.clone());
            log::console_line(&ready.to_line());
        }
        Err(e) => {
            log::error!("SSH is not available: {e}; no readiness line will be printed");
            // The agent still serves the host (it can read the console and files).
            agent::set_ready(Ready { v: READY_VERSION, host_key: String::new(), boot_us: phases });
        }
    }

    supervisor::run()
}
