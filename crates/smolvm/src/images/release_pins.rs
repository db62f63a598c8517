//! `recipes/release.toml`: the single source of truth for the images this binary uses.
//!
//! The file is compiled in (`include_str!`), so a `smolvm` binary always knows exactly which
//! bytes it will boot: the release tag (`IMAGES_RELEASE_TAG`), where assets are downloaded from,
//! and the size and SHA-256 of every asset. It is written by `smolvm image pin` and reviewed
//! like code. Unknown fields are an error: a misspelt key must not silently drop a pin.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::asset::{Asset, AssetKind};
use super::tag::Tag;

/// The text of `recipes/release.toml` as compiled into this binary.
pub const IMAGES_RELEASE_TOML: &str = include_str!("../../../../recipes/release.toml");

/// The pins of one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasePins {
    /// `IMAGES_RELEASE_TAG`: the release every pinned asset belongs to.
    pub tag: String,
    /// Where an asset is downloaded from; `{tag}` and `{asset}` are substituted.
    pub url_template: String,
    /// The base kernels and the base rootfs, each with size and SHA-256.
    pub assets: Vec<Asset>,
}

/// Why pins could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("{origin}: {source}")]
    Parse { origin: String, source: Box<toml::de::Error> },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
}

impl ReleasePins {
    /// Parses and validates pins; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ReleasePins, PinsError> {
        let pins: ReleasePins =
            toml::from_str(text).map_err(|e| PinsError::Parse { origin: origin.to_string(), source: Box::new(e) })?;
        pins.validate().map_err(|reason| PinsError::Invalid { origin: origin.to_string(), reason })?;
        Ok(pins)
    }

    /// The pins compiled into this binary. Parsed once; a test keeps the file valid.
    pub fn compiled() -> Result<&'static ReleasePins, &'static PinsError> {
        static PINS: OnceLock<Result<ReleasePins, PinsError>> = OnceLock::new();
        PINS.get_or_init(|| ReleasePins::parse(IMAGES_RELEASE_TOML, "recipes/release.toml (compiled in)")).as_ref()
    }

    fn validate(&self) -> Result<(), String> {
        Tag::parse(&self.tag)?;
        for key in ["{tag}", "{asset}"] {
            if !self.url_template.contains(key) {
                return Err(format!("url_template {:?} lacks {key}", self.url_template));
            }
        }
        if !(self.url_template.starts_with("https://") || self.url_template.starts_with("http://")) {
            return Err(format!("url_template {:?} is not an http(s) URL", self.url_template));
        }
        for a in &self.assets {
            a.validate()?;
        }
        let mut names: Vec<&str> = self.assets.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("asset {} is listed twice", w[0]));
        }
        Ok(())
    }

    /// The download URL of an asset of this release.
    pub fn url(&self, asset_name: &str) -> String {
        self.url_template.replace("{tag}", &self.tag).replace("{asset}", asset_name)
    }

    /// The first asset of a kind for an architecture (e.g. the base rootfs for x86_64).
    pub fn find(&self, kind: AssetKind, arch: &str, format: Option<super::Format>) -> Option<&Asset> {
        self.assets.iter().find(|a| a.kind == kind && a.arch == arch && format.is_none_or(|f| a.format == f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::is_sha256_hex;
    use crate::images::Format;

    fn compiled() -> &'static ReleasePins {
        ReleasePins::compiled().expect("recipes/release.toml must load")
    }

    #[test]
    fn base_rootfs_url_is_at_images_release_tag() {
        let pins = compiled();
        let base = pins.find(AssetKind::Rootfs, "x86_64", Some(Format::Ext4)).expect("a base rootfs pin");
        assert_eq!(base.name, "base-x86_64-rootfs.ext4.zst");
        let url = pins.url(&base.name);
        assert!(url.ends_with(&format!("/releases/download/{}/base-x86_64-rootfs.ext4.zst", pins.tag)), "{url}");
        assert!(url.starts_with("https://"));
    }

    #[test]
    fn every_pin_is_64_hex_digits() {
        let pins = compiled();
        assert!(pins.find(AssetKind::Kernel, "x86_64", Some(Format::Elf)).is_some());
        assert!(pins.find(AssetKind::Kernel, "x86_64", Some(Format::Bzimage)).is_some());
        for a in &pins.assets {
            assert!(is_sha256_hex(&a.sha256), "{}", a.name);
            assert!(a.size > 0, "{}", a.name);
            if let Some(u) = &a.uncompressed {
                assert!(is_sha256_hex(&u.sha256), "{}", a.name);
                assert!(u.size >= a.size, "{}", a.name);
            }
        }
    }

    #[test]
    fn a_misspelt_field_fails_to_load() {
        let misspelt = IMAGES_RELEASE_TOML.replacen("sha256 =", "sha265 =", 1);
        assert_ne!(misspelt, IMAGES_RELEASE_TOML);
        let err = ReleasePins::parse(&misspelt, "test").unwrap_err().to_string();
        assert!(err.contains("sha265"), "{err}");
        let extra = format!("{IMAGES_RELEASE_TOML}\nmirror = \"x\"\n");
        assert!(ReleasePins::parse(&extra, "test").unwrap_err().to_string().contains("mirror"));
    }

    #[test]
    fn bad_digest_and_bad_tag_are_rejected() {
        let pins = compiled();
        let a = &pins.assets[0];
        let bad = IMAGES_RELEASE_TOML.replacen(&a.sha256, &a.sha256[..63], 1);
        assert!(ReleasePins::parse(&bad, "t").unwrap_err().to_string().contains("64 lowercase hex"));
        let bad_tag = IMAGES_RELEASE_TOML.replacen(&pins.tag, "v1", 1);
        assert!(ReleasePins::parse(&bad_tag, "t").unwrap_err().to_string().contains("images-YYYY.MM.DD.N"));
    }
}
