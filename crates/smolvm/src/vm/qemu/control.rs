//! QEMU behind the seam: [`Vmm`] for [`Qemu`], and [`VmControl`] over its QMP socket.

use std::path::Path;
use std::time::Duration;

use super::qmp::Qmp;
use super::{migrate, qmp_socket, Qemu, INCOMING_FD};
use crate::vm::machine::{MachineSpec, Wiring};
use crate::vm::vmm::{MachineId, SaveRam, VmControl, Vmm};

impl Vmm for Qemu {
    fn program(&self) -> &Path {
        &self.program
    }

    fn spawn(&self, spec: &MachineSpec, wiring: Wiring, log: std::fs::File) -> std::io::Result<std::process::Child> {
        Qemu::spawn(self, spec, wiring, log)
    }

    fn machine_id(&self, spec: &MachineSpec, cache: &Path) -> std::io::Result<MachineId> {
        Ok(MachineId {
            version: super::qemu_version_cached(&self.program, cache)?,
            device_model_sha256: crate::digest::sha256_hex(self.device_model(spec).as_bytes()),
        })
    }

    fn control(&self, dir: &Path, pid: i32) -> std::io::Result<Box<dyn VmControl>> {
        Ok(Box::new(QmpControl(Qmp::connect(&qmp_socket(dir), pid)?)))
    }

    fn control_when_up(&self, dir: &Path, pid: i32, within: Duration) -> std::io::Result<Box<dyn VmControl>> {
        Ok(Box::new(QmpControl(migrate::connect_new(&qmp_socket(dir), within, pid)?)))
    }

    fn is_vm_of(&self, pid: i32, name: &str) -> bool {
        // Its `-name smolvm-<name>,process=smolvm-<name>` argument (`Qemu::command`).
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let want = format!("smolvm-{name},process=smolvm-{name}");
        cmdline.split(|b| *b == 0).any(|arg| arg == want.as_bytes())
    }
}

/// A QMP session with one QEMU.
#[derive(Debug)]
struct QmpControl(Qmp);

impl VmControl for QmpControl {
    fn stop(&mut self) -> std::io::Result<()> {
        migrate::stop(&mut self.0)
    }

    fn cont(&mut self) -> std::io::Result<()> {
        // The guest cannot run while a save of a killed command goes on in QEMU.
        migrate::end_stale_migration(&mut self.0)?;
        migrate::cont(&mut self.0)
    }

    fn is_running(&mut self) -> std::io::Result<bool> {
        Ok(migrate::run_state(&mut self.0)? == "running")
    }

    fn save(&mut self, file: &str, ram: SaveRam) -> std::io::Result<()> {
        migrate::save(&mut self.0, file, ram == SaveRam::LeftOut)
    }

    fn save_devices(&mut self, file: &str) -> std::io::Result<()> {
        migrate::save_devices(&mut self.0, file)
    }

    fn load(&mut self, ram: SaveRam) -> std::io::Result<()> {
        migrate::load(&mut self.0, &format!("file:/proc/self/fd/{INCOMING_FD}"), ram == SaveRam::LeftOut)
    }

    fn quit(&mut self) {
        let _ = self.0.execute("quit", None);
    }
}
