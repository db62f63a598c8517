//! The sandbox lifecycle commands.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use smolvm::sandbox::{presets, AccelChoice, CreateEvent, CreateOptions, SandboxInfo, Smolvm};

use super::{print_json, say};
use crate::cli::{AccelArg, CreateArgs, EnvCommand, PresetStartArgs};
use crate::progress::Progress;

pub fn open() -> anyhow::Result<Smolvm> {
    Smolvm::open(crate::config::from_env()).context("open smolvm's state (SMOLVM_HOME)")
}

pub fn create(args: CreateArgs, json: bool) -> anyhow::Result<i32> {
    let sm = open()?;
    let info = create_sandbox(&sm, args, Vec::new(), json)?;
    if json {
        print_json(&json!({ "sandbox": info.0, "seconds": info.1 }))?;
    } else {
        let how = match info.0.started_from.as_deref() {
            Some("boot") | None => String::new(),
            Some(f) => format!(", from {f}"),
        };
        say(format!(
            "{} is ready ({:.1} s, {}{how}). Try: smolvm exec {} -- uname -a",
            info.0.name, info.1, info.0.accel, info.0.name
        ));
    }
    Ok(0)
}

fn create_sandbox(
    sm: &Smolvm,
    args: CreateArgs,
    mut extra_secrets: Vec<smolvm::sandbox::secrets::Secret>,
    json: bool,
) -> anyhow::Result<(SandboxInfo, f64)> {
    // Given secrets first: a preset's own for the same variable give way to them.
    let mut given = super::secret::parse_all(&args.secrets)?;
    extra_secrets.retain(|s| !given.iter().any(|g| g.name == s.name));
    given.append(&mut extra_secrets);
    let extra_secrets = given;
    // From a snapshot, what is not given is the snapshot's (and what is given must agree).
    let snap = match &args.from_snapshot {
        Some(s) => Some(sm.snapshot_info(s)?),
        None => None,
    };
    let opts = CreateOptions {
        name: args.name,
        memory_mib: args.memory.or(snap.as_ref().map(|s| s.memory_mib)).unwrap_or(smolvm::sandbox::DEFAULT_MEMORY_MIB),
        cpus: args.cpus.or(snap.as_ref().map(|s| s.cpus)).unwrap_or(smolvm::sandbox::DEFAULT_CPUS),
        disk_mib: args.disk_size.or(snap.as_ref().map(|s| s.disk_mib)).unwrap_or(smolvm::sandbox::DEFAULT_DISK_MIB),
        from_snapshot: args.from_snapshot,
        cold: args.cold,
        network: super::network::policy(&args.net)?,
        accel: match args.accel {
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
            AccelArg::Auto => AccelChoice::Auto,
        },
        ready_timeout: Duration::from_secs(args.timeout),
        preset: args.preset,
        secrets: extra_secrets,
        disk_limit: smolvm::state::DiskLimit { bytes_per_sec: args.disk_mbps.map(|m| m << 20), iops: args.disk_iops },
    };
    let mut progress = Progress::new(json);
    let start = Instant::now();
    let info = sm.create(&opts, &mut |e| match e {
        CreateEvent::Notice(n) => eprintln!("{n}"),
        CreateEvent::Fetch(f) => progress.event(f),
        CreateEvent::Booting { accel } => tracing::debug!("booting ({accel})"),
        CreateEvent::Restoring { from } => tracing::debug!("restoring ({from})"),
    })?;
    Ok((info, start.elapsed().as_secs_f64()))
}

