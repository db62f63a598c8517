//! The VMM seam: what the sandbox layer asks of a virtual machine monitor, whichever one it
//! is. QEMU (`vm::qemu`) is the implementation; a second backend is one module that
//! implements these two traits (ARCHITECTURE.md, "The VMM seam", says what Firecracker or
//! cloud-hypervisor would need). Above this line nothing knows QMP, migration capabilities or
//! a command line: the sandbox layer says *what* (stop, save the devices, load the state it
//! was given) and the backend says *how*.
//!
//! What stays generic, below the sandbox layer but outside a backend: liveness and pidfds
//! (`vm::process`), cgroups, the wait for the guest's readiness line (`vm::ready`), and the
//! reading of a guest's written RAM pages from outside the VMM (`vm::guest_ram`), which works
//! on any VMM that maps the RAM file given in [`Wiring::ram`].

use std::path::Path;
use std::time::Duration;

use super::machine::{MachineSpec, Wiring};

/// Whether a saved stream carries the guest's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveRam {
    /// The RAM is in the stream (at fixed offsets, zero pages left as holes): a booted
    /// guest's pause, or the first step of its snapshot.
    Included,
    /// The RAM is left out: it is the file the VM maps ([`super::Memory::Shared`] or
    /// `SnapshotImage`), saved or restored apart from the stream.
    LeftOut,
}

/// What a snapshot records of the machine it was taken on, and a restore compares: a state
/// saved by one VMM build and machine loads only into the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineId {
    /// The VMM and its version (QEMU: the first line of `-version`).
    pub version: String,
    /// SHA-256 of the machine and its devices as the backend configures them, without what
    /// differs between sandboxes of one configuration (name, kernel command line, RAM's home).
    pub device_model_sha256: String,
}

/// A virtual machine monitor: starts VMs and reaches the ones it started.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// The program, for messages ("/usr/bin/qemu-system-x86_64 failed to start: ...").
    fn program(&self) -> &Path;

    /// Starts a VM for `spec`, confined (its working directory the sandbox's `run/`, its own
    /// session, the sandbox's uid, an empty environment), its output on `log`. The backend
    /// opens the kernel and disks of `spec` itself. Not waited for: the VM outlives us.
    fn spawn(&self, spec: &MachineSpec, wiring: Wiring, log: std::fs::File) -> std::io::Result<std::process::Child>;

    /// What a snapshot of a VM with `spec` records (see [`MachineId`]). `cache` is a file the
    /// backend may keep the answer in across processes.
    fn machine_id(&self, spec: &MachineSpec, cache: &Path) -> std::io::Result<MachineId>;

    /// The control channel of the VM `pid` of the sandbox in `dir`, checked to be served by
    /// that process before anything is sent.
    fn control(&self, dir: &Path, pid: i32) -> std::io::Result<Box<dyn VmControl>>;

    /// As [`Vmm::control`], for a VM just started, whose channel may not be open yet:
    /// waits up to `within` while the process lives.
    fn control_when_up(&self, dir: &Path, pid: i32, within: Duration) -> std::io::Result<Box<dyn VmControl>>;

    /// Whether `pid` is this backend's VM of sandbox `name` (a pid read from a file the
    /// sandbox's uid could write is checked this way before it is killed).
    fn is_vm_of(&self, pid: i32, name: &str) -> bool;
}

/// A running VM's control channel. Every call is synchronous: it returns when the VM has
/// done it (a save: the file is complete).
pub trait VmControl: Send {
    /// Stops the guest's vCPUs (the VM stays, its state intact).
    fn stop(&mut self) -> std::io::Result<()>;
    /// Lets a stopped (or just loaded) guest run.
    fn cont(&mut self) -> std::io::Result<()>;
    /// Whether the guest's vCPUs run.
    fn is_running(&mut self) -> std::io::Result<bool>;
    /// Saves the stopped guest to `file`, a name in the VM's working directory (`run/`).
    fn save(&mut self, file: &str, ram: SaveRam) -> std::io::Result<()>;
    /// Saves the stopped guest's devices alone (no RAM, no description of the machine) to
    /// `file`, for a guest whose RAM is saved another way (`vm::guest_ram`): a few
    /// milliseconds. Loaded by a VM started with [`super::Incoming::Devices`].
    fn save_devices(&mut self, file: &str) -> std::io::Result<()>;
    /// Loads the state the VM was started with ([`Wiring::incoming`]) and returns once it is
    /// loaded, the guest stopped.
    fn load(&mut self, ram: SaveRam) -> std::io::Result<()>;
    /// Asks the VM to exit at once (no guest shutdown). Whether it did is the caller's to
    /// check on the process.
    fn quit(&mut self);
}
