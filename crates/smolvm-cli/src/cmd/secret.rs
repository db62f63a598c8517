//! `--secret` and `smolvm secret`: API keys that stay on the host. The guest gets a
//! placeholder; smolvm adds the value to requests to the secret's hosts at the egress.

use anyhow::Context;
use serde_json::json;
use smolvm::net::intercept::rules::HeaderSlot;
use smolvm::sandbox::secrets::{Secret, SecretValue};

use super::{print_json, say};
use crate::cli::SecretCommand;

/// Parses `NAME@HOST[,HOST...][:header=H[,H...]]` (the value from this command's environment
/// variable NAME), with `=@FILE` (from a file) or `=@-` (from stdin) after it. A value is never
/// taken from the command line itself, where `ps` would show it. `H` is a header name the
/// value is sent in as it is (`x-goog-api-key`) or `NAME:SCHEME` (`authorization:Token`);
/// without `:header=`, `Authorization: Bearer`, `x-api-key` and `api-key`.
pub fn parse(spec: &str, stdin_taken: &mut bool) -> anyhow::Result<Secret> {
    let (left, source) = match spec.split_once("=@") {
        Some((l, s)) => (l, Some(format!("@{s}"))),
        None => (spec, None),
    };
    let (left, headers) = match left.split_once(":header=") {
        Some((l, h)) => {
            let slots = h
                .split(',')
                .map(|one| HeaderSlot::parse(one).map_err(|e| anyhow::anyhow!("--secret {left}: header={one}: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            (l, slots)
        }
        None => (left, Vec::new()),
    };
    // `NAME@HOST=VALUE`: the value on the command line, refused below.
    let (left, source) = match (left.split_once('='), source) {
        (Some((l, v)), None) => (l, Some(v.to_string())),
        (_, s) => (left, s),
    };
    let (name, hosts) = match left.split_once('@') {
        Some((n, h)) => (n, h.split(',').filter(|h| !h.is_empty()).map(str::to_string).collect::<Vec<_>>()),
        None => (left, Vec::new()),
    };
    let value = match source.as_deref() {
        None => std::env::var(name).ok().filter(|v| !v.is_empty()).with_context(|| {
            format!("--secret {spec}: {name} is not set in this environment (export it, or give =@FILE or =@-)")
        })?,
        Some("@-") => {
            anyhow::ensure!(!*stdin_taken, "--secret {spec}: only one secret can be read from stdin");
            *stdin_taken = true;
            let mut v = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut v).context("read the secret from stdin")?;
            v.trim_end_matches(['\r', '\n']).to_string()
        }
        Some(f) if f.starts_with('@') => {
            let path = &f[1..];
            let v = std::fs::read_to_string(path).with_context(|| format!("--secret {name}: read {path}"))?;
            v.trim_end_matches(['\r', '\n']).to_string()
        }
        Some(_) => anyhow::bail!(
            "--secret {name}: a value is never given on the command line (ps shows it): use {name}@HOST with \
             {name} exported, or {name}@HOST=@FILE, or {name}@HOST=@- for stdin"
        ),
    };
    Ok(Secret { name: name.to_string(), hosts, headers, value: SecretValue::new(value) })
}

pub fn parse_all(specs: &[String]) -> anyhow::Result<Vec<Secret>> {
    let mut stdin_taken = false;
    specs.iter().map(|s| parse(s, &mut stdin_taken)).collect()
}

pub fn run(cmd: SecretCommand, json: bool) -> anyhow::Result<i32> {
    let sm = super::sandbox::open()?;
    match cmd {
        SecretCommand::List { name } => {
            let all = sm.secrets(&name)?;
            if json {
                print_json(&all)?;
            } else if all.is_empty() {
                say(format!("{name} has no secrets"));
            } else {
                for s in all {
                    say(format!("{}  -> {}  (in {})", s.name, s.hosts.join(", "), s.headers.join(" | ")));
                }
            }
        }
        SecretCommand::Set { name, specs } => {
            for s in parse_all(&specs)? {
                let var = s.name.clone();
                sm.set_secret(&name, s)?;
                if !json {
                    say(format!("{name}: {var} set (the guest sees a placeholder)"));
                }
            }
            if json {
                print_json(&sm.secrets(&name)?)?;
            }
        }
        SecretCommand::Unset { name, vars } => {
            for v in &vars {
                let removed = sm.unset_secret(&name, v)?;
                if !json {
                    say(format!("{name}: {v} {}", if removed { "removed" } else { "was not set" }));
                }
            }
            if json {
                print_json(&json!(sm.secrets(&name)?))?;
            }
        }
    }
    Ok(0)
}
