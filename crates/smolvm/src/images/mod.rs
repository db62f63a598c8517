//! Images: the kernels and root filesystems a sandbox boots.
//!
//! There is one definition of "a smolvm image": the assets of a release, built by this project
//! from Debian's packages ([`build`]), listed with their SHA-256 in the release's `manifest.json`
//! ([`manifest`]), and pinned in `images/release.toml`, which is compiled into the binary
//! ([`pins`]). `smolvm image pin` ([`pin`]) writes that file from a built release.

pub mod asset;
pub mod build;
pub mod fetch;
pub mod manifest;
pub mod pin;
pub mod pins;
pub mod source;
pub mod tag;

pub use asset::{Asset, AssetKind, Blob, Format};
pub use manifest::Manifest;
pub use pins::{ReleasePins, IMAGES_RELEASE_TOML};
