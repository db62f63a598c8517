//! `smolvm doctor`: what this host can run, and why.

use std::process::Command;

use serde_json::json;
use smolvm::images::pins::ReleasePins;
use smolvm::paths::Home;
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
    let home = Home::from_env();
    let qemu = smolvm::vm::qemu::qemu_binary();
    let tools = [
        (qemu.as_str(), "--version", "runs the VMs (scripts/install-host-deps.sh)"),
        ("mkfs.ext4", "-V", "makes each sandbox's disk (e2fsprogs)"),
        ("ssh", "-V", "exec, ssh (openssh-client)"),
        ("scp", "-h", "cp (openssh-client)"),
        ("ssh-keygen", "-?", "the managed key (openssh-client)"),
    ];
    let found: Vec<_> =
        tools.iter().map(|(t, a, why)| (*t, which(t).then(|| version_of(t, a).unwrap_or_default()), *why)).collect();
    let pins = ReleasePins::compiled().ok();
    if json {
        print_json(&json!({
            "accel": accel,
            "host": { "dev_kvm_usable": facts.dev_kvm_usable, "kvm_pvm_loaded": facts.kvm_pvm_loaded, "cpu_has_vmx_or_svm": facts.cpu_has_vmx_or_svm },
            "tools": found.iter().map(|(t, v, why)| json!({ "tool": t, "found": v.is_some(), "version": v, "for": why })).collect::<Vec<_>>(),
            "home": { "data": home.data, "cache": home.cache },
            "images_release_tag": pins.map(|p| p.tag.clone()),
        }))?;
        return Ok(if found.iter().all(|(_, v, _)| v.is_some()) { 0 } else { 1 });
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
