//! One published file of a release, as both `manifest.json` and `recipes/release.toml` list it.

use serde::{Deserialize, Serialize};

use crate::digest::is_sha256_hex;

/// What an asset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetKind {
    Kernel,
    Rootfs,
    /// A preset's tooling: the files it adds to the base rootfs, stacked over it in the guest.
    Layer,
}

/// The bytes' format (after decompression, for a `.zst` asset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Uncompressed ELF `vmlinux` with a PVH note: QEMU `microvm`, Firecracker.
    Elf,
    /// x86 `bzImage`: QEMU `q35`/`pc`.
    Bzimage,
    /// A raw ext4 filesystem image.
    Ext4,
}

/// Size and SHA-256 of some bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    pub size: u64,
    pub sha256: String,
}

/// A release asset. For a `.zst` asset, `size`/`sha256` describe the compressed file and
/// `uncompressed` the bytes it decompresses to; both are checked when it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub name: String,
    pub kind: AssetKind,
    pub arch: String,
    pub format: Format,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed: Option<Blob>,
    /// For a layer: the preset it belongs to (`codex`, `claude-code`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
}

impl Asset {
    /// True when the asset is zstd-compressed (its name says so).
    pub fn is_zstd(&self) -> bool {
        self.name.ends_with(".zst")
    }

    /// Checks what serde cannot: hex digests, a plain file name, `uncompressed` iff `.zst`.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') || self.name.starts_with('.') {
            return Err(format!("asset name {:?} must be a plain file name", self.name));
        }
        if !is_sha256_hex(&self.sha256) {
            return Err(format!("asset {}: sha256 {:?} is not 64 lowercase hex digits", self.name, self.sha256));
        }
        if (self.kind == AssetKind::Layer) != self.preset.is_some() {
            return Err(format!("asset {}: a layer names its preset, and only a layer does", self.name));
        }
        match (&self.uncompressed, self.is_zstd()) {
            (Some(u), true) if !is_sha256_hex(&u.sha256) => {
                Err(format!("asset {}: uncompressed.sha256 {:?} is not 64 lowercase hex digits", self.name, u.sha256))
            }
            (None, true) => Err(format!("asset {}: a .zst asset needs `uncompressed` (size, sha256)", self.name)),
            (Some(_), false) => Err(format!("asset {}: only .zst assets have `uncompressed`", self.name)),
            _ => Ok(()),
        }
    }

    /// The SHA-256 of the bytes a sandbox uses (after decompression).
    pub fn content_sha256(&self) -> &str {
        self.uncompressed.as_ref().map_or(&self.sha256, |u| &u.sha256)
    }
}
