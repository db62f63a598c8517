//! `smolvm network set|show` and `smolvm logs NAME --network`.

use anyhow::Context;
use smolvm::net::{NetworkMode, NetworkPolicy};
use smolvm::sandbox::SandboxInfo;

use super::{print_json, say};
use crate::cli::{NetworkArgs, NetworkCommand, NetworkModeArg};

/// The policy the flags describe (each value checked, with the flag named in the error).
pub fn policy(a: &NetworkArgs) -> anyhow::Result<NetworkPolicy> {
    let p = NetworkPolicy {
        mode: match a.network {
            NetworkModeArg::Nat => NetworkMode::Nat,
            NetworkModeArg::None => NetworkMode::None,
        },
        allow_domains: a
            .allow_domains
            .iter()
            .map(|d| d.parse().with_context(|| format!("--allow-domain {d}")))
            .collect::<anyhow::Result<_>>()?,
        allow_cidrs: a
            .allow_cidrs
            .iter()
            .map(|c| c.parse().with_context(|| format!("--allow-cidr {c}")))
            .collect::<anyhow::Result<_>>()?,
        allow_host_ports: a.allow_host_ports.clone(),
        allow_private: a.allow_private,
    };
    p.validate()?;
    Ok(p)
}

pub fn run(cmd: NetworkCommand, json: bool) -> anyhow::Result<i32> {
    let sm = super::sandbox::open()?;
    let name = match &cmd {
        NetworkCommand::Set { name, policy: args } => {
            sm.set_network(name, &policy(args)?)?;
            name
        }
        NetworkCommand::Show { name } => name,
    };
    let info = sm.info(name)?;
    if json {
        print_json(&serde_json::json!({
            "name": info.name,
            "network_policy": info.network_policy,
            "network_refusals": info.network_refusals,
        }))?;
    } else {
        print_policy(&info);
    }
    Ok(0)
}

/// The policy and the refusals, for `status` and `network show`.
pub fn print_policy(s: &SandboxInfo) {
    say(format!("network:  {}", s.network_policy.summary()));
    let r = &s.network_refusals;
    if r.refused > 0 {
        say(format!(
            "refused:  {} connection(s); the last {} (smolvm logs {} --network):",
            r.refused,
            r.recent.len(),
            s.name
        ));
        for x in &r.recent {
            let name = x.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            let line = format!("{:<4} {}{}: {}", x.proto, x.dest, name, x.rule);
            say(format!("  {} {}", smolvm::timefmt::rfc3339_utc(x.time), smolvm::text::escape_controls(&line)));
        }
    }
}

pub fn logs(name: &str) -> anyhow::Result<i32> {
    let out = super::sandbox::open()?.network_log(name)?;
    let out = smolvm::text::escape_controls(&String::from_utf8_lossy(&out));
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    Ok(0)
}
