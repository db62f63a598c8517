//! The QEMU backend: a `microvm` machine, the PVH kernel booted directly, virtio-mmio devices.

//!
//! QEMU opens nothing in smolvm's home by path. It runs as the sandbox's own user (when smolvm
//! is root) in the sandbox's `run/` directory, and gets everything else as descriptors opened
//! for it: the network wire, the agent and console sockets, the kernel (read through
//! `/proc/self/fd`, since the x86 loader takes a file name) and the disks (`-add-fd` fd sets,
//! which QEMU duplicates instead of reopening). So a QEMU taken over by its guest holds its
//! own disks and nothing else of the host's.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::accel::Accel;
use super::machine::{DiskCache, Incoming, MachineSpec, Memory, Netdev, Wiring};

mod control;
pub mod migrate;
pub mod qmp;
mod version;

pub use version::{qemu_version, qemu_version_cached};

/// QEMU's end of the agent port's socket pair (the agent proxy holds the other).
pub const AGENT_FD: RawFd = 4;
/// QEMU's end of the serial console's socket pair (the agent proxy writes it to `console.log`).
pub const CONSOLE_FD: RawFd = 5;
/// The kernel image.
pub const KERNEL_FD: RawFd = 6;
/// The first disk's descriptor: the base, then the sandbox's disk, then the layers; disk `i`
/// is fd set `i + 1`.
pub const FIRST_DISK_FD: RawFd = 7;
/// The guest RAM's file, for a restore ([`Memory::SnapshotImage`]) or a seal ([`Memory::Shared`]).
pub const RAM_FD: RawFd = 50;
/// The migration stream an `-incoming defer` QEMU loads (`file:/proc/self/fd/51`).
pub const INCOMING_FD: RawFd = 51;
/// Under emulation, the translation cache's size in MiB (QEMU's default is 1 GiB): counted in
/// the sandbox's memory ceiling (`cgroup::TCG_CACHE_MIB`).
pub const TCG_TB_SIZE_MIB: u64 = super::cgroup::TCG_CACHE_MIB;

/// What [`Incoming::Devices`] adds to the command line (left out of the device model: it
/// concerns the stream, not the machine).
const NO_CONFIGURATION_SECTION: &str = "migration.send-configuration=off";

/// QEMU's control socket, in the sandbox's run directory.
pub fn qmp_socket(dir: &Path) -> PathBuf {
    crate::paths::run_dir(dir).join("qmp.sock")
}

/// The QEMU backend: the program, and where its version is remembered.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The QEMU executable (a bare name is looked up in `child::CHILD_PATH`).
    pub program: PathBuf,
}