/// `smolvm <preset> start`: create with the preset's layer and its secrets (the API keys set
/// on the host stay there; the guest gets placeholders), set the tool's own auth up from the
/// placeholder, then open the tool over SSH.
pub fn preset_start(preset: &str, mut args: PresetStartArgs, json: bool) -> anyhow::Result<i32> {
    let p = presets::find(preset).with_context(|| format!("no preset {preset}"))?;
    let sm = open()?;
    args.create.preset = Some(preset.to_string());
    let policy = super::network::policy(&args.create.net)?;
    let (found, missing) = p.secrets_from(|k| std::env::var(k).ok());
    // A key whose host this sandbox's policy refuses is not handed over (with --network none,
    // say): said, not an error, since the preset asked for it and not the user.
    let mut secrets = Vec::new();
    let mut skipped = Vec::new();
    for s in found {
        match smolvm::sandbox::secrets::validate(std::slice::from_ref(&s), &policy) {
            Ok(()) => secrets.push(s),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    for why in &skipped {
        eprintln!("notice: not handed over: {why}");
    }
    let (info, seconds) = create_sandbox(&sm, args.create, secrets, json)?;
    let name = info.name.clone();
    sm.setup_preset_auth(&name, p)?;
    let handed: Vec<String> = sm.secrets(&name)?.into_iter().map(|s| s.name).collect();
    if json {
        print_json(&json!({
            "sandbox": info, "seconds": seconds, "secrets": handed, "not_set_on_host": missing,
        }))?;
    } else {
        say(format!(
            "{name} is ready with {preset} ({seconds:.1} s); secrets (placeholders in the guest): {}",
            if handed.is_empty() { "none".to_string() } else { handed.join(", ") }
        ));
    }
    if args.no_attach {
        return Ok(0);
    }
    // A login shell: its environment has the placeholders and where the sandbox's CA is.
    let status = sm
        .ssh_command(&name, &["bash".into(), "-lc".into(), format!("exec {}", p.command)], true)?
        .status()
        .context("run ssh")?;
    eprintln!("{preset} exited; the sandbox {name} is still running (smolvm ssh {name}; smolvm delete {name})");
    Ok(exit_code(status))
}

pub fn preset_list(json: bool) -> anyhow::Result<i32> {
    let sm = open()?;
    let src = sm.image_source()?;
    let rows: Vec<_> = presets::PRESETS
        .iter()
        .map(|p| {
            let layer = src.layer(p.name).ok();
            json!({
                "preset": p.name,
                "command": p.command,
                "layer": layer.map(|l| l.name.clone()),
                "layer_bytes": layer.map(|l| l.size),
                "cached": layer.is_some_and(|l| sm.images().lookup(l).is_some()),
                "secrets": p.secrets.iter().map(|s| json!({ "var": s.var, "hosts": s.hosts })).collect::<Vec<_>>(),
            })
        })
        .collect();
    if json {
        print_json(&rows)?;
        return Ok(0);
    }
    say(format!("{:<12} {:>12} {:<7} {}", "PRESET", "LAYER (zst)", "CACHED", "SECRETS (they stay on the host)"));
    for r in rows {
        say(format!(
            "{:<12} {:>12} {:<7} {}",
            r["preset"].as_str().unwrap_or_default(),
            r["layer_bytes"].as_u64().map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or_else(|| "-".into()),
            if r["cached"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            r["secrets"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| Some(format!("{}@{}", v["var"].as_str()?, v["hosts"][0].as_str()?)))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ));
    }
    Ok(0)
}

fn row_line(s: &SandboxInfo) -> String {
    format!(
        "{:<20} {:<9} {:>6} {:>4} {:>7} {:<5} {:<4} {}",
        s.name,
        s.status.to_string(),
        s.memory_mib,
        s.cpus,
        s.disk_mib,
        s.network.as_str(),
        s.accel,
        s.ssh_port.map(|p| format!("127.0.0.1:{p}")).unwrap_or_else(|| "-".into())
    )
}

pub fn list(json: bool) -> anyhow::Result<i32> {
    let all = open()?.list()?;
    if json {
        print_json(&all)?;
        return Ok(0);
    }
    say(format!(
        "{:<20} {:<9} {:>6} {:>4} {:>7} {:<5} {:<4} {}",
        "NAME", "STATUS", "MEM", "CPUS", "DISK", "NET", "ACC", "SSH"
    ));
    for s in &all {
        say(row_line(s));
    }
    Ok(0)
}

pub fn status(name: &str, json: bool) -> anyhow::Result<i32> {
    let s = open()?.info(name)?;
    if json {
        print_json(&s)?;
        return Ok(0);
    }
    say(format!("name:     {}", s.name));
    say(format!("status:   {}", s.status));
    let mut io = String::new();
    if let Some(b) = s.disk_limit.bytes_per_sec {
        io.push_str(&format!(", disk I/O at most {} MiB/s", b >> 20));
    }
    if let Some(n) = s.disk_limit.iops {
        io.push_str(&format!(", at most {n} disk operations/s"));
    }
    say(format!(
        "resources: {} MiB memory, {} vCPU, {} MiB disk{io}, accel {}",
        s.memory_mib, s.cpus, s.disk_mib, s.accel
    ));
    super::network::print_policy(&s);
    say(format!("images:   {}{}", s.image_tag, if s.pinned { "" } else { " (not pinned in this binary)" }));
    if let Some(p) = s.ssh_port {
        say(format!("ssh:      127.0.0.1:{p} (smolvm ssh {})", s.name));
    }
    for f in &s.forwards {
        say(format!("forward:  127.0.0.1:{} -> guest :{}", f.host, f.guest));
    }
    if let Some(b) = s.boot_us {
        let ms = |us: u64| us as f64 / 1000.0;
        say(format!(
            "boot:     kernel {:.0} ms, mounts +{:.0} ms, network +{:.0} ms, host key + sshd started +{:.0} ms",
            ms(b.init),
            ms(b.mounts.saturating_sub(b.init)),
            ms(b.network.saturating_sub(b.mounts)),
            ms(b.sshd.saturating_sub(b.network))
        ));
    }
    if let Some(uid) = s.host.uid {
        say(format!("host uid: {uid} (QEMU, its network process and agent proxy)"));
    }
    match (&s.host.limits, &s.host.limits_note) {
        (Some(l), _) => say(format!(
            "limits:   memory {} MiB, {} tasks, cpu weight {} ({})",
            l.memory_max_bytes.map(|b| (b >> 20).to_string()).unwrap_or_else(|| "?".into()),
            l.pids_max.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            l.cpu_weight.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            l.groups.iter().map(|g| g.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
        (None, Some(why)) => say(format!("limits:   none: {why}")),
        (None, None) => {}
    }
    if !s.host.confinement.is_empty() {
        say(format!("confined: {}", s.host.confinement.join("; ")));
    }
    say(format!("dir:      {}", s.dir.display()));
    Ok(0)
}

pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

pub fn ssh(name: &str, command: &[String]) -> anyhow::Result<i32> {
    let status = open()?.ssh_command(name, command, true)?.status().context("run ssh")?;
    Ok(exit_code(status))
}

pub fn stop(name: &str, timeout: u64, json: bool) -> anyhow::Result<i32> {
    open()?.stop(name, Duration::from_secs(timeout))?;
    done(json, name, "stopped")
}

pub fn start(name: &str, timeout: u64, json: bool) -> anyhow::Result<i32> {
    open()?.start(name, Duration::from_secs(timeout))?;
    done(json, name, "running")
}

pub fn delete(names: &[String], json: bool) -> anyhow::Result<i32> {
    let sm = open()?;
    for n in names {
        sm.delete(n)?;
        done(json, n, "deleted")?;
    }
    Ok(0)
}

fn done(json: bool, name: &str, what: &str) -> anyhow::Result<i32> {
    if json {
        print_json(&json!({ "name": name, "status": what }))?;
    } else {
        say(format!("{name} {what}"));
    }
    Ok(0)
}

pub fn logs(name: &str) -> anyhow::Result<i32> {
    let text = open()?.console(name, smolvm::agent::console::TOTAL_CAP)?;
    // The guest's text: its control characters are escaped, not sent to the terminal.
    let text = smolvm::text::escape_console(&String::from_utf8_lossy(&text));
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    Ok(0)
}

pub fn expose(name: &str, guest: u16, host: Option<u16>, json: bool) -> anyhow::Result<i32> {
    let port = open()?.expose(name, guest, host)?;
    if json {
        print_json(&json!({ "name": name, "guest_port": guest, "host": format!("127.0.0.1:{port}") }))?;
    } else {
        say(format!("127.0.0.1:{port} -> {name}:{guest}"));
    }
    Ok(0)
}

pub fn env(cmd: EnvCommand, json: bool) -> anyhow::Result<i32> {
    let sm = open()?;
    match cmd {
        EnvCommand::Set { name, vars, from_env } => {
            anyhow::ensure!(
                !vars.is_empty() || !from_env.is_empty(),
                "give KEY=VALUE, KEY (value on stdin) or --from-env VAR"
            );
            let from_stdin: Vec<&String> = vars.iter().filter(|v| !v.contains('=')).collect();
            anyhow::ensure!(from_stdin.len() <= 1, "only one KEY can take its value from stdin");
            for v in &vars {
                match v.split_once('=') {
                    Some((k, val)) => sm.env_set(&name, k, val)?,
                    None => {
                        let mut val = String::new();
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut val)
                            .context("read the value from stdin")?;
                        sm.env_set(&name, v, val.strip_suffix('\n').unwrap_or(&val))?;
                    }
                }
            }
            for k in &from_env {
                let val = std::env::var(k).with_context(|| format!("--from-env {k}: not set in this environment"))?;
                sm.env_set(&name, k, &val)?;
            }
        }
        EnvCommand::Unset { name, keys } => {
            for k in &keys {
                sm.env_unset(&name, k)?;
            }
        }
        EnvCommand::List { name } => {
            let vars = sm.env_list(&name)?;
            if json {
                print_json(&vars.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect::<Vec<_>>())?;
            } else {
                for (k, v) in vars {
                    say(format!("{k}={v}"));
                }
            }
        }
    }
    Ok(0)
}
