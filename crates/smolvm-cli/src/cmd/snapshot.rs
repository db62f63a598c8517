//! pause, resume, snapshot and fork.

use std::time::{Duration, Instant};

use serde_json::json;

use super::sandbox::open;
use super::{print_json, say};
use crate::cli::{SnapshotArgs, SnapshotCommand};

pub fn pause(name: &str, json: bool) -> anyhow::Result<i32> {
    let r = open()?.pause(name)?;
    if json {
        print_json(&json!({ "name": name, "status": "paused", "millis": r.millis, "bytes": r.bytes }))?;
    } else {
        say(format!(
            "{name} paused ({} ms; {:.1} MiB saved; smolvm resume {name})",
            r.millis,
            r.bytes as f64 / 1048576.0
        ));
    }
    Ok(0)
}

pub fn resume(name: &str, timeout: u64, json: bool) -> anyhow::Result<i32> {
    let r = open()?.resume(name, Duration::from_secs(timeout))?;
    if json {
        print_json(&json!({ "name": name, "status": "running", "millis": r.millis }))?;
    } else {
        say(format!("{name} is running again ({} ms)", r.millis));
    }
    Ok(0)
}

pub fn run(a: SnapshotArgs, json: bool) -> anyhow::Result<i32> {
    let sm = open()?;
    match (a.command, a.sandbox) {
        (Some(SnapshotCommand::List), _) => {
            let all = sm.snapshots();
            if json {
                print_json(&all)?;
                return Ok(0);
            }
            say(format!("{:<24} {:<16} {:>6} {:>4} {:>9}  {}", "SNAPSHOT", "SOURCE", "MEM", "CPUS", "SIZE", "TAKEN"));
            for s in all {
                say(format!(
                    "{:<24} {:<16} {:>6} {:>4} {:>7.1}Mi  {}",
                    s.name,
                    s.source.as_deref().unwrap_or("-"),
                    s.memory_mib,
                    s.cpus,
                    s.bytes as f64 / 1048576.0,
                    smolvm::timefmt::rfc3339_utc(s.created_at)
                ));
            }
            Ok(0)
        }
        (Some(SnapshotCommand::Delete { names }), _) => {
            for n in &names {
                sm.delete_snapshot(n)?;
                if json {
                    print_json(&json!({ "snapshot": n, "status": "deleted" }))?;
                } else {
                    say(format!("snapshot {n} deleted"));
                }
            }
            Ok(0)
        }
        (None, Some(sandbox)) => {
            let start = Instant::now();
            let s = sm.snapshot(&sandbox, a.name.as_deref())?;
            if json {
                print_json(&json!({ "snapshot": s, "seconds": start.elapsed().as_secs_f64() }))?;
            } else {
                say(format!(
                    "snapshot {} of {sandbox} ({:.1} s, {:.1} MiB); new sandboxes from it: smolvm create --from-snapshot {}",
                    s.name,
                    start.elapsed().as_secs_f64(),
                    s.bytes as f64 / 1048576.0,
                    s.name
                ));
            }
            Ok(0)
        }
        (None, None) => anyhow::bail!("say which sandbox: smolvm snapshot NAME [--name SNAP] (or snapshot list)"),
    }
}

pub fn fork(name: &str, count: u32, new_name: Option<String>, timeout: u64, json: bool) -> anyhow::Result<i32> {
    anyhow::ensure!((1..=64).contains(&count), "--count is 1 to 64");
    let names: Vec<String> = match (&new_name, count) {
        (Some(n), 1) => vec![n.clone()],
        (Some(n), k) => (1..=k).map(|i| format!("{n}-{i}")).collect(),
        (None, k) => (0..k).map(|_| smolvm::sandbox::names::generate()).collect(),
    };
    let start = Instant::now();
    let made = open()?.fork(name, &names, Duration::from_secs(timeout), &mut |_| {})?;
    if json {
        print_json(&json!({ "sandboxes": made, "seconds": start.elapsed().as_secs_f64() }))?;
    } else {
        let list: Vec<&str> = made.iter().map(|m| m.name.as_str()).collect();
        say(format!("forked {name} into {} ({:.1} s)", list.join(", "), start.elapsed().as_secs_f64()));
    }
    Ok(0)
}
