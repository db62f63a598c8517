//! The snapshot figures: create from the boot snapshot against a cold boot (both to the first
//! command answered, alternating in one run), fork, pause and resume, the memory of clones
//! against booted sandboxes, snapshot size, and delete of a running sandbox.

use std::time::{Duration, Instant};

use anyhow::Context;
use smolvm::sandbox::{CreateOptions, Smolvm};

use super::{memory_kib, ms, opts, Report};

fn exec_true(sm: &Smolvm, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(sm.exec(name, &["true".into()], None, None)?.code() == 0, "exec true failed in {name}");
    Ok(())
}

/// create → first `exec true` answered, from the boot snapshot or booting the kernel.
fn create_to_exec(sm: &Smolvm, name: &str, cold: bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let info = sm.create(&CreateOptions { cold, ..opts(name) }, &mut |_| {})?;
    exec_true(sm, name)?;
    let d = t.elapsed();
    let want = if cold { "boot" } else { "boot-snapshot" };
    anyhow::ensure!(
        info.started_from.as_deref() == Some(want),
        "{name} started from {:?}, not {want}",
        info.started_from
    );
    Ok(d)
}

pub fn figures(runs: usize, density: usize, sm: &Smolvm, report: &mut Report) -> anyhow::Result<()> {
    // The boot snapshot exists after the first create of this home's configuration.
    sm.create(&opts("seed"), &mut |_| {})?;
    sm.delete("seed")?;
    let (mut cold, mut restored, mut ratio) = (vec![], vec![], vec![]);
    let (mut fork, mut pause, mut resume, mut delete_running, mut snap, mut snap_bytes) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut pause_clone = vec![];
    for run in 0..=runs {
        let c = create_to_exec(sm, "bench-cold", true)?;
        sm.delete("bench-cold")?;
        let r = create_to_exec(sm, "bench-snap", false)?;
        // fork of a running sandbox to an exec-ready clone
        let t = Instant::now();
        sm.fork("bench-snap", &["bench-fork".to_string()], Duration::from_secs(180), &mut |_| {})?;
        exec_true(sm, "bench-fork")?;
        let f = t.elapsed();
        // a named snapshot (the sandbox keeps running), and its size on disk
        let t = Instant::now();
        let s = sm.snapshot("bench-snap", Some("bench-s"))?;
        let sn = t.elapsed();
        sm.delete_snapshot("bench-s")?;
        // pause, then resume to the first command answered: a sandbox restored from the boot
        // snapshot (what `create` makes), and a fork's clone (whose RAM image only the clones
        // name)
        let t = Instant::now();
        sm.pause("bench-snap")?;
        let p = t.elapsed();
        let t = Instant::now();
        sm.resume("bench-snap", Duration::from_secs(180))?;
        exec_true(sm, "bench-snap")?;
        let re = t.elapsed();
        let t = Instant::now();
        sm.pause("bench-fork")?;
        let pf = t.elapsed();
        sm.resume("bench-fork", Duration::from_secs(180))?;
        exec_true(sm, "bench-fork")?;
        // delete of a running sandbox
        let t = Instant::now();
        sm.delete("bench-fork")?;
        let d = t.elapsed();
        sm.delete("bench-snap")?;
        if run == 0 {
            continue;
        }
        cold.push(ms(c));
        restored.push(ms(r));
        ratio.push(ms(r) / ms(c));
        fork.push(ms(f));
        snap.push(ms(sn));
        snap_bytes.push(s.bytes as f64 / 1048576.0);
        pause.push(ms(p));
        pause_clone.push(ms(pf));
        resume.push(ms(re));
        delete_running.push(ms(d));
    }
    report.add("create -> first exec: cold boot", "ms", &cold);
    report.add("create -> first exec: boot snapshot", "ms", &restored);
    report.add("  ratio boot snapshot / cold (same run)", "x", &ratio);
    report.add("fork of a running sandbox -> first exec", "ms", &fork);
    report.add("snapshot of a running sandbox", "ms", &snap);
    report.add("  its size on disk (fresh 512 MiB guest)", "MiB", &snap_bytes);
    report.add("pause (QEMU gone)", "ms", &pause);
    report.add("resume -> first exec", "ms", &resume);
    report.add("pause of a fork's clone", "ms", &pause_clone);
    report.add("delete (running sandbox)", "ms", &delete_running);
    if density > 0 {
        clone_memory(density, sm, report)?;
    }
    Ok(())
}

/// Total PSS of `k` sandboxes booted cold against `k` clones forked from one sandbox.
fn clone_memory(k: usize, sm: &Smolvm, report: &mut Report) -> anyhow::Result<()> {
    let total_pss = |names: &[String]| -> anyhow::Result<f64> {
        std::thread::sleep(Duration::from_millis(500));
        let mut sum = 0;
        for n in names {
            sum += memory_kib(sm.info(n)?.pid.context("no pid")?)?.1;
        }
        Ok(sum as f64 / 1024.0)
    };
    let booted: Vec<String> = (0..k).map(|i| format!("booted-{i}")).collect();
    for n in &booted {
        sm.create(&CreateOptions { cold: true, ..opts(n) }, &mut |_| {})?;
        exec_true(sm, n)?;
    }
    let booted_pss = total_pss(&booted)?;
    for n in &booted {
        sm.delete(n)?;
    }
    sm.create(&opts("fork-src"), &mut |_| {})?;
    exec_true(sm, "fork-src")?;
    let clones: Vec<String> = (0..k).map(|i| format!("clone-{i}")).collect();
    let t = Instant::now();
    sm.fork("fork-src", &clones, Duration::from_secs(180), &mut |_| {})?;
    let forked = ms(t.elapsed());
    for n in &clones {
        exec_true(sm, n)?;
    }
    let clones_pss = total_pss(&clones)?;
    for n in clones.iter().chain(std::iter::once(&"fork-src".to_string())) {
        sm.delete(n)?;
    }
    report.add(&format!("fork --count {k}"), "ms", &[forked]);
    report.add(&format!("total QEMU PSS of {k} booted sandboxes"), "MiB", &[booted_pss]);
    report.add(&format!("total QEMU PSS of {k} clones of one"), "MiB", &[clones_pss]);
    report.add("  ratio clones / booted", "x", &[clones_pss / booted_pss]);
    Ok(())
}
