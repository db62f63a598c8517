//! Building a release from source: the guest kernel, the init, the base rootfs.
//!
//! The heavy lifting is done by the project's recipe scripts (`recipes/kernel/build.sh`,
//! `recipes/base/build.sh`), which stay readable and runnable by hand; this module owns what a
//! script does badly: cache keys, locking, atomic results, hashing, the manifest and a report.
//!
//! Every intermediate is cached under the build cache (default `/var/cache/smolvm/build` for
//! root, else `$XDG_CACHE_HOME/smolvm/build`), keyed by the SHA-256 of its recipe: the inputs
//! that determine its bytes. A second build of an unchanged recipe is instant; a killed build
//! leaves only a `*.tmp-*` directory that the next build removes.

mod base;
mod cache;
mod compress;
mod init;
mod kernel;
pub mod pinning;
mod preset;
mod release;
mod run;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

pub use base::{build_base, build_base_into, BaseBuild, BASE_ROOTFS_FILE};
pub use init::build_init;
pub use kernel::{build_kernel, KernelBuild, KERNEL_BZIMAGE_FILE, KERNEL_ELF_FILE};
pub use preset::{build_layer, layer_file, presets};
pub use release::{build_release, source_date_epoch, ReleaseBuild};

/// Why a build failed. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot find the smolvm source checkout (a directory with recipes/release.toml): building images needs one"
    )]
    NoCheckout,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("`{command}` failed ({status}){hint}")]
    Command { command: String, status: String, hint: String },
    #[error("{0}")]
    Invalid(String),
}

impl BuildError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
        let what = what.into();
        move |source| BuildError::Io { what, source }
    }
}

/// Where sources and the cache are, and how much CPU to use.
#[derive(Debug, Clone)]
pub struct BuildEnv {
    /// The source checkout (holds `recipes/` and the workspace `Cargo.toml`).
    pub source: PathBuf,
    /// The build cache.
    pub cache: PathBuf,
    /// Parallel jobs for the kernel build.
    pub jobs: usize,
}

impl BuildEnv {
    /// Finds the checkout (from `source`, else upwards from the current directory) and the cache (from `cache`, `SMOLVM_BUILD_CACHE`, or the
    /// default).
    pub fn discover(source: Option<PathBuf>, cache: Option<PathBuf>) -> Result<BuildEnv, BuildError> {
        let is_checkout = |p: &Path| p.join("recipes/release.toml").is_file() && p.join("Cargo.toml").is_file();
        let source = match source {
            Some(s) if is_checkout(&s) => s,
            Some(_) => return Err(BuildError::NoCheckout),
            None => {
                let cwd = std::env::current_dir().map_err(BuildError::io("current directory"))?;
                cwd.ancestors().find(|p| is_checkout(p)).map(Path::to_path_buf).ok_or(BuildError::NoCheckout)?
            }
        };
        let source = source.canonicalize().map_err(BuildError::io("resolve the source checkout"))?;
        let cache =
            cache.or_else(|| std::env::var_os("SMOLVM_BUILD_CACHE").map(PathBuf::from)).unwrap_or_else(default_cache);
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(BuildEnv { source, cache, jobs })
    }

    pub(crate) fn recipe(&self, rel: &str) -> PathBuf {
        self.source.join("recipes").join(rel)
    }
}

fn default_cache() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/smolvm/build");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("smolvm/build")
}

/// One step of a build, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    /// True when the result came from the cache.
    pub cached: bool,
    pub detail: String,
}

/// Timing of each step of a build.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    /// Runs `f` as a step named `name`; `f` returns its result, whether it was cached, and a
    /// detail line.
    pub fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, bool, String), BuildError>,
    ) -> Result<T, BuildError> {
        tracing::info!("{name}: starting");
        let start = Instant::now();
        let (value, cached, detail) = f()?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!("{name}: {detail} ({seconds:.1} s{})", if cached { ", cached" } else { "" });
        self.steps.push(Step { name: name.to_string(), seconds, cached, detail });
        Ok(value)
    }
}
