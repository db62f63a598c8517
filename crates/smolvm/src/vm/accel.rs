//! KVM where it works, TCG (QEMU's software CPU) where it does not.
//!
//! Opening `/dev/kvm` is not enough to know KVM works. Under PVM ("pagetable-based virtual
//! machine", used to nest VMs in clouds without hardware virtualization) `/dev/kvm` exists and
//! `KVM_CREATE_VM` succeeds, yet only kernels built for PVM run: an ordinary guest kernel spins
//! or dies with an emulation failure. So we also look for the signs of a PVM host: the
//! `kvm_pvm` module loaded, and no `vmx`/`svm` CPU flag.

use std::path::Path;

use serde::Serialize;

/// An accelerator choice and why it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "accel", rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// Software emulation; `reason` says why KVM was not used, for `smolvm doctor` and notices.
    Tcg { reason: String },
}

/// Which accelerator, without the why: what a sandbox's row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for AccelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl Accel {
    pub fn kind(&self) -> AccelKind {
        match self {
            Accel::Kvm => AccelKind::Kvm,
            Accel::Tcg { .. } => AccelKind::Tcg,
        }
    }

    /// The QEMU `-accel` value.
    pub fn qemu_name(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg { .. } => "tcg",
        }
    }
}

/// What the host looks like, read from the filesystem (a parameter, so tests can fake it).
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub dev_kvm_usable: bool,
    pub kvm_pvm_loaded: bool,
    pub cpu_has_vmx_or_svm: bool,
}

impl HostFacts {
    /// Reads the facts of this host.
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_has_vmx_or_svm = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        HostFacts {
            dev_kvm_usable: std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
            cpu_has_vmx_or_svm,
        }
    }
}

/// Chooses KVM if it can run an ordinary kernel here, else TCG with the reason.
pub fn detect(facts: &HostFacts) -> Accel {
    let tcg = |reason: &str| Accel::Tcg { reason: reason.to_string() };
    if !facts.dev_kvm_usable {
        return tcg("/dev/kvm is missing or not accessible (is this user in the kvm group?)");
    }
    if facts.kvm_pvm_loaded {
        return tcg("this host's KVM is PVM (module kvm_pvm), which runs only PVM-built guest kernels");
    }
    if !facts.cpu_has_vmx_or_svm {
        return tcg("the CPU shows no vmx/svm flag, so /dev/kvm is not hardware virtualization");
    }
    Accel::Kvm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_kvm_only_on_real_hardware_virtualization() {
        let real = HostFacts { dev_kvm_usable: true, kvm_pvm_loaded: false, cpu_has_vmx_or_svm: true };
        assert_eq!(detect(&real), Accel::Kvm);
        let pvm = HostFacts { kvm_pvm_loaded: true, cpu_has_vmx_or_svm: false, ..real.clone() };
        assert!(matches!(detect(&pvm), Accel::Tcg { reason } if reason.contains("PVM")));
        let none = HostFacts { dev_kvm_usable: false, ..real };
        assert!(matches!(detect(&none), Accel::Tcg { reason } if reason.contains("/dev/kvm")));
    }

    #[test]
    fn this_host_gets_a_decision() {
        // On the development machines (PVM) this is TCG; on a KVM host, KVM. Either way the
        // probe must not panic and TCG must carry a reason.
        if let Accel::Tcg { reason } = detect(&HostFacts::probe()) {
            assert!(!reason.is_empty());
        }
    }
}
