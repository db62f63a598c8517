//! `smolvm-bench`: drives the real product (the `smolvm` library: real downloads from a real
//! HTTP server on 127.0.0.1, real QEMU, real guests) and reports where the time goes, as
//! min / median / p90 / max over N runs after a warm-up. One command reproduces every figure in
//! docs/benchmarks.md:
//!
//! ```text
//! smolvm-bench --release dist/<tag> [--runs 5] [--density 10] [--no-network] [--json]
//! ```
//! As root it also measures the network (`network.rs`), in namespaces of its own.

#![allow(clippy::print_stdout)]

mod intercept;
mod network;
mod serve;
mod snapshots;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use serde_json::json;
use smolvm::agent::client::{Command as AgentCommand, ExecRequest};
use smolvm::config::{Config, ImageOverrides};
use smolvm::paths::Home;
use smolvm::sandbox::{CreateEvent, CreateOptions, Smolvm};
use smolvm::vm::accel::{detect, HostFacts};
use smolvm_bench::stats::Summary;
use smolvm_testkit::http::Server;

#[derive(Debug, Parser)]
#[command(name = "smolvm-bench", about = "Measure smolvm: create, exec, cp, teardown, memory, density")]
struct Args {
    /// A release directory (DIR/<tag>, as `smolvm image build all` writes), served over HTTP on
    /// 127.0.0.1 for the cold-cache runs.
    #[arg(long)]
    release: PathBuf,
    /// Measured runs per figure (a warm-up run is added and excluded).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Sandboxes started at once for the density figure (0 skips it).
    #[arg(long, default_value_t = 10)]
    density: usize,
    /// Size of the file copied each way, in MiB.
    #[arg(long, default_value_t = 64)]
    cp_mib: usize,
    /// Skip the network figures (they need root: network namespaces).
    #[arg(long)]
    no_network: bool,
    /// Only the network figures.
    #[arg(long, conflicts_with = "no_network")]
    network_only: bool,
    /// Only the E2B figure (`smolvm serve` against exec and the library).
    #[arg(long, conflicts_with = "network_only")]
    serve_only: bool,
    /// Only the snapshot figures (create from the boot snapshot against a cold boot, fork,
    /// pause, resume, clones' memory): needs no preset layer in the release.
    #[arg(long, conflicts_with_all = ["network_only", "serve_only"])]
    snapshots_only: bool,
    /// Only the secrets interceptor's figures (host-side: no VM, no root).
    #[arg(long, conflicts_with_all = ["network_only", "serve_only", "snapshots_only"])]
    intercept_only: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measured figure.
#[derive(Debug, Serialize)]
struct Figure {
    name: String,
    unit: &'static str,
    summary: Summary,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    figures: Vec<Figure>,
}

impl Report {
    pub(crate) fn add(&mut self, name: &str, unit: &'static str, samples: &[f64]) {
        if let Some(summary) = Summary::of(samples) {
            self.figures.push(Figure { name: name.to_string(), unit, summary });
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "__serve-inet") {
        return network::serve_inet(Path::new(argv.get(2).context("__serve-inet DIR")?));
    }
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    // Before any thread: the network figures need this process in namespaces of its own.
    let measure_network = !args.no_network && !args.intercept_only && is_root();
    let inet = if measure_network { Some(network::enter_world(work.path(), 64)?) } else { None };
    let release =
        args.release.canonicalize().with_context(|| format!("release directory {}", args.release.display()))?;
    let manifest = release.join("manifest.json");
    anyhow::ensure!(manifest.is_file(), "{} has no manifest.json", release.display());
    let server = Server::start(release.parent().context("release has no parent directory")?.to_path_buf())?;
    let _ = IMAGES.set(ImageOverrides {
        manifest: Some(manifest.display().to_string()),
        url_prefix: Some(server.url.clone()),
        ..ImageOverrides::default()
    });

    let accel = detect(&HostFacts::probe());
    let machine = machine();
    if !args.json {
        println!("smolvm-bench: accel {} ({}), {}", accel.qemu_name(), reason(&accel), machine);
        println!(
            "release {}, {} runs per figure (+1 warm-up), {} sandboxes for density\n",
            release.display(),
            args.runs,
            args.density
        );
    }
    let mut report = Report::default();

    if !args.network_only && !args.intercept_only {
        let home = work.path().join("warm");
        let mut run = || -> anyhow::Result<()> {
            if args.serve_only {
                let sm = open(&home)?;
                return serve::figures(args.runs, &sm, &home, &mut report);
            }
            if args.snapshots_only {
                let sm = open(&home)?;
                return snapshots::figures(args.runs, args.density, &sm, &mut report);
            }
            cold_create(&args, work.path(), &mut report)?;
            let sm = open(&home)?;
            warm_create_and_lifecycle(&args, &sm, &mut report)?;
            exec_and_cp(&args, &sm, work.path(), &mut report)?;
            disk_durability(&args, &home, &mut report)?;
            presets(&args, &release, &sm, &mut report)?;
            snapshots::figures(args.runs, args.density, &sm, &mut report)?;
            serve::figures(args.runs, &sm, &home, &mut report)?;
            if args.density > 0 {
                density(&args, &home, &mut report)?;
            }
            Ok(())
        };
        let result = run();
        if result.is_err() {
            // A figure failed half-way: no sandbox of this run may outlive it.
            if let Ok(sm) = open(&home) {
                for s in sm.list().unwrap_or_default() {
                    let _ = sm.delete(&s.name);
                }
            }
        }
        result?;
    }
    if !args.network_only && !args.serve_only && !args.snapshots_only {
        intercept::figures(args.runs, 64, &mut report)?;
    }
    if let Some(inet) = inet.as_ref().filter(|_| !args.intercept_only) {
        let r = network::figures(work.path(), args.runs, &mut report);
        network::leave_world(inet);
        r?;
    } else if !args.json && !args.intercept_only {
        println!("(network figures skipped: they need root, or --no-network was given)\n");
    }

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "accel": accel, "machine": machine, "runs": args.runs, "figures": report.figures })
            )?
        );
    } else {
        println!("{:<44} {:>5} {:>10} {:>10} {:>10} {:>10}", "figure", "unit", "min", "median", "p90", "max");
        for f in &report.figures {
            let s = &f.summary;
            // Ratios get two decimals: 0.24 and 0.16 are not both "0.2".
            let p = if f.unit == "x" { 2 } else { 1 };
            println!(
                "{:<44} {:>5} {:>10.p$} {:>10.p$} {:>10.p$} {:>10.p$}",
                f.name, f.unit, s.min, s.median, s.p90, s.max
            );
        }
    }
    Ok(())
}

