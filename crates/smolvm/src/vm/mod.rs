//! Running guests: the machine a sandbox runs ([`machine`]), the seam to the VMM that runs it
//! ([`vmm`]: the [`Vmm`] and [`VmControl`] traits) and its QEMU implementation ([`qemu`]), and
//! what is the same whatever the VMM: the accelerator choice, liveness of the process,
//! cgroups, the guest's RAM read from outside, the wait for the guest's readiness line.

pub mod accel;
pub mod cgroup;
#[cfg(test)]
pub(crate) mod fake;
pub mod guest_ram;
pub mod machine;
pub mod process;
pub mod qemu;
pub mod ready;
pub mod vmm;

pub use machine::{DiskCache, Incoming, MachineSpec, Memory, Netdev, Wiring};
pub use vmm::{MachineId, SaveRam, VmControl, Vmm};
