//! Which assets to use and where to download them from.
//!
//! By default: the pins compiled into the binary, downloaded from the release URL they name.
//! Two overrides change that (`config::ImageOverrides`; the CLI takes them from these
//! environment variables), for air-gapped hosts, mirrors and tests:
//!
//! - `SMOLVM_IMAGES_URL=<prefix>`: download `<prefix>/<tag>/<asset>` instead. That is the layout
//!   `smolvm image build all --out DIR` writes, so serving `DIR` over HTTP makes a mirror.
//! - `SMOLVM_IMAGES_MANIFEST=<path|url>`: use another release's `manifest.json` (an unpublished
//!   or newer release) instead of the compiled-in pins. Its assets are still checked against its
//!   own SHA-256 values, but those are no longer pinned by this binary: a warning says so.

use std::path::Path;

use super::asset::{Asset, AssetKind, Format};
use super::manifest::{Manifest, ManifestError};
use super::release_pins::ReleasePins;

/// Where the asset list comes from, and where assets are downloaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub tag: String,
    pub assets: Vec<Asset>,
    /// `{tag}`/`{asset}` template, or `<prefix>/{tag}/{asset}` from `SMOLVM_IMAGES_URL`.
    url_template: String,
    /// Set when the compiled-in pins are not in force: the one-line warning to print.
    pub pins_overridden: Option<String>,
    /// Where the asset list came from.
    pub origin: ReleaseOrigin,
    /// For a manifest given as a local path: its directory, where its assets are read from
    /// (unless a mirror prefix is given).
    pub local_dir: Option<std::path::PathBuf>,
}

/// Where a source's asset list came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "from")]
pub enum ReleaseOrigin {
    /// The pins compiled into this binary.
    Compiled,
    /// The release `smolvm image import` made this home's default (checked by its digests).
    Imported(String),
    /// A manifest given for this run (`SMOLVM_IMAGES_MANIFEST`).
    Override(String),
}

/// Why the image source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the compiled-in pins are invalid: {0}")]
    Pins(String),
    #[error("the release manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("the release manifest {url}: download failed: {reason}")]
    ManifestDownload { url: String, reason: String },
    #[error("{url}: a manifest over plain http is refused (whoever alters it in transit chooses the digests)")]
    InsecureManifest { url: String },
    #[error("the release {tag} has no {what} asset for x86_64")]
    Missing { tag: String, what: &'static str },
}

impl ImageSource {
    /// The source for these overrides (see the module docs): the compiled-in pins when both
    /// are `None`.
    pub fn resolve(manifest: Option<&str>, url_prefix: Option<&str>) -> Result<ImageSource, SourceError> {
        let pins = ReleasePins::compiled().map_err(|e| SourceError::Pins(e.to_string()))?;
        let mut src = match manifest {
            None => ImageSource {
                tag: pins.tag.clone(),
                assets: pins.assets.clone(),
                url_template: pins.url_template.clone(),
                pins_overridden: None,
                origin: ReleaseOrigin::Compiled,
                local_dir: None,
            },
            Some(loc) => {
                let m = load_manifest(loc)?;
                let what = if m.tag == pins.tag {
                    format!("release {} with other digests than the ones pinned in this binary", m.tag)
                } else {
                    format!("release {} instead of the one pinned in this binary ({})", m.tag, pins.tag)
                };
                let local_dir = (!is_url(loc)).then(|| {
                    let p = Path::new(loc);
                    p.parent().map(Path::to_path_buf).unwrap_or_default()
                });
                ImageSource {
                    pins_overridden: Some(format!("warning: the manifest {loc}: using {what}")),
                    tag: m.tag,
                    assets: m.assets,
                    // Assets of a manifest given by URL sit next to it.
                    url_template: match loc.rsplit_once('/') {
                        Some((dir, _)) if is_url(loc) => format!("{dir}/{{asset}}"),
                        _ => pins.url_template.clone(),
                    },
                    origin: ReleaseOrigin::Override(loc.to_string()),
                    local_dir,
                }
            }
        };
        if let Some(prefix) = url_prefix {
            src.url_template = format!("{}/{{tag}}/{{asset}}", prefix.trim_end_matches('/'));
            src.local_dir = None;
        }
        Ok(src)
    }