/// The release under test, served by the benchmark's own HTTP server (set once in `main`).
static IMAGES: std::sync::OnceLock<ImageOverrides> = std::sync::OnceLock::new();

/// A `Smolvm` with its own home, using the release under test.
pub(crate) fn open(home: &Path) -> anyhow::Result<Smolvm> {
    let mut c = Config::new(Home::at(home));
    c.images = IMAGES.get().cloned().unwrap_or_default();
    c.vm_users = smolvm::config::VmUsers::of_system_user(smolvm::config::VM_USER);
    Ok(Smolvm::open(c)?)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn reason(a: &smolvm::vm::accel::Accel) -> String {
    match a {
        smolvm::vm::accel::Accel::Kvm => "hardware virtualization".into(),
        smolvm::vm::accel::Accel::Tcg { reason } => reason.clone(),
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} cores, {}", model.unwrap_or_else(|| "unknown CPU".into()))
}

pub(crate) fn opts(name: &str) -> CreateOptions {
    CreateOptions { name: Some(name.to_string()), ..CreateOptions::default() }
}

/// Cold create: an empty cache every run, so download + verify + decompress + boot + ready.
fn cold_create(args: &Args, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    let (mut total, mut fetch, mut boot) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=args.runs {
        let home = work.join(format!("cold-{run}"));
        let sm = open(&home)?;
        let start = Instant::now();
        let mut booting_at = None;
        sm.create(&opts("cold"), &mut |e| {
            if let CreateEvent::Booting { .. } = e {
                booting_at = Some(start.elapsed());
            }
        })?;
        let t = start.elapsed();
        sm.delete("cold")?;
        std::fs::remove_dir_all(&home)?;
        if run > 0 {
            total.push(ms(t));
            let b = booting_at.unwrap_or_default();
            fetch.push(ms(b));
            boot.push(ms(t - b));
        }
    }
    report.add("cold create (total)", "ms", &total);
    report.add("  download+verify+decompress+disk", "ms", &fetch);
    report.add("  boot to ready", "ms", &boot);
    Ok(())
}

/// Warm create, the guest's boot phases, stop/start/delete, and create -> exec -> delete.
fn warm_create_and_lifecycle(args: &Args, sm: &Smolvm, report: &mut Report) -> anyhow::Result<()> {
    let (mut create, mut kernel, mut mounts, mut network, mut sshd, mut rss, mut pss) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut host_ready, mut before_guest) = (vec![], vec![]);
    let (mut stop, mut start, mut delete, mut lifecycle) = (vec![], vec![], vec![], vec![]);
    for run in 0..=args.runs {
        let t0 = Instant::now();
        // Booting the kernel: the boot phases are the figure (create restores the boot
        // snapshot otherwise; see snapshots.rs).
        let info = sm.create(&CreateOptions { cold: true, ..opts("warm") }, &mut |_| {})?;
        let t_create = t0.elapsed();
        let b = info.boot_us.context("no boot phases recorded")?;
        // Let the guest settle before reading memory: boot-time page touches are the figure.
        std::thread::sleep(Duration::from_millis(500));
        let (r, p) = memory_kib(info.pid.context("no pid")?)?;
        let t1 = Instant::now();
        sm.stop("warm", Duration::from_secs(30))?;
        let t_stop = t1.elapsed();
        let t2 = Instant::now();
        sm.start("warm", Duration::from_secs(180))?;
        let t_start = t2.elapsed();
        let t3 = Instant::now();
        sm.delete("warm")?;
        let t_delete = t3.elapsed();
        let t4 = Instant::now();
        sm.create(&opts("life"), &mut |_| {})?;
        anyhow::ensure!(sm.exec("life", &["true".into()], None, None)?.code() == 0, "exec true failed");
        sm.delete("life")?;
        let t_life = t4.elapsed();
        if run == 0 {
            continue;
        }
        create.push(ms(t_create));
        if let Some(r) = info.ready_ms {
            host_ready.push(r as f64);
            // Host-measured boot minus the guest's own clock at readiness: QEMU start, firmware,
            // loading the kernel, and noticing the readiness line.
            before_guest.push(r as f64 - b.sshd as f64 / 1000.0);
        }
        kernel.push(b.init as f64 / 1000.0);
        mounts.push((b.mounts - b.init) as f64 / 1000.0);
        network.push((b.network - b.mounts) as f64 / 1000.0);
        sshd.push((b.sshd - b.network) as f64 / 1000.0);
        rss.push(r as f64 / 1024.0);
        pss.push(p as f64 / 1024.0);
        stop.push(ms(t_stop));
        start.push(ms(t_start));
        delete.push(ms(t_delete));
        lifecycle.push(ms(t_life));
    }
    report.add("warm create to ready (booting, --cold)", "ms", &create);
    report.add("  VMM start to ready (host clock)", "ms", &host_ready);
    report.add("  QEMU start + firmware + kernel load (host - guest)", "ms", &before_guest);
    report.add("  guest: kernel boot (to init)", "ms", &kernel);
    report.add("  guest: init mounts + overlay root", "ms", &mounts);
    report.add("  guest: network", "ms", &network);
    report.add("  guest: host key + sshd started", "ms", &sshd);
    report.add("stop (clean power-off)", "ms", &stop);
    report.add("start (boot again)", "ms", &start);
    report.add("delete (stopped sandbox)", "ms", &delete);
    report.add("lifecycle create -> exec true (agent) -> delete (boot snapshot)", "ms", &lifecycle);
    report.add("QEMU RSS per idle sandbox", "MiB", &rss);
    report.add("QEMU PSS per idle sandbox", "MiB", &pss);
    Ok(())
}

