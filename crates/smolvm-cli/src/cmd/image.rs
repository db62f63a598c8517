//! `smolvm image ...`

use std::fs;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use smolvm::images::tag::Tag;
use smolvm::images::{Manifest, ReleasePins};
use smolvm_release::pinning as pin;
use smolvm_release::{self as build, BuildEnv, Report};

use super::{print_json, say};
use crate::cli::{BuildArgs, BuildCommand, ImageCommand};
use crate::progress::Progress;

pub fn run(cmd: ImageCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(b) => run_build(b, json),
        ImageCommand::Pin { release_dir, release_toml } => {
            let toml_path = match release_toml {
                Some(p) => p,
                None => BuildEnv::discover(None, None)?.source.join("recipes/release.toml"),
            };
            let pins = pin::pin(&release_dir, &toml_path).with_context(|| format!("pin {}", release_dir.display()))?;
            if json {
                return print_json(&pins);
            }
            say(format!("pinned {} ({} assets) in {}", pins.tag, pins.assets.len(), toml_path.display()));
            say("rebuild smolvm (cargo build) to compile the new pins in");
            Ok(())
        }
        ImageCommand::Pull { preset } => {
            let sm = super::sandbox::open()?;
            let src = sm.image_source()?;
            if let Some(w) = &src.pins_overridden {
                eprintln!("{w}");
            }
            let mut progress = Progress::new(json);
            let images = sm.ensure_images(&src, preset.as_deref(), &mut |e| progress.event(e))?;
            if json {
                return print_json(&json!({ "tag": images.tag, "kernel": images.kernel, "rootfs": images.rootfs }));
            }
            say(format!("release {}: kernel and base rootfs verified in {}", images.tag, sm.home().images().display()));
            Ok(())
        }
        ImageCommand::List => {
            let sm = super::sandbox::open()?;
            let images = sm.images().list();
            if json {
                return print_json(&images);
            }
            say(format!("{:<64} {:>12} {:>12}", "SHA256 (content)", "SIZE", "ON DISK"));
            for i in images {
                say(format!("{:<64} {:>12} {:>12}", i.sha256, i.size, i.allocated));
            }
            Ok(())
        }
        ImageCommand::Verify => {
            let sm = super::sandbox::open()?;
            let mut bad = Vec::new();
            for i in sm.images().list() {
                let good = sm.images().verify(&i).with_context(|| format!("verify {}", i.path.display()))?;
                if !json {
                    say(format!("{} {}", if good { "ok     " } else { "REMOVED" }, i.sha256));
                }
                if !good {
                    bad.push(i.sha256);
                }
            }
            if json {
                print_json(&json!({ "removed": bad }))?;
            }
            anyhow::ensure!(
                bad.is_empty(),
                "{} cached image(s) failed verification and were removed; `smolvm image pull` fetches them again",
                bad.len()
            );
            Ok(())
        }
        ImageCommand::Prune => {
            let r = super::sandbox::open()?.prune_images()?;
            if json {
                return print_json(&json!({ "removed": r.removed, "bytes_freed": r.bytes_freed }));
            }
            say(format!("removed {} image(s), freed {} bytes", r.removed.len(), r.bytes_freed));
            Ok(())
        }
        ImageCommand::Import { release_dir } => {
            let sm = super::sandbox::open()?;
            let manifest = Manifest::load(&release_dir.join("manifest.json"))?;
            pin::verify_release_dir(&release_dir, &manifest)?;
            sm.import_release(&release_dir, &manifest).with_context(|| format!("import {}", release_dir.display()))?;
            // The pins are in force for this release if each of its assets is pinned as is (a
            // release built without the preset layers still qualifies).
            let pinned = ReleasePins::compiled()
                .map(|p| p.tag == manifest.tag && manifest.assets.iter().all(|a| p.assets.contains(a)))
                .unwrap_or(false);
            if json {
                return print_json(&json!({
                    "tag": manifest.tag, "assets": manifest.assets.len(), "matches_pins": pinned, "default": true,
                }));
            }
            say(format!(
                "imported {} ({} assets, SHA256SUMS checked); it is now this home's release{}",
                manifest.tag,
                manifest.assets.len(),
                if pinned { " (the one pinned in this binary)" } else { " (not the one pinned in this binary)" }
            ));
            Ok(())
        }
        ImageCommand::Show => {
            let pins = ReleasePins::compiled().map_err(|e| anyhow::anyhow!("{e}"))?;
            let src = super::sandbox::open()?.image_source()?;
            let in_use = json!({ "tag": src.tag, "origin": src.origin, "pinned": src.is_pinned() });
            if json {
                return print_json(&json!({
                    "in_use": in_use,
                    "pins": pins,
                    "urls": pins.assets.iter().map(|a| pins.url(&a.name)).collect::<Vec<_>>(),
                }));
            }
            let origin = match &src.origin {
                smolvm::images::source::ReleaseOrigin::Compiled => "the release pinned in this binary".to_string(),
                smolvm::images::source::ReleaseOrigin::Imported(_) => {
                    "imported into this home (smolvm image import)".into()
                }
                smolvm::images::source::ReleaseOrigin::Override(loc) => format!("SMOLVM_IMAGES_MANIFEST={loc}"),
            };
            say(format!(
                "in use: {} ({origin}; {})",
                src.tag,
                if src.is_pinned() { "pinned" } else { "not pinned in this binary" }
            ));
            say(format!("IMAGES_RELEASE_TAG {}", pins.tag));
            for a in &pins.assets {
                say(format!("{:<32} {:>11} bytes  sha256 {}", a.name, a.size, a.sha256));
                say(format!("  {}", pins.url(&a.name)));
            }
            Ok(())
        }
    }
}
fn env_for(common: &BuildArgs) -> anyhow::Result<BuildEnv> {
    fs::create_dir_all(&common.out).with_context(|| format!("create {}", common.out.display()))?;
    Ok(BuildEnv::discover(common.source.clone(), common.cache.clone())?)
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
    anyhow::ensure!(status.success(), "copy {} to {} failed", from.display(), to.display());
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
        BuildCommand::Base { common, init, epoch } => {
            let env = env_for(&common)?;
            let init = match init {
                Some(p) => p,
                None => report.step("init", || Ok((build::build_init(&env)?, false, "static smolvm-init".into())))?,
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
        BuildCommand::Preset { name, common } => {
            let env = env_for(&common)?;
            let init = report.step("init", || Ok((build::build_init(&env)?, false, "static smolvm-init".into())))?;
            let pins = ReleasePins::compiled().map_err(|e| anyhow::anyhow!("{e}"))?;
            let epoch = build::source_date_epoch(&Tag::parse(&pins.tag).map_err(anyhow::Error::msg)?)?;
            let b = report.step("base", || {
                let (b, hit) = build::build_base(&env, &init, epoch)?;
                Ok((b, hit, build::BASE_ROOTFS_FILE.to_string()))
            })?;
            let layer = report.step(&format!("layer {name}"), || {
                let (p, hit) = build::build_layer(&env, &name, &b.ext4(), epoch)?;
                Ok((p, hit, build::layer_file(&name)))
            })?;
            copy_out(&layer, &common.out)?;
            common.out
        }
        BuildCommand::All { common, tag, force, no_presets } => {
            let env = env_for(&common)?;
            let tag = match tag {
                Some(t) => t,
                None => ReleasePins::compiled().map_err(|e| anyhow::anyhow!("{e}"))?.tag.clone(),
            };
            let r = build::build_release(&env, &tag, &common.out, force, !no_presets)?;
            if json {
                return print_json(&json!({ "dir": r.dir, "manifest": r.manifest, "steps": r.report.steps }));
            }
            print_report(&r.report);
            for a in &r.manifest.assets {
                say(format!("{:<32} {:>11} bytes  sha256 {}", a.name, a.size, a.sha256));
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
        say(format!("{:<28} {:>8.1} s  {}{}", s.name, s.seconds, s.detail, if s.cached { " (cached)" } else { "" }));
    }
}