impl Qemu {
    pub fn new(program: impl Into<PathBuf>) -> Qemu {
        Qemu { program: program.into() }
    }
    /// The full command. The caller detaches it (own session, output to `qemu.log`).
    pub fn command(&self, spec: &MachineSpec) -> Command {
        let mut c = Command::new(&self.program);
        let cpu = match spec.accel {
            Accel::Kvm => "host",
            Accel::Tcg { .. } => "max",
        };
        let netdev = match spec.netdev {
            Netdev::Wire => {
                format!("stream,id=net0,server=off,addr.type=fd,addr.str={}", crate::net::WIRE_FD)
            }
            Netdev::UnrestrictedUser { ssh_port } => format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
        };
        // Disk `i` is fd set `i + 1` (see `FIRST_DISK_FD`). The shared read-only images keep
        // `cache=unsafe` (nothing is written to them); the sandbox's own disk is `writeback`:
        // the host page cache, and the guest's flushes (fsync, journal commits) reach the
        // host's disk, so a host crash does not leave a torn ext4 behind.
        let upper_cache = match spec.upper_cache {
            DiskCache::Writeback => "writeback",
            DiskCache::Unsafe => "unsafe",
        };
        // file.drop-cache=off: QEMU's default drops a file's pages from the host's page cache
        // when a restored guest starts (the cache is invalidated for migration), which would
        // evict the base image that every other sandbox is reading.
        // Every disk in one throttle group: the ceiling is the sandbox's, not each disk's.
        let mut throttle = String::new();
        if let Some(b) = spec.disk_limit.bytes_per_sec {
            throttle.push_str(&format!(",throttling.bps-total={b}"));
        }
        if let Some(n) = spec.disk_limit.iops {
            throttle.push_str(&format!(",throttling.iops-total={n}"));
        }
        if !throttle.is_empty() {
            throttle.push_str(",throttling.group=disks");
        }
        let drive = |id: &str, set: usize, ro: bool| {
            format!(
                "id={id},file=/dev/fdset/{set},format=raw,if=none,cache={},aio=threads,file.drop-cache=off{}{throttle}",
                if ro { "unsafe" } else { upper_cache },
                // A writable drive opens its file read-write at once: with QEMU's default
                // (auto-read-only), it would first want a read-only descriptor in the set.
                if ro { ",readonly=on" } else { ",auto-read-only=off" }
            )
        };
        let accel = match spec.accel {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg { .. } => format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
        };
        for i in 0..2 + spec.layers.len() {
            c.arg("-add-fd").arg(format!("fd={},set={}", FIRST_DISK_FD + i as RawFd, i + 1));
        }
        c.arg("-name")
            .arg(format!("smolvm-{},process=smolvm-{}", spec.name, spec.name))
            // pic=off: with the legacy 8259 present, an early timer interrupt was sometimes
            // delivered as vector 0 under TCG, a "divide error" in start_kernel that resets the
            // VM (a quarter of boots on the development machine); nothing here needs the PIC.
            .args(["-machine", "microvm,rtc=on,pic=off,memory-backend=ram0", "-accel", &accel, "-cpu", cpu])
            .args(["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.cpus.to_string()])
            .arg("-object")
            .arg(Self::memory_object(spec))
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(format!("/proc/self/fd/{KERNEL_FD}"))
            .arg("-append")
            .arg(&spec.cmdline)
            .arg("-chardev")
            .arg(format!("socket,id=console,fd={CONSOLE_FD}"))
            .args(["-serial", "chardev:console"])
            .arg("-drive")
            .arg(drive("base", 1, true))
            .args(["-device", "virtio-blk-device,drive=base"])
            .arg("-drive")
            .arg(drive("upper", 2, false))
            .args(["-device", "virtio-blk-device,drive=upper"]);
        for i in 0..spec.layers.len() {
            c.arg("-drive").arg(drive(&format!("layer{i}"), 3 + i, true));
            c.args(["-device", &format!("virtio-blk-device,drive=layer{i}")]);
        }
        c.arg("-netdev")
            .arg(netdev)
            .args(["-device", "virtio-net-device,netdev=net0"])
            .args(["-device", "virtio-rng-device"])
            // The guest agent's port; the agent proxy is its one client.
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,fd={AGENT_FD}"))
            .arg("-device")
            .arg(format!("virtserialport,chardev=agent,name={}", smolvm_protocol::agent::AGENT_PORT_NAME))
            // Relative to its working directory, the sandbox's `run/`.
            .args(["-qmp", "unix:qmp.sock,server=on,wait=off"])
            // Least privilege: QEMU's seccomp filter forbids it to spawn processes, change its
            // privileges or use obsolete system calls. (`spawn=deny` is also why QEMU is not
            // asked to `-daemonize`: that forks after the filter is in place.)
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            .stdin(Stdio::null());
        if let Some(kind) = spec.incoming {
            c.args(["-incoming", "defer"]);
            if kind == Incoming::Devices {
                c.args(["-global", NO_CONFIGURATION_SECTION]);
            }
        }
        c
    }

    fn memory_object(spec: &MachineSpec) -> String {
        let size = format!("size={}M", spec.memory_mib);
        let path = format!("mem-path=/proc/self/fd/{RAM_FD}");
        match spec.memory {
            Memory::Anonymous => format!("memory-backend-ram,id=ram0,{size}"),
            // readonly=on,rom=off: the file is opened read-only and mapped private and
            // writable: the guest's writes never reach it.
            Memory::SnapshotImage => format!("memory-backend-file,id=ram0,{size},{path},share=off,readonly=on,rom=off"),
            Memory::Shared => format!("memory-backend-file,id=ram0,{size},{path},share=on"),
        }
    }

    /// What a migration stream depends on besides QEMU's version: the machine and its
    /// devices, as this command line gives them (without what differs between sandboxes of
    /// one configuration: name, kernel command line, where the RAM is, `-incoming`).
    /// A snapshot records its SHA-256 and a restore compares it.
    pub fn device_model(&self, spec: &MachineSpec) -> String {
        let args: Vec<String> = self.command(spec).get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "-name" | "-append" | "-object" | "-incoming" => i += 2,
                "-global" if args.get(i + 1).map(String::as_str) == Some(NO_CONFIGURATION_SECTION) => i += 2,
                a => {
                    out.push(a.to_string());
                    i += 1;
                }
            }
        }
        out.join(" ")
    }