    /// The release `smolvm image import` recorded as a home's default (`path`, a copy of its
    /// manifest): its assets are in the cache already, checked against these digests.
    pub fn imported(path: &Path) -> Result<ImageSource, SourceError> {
        let mut src = ImageSource::resolve(path.to_str(), None)?;
        src.origin = ReleaseOrigin::Imported(src.tag.clone());
        src.pins_overridden = None;
        src.local_dir = None;
        Ok(src)
    }

    /// Whether every asset is pinned, as is, in this binary.
    pub fn is_pinned(&self) -> bool {
        ReleasePins::compiled().is_ok_and(|p| self.assets.iter().all(|a| p.assets.contains(a)))
    }

    /// The download URL of an asset.
    pub fn url(&self, asset: &Asset) -> String {
        self.url_template.replace("{tag}", &self.tag).replace("{asset}", &asset.name)
    }

    fn find(&self, kind: AssetKind, format: Format, what: &'static str) -> Result<&Asset, SourceError> {
        self.assets
            .iter()
            .find(|a| a.kind == kind && a.format == format && a.arch == "x86_64")
            .ok_or_else(|| SourceError::Missing { tag: self.tag.clone(), what })
    }

    /// The PVH ELF kernel (QEMU `microvm`, Firecracker).
    pub fn kernel(&self) -> Result<&Asset, SourceError> {
        self.find(AssetKind::Kernel, Format::Elf, "kernel (ELF)")
    }

    /// The layer of a preset.
    pub fn layer(&self, preset: &str) -> Result<&Asset, SourceError> {
        self.assets
            .iter()
            .find(|a| a.kind == AssetKind::Layer && a.preset.as_deref() == Some(preset) && a.arch == "x86_64")
            .ok_or_else(|| SourceError::Missing { tag: self.tag.clone(), what: "preset layer" })
    }

    /// The base rootfs.
    pub fn base_rootfs(&self) -> Result<&Asset, SourceError> {
        self.find(AssetKind::Rootfs, Format::Ext4, "base rootfs")
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn load_manifest(loc: &str) -> Result<Manifest, SourceError> {
    if !is_url(loc) {
        return Ok(Manifest::load(Path::new(loc))?);
    }
    let fail = |reason: String| SourceError::ManifestDownload { url: loc.to_string(), reason };
    let text = super::fetch::http_agent()
        .get(loc)
        .call()
        .map_err(|e| fail(e.to_string()))?
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    Ok(Manifest::parse(&text, loc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_pins_and_prefix_override() {
        let src = ImageSource::resolve(None, None).unwrap();
        assert!(src.pins_overridden.is_none());
        let base = src.base_rootfs().unwrap().clone();
        assert!(src.url(&base).contains(&format!("/releases/download/{}/", src.tag)));
        let mirrored = ImageSource::resolve(None, Some("http://127.0.0.1:8000/")).unwrap();
        assert_eq!(mirrored.url(&base), format!("http://127.0.0.1:8000/{}/{}", src.tag, base.name));
    }

    #[test]
    fn a_manifest_path_overrides_the_pins_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let pins = ReleasePins::compiled().unwrap();
        let m = Manifest { tag: "images-2030.01.02.3".into(), created: "x".into(), assets: pins.assets.clone() };
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, m.to_json()).unwrap();
        let src = ImageSource::resolve(path.to_str(), Some("http://127.0.0.1:1")).unwrap();
        assert_eq!(src.tag, "images-2030.01.02.3");
        assert!(src.pins_overridden.as_deref().unwrap().contains("instead of the one pinned"));
        assert!(src.url(src.kernel().unwrap()).starts_with("http://127.0.0.1:1/images-2030.01.02.3/"));
        assert_eq!(src.local_dir, None, "a mirror prefix wins over the manifest's directory");
        let local = ImageSource::resolve(path.to_str(), None).unwrap();
        assert_eq!(local.local_dir.as_deref(), Some(dir.path()), "assets are read next to a local manifest");
        // The same tag with other digests is said so, not "tag X instead of tag X".
        let same = Manifest { tag: pins.tag.clone(), created: "x".into(), assets: vec![] };
        std::fs::write(&path, same.to_json()).unwrap();
        let w = ImageSource::resolve(path.to_str(), None).unwrap().pins_overridden.unwrap();
        assert!(w.contains("with other digests") && w.matches(&pins.tag).count() == 1, "{w}");
    }
}
