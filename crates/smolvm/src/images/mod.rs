//! Images: the kernels and root filesystems a sandbox boots.
//!
//! There is one definition of "a smolvm image": the assets of a release, built by this project
//! from Debian's packages (the `smolvm-release` crate), listed with their SHA-256 in the
//! release's `manifest.json` ([`manifest`]), and pinned in `recipes/release.toml`, which is
//! compiled into the binary ([`release_pins`]).

pub mod asset;
pub mod fetch;
pub mod manifest;
pub mod release_pins;
pub mod source;
pub mod tag;

pub use asset::{Asset, AssetKind, Blob, Format};
pub use manifest::Manifest;
pub use release_pins::{ReleasePins, IMAGES_RELEASE_TOML};
