//! The machine a sandbox runs, described for any VMM: what the sandbox layer decides (memory,
//! vCPUs, disks, where the RAM lives, what the network card is wired to, whether to wait for
//! a saved state) and the descriptors it hands over. A backend (`vm::qemu`) turns this into
//! its own command line; nothing above `vm::Vmm` sees that command line.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use super::accel::Accel;

/// Everything needed to start one guest.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub cmdline: String,
    /// The shared base rootfs, attached read-only (`/dev/vda`).
    pub base: PathBuf,
    /// The sandbox's writable disk (`/dev/vdb`).
    pub upper: PathBuf,
    /// Read-only layers over the base, top first (`/dev/vdc`, ...): a preset's tooling.
    pub layers: Vec<PathBuf>,
    /// The guest's network card and what is behind it.
    pub netdev: Netdev,
    /// The sandbox directory; the VMM itself works in its `run/` (`paths::run_dir`).
    pub dir: PathBuf,
    /// The sandbox disk's cache mode: `writeback` (flushes reach the host's disk) unless a
    /// benchmark measures the cost of that against `unsafe`.
    pub upper_cache: DiskCache,
    /// Where the guest's RAM lives.
    pub memory: Memory,
    /// Start paused, waiting for a saved state ([`Wiring::incoming`]): a restore.
    pub incoming: Option<Incoming>,
    /// A ceiling on the disks' I/O, shared by all of them.
    pub disk_limit: crate::state::DiskLimit,
}

/// The kind of saved state a restoring VM loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A whole stream ([`super::SaveRam::Included`] or `LeftOut`): it describes the machine.
    Migration,
    /// The devices alone (`VmControl::save_devices`), with no description of the machine:
    /// the VM is told not to expect one.
    Devices,
}

/// Where a guest's RAM lives. Every form is the same RAM block to the guest, so that a state
/// saved from one loads into another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// The VMM's own anonymous memory: a cold boot, a resume.
    Anonymous,
    /// A snapshot's RAM image ([`Wiring::ram`], opened read-only), mapped copy-on-write:
    /// every clone of one snapshot reads the same pages of the host's page cache, and only
    /// what a clone writes becomes its own.
    SnapshotImage,
    /// A shared memory file ([`Wiring::ram`]): the sealing VM loads a stream into it, which
    /// makes the file the RAM image (`snapshot::seal`).
    Shared,
}

/// The cache mode for the sandbox's own disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCache {
    /// The host's page cache, and the guest's flushes honoured: what sandboxes use.
    Writeback,
    /// Flushes ignored: a host crash can tear the guest's file system. Benchmarks only.
    Unsafe,
}

/// What the guest's network card is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netdev {
    /// smolvm's network process, which enforces the sandbox's policy (`crate::net`): the wire
    /// is a socket of ethernet frames ([`Wiring::wire`]).
    Wire,
    /// The VMM's stock user-mode network, which lets the guest reach the host's loopback and
    /// everything the host reaches. Only for measuring the enforced network against it
    /// (smolvm-bench) and for booting an image by hand; never for a sandbox.
    UnrestrictedUser { ssh_port: u16 },
}

/// The descriptors and confinement a VM is started with, besides the files of its
/// [`MachineSpec`] (which the backend opens itself).
#[derive(Debug)]
pub struct Wiring {
    /// The network wire ([`Netdev::Wire`]): a stream socket carrying length-prefixed frames.
    pub wire: Option<OwnedFd>,
    /// The guest agent's port (a virtio-serial port in the guest); the agent proxy holds
    /// the other end.
    pub agent: OwnedFd,
    /// The serial console; the agent proxy holds the other end.
    pub console: OwnedFd,
    /// Run as this user (when we are root).
    pub identity: Option<crate::child::Identity>,
    /// `cgroup.procs` descriptors to join.
    pub cgroup_procs: Vec<RawFd>,
    /// The RAM file, for [`Memory::SnapshotImage`] and [`Memory::Shared`].
    pub ram: Option<OwnedFd>,
    /// The saved state to load, with [`MachineSpec::incoming`].
    pub incoming: Option<OwnedFd>,
    /// The VM serves the starting command only (the sealing VM): it is killed if that
    /// command dies. A sandbox's VM outlives the command that starts it.
    pub ends_with_caller: bool,
}

/// The guest kernel command line. Nothing secret goes here: it is visible in the host's
/// process list and in the guest's `/proc/cmdline`. The SSH key is a public key.
pub fn kernel_cmdline(name: &str, accel: &Accel, layers: usize, authorized_key_b64: &str) -> String {
    use smolvm_protocol::cmdline as k;
    // The guest always gets its route and resolver: what it may reach is the network
    // process's decision, made per connection (and recorded when it refuses).
    let ip =
        format!("{}::{}:255.255.255.0:{name}:eth0:off:{}", crate::net::GUEST, crate::net::GATEWAY, crate::net::DNS);
    let mut s = format!(
        "console=ttyS0 quiet root=/dev/vda ro rootfstype=ext4 init=/init pci=off panic=-1 \
         {}=/dev/vdb {}={ip} {}={name} {}={authorized_key_b64}",
        k::UPPER,
        k::IP,
        k::HOSTNAME,
        k::AUTHORIZED_KEY_B64
    );
    if layers > 0 {
        // virtio-blk devices are named in the order they are attached: vda, vdb, then layers.
        let devs: Vec<String> = (0..layers).map(|i| format!("/dev/vd{}", (b'c' + i as u8) as char)).collect();
        s.push_str(&format!(" {}={}", k::LAYERS, devs.join(",")));
    }
    if let (Accel::Tcg { .. }, Some(khz)) = (accel, tsc_khz()) {
        // Under emulation the kernel may fail to calibrate the TSC against the emulated PIT
        // and hang; telling it the frequency avoids that.
        s.push_str(&format!(" tsc_early_khz={khz}"));
    }
    s
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo`.
pub fn tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_has_the_route_the_resolver_and_no_secret() {
        let k = kernel_cmdline("box", &Accel::Kvm, 2, "a2V5");
        assert!(k.contains("ip=10.0.2.15::10.0.2.2:255.255.255.0:box:eth0:off:10.0.2.3"), "{k}");
        assert!(k.contains("smolvm.layers=/dev/vdc,/dev/vdd"), "{k}");
        assert!(k.contains("smolvm.authorized_key_b64=a2V5") && k.contains("root=/dev/vda ro"), "{k}");
        assert!(!k.contains("tsc_early_khz"), "only under TCG: {k}");
        assert!(!kernel_cmdline("box", &Accel::Kvm, 0, "a2V5").contains("smolvm.layers"));
    }
}
