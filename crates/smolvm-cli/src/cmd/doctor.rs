//! `smolvm doctor`: what this host can run, and why.

use std::process::Command;

use serde_json::json;
use smolvm::images::release_pins::ReleasePins;
use smolvm::vm::accel::{detect, Accel, HostFacts};

use super::{print_json, say};

fn version_of(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).into_owned();
    text.lines().next().map(str::to_string)
}

pub fn run(json: bool) -> anyhow::Result<i32> {
    let facts = HostFacts::probe();
    let accel = detect(&facts);
    let config = crate::config::from_env();
    let home = config.home.clone();
    let qemu = config.qemu.display().to_string();
    let openssh = version_of("ssh", "-V").unwrap_or_default();
    // ssh-keygen has no version option: it comes with ssh, whose version is shown.
    let tools: [(&str, Option<&str>, &str); 4] = [
        (qemu.as_str(), Some("--version"), "runs the VMs (scripts/install-host-deps.sh)"),
        ("mkfs.ext4", Some("-V"), "makes each sandbox's disk (e2fsprogs)"),
        ("ssh", Some("-V"), "ssh into a sandbox (openssh-client)"),
        ("ssh-keygen", None, "the managed key (openssh-client)"),
    ];
    let found: Vec<_> = tools
        .iter()
        .map(|(t, a, why)| {
            let v = match a {
                Some(a) => version_of(t, a).unwrap_or_default(),
                None => format!("present (with {openssh})"),
            };
            (*t, which(t).then_some(v), *why)
        })
        .collect();
    let pins = ReleasePins::compiled().ok();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let users = config.vm_users;
    let cgroups = smolvm::vm::cgroup::detect();
    let privilege = match (me, users) {
        (0, Some(u)) => {
            json!({ "ok": true, "runs_as": "a uid per sandbox", "uids": [u.uid_base, u.uid_base + u.count - 1], "user": crate::config::VM_USER })
        }
        (0, None) => {
            json!({ "ok": false, "runs_as": null, "problem": "root without the smolvm user's uid range: sandboxes refuse to boot (run scripts/install-host-deps.sh)" })
        }
        (uid, _) => json!({ "ok": true, "runs_as": "the calling user", "uids": [uid, uid] }),
    };
    let privilege_ok = privilege["ok"].as_bool().unwrap_or(false);
    if json {
        print_json(&json!({
            "accel": accel,
            "host": { "dev_kvm_usable": facts.dev_kvm_usable, "kvm_pvm_loaded": facts.kvm_pvm_loaded, "cpu_has_vmx_or_svm": facts.cpu_has_vmx_or_svm },
            "tools": found.iter().map(|(t, v, why)| json!({ "tool": t, "found": v.is_some(), "version": v, "for": why })).collect::<Vec<_>>(),
            "home": { "data": home.data, "cache": home.cache },
            "images_release_tag": pins.map(|p| p.tag.clone()),
            "sandbox_processes": privilege,
            "confinement": smolvm::jail::confinement(),
            "limits": { "support": cgroups, "placement_note": smolvm::vm::cgroup::placement_note(&cgroups), "overhead_mib_kvm": smolvm::vm::cgroup::OVERHEAD_MIB_KVM, "tcg_cache_mib": smolvm::vm::cgroup::TCG_CACHE_MIB, "pids_max": smolvm::vm::cgroup::PIDS_MAX, "cpu_weight": smolvm::vm::cgroup::CPU_WEIGHT },
        }))?;
        return Ok(if found.iter().all(|(_, v, _)| v.is_some()) && privilege_ok { 0 } else { 1 });
    }
    match &accel {
        Accel::Kvm => say("accelerator: kvm (hardware virtualization)"),
        Accel::Tcg { reason } => say(format!("accelerator: tcg (software emulation, several times slower): {reason}")),
    }
    say(format!(
        "  /dev/kvm usable: {}; kvm_pvm module: {}; vmx/svm flag: {}",
        facts.dev_kvm_usable, facts.kvm_pvm_loaded, facts.cpu_has_vmx_or_svm
    ));
    let mut ok = true;
    for (t, v, why) in &found {
        match v {
            Some(v) => say(format!("ok       {t:<22} {v}")),
            None => {
                ok = false;
                say(format!("MISSING  {t:<22} needed for: {why}"));
            }
        }
    }
    match (me, users) {
        (0, Some(u)) => say(format!(
            "ok       sandboxes' QEMU and helpers run as uids {}-{} (one per sandbox; user {}), never root",
            u.uid_base,
            u.uid_base + u.count - 1,
            crate::config::VM_USER
        )),
        (0, None) => {
            ok = false;
            say("MISSING  a uid range for sandboxes: as root, sandboxes refuse to boot; run scripts/install-host-deps.sh");
        }
        (uid, _) => say(format!("ok       sandboxes' QEMU and helpers run as you (uid {uid})")),
    }
    say(format!("ok       confinement: {}", smolvm::jail::confinement().join("; ")));
    let limits = format!(
        "memory = guest + {} MiB (+{} MiB under emulation), {} tasks, cpu weight {}",
        smolvm::vm::cgroup::OVERHEAD_MIB_KVM,
        smolvm::vm::cgroup::TCG_CACHE_MIB,
        smolvm::vm::cgroup::PIDS_MAX,
        smolvm::vm::cgroup::CPU_WEIGHT
    );
    match &cgroups {
        smolvm::vm::cgroup::Support::V2 { parent, unit } => match smolvm::vm::cgroup::placement_note(&cgroups) {
            None => {
                let under = unit.as_ref().map(|u| u.join("smolvm")).unwrap_or_else(|| parent.clone());
                say(format!("ok       limits: cgroup v2 under {}: {limits}", under.display()))
            }
            Some(note) => say(format!("note     limits: cgroup v2 under {}: {limits}; {note}", parent.display())),
        },
        smolvm::vm::cgroup::Support::V1 { memory, .. } => {
            say(format!("ok       limits: cgroup v1 (memory group under {}): {limits}", memory.display()))
        }
        smolvm::vm::cgroup::Support::Unavailable { reason } => say(format!("note     limits: none: {reason}")),
    }
    say(format!("state:   {}", home.data.display()));
    say(format!("images:  {}", home.cache.display()));
    if let Some(p) = pins {
        say(format!("release: {} (pinned in this binary)", p.tag));
    }
    Ok(if ok { 0 } else { 1 })
}

fn which(tool: &str) -> bool {
    if tool.contains('/') {
        return std::path::Path::new(tool).exists();
    }
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
}