fn ssh_exec(sm: &Smolvm, name: &str, argv: &[&str]) -> anyhow::Result<()> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let st = sm.ssh_command(name, &argv, false)?.stdin(Stdio::null()).stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("exec {argv:?} in {name}: {st}");
    }
    Ok(())
}

/// Exec round trips over SSH and cp throughput, on one sandbox.
fn exec_and_cp(args: &Args, sm: &Smolvm, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mut first = Vec::new();
    for _ in 0..=args.runs {
        sm.create(&opts("first"), &mut |_| {})?;
        let t = Instant::now();
        ssh_exec(sm, "first", &["true"])?;
        first.push(ms(t.elapsed()));
        sm.delete("first")?;
    }
    first.remove(0);
    report.add("first exec after ready (ssh, new connection)", "ms", &first);

    sm.create(&opts("exec"), &mut |_| {})?;
    // The agent: one connection reused (the SDK's way), and a new connection per command
    // (what each `smolvm exec` process does).
    let client = sm.agent("exec")?;
    let true_req = || ExecRequest {
        command: AgentCommand::Argv(vec!["true".into()]),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: None,
        pty: None,
    };
    client.exec_output(true_req(), None)?;
    let mut agent_rt = Vec::new();
    for _ in 0..(args.runs * 20).max(100) {
        let t = Instant::now();
        let out = client.exec_output(true_req(), None)?;
        agent_rt.push(ms(t.elapsed()));
        anyhow::ensure!(out.code() == 0, "true failed through the agent");
    }
    report.add("exec true round trip (agent, one connection)", "ms", &agent_rt);
    let mut agent_new = Vec::new();
    for _ in 0..(args.runs * 4).max(20) {
        let t = Instant::now();
        let c = sm.agent("exec")?;
        c.exec_output(true_req(), None)?;
        agent_new.push(ms(t.elapsed()));
    }
    report.add("exec true (agent, new connection each)", "ms", &agent_new);
    ssh_exec(sm, "exec", &["true"])?;
    let mut rt = Vec::new();
    for _ in 0..(args.runs * 4).max(20) {
        let t = Instant::now();
        ssh_exec(sm, "exec", &["true"])?;
        rt.push(ms(t.elapsed()));
    }
    report.add("exec true round trip (ssh, warm connection)", "ms", &rt);

    let src = work.join("cp.bin");
    let data: Vec<u8> = (0..args.cp_mib * 1024 * 1024).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&src, &data)?;
    let back = work.join("cp.back");
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for run in 0..=args.runs.min(3) {
        let t = Instant::now();
        run_ok(sm.cp_command(src.to_str().unwrap_or_default(), "exec:/root/cp.bin")?)?;
        let t_up = t.elapsed();
        let t = Instant::now();
        run_ok(sm.cp_command("exec:/root/cp.bin", back.to_str().unwrap_or_default())?)?;
        let t_down = t.elapsed();
        anyhow::ensure!(std::fs::read(&back)? == data, "cp round trip changed the file");
        if run > 0 {
            up.push(args.cp_mib as f64 / t_up.as_secs_f64());
            down.push(args.cp_mib as f64 / t_down.as_secs_f64());
        }
    }
    report.add(&format!("cp host -> guest ({} MiB, scp)", args.cp_mib), "MiB/s", &up);
    report.add(&format!("cp guest -> host ({} MiB, scp)", args.cp_mib), "MiB/s", &down);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for run in 0..=args.runs.min(3) {
        let t = Instant::now();
        client.write_file("/root/cp-agent.bin", &mut std::fs::File::open(&src)?, 0o644, 0, 0)?;
        let t_up = t.elapsed();
        let mut got = Vec::with_capacity(data.len());
        let t = Instant::now();
        client.read_file("/root/cp-agent.bin", &mut got)?;
        let t_down = t.elapsed();
        anyhow::ensure!(got == data, "agent file round trip changed the file");
        if run > 0 {
            up.push(args.cp_mib as f64 / t_up.as_secs_f64());
            down.push(args.cp_mib as f64 / t_down.as_secs_f64());
        }
    }
    report.add(&format!("cp host -> guest ({} MiB, agent)", args.cp_mib), "MiB/s", &up);
    report.add(&format!("cp guest -> host ({} MiB, agent)", args.cp_mib), "MiB/s", &down);
    // The same read over agent protocol v4, which has no flow control: what v5's windows cost.
    let v4 = smolvm::agent::AgentClient::connect_sandbox_speaking("exec", &sm.home().sandboxes().join("exec"), 4)?;
    anyhow::ensure!(v4.version() == 4, "the v4 client negotiated v{}", v4.version());
    let mut down = Vec::new();
    for run in 0..=args.runs.min(3) {
        let mut got = Vec::with_capacity(data.len());
        let t = Instant::now();
        v4.read_file("/root/cp-agent.bin", &mut got)?;
        let t_down = t.elapsed();
        anyhow::ensure!(got == data, "agent file read (v4) changed the file");
        if run > 0 {
            down.push(args.cp_mib as f64 / t_down.as_secs_f64());
        }
    }
    report.add(&format!("cp guest -> host ({} MiB, agent v4: no flow control)", args.cp_mib), "MiB/s", &down);
    drop(client);
    sm.delete("exec")?;
    Ok(())
}