    /// Starts QEMU with `plumbing`, confined (`child::Confine`): its working directory the
    /// sandbox's `run/`, its own session, its output in `log`, an empty environment. Opens
    /// the kernel and disks for it.
    pub fn spawn(
        &self,
        spec: &MachineSpec,
        plumbing: Wiring,
        log: std::fs::File,
    ) -> std::io::Result<std::process::Child> {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("open {}: {e}", p.display())))
        };
        let kernel = open(&spec.kernel, false)?;
        // QEMU reopens the kernel through /proc/self/fd as the sandbox's user: the image is
        // made readable by the sandboxes' shared group (0640), never by other users.
        if let Some(id) = plumbing.identity {
            let meta = kernel.metadata()?;
            if std::os::unix::fs::MetadataExt::gid(&meta) != id.images_gid {
                std::os::unix::fs::fchown(&kernel, None, Some(id.images_gid))?;
            }
            if meta.permissions().mode() & 0o777 != 0o640 {
                kernel.set_permissions(std::fs::Permissions::from_mode(0o640))?;
            }
        }
        let mut disks = vec![open(&spec.base, false)?, open(&spec.upper, true)?];
        for l in &spec.layers {
            disks.push(open(l, false)?);
        }
        // Run through its descriptor: the sandbox's uid needs to execute the file, not to
        // reach its directory.
        let exe = crate::child::Executable::open(&self.program)?;
        let mut cmd = exe.command();
        cmd.args(self.command(spec).get_args()).stdin(Stdio::null());
        // QEMU needs nothing of our environment (host API keys and tokens must not reach it).
        cmd.env_clear().env("PATH", crate::child::CHILD_PATH);
        cmd.stdout(log.try_clone()?).stderr(log);
        let mut fds = vec![
            (plumbing.agent.as_raw_fd(), AGENT_FD),
            (plumbing.console.as_raw_fd(), CONSOLE_FD),
            (kernel.as_raw_fd(), KERNEL_FD),
        ];
        if let Some(w) = &plumbing.wire {
            fds.push((w.as_raw_fd(), crate::net::WIRE_FD));
        }
        for (i, d) in disks.iter().enumerate() {
            fds.push((d.as_raw_fd(), FIRST_DISK_FD + i as RawFd));
        }
        if let Some(r) = &plumbing.ram {
            fds.push((r.as_raw_fd(), RAM_FD));
        }
        if let Some(s) = &plumbing.incoming {
            fds.push((s.as_raw_fd(), INCOMING_FD));
        }
        crate::child::Confine {
            fds,
            cwd: Some(crate::paths::run_dir(&spec.dir)),
            identity: plumbing.identity,
            cgroup_procs: plumbing.cgroup_procs,
            exe: Some(exe.file.as_raw_fd()),
            // QEMU's own user-mode network (the benchmark's baseline, never a sandbox's) needs
            // the host's network and resolver configuration: it runs as before, unjailed.
            jail: match spec.netdev {
                Netdev::Wire => Some(crate::jail::Jail::new(
                    &crate::jail::mount_point(&spec.dir, "qemu"),
                    &crate::paths::run_dir(&spec.dir),
                    true,
                )?),
                Netdev::UnrestrictedUser { .. } => None,
            },
            no_namespaces: true,
            dies_with_caller: plumbing.ends_with_caller,
        }
        .apply(&mut cmd);
        tracing::debug!("starting {cmd:?}");
        // Not waited for once booted: QEMU outlives this process (it is re-parented when we
        // exit). Our copies of its descriptors close when this returns.
        cmd.spawn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Qemu {
        Qemu::new("/usr/bin/qemu-system-x86_64")
    }

    fn cfg(netdev: Netdev) -> MachineSpec {
        MachineSpec {
            name: "t".into(),
            accel: Accel::Kvm,
            memory_mib: 512,
            cpus: 2,
            kernel: "/k".into(),
            cmdline: "console=ttyS0".into(),
            base: "/base".into(),
            upper: "/dir/disk.ext4".into(),
            layers: vec!["/layer".into()],
            netdev,
            dir: "/dir".into(),
            upper_cache: DiskCache::Writeback,
            memory: Memory::Anonymous,
            incoming: None,
            disk_limit: crate::state::DiskLimit::default(),
        }
    }

    fn args(c: &MachineSpec) -> Vec<String> {
        q().command(c).get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str, containing: &str) -> Option<&'a str> {
        args.windows(2).find(|w| w[0] == flag && w[1].contains(containing)).map(|w| w[1].as_str())
    }

    #[test]
    fn the_command_line_is_a_microvm_on_our_wire_with_read_only_shared_disks() {
        let c = cfg(Netdev::Wire);
        assert_eq!(q().command(&c).get_program(), "/usr/bin/qemu-system-x86_64");
        let a = args(&c);
        assert!(value_of(&a, "-machine", "microvm").is_some_and(|m| m.contains("pic=off")), "{a:?}");
        assert_eq!(value_of(&a, "-object", ""), Some("memory-backend-ram,id=ram0,size=512M"));
        assert!(!a.iter().any(|x| x == "-incoming"));
        assert_eq!(value_of(&a, "-accel", ""), Some("kvm"));
        assert_eq!(value_of(&a, "-cpu", ""), Some("host"));
        assert_eq!(value_of(&a, "-smp", ""), Some("2"));
        // The network is the wire on descriptor 3: never QEMU's user-mode network.
        assert_eq!(value_of(&a, "-netdev", ""), Some("stream,id=net0,server=off,addr.type=fd,addr.str=3"));
        assert!(!a.iter().any(|x| x.starts_with("user,")), "{a:?}");
        // Base and layer are shared read-only; the sandbox's own disk is writable, and flushed.
        // All are descriptors: QEMU opens no file of the home by path.
        assert!(value_of(&a, "-drive", "id=base").is_some_and(|d| d.contains("fdset/1") && d.contains("readonly=on")));
        assert!(value_of(&a, "-drive", "id=layer0").is_some_and(|d| d.contains("fdset/3") && d.contains("readonly=on")));
        let upper = value_of(&a, "-drive", "id=upper").unwrap();
        assert!(
            upper.contains("fdset/2") && !upper.contains("readonly") && upper.contains("cache=writeback"),
            "{upper}"
        );
        assert!(!a.iter().any(|x| x.contains("throttling")), "no ceiling unless asked");
        // A disk ceiling: one throttle group for all disks, so it is the sandbox's.
        let mut limited = cfg(Netdev::Wire);
        limited.disk_limit = crate::state::DiskLimit { bytes_per_sec: Some(8 << 20), iops: Some(500) };
        let a = args(&limited);
        for id in ["id=base", "id=upper", "id=layer0"] {
            let d = value_of(&a, "-drive", id).unwrap();
            assert!(
                d.contains(",throttling.bps-total=8388608,throttling.iops-total=500,throttling.group=disks"),
                "{d}"
            );
        }
        assert_eq!(a.iter().filter(|x| *x == "-add-fd").count(), 3);
        assert_eq!(value_of(&a, "-kernel", ""), Some("/proc/self/fd/6"));
        assert!(!a.iter().any(|x| x.contains("/dir") || x.contains("/base") || x.contains("/k")), "no path: {a:?}");
        // QEMU's own seccomp sandbox stays on.
        assert!(value_of(&a, "-sandbox", "on")
            .is_some_and(|s| s.contains("spawn=deny") && s.contains("elevateprivileges=deny")));
        let tcg = MachineSpec { accel: Accel::Tcg { reason: "test".into() }, ..c };
        assert_eq!(value_of(&args(&tcg), "-cpu", ""), Some("max"));
        assert_eq!(value_of(&args(&tcg), "-accel", ""), Some("tcg,tb-size=256"));
    }

    #[test]
    fn a_restore_maps_the_snapshot_private_and_read_only_and_keeps_the_device_model() {
        let cold = cfg(Netdev::Wire);
        let clone = MachineSpec {
            memory: Memory::SnapshotImage,
            incoming: Some(Incoming::Migration),
            cmdline: "other".into(),
            ..cold.clone()
        };
        let a = args(&clone);
        assert_eq!(
            value_of(&a, "-object", ""),
            Some("memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/50,share=off,readonly=on,rom=off")
        );
        assert_eq!(value_of(&a, "-incoming", ""), Some("defer"));
        assert!(value_of(&a, "-drive", "id=base").is_some_and(|d| d.contains("file.drop-cache=off")));
        // Same devices, whatever the RAM and the command line: a stream of one loads in the other.
        assert_eq!(q().device_model(&cold), q().device_model(&clone));
        assert!(!a.iter().any(|x| x == "-global"));
        let devices = MachineSpec { incoming: Some(Incoming::Devices), ..clone.clone() };
        assert_eq!(value_of(&args(&devices), "-global", ""), Some(NO_CONFIGURATION_SECTION));
        assert_eq!(q().device_model(&cold), q().device_model(&devices), "the stream's kind is not the machine's");
        assert_ne!(q().device_model(&cold), q().device_model(&MachineSpec { memory_mib: 1024, ..cold.clone() }));
        assert_ne!(q().device_model(&cold), q().device_model(&MachineSpec { layers: vec![], ..cold.clone() }));
        let shared = MachineSpec { memory: Memory::Shared, ..cold };
        assert!(value_of(&args(&shared), "-object", "").is_some_and(|o| o.ends_with("share=on")));
    }

    #[test]
    fn the_unrestricted_baseline_is_only_what_it_says() {
        let a = args(&cfg(Netdev::UnrestrictedUser { ssh_port: 2222 }));
        assert_eq!(value_of(&a, "-netdev", ""), Some("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"));
    }
}
