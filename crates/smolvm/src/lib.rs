//! smolvm: disposable, hardware-isolated Linux sandboxes for AI agents.
//!
//! This crate is the SDK: all host logic lives here, and the `smolvm` CLI is a thin layer over
//! it. Modules:
//!
//! - [`images`]: what a smolvm image *is* (assets, the release manifest, the pins compiled into
//!   the binary) and how the project builds and pins its own releases;
//! - [`vm`]: running guests (accelerator choice);
//! - [`net`]: the sandbox network: the policy, and the process that enforces it per connection;
//! - [`digest`], [`lock`], [`timefmt`]: small shared utilities.

pub mod agent;
pub mod child;
pub mod config;
pub mod digest;
pub mod error;
pub mod images;
pub mod jail;
pub mod lock;
pub mod net;
pub mod paths;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod text;
pub mod timefmt;
pub mod vm;
