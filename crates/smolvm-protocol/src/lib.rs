//! The contract between the smolvm host and `smolvm-init`, the guest's PID 1.
//!
//! Both sides depend on this crate, so a name or a format is written down once. Today it holds:
//!
//! - [`cmdline`]: the kernel command-line keys the host sets and the init reads;
//! - [`ready`]: the readiness line the init prints on the console once the guest is reachable.
//!
//! # Compatibility
//! The readiness line carries a version ([`ready::READY_VERSION`]). Adding a field is a
//! compatible change (readers ignore unknown fields); renaming, removing or changing the meaning
//! of a field is not, and bumps the version. Tests in each module pin the exact text.

pub mod agent;
pub mod cmdline;
pub mod ready;
