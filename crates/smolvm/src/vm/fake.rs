//! A fake VMM for unit tests of the sandbox layer: every call is recorded, any operation can
//! be made to fail, and the "VM" is a real process (`sleep`), so that liveness, pid files and
//! `kill -9` work on a real pid. It never runs a guest: the tests above it are of what the
//! sandbox layer does with what the VMM answers, not of a VMM (the real-VM suites are).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::machine::{MachineSpec, Wiring};
use super::vmm::{MachineId, SaveRam, VmControl, Vmm};

#[derive(Debug, Default)]
pub(crate) struct FakeState {
    calls: Mutex<Vec<String>>,
    failing: Mutex<HashSet<&'static str>>,
    stopped: AtomicBool,
    /// What `is_vm_of` answers.
    owns: AtomicBool,
}

/// Cheap to clone: the clones share what they record.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeVmm(pub Arc<FakeState>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeVmm {
    /// The operations called so far, in order (`"stop"`, `"save capture.mem"`, ...).
    pub(crate) fn calls(&self) -> Vec<String> {
        lock(&self.0.calls).clone()
    }

    /// Makes operation `op` (`"connect"`, `"stop"`, `"save"`, `"cont"`, ...) fail from now on.
    pub(crate) fn fail(&self, op: &'static str) {
        lock(&self.0.failing).insert(op);
    }

    pub(crate) fn set_owns_pids(&self, owns: bool) {
        self.0.owns.store(owns, Ordering::SeqCst);
    }

    pub(crate) fn set_stopped(&self, stopped: bool) {
        self.0.stopped.store(stopped, Ordering::SeqCst);
    }

    fn op(&self, call: String) -> std::io::Result<()> {
        let name = call.split(' ').next().unwrap_or_default().to_string();
        lock(&self.0.calls).push(call);
        if lock(&self.0.failing).contains(name.as_str()) {
            return Err(std::io::Error::other(format!("the fake VMM fails {name}")));
        }
        Ok(())
    }

    /// A stand-in VM: a real process that lives until it is killed (or 10 minutes).
    pub(crate) fn start_process() -> std::process::Child {
        std::process::Command::new("sleep").arg("600").spawn().expect("start sleep")
    }
}

impl Vmm for FakeVmm {
    fn program(&self) -> &Path {
        Path::new("fake-vmm")
    }

    fn spawn(&self, spec: &MachineSpec, _wiring: Wiring, _log: std::fs::File) -> std::io::Result<std::process::Child> {
        self.op(format!("spawn {}", spec.name))?;
        Ok(Self::start_process())
    }

    fn machine_id(&self, spec: &MachineSpec, _cache: &Path) -> std::io::Result<MachineId> {
        self.op("machine_id".into())?;
        Ok(MachineId { version: "fake 1".into(), device_model_sha256: format!("{}-{}", spec.memory_mib, spec.cpus) })
    }

    fn control(&self, dir: &Path, pid: i32) -> std::io::Result<Box<dyn VmControl>> {
        self.op(format!("connect {pid}"))?;
        Ok(Box::new(FakeControl { vmm: self.clone(), run: crate::paths::run_dir(dir), pid }))
    }

    fn control_when_up(&self, dir: &Path, pid: i32, _within: Duration) -> std::io::Result<Box<dyn VmControl>> {
        self.control(dir, pid)
    }

    fn is_vm_of(&self, _pid: i32, _name: &str) -> bool {
        self.0.owns.load(Ordering::SeqCst)
    }
}

struct FakeControl {
    vmm: FakeVmm,
    run: std::path::PathBuf,
    pid: i32,
}

impl VmControl for FakeControl {
    fn stop(&mut self) -> std::io::Result<()> {
        self.vmm.op("stop".into())?;
        self.vmm.set_stopped(true);
        Ok(())
    }

    fn cont(&mut self) -> std::io::Result<()> {
        self.vmm.op("cont".into())?;
        self.vmm.set_stopped(false);
        Ok(())
    }

    fn is_running(&mut self) -> std::io::Result<bool> {
        self.vmm.op("is_running".into())?;
        Ok(!self.vmm.0.stopped.load(Ordering::SeqCst))
    }

    fn save(&mut self, file: &str, ram: SaveRam) -> std::io::Result<()> {
        self.vmm.op(format!("save {file} {ram:?}"))?;
        std::fs::write(self.run.join(file), b"fake saved state")
    }

    fn save_devices(&mut self, file: &str) -> std::io::Result<()> {
        self.vmm.op(format!("save_devices {file}"))?;
        std::fs::write(self.run.join(file), b"fake devices")
    }

    fn load(&mut self, ram: SaveRam) -> std::io::Result<()> {
        self.vmm.op(format!("load {ram:?}"))
    }

    fn quit(&mut self) {
        // A VM told to quit exits: the stand-in process is ended.
        if self.vmm.op("quit".into()).is_ok() {
            let _ = super::process::signal(self.pid, libc::SIGKILL);
        }
    }
}
