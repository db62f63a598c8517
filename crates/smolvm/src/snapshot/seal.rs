//! Sealing: turning a mapped-ram stream (what a running guest can write in ~0.1 s) into a RAM
//! image and a devices-only stream, which clones restore from without reading the RAM.
//!
//! Why a second QEMU: only QEMU knows how to lay its RAM block out and what its devices' state
//! is. A QEMU with the same machine and devices, whose RAM is a shared memory file, loads the
//! stream (the file now holds the guest's RAM, holes where it was zero) and saves its devices
//! with `x-ignore-shared`, which leaves the RAM out. It never runs the guest. It is confined
//! like the sandbox's own QEMU (its uid, no host path, no network: its wire's other end is
//! closed), and takes ~0.2 s for a fresh 512 MiB guest under emulation.
//!
//! The RAM file is written to tmpfs first (a memfd): loading into a shared mapping of a file
//! on ext4 took seconds (every page fault allocates a block), into tmpfs a tenth of that.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::files;
use crate::child::Identity;
use crate::vm::{Incoming, MachineSpec, Memory, SaveRam, Vmm, Wiring};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> std::io::Error {
    let what = what.into();
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Seals `stream` (a stream with its RAM, saved from a guest with `spec`'s machine and
/// devices) into `out/ram` and `out/state`, with a VM of `vmm`. `spec.dir` is a scratch
/// directory of the caller's (the VM's log, its `run/`); `spec.upper` the disk copy that goes
/// with the stream.
pub fn seal(
    vmm: &dyn Vmm,
    spec: &MachineSpec,
    stream: &Path,
    identity: Option<Identity>,
    out: &Path,
) -> std::io::Result<()> {
    let cfg = MachineSpec { memory: Memory::Shared, incoming: Some(Incoming::Migration), ..spec.clone() };
    let run = crate::sandbox::boot_run_dir(&cfg.dir, identity).map_err(std::io::Error::other)?;
    let ram = memfd("smolvm-seal")?;
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(ram.as_raw_fd(), i64::from(cfg.memory_mib) << 20) } != 0 {
        return Err(io("size the RAM file")(std::io::Error::last_os_error()));
    }
    if let Some(id) = identity {
        std::os::unix::fs::fchown(&ram, Some(id.uid), Some(id.gid)).map_err(io("chown the RAM file"))?;
    }
    let input = crate::text::open_untrusted(stream).map_err(io(format!("open {}", stream.display())))?;
    // Its agent, console and wire lead nowhere: the guest never runs here.
    let (_agent, agent_qemu) = std::os::unix::net::UnixStream::pair()?;
    let (_console, console_qemu) = std::os::unix::net::UnixStream::pair()?;
    let (wire_ours, wire_qemu) = std::os::unix::net::UnixStream::pair()?;
    drop(wire_ours);
    let log = std::fs::File::create(cfg.dir.join("qemu.log"))?;
    let plumbing = Wiring {
        wire: Some(wire_qemu.into()),
        agent: agent_qemu.into(),
        console: console_qemu.into(),
        identity,
        cgroup_procs: vec![],
        ram: Some(ram.try_clone()?),
        incoming: Some(input.into()),
        // A command killed mid-seal must not leave this QEMU waiting for a load for ever.
        ends_with_caller: true,
    };
    let mut child = vmm.spawn(&cfg, plumbing, log).map_err(io("start the sealing VM"))?;
    let pid = child.id() as i32;
    let result = (|| {
        let mut q = vmm.control_when_up(&cfg.dir, pid, Duration::from_secs(30))?;
        q.load(SaveRam::Included)?;
        q.save("state", SaveRam::LeftOut)?;
        q.quit();
        Ok::<_, std::io::Error>(())
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    if let Err(e) = result {
        let log = std::fs::read_to_string(cfg.dir.join("qemu.log")).unwrap_or_default();
        return Err(std::io::Error::other(format!(
            "{e}; the sealing QEMU said: {}",
            crate::text::escape_controls(log.trim())
        )));
    }
    let state = crate::text::read_untrusted(&run.join("state"), 64 << 20).map_err(io("read the devices' state"))?;
    let mut f = crate::text::create_private(&out.join("state"))?;
    std::io::Write::write_all(&mut f, &state)?;
    files::copy_sparse(&std::fs::File::from(ram), &out.join("ram")).map_err(io("write the RAM image"))?;
    let _ = std::fs::remove_dir_all(&run);
    Ok(())
}

fn memfd(name: &str) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string; the returned descriptor is new and ours.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
