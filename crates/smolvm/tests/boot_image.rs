//! The release boots: its kernel and base rootfs under plain QEMU, an SSH key injected through
//! `smolvm.authorized_key_b64`, and `ssh true` with the host key taken from the readiness line
//! under `StrictHostKeyChecking=yes`.
//!
//! Needs QEMU and a built release: `#[ignore]`d for a plain `cargo test`; `scripts/test.sh`
//! runs it.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine;
use smolvm::images::{AssetKind, Format};
use smolvm::vm::accel::{detect, HostFacts};
use smolvm::vm::machine::kernel_cmdline;
use smolvm::vm::qemu::Qemu;
use smolvm::vm::{DiskCache, MachineSpec, Memory, Netdev, Wiring};

/// Kills QEMU if the test panics before it powers off.
struct Vm(Child);
impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (bounded) until something on 127.0.0.1:`port` sends an SSH banner.
fn wait_for_banner(port: u16, within: Duration) {
    use std::io::Read;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 8];
            if s.read_exact(&mut b).is_ok() && b.starts_with(b"SSH-") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no SSH banner on port {port} within {within:?}");
}

fn ssh(key: &Path, known_hosts: &Path, port: u16, cmd: &str) -> std::process::Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .arg("root@127.0.0.1")
        .arg(cmd)
        .output()
        .expect("run ssh")
}

#[test]
#[ignore = "boots a real release under QEMU: run scripts/test.sh"]
fn release_boots_and_serves_strict_ssh() {
    let release = common::release_dir();
    let manifest = common::manifest(&release);
    let work = tempfile::tempdir().unwrap();
    let kernel = manifest.assets.iter().find(|a| a.kind == AssetKind::Kernel && a.format == Format::Elf).unwrap();
    let rootfs = manifest.assets.iter().find(|a| a.kind == AssetKind::Rootfs).unwrap();
    let kernel = common::unpack(&release, &kernel.name, work.path());
    let disk = common::unpack(&release, &rootfs.name, work.path());

    let key = work.path().join("id_ed25519");
    common::run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&key));
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(pubkey.trim());

    let accel = detect(&HostFacts::probe());
    let port = free_port();
    // The production command lines (Qemu::command, kernel_cmdline) and disk layout: the
    // base read-only under an empty upper disk. The network is QEMU's user-mode one: what is
    // under test here is the image, and nothing untrusted runs.
    let upper = work.path().join("disk.ext4");
    smolvm::sandbox::disk::create_upper(&upper, 512).unwrap();
    let cfg = MachineSpec {
        name: "smolvm".into(),
        accel: accel.clone(),
        memory_mib: 512,
        cpus: 1,
        kernel: kernel.clone(),
        cmdline: kernel_cmdline("smolvm", &accel, 0, &key_b64),
        base: disk.clone(),
        upper: upper.clone(),
        layers: vec![],
        netdev: Netdev::UnrestrictedUser { ssh_port: port },
        dir: work.path().to_path_buf(),
        upper_cache: DiskCache::Writeback,
        memory: Memory::Anonymous,
        incoming: None,
        disk_limit: Default::default(),
    };
    // The production plumbing too: the console and agent port are socket pairs (the agent
    // proxy's job, here a thread that writes the console as the proxy does); QEMU works in
    // `run/` and gets its kernel and disks as descriptors.
    let run = smolvm::sandbox::boot_run_dir(work.path(), None).unwrap();
    let console = smolvm::paths::console_log(work.path());
    let (console_ours, console_qemu) = std::os::unix::net::UnixStream::pair().unwrap();
    let (_agent_ours, agent_qemu) = std::os::unix::net::UnixStream::pair().unwrap();
    let relay_dir = run.clone();
    std::thread::spawn(move || smolvm::agent::console::relay(console_ours, &relay_dir));
    let started = Instant::now();
    let plumbing = Wiring {
        wire: None,
        agent: agent_qemu.into(),
        console: console_qemu.into(),
        identity: None,
        cgroup_procs: vec![],
        ram: None,
        incoming: None,
        ends_with_caller: false,
    };
    let child = Qemu::new("qemu-system-x86_64")
        .spawn(&cfg, plumbing, std::fs::File::create(work.path().join("qemu.stderr")).unwrap())
        .expect("start qemu-system-x86_64 (scripts/install-host-deps.sh installs it)");
    let mut vm = Vm(child);
    let pidfd = smolvm::vm::process::pidfd(vm.0.id() as i32).unwrap();
    let ready = smolvm::vm::ready::wait_for_ready(&console, &pidfd, Duration::from_secs(300)).unwrap_or_else(|e| {
        panic!(
            "no readiness line ({e}); console:\n{}\nQEMU stderr:\n{}",
            smolvm::vm::ready::console_tail(&console, 60),
            std::fs::read_to_string(work.path().join("qemu.stderr")).unwrap_or_default()
        )
    });
    eprintln!("ready after {:?} ({}): {:?}", started.elapsed(), accel.qemu_name(), ready.boot_us);
    assert!(ready.host_key.starts_with("ssh-ed25519 "), "{}", ready.host_key);
    assert!(ready.boot_us.init <= ready.boot_us.mounts && ready.boot_us.mounts <= ready.boot_us.network);
    assert!(ready.boot_us.network <= ready.boot_us.sshd);

    // Readiness does not wait for sshd (the host asks the agent when it needs SSH); with no
    // agent here, wait for sshd's banner, so that the refusal below is the host key's.
    wait_for_banner(port, Duration::from_secs(60));
    // A wrong host key must be refused: this is what makes the pinning meaningful.
    let wrong = work.path().join("known_hosts.wrong");
    let other = pubkey.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    std::fs::write(&wrong, format!("[127.0.0.1]:{port} {other}\n")).unwrap();
    let out = ssh(&key, &wrong, port, "true");
    assert!(!out.status.success(), "ssh accepted a host key that is not the guest's");

    let known = work.path().join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {}\n", ready.host_key)).unwrap();
    let out = ssh(&key, &known, port, "true");
    assert!(out.status.success(), "ssh true failed: {}", String::from_utf8_lossy(&out.stderr));

    // What the image promises: our init is PID 1, no cloud-init, docs stripped but copyright kept.
    let probe = "readlink /proc/1/exe; dpkg-query -W cloud-init 2>/dev/null | wc -l; \
                 ls /usr/share/doc/openssh-server; ls /usr/share/man 2>/dev/null | wc -l; \
                 ls /etc/ssh/ssh_host_*; hostname; ip -4 -o addr show eth0 | awk '{print $4}'";
    let out = ssh(&key, &known, port, probe);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "/init",
            "0",
            "copyright",
            "0",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "smolvm",
            "10.0.2.15/24"
        ],
        "{text}"
    );

    // SIGTERM to PID 1 is a clean power-off: QEMU exits on its own and the disk is clean.
    let _ = ssh(&key, &known, port, "kill -TERM 1");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "QEMU still running 120 s after SIGTERM to the guest's init");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "QEMU exited with {status}");
    // Both disks are clean: the sandbox's own (written) and the shared base (never written).
    common::run(Command::new("e2fsck").arg("-fn").arg(&upper));
    common::run(Command::new("e2fsck").arg("-fn").arg(&disk));
}
