//! A release's `manifest.json` and `SHA256SUMS`.
//!
//! `manifest.json` is what `smolvm image pin` reads and what `SMOLVM_IMAGES_MANIFEST` points at;
//! `SHA256SUMS` lets anyone check a downloaded release with `sha256sum -c`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::asset::Asset;
use super::tag::Tag;

/// File names inside a release directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const SHA256SUMS_FILE: &str = "SHA256SUMS";

/// A release's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub tag: String,
    /// RFC 3339 UTC time the release was assembled.
    pub created: String,
    pub assets: Vec<Asset>,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}: not a valid release manifest: {source}")]
    Parse { origin: String, source: serde_json::Error },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
}

impl Manifest {
    /// Parses and validates; `origin` (a path or URL) names the manifest in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            serde_json::from_str(text).map_err(|source| ManifestError::Parse { origin: origin.to_string(), source })?;
        let invalid = |reason: String| ManifestError::Invalid { origin: origin.to_string(), reason };
        Tag::parse(&m.tag).map_err(invalid)?;
        for a in &m.assets {
            a.validate().map_err(invalid)?;
        }
        Ok(m)
    }

    /// Reads `path` (a `manifest.json`).
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Read { path: path.display().to_string(), source })?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        // A struct of strings, integers and enums always serializes.
        serde_json::to_string_pretty(self).expect("a manifest serializes") + "\n"
    }

    /// `SHA256SUMS` in `sha256sum` format: `<hex>  <name>` per asset.
    pub fn sha256sums(&self) -> String {
        self.assets.iter().map(|a| format!("{}  {}\n", a.sha256, a.name)).collect()
    }

    /// The asset called `name`.
    pub fn asset(&self, name: &str) -> Option<&Asset> {
        self.assets.iter().find(|a| a.name == name)
    }
}

/// Parses `sha256sum` output (text or binary mode markers) into `(sha256, name)` pairs.
pub fn parse_sha256sums(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (hash, rest) = l.split_once(' ').ok_or_else(|| format!("malformed SHA256SUMS line {l:?}"))?;
            let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*')).unwrap_or(rest);
            if !crate::digest::is_sha256_hex(hash) || name.is_empty() {
                return Err(format!("malformed SHA256SUMS line {l:?}"));
            }
            Ok((hash.to_string(), name.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{AssetKind, Blob, Format};

    fn sample() -> Manifest {
        Manifest {
            tag: "images-2026.12.01.1".into(),
            created: "2026-12-01T00:00:00Z".into(),
            assets: vec![Asset {
                name: "base-x86_64-rootfs.ext4.zst".into(),
                kind: AssetKind::Rootfs,
                arch: "x86_64".into(),
                format: Format::Ext4,
                size: 10,
                sha256: "a".repeat(64),
                uncompressed: Some(Blob { size: 100, sha256: "b".repeat(64) }),
                preset: None,
            }],
        }
    }

    #[test]
    fn round_trips_and_sums_parse() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_json(), "t").unwrap(), m);
        let sums = parse_sha256sums(&m.sha256sums()).unwrap();
        assert_eq!(sums, vec![("a".repeat(64), "base-x86_64-rootfs.ext4.zst".to_string())]);
        assert!(parse_sha256sums("xyz  f\n").is_err());
    }

    #[test]
    fn json_field_names_are_pinned() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        let a = &v["assets"][0];
        assert_eq!(a["kind"], "rootfs");
        assert_eq!(a["format"], "ext4");
        assert_eq!(a["uncompressed"]["size"], 100);
    }

    #[test]
    fn a_misspelt_field_fails_to_load() {
        let text = sample().to_json().replace("\"created\"", "\"craeted\"");
        let err = Manifest::parse(&text, "m.json").unwrap_err().to_string();
        assert!(err.contains("craeted") && err.contains("m.json"), "{err}");
    }
}
