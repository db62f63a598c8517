//! `smolvm image pin DIR/<tag>`: rewrite `recipes/release.toml` from a built release.

use std::fs;
use std::path::Path;

use smolvm::digest::sha256_file;
use smolvm::images::manifest::{parse_sha256sums, ManifestError, MANIFEST_FILE, SHA256SUMS_FILE};
use smolvm::images::release_pins::{PinsError, ReleasePins};
use smolvm::images::Manifest;

/// Where releases are published unless `recipes/release.toml` already says otherwise.
pub const DEFAULT_URL_TEMPLATE: &str = "https://github.com/smolvm/smolvm/releases/download/{tag}/{asset}";

const HEADER: &str = "\
# The images this smolvm binary boots: compiled in, the single source of truth.
# Written by `smolvm image pin DIR/<tag>` from a release built by `smolvm image build all`;
# see docs/images.md. Unknown fields are an error.
";

/// Why pinning failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {reason}; the release must be rebuilt")]
    Mismatch { path: String, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the pins written would not load back: {0}")]
    RoundTrip(#[from] PinsError),
}

/// Checks every asset of `release_dir` against its manifest and `SHA256SUMS`, then writes the
/// pins to `release_toml` (atomically). Keeps the file's `url_template` if it has a valid one.
pub fn pin(release_dir: &Path, release_toml: &Path) -> Result<ReleasePins, PinError> {
    let manifest = Manifest::load(&release_dir.join(MANIFEST_FILE))?;
    verify_release_dir(release_dir, &manifest)?;
    let url_template = fs::read_to_string(release_toml)
        .ok()
        .and_then(|t| ReleasePins::parse(&t, "existing").ok())
        .map_or_else(|| DEFAULT_URL_TEMPLATE.to_string(), |p| p.url_template);
    let pins = ReleasePins { tag: manifest.tag.clone(), url_template, assets: manifest.assets.clone() };
    let text = render(&pins);
    ReleasePins::parse(&text, "generated pins")?;
    let tmp = release_toml.with_extension("toml.tmp");
    let io = |what: String| move |source| PinError::Io { what, source };
    fs::write(&tmp, &text).map_err(io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, release_toml).map_err(io(format!("replace {}", release_toml.display())))?;
    Ok(pins)
}

/// The TOML text of `pins`, with the explanatory header.
pub fn render(pins: &ReleasePins) -> String {
    // Plain strings, integers and tables: serialization cannot fail.
    format!("{HEADER}\n{}", toml::to_string(pins).expect("pins (strings and integers) serialize"))
}

/// Every asset exists with the manifest's size and SHA-256, and `SHA256SUMS` agrees.
pub fn verify_release_dir(dir: &Path, manifest: &Manifest) -> Result<(), PinError> {
    let sums_path = dir.join(SHA256SUMS_FILE);
    let sums_text = fs::read_to_string(&sums_path)
        .map_err(|source| PinError::Io { what: format!("read {}", sums_path.display()), source })?;
    let sums = parse_sha256sums(&sums_text)
        .map_err(|reason| PinError::Mismatch { path: sums_path.display().to_string(), reason })?;
    for a in &manifest.assets {
        let path = dir.join(&a.name);
        let mismatch = |reason: String| PinError::Mismatch { path: path.display().to_string(), reason };
        let (size, sha) = sha256_file(&path).map_err(|e| mismatch(format!("cannot read: {e}")))?;
        if size != a.size || sha != a.sha256 {
            return Err(mismatch(format!(
                "manifest says {} bytes, sha256 {}; file has {size} bytes, sha256 {sha}",
                a.size, a.sha256
            )));
        }
        if !sums.iter().any(|(h, n)| n == &a.name && h == &a.sha256) {
            return Err(mismatch(format!("{SHA256SUMS_FILE} does not list it with sha256 {}", a.sha256)));
        }
    }
    Ok(())
}