/// What the durable disk costs: the sandbox disk is `cache=writeback` (the guest's flushes
/// reach the host's disk); against `cache=unsafe` (flushes ignored), in the same run: create,
/// 100 small writes each followed by `sync`, and 64 MiB written with `fsync` at the end.
fn disk_durability(args: &Args, home: &Path, report: &mut Report) -> anyhow::Result<()> {
    let small = "i=0; while [ $i -lt 100 ]; do echo $i > /root/f; sync; i=$((i+1)); done";
    let big = "dd if=/dev/zero of=/root/big bs=1M count=64 conv=fsync status=none; rm /root/big";
    for (label, unsafe_cache) in [("writeback", false), ("unsafe", true)] {
        let sm = if unsafe_cache { open(home)?.with_unsafe_disk_cache_for_benchmarks() } else { open(home)? };
        let (mut create, mut syncs, mut fsync) = (vec![], vec![], vec![]);
        for run in 0..=args.runs {
            let t = Instant::now();
            sm.create(&opts("disk"), &mut |_| {})?;
            let c = ms(t.elapsed());
            let timed = |script: &str| -> anyhow::Result<f64> {
                let t = Instant::now();
                let out = sm.exec("disk", &["sh".into(), "-c".into(), script.into()], None, None)?;
                anyhow::ensure!(out.code() == 0, "{script}: {}", String::from_utf8_lossy(&out.stderr));
                Ok(ms(t.elapsed()))
            };
            let (s, f) = (timed(small)?, timed(big)?);
            sm.delete("disk")?;
            if run > 0 {
                create.push(c);
                syncs.push(s);
                fsync.push(f);
            }
        }
        report.add(&format!("disk cache={label}: create"), "ms", &create);
        report.add(&format!("disk cache={label}: 100 x (write + sync)"), "ms", &syncs);
        report.add(&format!("disk cache={label}: 64 MiB + fsync"), "ms", &fsync);
    }
    Ok(())
}

