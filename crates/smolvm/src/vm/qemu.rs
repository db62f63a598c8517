//! The QEMU backend: a `microvm` machine, the PVH kernel booted directly, virtio-mmio devices.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::accel::Accel;

/// Everything needed to start one guest.
#[derive(Debug, Clone)]
pub struct QemuConfig {
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
    /// The sandbox directory: console log, QMP socket, pid file, QEMU's own log.
    pub dir: PathBuf,
    /// The QEMU executable.
    pub qemu: PathBuf,
}

/// What the guest's virtio-net device is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netdev {
    /// smolvm's network process, which enforces the sandbox's policy (`crate::net`): the wire
    /// is a socket on descriptor [`crate::net::WIRE_FD`] of the QEMU process.
    Wire,
    /// QEMU's stock user-mode network, which lets the guest reach the host's loopback through
    /// 10.0.2.2 and everything the host reaches. Only for measuring the enforced network
    /// against it (smolvm-bench) and for booting an image by hand; never for a sandbox.
    UnrestrictedUser { ssh_port: u16 },
}

pub fn console_log(dir: &Path) -> PathBuf {
    dir.join("console.log")
}
pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}
pub fn qemu_log(dir: &Path) -> PathBuf {
    dir.join("qemu.log")
}

/// A value inside a QEMU `key=value,...` option: a comma is written as two.
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl QemuConfig {
    /// The full command. The caller detaches it (own session, output to `qemu.log`).
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.qemu);
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg { .. } => "max",
        };
        let netdev = match self.netdev {
            Netdev::Wire => {
                format!("stream,id=net0,server=off,addr.type=fd,addr.str={}", crate::net::WIRE_FD)
            }
            Netdev::UnrestrictedUser { ssh_port } => format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
        };
        let drive = |id: &str, file: &Path, ro: bool| {
            format!(
                "id={id},file={},format=raw,if=none,cache=unsafe,aio=threads{}",
                opt(file),
                if ro { ",readonly=on" } else { "" }
            )
        };
        c.arg("-name")
            .arg(format!("smolvm-{},process=smolvm-{}", self.name, self.name))
            // pic=off: with the legacy 8259 present, an early timer interrupt was sometimes
            // delivered as vector 0 under TCG, a "divide error" in start_kernel that resets the
            // VM (a quarter of boots on the development machine); nothing here needs the PIC.
            .args(["-machine", "microvm,rtc=on,pic=off", "-accel", self.accel.qemu_name(), "-cpu", cpu])
            .args(["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-append")
            .arg(&self.cmdline)
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", opt(&console_log(&self.dir))))
            .args(["-serial", "chardev:console"])
            .arg("-drive")
            .arg(drive("base", &self.base, true))
            .args(["-device", "virtio-blk-device,drive=base"])
            .arg("-drive")
            .arg(drive("upper", &self.upper, false))
            .args(["-device", "virtio-blk-device,drive=upper"]);
        for (i, layer) in self.layers.iter().enumerate() {
            c.arg("-drive").arg(drive(&format!("layer{i}"), layer, true));
            c.args(["-device", &format!("virtio-blk-device,drive=layer{i}")]);
        }
        c.arg("-netdev")
            .arg(netdev)
            .args(["-device", "virtio-net-device,netdev=net0"])
            .args(["-device", "virtio-rng-device"])
            // The guest agent's port; the agent proxy is its one client.
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={},server=on,wait=off", opt(&crate::agent::vm_socket(&self.dir))))
            .arg("-device")
            .arg(format!("virtserialport,chardev=agent,name={}", smolvm_protocol::agent::AGENT_PORT_NAME))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", opt(&qmp_socket(&self.dir))))
            .arg("-pidfile")
            .arg(pid_file(&self.dir))
            // Least privilege: QEMU's seccomp filter forbids it to spawn processes, change its
            // privileges or use obsolete system calls. (`spawn=deny` is also why QEMU is not
            // asked to `-daemonize`: that forks after the filter is in place.)
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            .stdin(Stdio::null());
        c
    }
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

    fn cfg(netdev: Netdev) -> QemuConfig {
        QemuConfig {
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
            qemu: "/usr/bin/qemu-system-x86_64".into(),
        }
    }

    fn args(c: &QemuConfig) -> Vec<String> {
        c.command().get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str, containing: &str) -> Option<&'a str> {
        args.windows(2).find(|w| w[0] == flag && w[1].contains(containing)).map(|w| w[1].as_str())
    }

    #[test]
    fn the_command_line_is_a_microvm_on_our_wire_with_read_only_shared_disks() {
        let c = cfg(Netdev::Wire);
        assert_eq!(c.command().get_program(), "/usr/bin/qemu-system-x86_64");
        let a = args(&c);
        assert!(value_of(&a, "-machine", "microvm").is_some_and(|m| m.contains("pic=off")), "{a:?}");
        assert_eq!(value_of(&a, "-accel", ""), Some("kvm"));
        assert_eq!(value_of(&a, "-cpu", ""), Some("host"));
        assert_eq!(value_of(&a, "-smp", ""), Some("2"));
        // The network is the wire on descriptor 3: never QEMU's user-mode network.
        assert_eq!(value_of(&a, "-netdev", ""), Some("stream,id=net0,server=off,addr.type=fd,addr.str=3"));
        assert!(!a.iter().any(|x| x.starts_with("user,")), "{a:?}");
        // Base and layer are shared read-only; the sandbox's own disk is writable.
        assert!(value_of(&a, "-drive", "file=/base").is_some_and(|d| d.contains("readonly=on")));
        assert!(value_of(&a, "-drive", "file=/layer").is_some_and(|d| d.contains("readonly=on")));
        assert!(value_of(&a, "-drive", "file=/dir/disk.ext4").is_some_and(|d| !d.contains("readonly")));
        // QEMU's own seccomp sandbox stays on.
        assert!(value_of(&a, "-sandbox", "on")
            .is_some_and(|s| s.contains("spawn=deny") && s.contains("elevateprivileges=deny")));
        let tcg = QemuConfig { accel: Accel::Tcg { reason: "test".into() }, ..c };
        assert_eq!(value_of(&args(&tcg), "-cpu", ""), Some("max"));
    }

    #[test]
    fn a_comma_in_a_path_cannot_add_an_option() {
        let c = QemuConfig { upper: "/d/x,readonly=off,file=/etc/shadow".into(), ..cfg(Netdev::Wire) };
        let a = args(&c);
        let d = value_of(&a, "-drive", "id=upper").unwrap();
        assert!(d.contains("file=/d/x,,readonly=off,,file=/etc/shadow,format=raw"), "{d}");
    }

    #[test]
    fn the_unrestricted_baseline_is_only_what_it_says() {
        let a = args(&cfg(Netdev::UnrestrictedUser { ssh_port: 2222 }));
        assert_eq!(value_of(&a, "-netdev", ""), Some("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"));
    }

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
