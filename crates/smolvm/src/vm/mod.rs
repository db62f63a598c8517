//! Running guests: the accelerator choice, the QEMU backend, its control socket, the VMM
//! process, and the wait for the guest's readiness line.

pub mod accel;
pub mod cgroup;
pub mod guest_ram;
pub mod migrate;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod ready;
