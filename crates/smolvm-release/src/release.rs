//! `smolvm image build all`: every asset of a release, its manifest and `SHA256SUMS`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::base::{build_base, BASE_ROOTFS_FILE};
use crate::compress::{zstd_cached, ZSTD_ARGS, ZSTD_LAYER_ARGS};
use crate::init::build_init;
use crate::kernel::{build_kernel, KERNEL_BZIMAGE_FILE, KERNEL_ELF_FILE};
use crate::preset::{build_layer, presets as all_presets};
use crate::run::copy_sparse;
use crate::{BuildEnv, BuildError, Report};
use smolvm::digest::sha256_file;
use smolvm::images::manifest::{MANIFEST_FILE, SHA256SUMS_FILE};
use smolvm::images::tag::Tag;
use smolvm::images::{Asset, AssetKind, Blob, Format, Manifest};
use smolvm::timefmt::{now_secs, rfc3339_utc};

/// A finished release directory.
#[derive(Debug, Clone)]
pub struct ReleaseBuild {
    /// `<out>/<tag>/`.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub report: Report,
}

/// What goes into the release, before hashing.
struct Planned {
    file: PathBuf,
    name: String,
    kind: AssetKind,
    format: Format,
    /// For a `.zst` asset: the uncompressed file it was made from.
    uncompressed: Option<PathBuf>,
    preset: Option<String>,
}

fn blob(path: &Path) -> Result<Blob, BuildError> {
    let (size, sha256) = sha256_file(path).map_err(BuildError::io(format!("hash {}", path.display())))?;
    Ok(Blob { size, sha256 })
}

/// The `SOURCE_DATE_EPOCH` of a build: the environment's, else midnight UTC of the tag's date.
pub fn source_date_epoch(tag: &Tag) -> Result<i64, BuildError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| BuildError::Invalid(format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))),
        Err(_) => Ok(tag.epoch()),
    }
}

/// Builds every asset and writes `<out>/<tag>/`. The directory appears whole: it is assembled
/// under a temporary name and renamed. An existing release directory is an error unless
/// `replace` is set, so that a published release is never overwritten by accident. With
/// `presets` false the preset layers are left out (a release for `create` only, which builds
/// in a third of the time).
pub fn build_release(
    env: &BuildEnv,
    tag: &str,
    out: &Path,
    replace: bool,
    presets: bool,
) -> Result<ReleaseBuild, BuildError> {
    let parsed = Tag::parse(tag).map_err(BuildError::Invalid)?;
    let epoch = source_date_epoch(&parsed)?;
    let final_dir = out.join(tag);
    if final_dir.exists() && !replace {
        return Err(BuildError::Invalid(format!(
            "{} already exists: remove it, pass --force to replace it, or choose another --tag",
            final_dir.display()
        )));
    }
    let mut report = Report::default();
    let kernel = report.step("kernel", || {
        let (k, hit) = build_kernel(env)?;
        let detail = format!("Debian linux-source {}", k.source_version);
        Ok((k, hit, detail))
    })?;
    let init = report.step("init", || Ok((build_init(env)?, false, "static smolvm-init".to_string())))?;
    let base = report.step("base", || {
        let (b, hit) = build_base(env, &init, epoch)?;
        let detail =
            format!("{BASE_ROOTFS_FILE}, {} bytes apparent", fs::metadata(b.ext4()).map(|m| m.len()).unwrap_or(0));
        Ok((b, hit, detail))
    })?;

    let mut planned = vec![
        (kernel.dir.join(KERNEL_ELF_FILE), AssetKind::Kernel, Format::Elf, true, None),
        (kernel.dir.join(KERNEL_BZIMAGE_FILE), AssetKind::Kernel, Format::Bzimage, false, None),
        (base.ext4(), AssetKind::Rootfs, Format::Ext4, true, None),
    ];
    for preset in all_presets().filter(|_| presets) {
        let layer = report.step(&format!("layer {preset}"), || {
            let (p, hit) = build_layer(env, preset, &base.ext4(), epoch)?;
            let detail = format!("{} bytes apparent", fs::metadata(&p).map(|m| m.len()).unwrap_or(0));
            Ok((p, hit, detail))
        })?;
        planned.push((layer, AssetKind::Layer, Format::Ext4, true, Some(preset.to_string())));
    }
    let mut assets = Vec::new();
    for (file, kind, format, compress, preset) in planned {
        let base_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !compress {
            assets.push(Planned { file, name: base_name, kind, format, uncompressed: None, preset });
            continue;
        }
        let name = format!("{base_name}.zst");
        let source = blob(&file)?;
        let zst = report.step(&format!("zstd {base_name}"), || {
            let args = if kind == AssetKind::Layer { ZSTD_LAYER_ARGS } else { ZSTD_ARGS };
            let (p, hit) = zstd_cached(env, &file, &source.sha256, args)?;
            let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            Ok((p, hit, format!("{} -> {size} bytes", source.size)))
        })?;
        assets.push(Planned { file: zst, name, kind, format, uncompressed: Some(file), preset });
    }

    fs::create_dir_all(out).map_err(BuildError::io(format!("create {}", out.display())))?;
    let staging = out.join(format!(".{tag}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = assemble(&staging, tag, &assets);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(BuildError::io(format!("remove {}", final_dir.display())))?;
    }
    fs::rename(&staging, &final_dir).map_err(BuildError::io(format!("rename into {}", final_dir.display())))?;
    Ok(ReleaseBuild { dir: final_dir, manifest, report })
}

fn assemble(staging: &Path, tag: &str, planned: &[Planned]) -> Result<Manifest, BuildError> {
    fs::create_dir_all(staging).map_err(BuildError::io(format!("create {}", staging.display())))?;
    let mut assets = Vec::new();
    for p in planned {
        let dest = staging.join(&p.name);
        copy_sparse(&p.file, &dest)?;
        let b = blob(&dest)?;
        let uncompressed = p.uncompressed.as_deref().map(blob).transpose()?;
        assets.push(Asset {
            name: p.name.clone(),
            kind: p.kind,
            arch: "x86_64".into(),
            format: p.format,
            size: b.size,
            sha256: b.sha256,
            uncompressed,
            preset: p.preset.clone(),
        });
    }
    let manifest = Manifest { tag: tag.to_string(), created: rfc3339_utc(now_secs()), assets };
    for a in &manifest.assets {
        a.validate().map_err(BuildError::Invalid)?;
    }
    let write =
        |name: &str, body: String| fs::write(staging.join(name), body).map_err(BuildError::io(format!("write {name}")));
    write(MANIFEST_FILE, manifest.to_json())?;
    write(SHA256SUMS_FILE, manifest.sha256sums())?;
    Ok(manifest)
}
