//! `smolvm image ...`

use std::fs;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use smolvm::images::build::{self, BuildEnv, Report};
use smolvm::images::tag::Tag;
use smolvm::images::{pin, ReleasePins};

use super::{print_json, say};
use crate::cli::{BuildArgs, BuildCommand, ImageCommand};

pub fn run(cmd: ImageCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(b) => run_build(b, json),
        ImageCommand::Pin {
            release_dir,
            release_toml,
        } => {
            let toml_path = match release_toml {
                Some(p) => p,
                None => BuildEnv::discover(None, None)?
                    .source
                    .join("images/release.toml"),
            };
            let pins = pin::pin(&release_dir, &toml_path)
                .with_context(|| format!("pin {}", release_dir.display()))?;
            if json {
                return print_json(&pins);
            }
            say(format!(
                "pinned {} ({} assets) in {}",
                pins.tag,
                pins.assets.len(),
                toml_path.display()
            ));
            say("rebuild smolvm (cargo build) to compile the new pins in");
            Ok(())
        }
        ImageCommand::Show => {
            let pins = ReleasePins::compiled().map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                return print_json(
                    &json!({ "pins": pins, "urls": pins.assets.iter().map(|a| pins.url(&a.name)).collect::<Vec<_>>() }),
                );
            }
            say(format!("IMAGES_RELEASE_TAG {}", pins.tag));
            for a in &pins.assets {
                say(format!(
                    "{:<32} {:>11} bytes  sha256 {}",
                    a.name, a.size, a.sha256
                ));
                say(format!("  {}", pins.url(&a.name)));
            }
            Ok(())
        }
    }
}

fn env_for(common: &BuildArgs) -> anyhow::Result<BuildEnv> {
    fs::create_dir_all(&common.out).with_context(|| format!("create {}", common.out.display()))?;
    Ok(BuildEnv::discover(
        common.source.clone(),
        common.cache.clone(),
    )?)
}

fn copy_out(from: &Path, dir: &Path) -> anyhow::Result<()> {
    let name = from.file_name().context("output has no file name")?;
    let to = dir.join(name);
    let status = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(&to)
        .status()
        .context("run cp")?;
    anyhow::ensure!(
        status.success(),
        "copy {} to {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

fn run_build(cmd: BuildCommand, json: bool) -> anyhow::Result<()> {
    let mut report = Report::default();
    let written = match cmd {
        BuildCommand::Kernel { common } => {
            let env = env_for(&common)?;
            let k = report.step("kernel", || {
                let (k, hit) = build::build_kernel(&env)?;
                let d = format!("Debian linux-source {}", k.source_version);
                Ok((k, hit, d))
            })?;
            for f in [build::KERNEL_ELF_FILE, build::KERNEL_BZIMAGE_FILE] {
                copy_out(&k.dir.join(f), &common.out)?;
            }
            common.out
        }
        BuildCommand::Base {
            common,
            init,
            epoch,
        } => {
            let env = env_for(&common)?;
            let init = match init {
                Some(p) => p,
                None => report.step("init", || {
                    Ok((build::build_init(&env)?, false, "static smolvm-init".into()))
                })?,
            };
            let epoch = match epoch {
                Some(e) => e,
                None => {
                    let pins = ReleasePins::compiled().map_err(|e| anyhow::anyhow!("{e}"))?;
                    build::source_date_epoch(&Tag::parse(&pins.tag).map_err(anyhow::Error::msg)?)?
                }
            };
            let b = report.step("base", || {
                let (b, hit) = build::build_base(&env, &init, epoch)?;
                Ok((b, hit, build::BASE_ROOTFS_FILE.to_string()))
            })?;
            copy_out(&b.ext4(), &common.out)?;
            common.out
        }
        BuildCommand::All { common, tag, force } => {
            let env = env_for(&common)?;
            let tag = match tag {
                Some(t) => t,
                None => ReleasePins::compiled()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .tag
                    .clone(),
            };
            let r = build::build_release(&env, &tag, &common.out, force)?;
            if json {
                return print_json(
                    &json!({ "dir": r.dir, "manifest": r.manifest, "steps": r.report.steps }),
                );
            }
            print_report(&r.report);
            for a in &r.manifest.assets {
                say(format!(
                    "{:<32} {:>11} bytes  sha256 {}",
                    a.name, a.size, a.sha256
                ));
            }
            say(format!("release written to {}", r.dir.display()));
            return Ok(());
        }
    };
    if json {
        return print_json(&json!({ "dir": written, "steps": report.steps }));
    }
    print_report(&report);
    say(format!("written to {}", written.display()));
    Ok(())
}

fn print_report(report: &Report) {
    for s in &report.steps {
        say(format!(
            "{:<28} {:>8.1} s  {}{}",
            s.name,
            s.seconds,
            s.detail,
            if s.cached { " (cached)" } else { "" }
        ));
    }
}