fn run_ok(mut cmd: std::process::Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Warm start of each preset (its layer cached after the warm-up run): create to ready.
/// A release built with `--no-presets` has no layers: those figures are skipped, said once.
fn presets(args: &Args, release: &Path, sm: &Smolvm, report: &mut Report) -> anyhow::Result<()> {
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(release.join("manifest.json"))?)?;
    let has_layer = |name: &str| {
        manifest["assets"].as_array().is_some_and(|a| a.iter().any(|x| x["preset"].as_str() == Some(name)))
    };
    for p in smolvm::sandbox::presets::PRESETS {
        if !has_layer(p.name) {
            if !args.json {
                println!("(warm {} start skipped: the release has no layer for it)", p.name);
            }
            continue;
        }
        let mut samples = Vec::new();
        for run in 0..=args.runs {
            let o = CreateOptions { preset: Some(p.name.to_string()), ..opts("preset") };
            let t = Instant::now();
            sm.create(&o, &mut |_| {})?;
            let took = ms(t.elapsed());
            sm.delete("preset")?;
            if run > 0 {
                samples.push(took);
            }
        }
        report.add(&format!("warm {} start to ready", p.name), "ms", &samples);
    }
    Ok(())
}

/// K sandboxes created at once (separate processes would contend the same way; threads keep
/// the measurement in one place): time until all are ready, and their total memory.
fn density(args: &Args, home: &Path, report: &mut Report) -> anyhow::Result<()> {
    let start = Instant::now();
    let handles: Vec<_> = (0..args.density)
        .map(|i| {
            let home = home.to_path_buf();
            std::thread::spawn(move || -> anyhow::Result<smolvm::sandbox::SandboxInfo> {
                let sm = open(&home)?;
                Ok(sm.create(&opts(&format!("dense-{i}")), &mut |_| {})?)
            })
        })
        .collect();
    let mut infos = Vec::new();
    for h in handles {
        infos.push(h.join().map_err(|_| anyhow::anyhow!("a create thread panicked"))??);
    }
    let all_ready = ms(start.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let mut rss_total = 0u64;
    let mut pss_total = 0u64;
    for i in &infos {
        let (r, p) = memory_kib(i.pid.context("no pid")?)?;
        rss_total += r;
        pss_total += p;
    }
    let sm = open(home)?;
    for i in &infos {
        sm.delete(&i.name)?;
    }
    report.add(&format!("density: {} creates at once, all ready", args.density), "ms", &[all_ready]);
    report.add(&format!("density: total QEMU RSS of {}", args.density), "MiB", &[rss_total as f64 / 1024.0]);
    report.add(&format!("density: total QEMU PSS of {}", args.density), "MiB", &[pss_total as f64 / 1024.0]);
    Ok(())
}

/// RSS and PSS of a process in KiB, from `/proc/<pid>/smaps_rollup`.
pub(crate) fn memory_kib(pid: i32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}
