//! The E2B figure: `commands.run("true")` from the official E2B Python SDK through
//! `smolvm serve`, next to `smolvm exec NAME -- true` (a CLI process) and the library's
//! `Smolvm::exec`, on one sandbox, interleaved in one run. The SDK is the pinned one of the
//! serve tests (`scripts/test-clients.sh` installs it, cached).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use smolvm::sandbox::Smolvm;

use super::{ms, Report};

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The CLI with this run's home and images.
fn cli(sm: &Smolvm, home: &Path) -> Command {
    let mut c = Command::new(&sm.config().helper);
    c.env("SMOLVM_HOME", home).env_remove("SMOLVM_LOG");
    if let Some(m) = &sm.config().images.manifest {
        c.env("SMOLVM_IMAGES_MANIFEST", m);
    }
    if let Some(u) = &sm.config().images.url_prefix {
        c.env("SMOLVM_IMAGES_URL", u);
    }
    c
}

pub fn figures(runs: usize, sm: &Smolvm, home: &Path, report: &mut Report) -> anyhow::Result<()> {
    let out = Command::new("bash").arg(repo_root().join("scripts/test-clients.sh")).output()?;
    anyhow::ensure!(out.status.success(), "scripts/test-clients.sh: {}", String::from_utf8_lossy(&out.stderr));
    let clients = std::path::PathBuf::from(String::from_utf8(out.stdout)?.trim());

    let mut serve = cli(sm, home)
        .args(["serve", "--listen", "127.0.0.1:0", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start smolvm serve")?;
    let result = (|| -> anyhow::Result<()> {
        let mut line = String::new();
        BufReader::new(serve.stdout.take().context("serve's stdout")?).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("serve printed {line:?}"))?;
        let mut py = Command::new(clients.join("venv/bin/python"))
            .arg(repo_root().join("crates/smolvm-cli/tests/clients/bench_roundtrip.py"))
            .env("E2B_API_KEY", v["env"]["E2B_API_KEY"].as_str().unwrap_or_default())
            .env("E2B_API_URL", v["url"].as_str().unwrap_or_default())
            .env("E2B_SANDBOX_URL", v["url"].as_str().unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut to_py = py.stdin.take().context("python's stdin")?;
        let mut from_py = BufReader::new(py.stdout.take().context("python's stdout")?);
        let mut answer = || -> anyhow::Result<String> {
            let mut l = String::new();
            from_py.read_line(&mut l)?;
            anyhow::ensure!(!l.is_empty(), "the SDK script ended early");
            Ok(l.trim().to_string())
        };
        let ready = answer()?;
        let id = ready.strip_prefix("ready ").with_context(|| format!("the SDK script said {ready:?}"))?.to_string();
        sm.exec(&id, &["true".into()], None, None)?;
        let (mut e2b, mut cli_exec, mut lib, mut lib_login) = (vec![], vec![], vec![], vec![]);
        // What the SDK runs for `commands.run("true")`: a login shell (it reads /etc/profile).
        let login: Vec<String> = ["/bin/bash", "-l", "-c", "true"].map(String::from).to_vec();
        for _ in 0..(runs * 10).max(30) {
            writeln!(to_py, "run")?;
            e2b.push(answer()?.parse::<f64>()?);
            let t = Instant::now();
            let st = cli(sm, home).args(["exec", &id, "--", "true"]).status()?;
            cli_exec.push(ms(t.elapsed()));
            anyhow::ensure!(st.success(), "smolvm exec failed");
            let t = Instant::now();
            anyhow::ensure!(sm.exec(&id, &["true".into()], None, None)?.code() == 0, "exec failed");
            lib.push(ms(t.elapsed()));
            let t = Instant::now();
            anyhow::ensure!(sm.exec(&id, &login, None, None)?.code() == 0, "exec failed");
            lib_login.push(ms(t.elapsed()));
        }
        writeln!(to_py, "quit")?;
        drop(to_py);
        let _ = py.wait();
        report.add("exec `true`: E2B Python SDK commands.run via smolvm serve", "ms", &e2b);
        report.add("exec `true`: smolvm exec (a CLI process)", "ms", &cli_exec);
        report.add("exec `true`: library Smolvm::exec (new agent connection)", "ms", &lib);
        report.add("exec `bash -l -c true` (the SDK's command): library", "ms", &lib_login);
        Ok(())
    })();
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let _ = serve.wait();
    result
}
