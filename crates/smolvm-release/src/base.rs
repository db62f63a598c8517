//! The base rootfs: Debian trixie minbase plus what an agent sandbox needs, stripped, with
//! `smolvm-init` at `/init`, as a reproducible ext4 image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, RecipeHash};
use crate::run::run;
use crate::{BuildEnv, BuildError};
use smolvm::digest::sha256_file;

/// The ext4 image's file name inside a build directory (the release asset adds `.zst`).
pub const BASE_ROOTFS_FILE: &str = "base-x86_64-rootfs.ext4";
/// The Debian release the base is made of.
pub const BASE_SUITE: &str = "trixie";

/// A built base rootfs.
#[derive(Debug, Clone)]
pub struct BaseBuild {
    /// Directory holding [`BASE_ROOTFS_FILE`] and `<it>.packages` (the installed versions).
    pub dir: PathBuf,
}

impl BaseBuild {
    pub fn ext4(&self) -> PathBuf {
        self.dir.join(BASE_ROOTFS_FILE)
    }
}

/// The recipe key: the script, the package list, the overlay tree, the init's bytes, the suite
/// and the epoch. (Debian's package *versions* are not in it: the cache holds the base built
/// from the archive as it was then. Delete the entry, or bump the tag, to take updates.)
fn recipe_key(env: &BuildEnv, init: &Path, epoch: i64) -> Result<String, BuildError> {
    let (_, init_sha) = sha256_file(init).map_err(BuildError::io(format!("read {}", init.display())))?;
    let mut h = RecipeHash::new("base");
    h.text("suite", BASE_SUITE).text("epoch", &epoch.to_string()).text("init-sha256", &init_sha);
    h.file("build.sh", &env.recipe("base/build.sh"))?.file("packages", &env.recipe("base/packages"))?;
    h.tree("overlay", &env.recipe("base/overlay"))?;
    Ok(h.key())
}

/// Runs the recipe into `out_dir` (no cache). Used by [`build_base`], and by the test that
/// checks two builds give the same bytes.
pub fn build_base_into(env: &BuildEnv, init: &Path, epoch: i64, out_dir: &Path) -> Result<PathBuf, BuildError> {
    let out = out_dir.join(BASE_ROOTFS_FILE);
    run(
        Command::new("bash")
            .arg(env.recipe("base/build.sh"))
            .arg(&out)
            .arg(init)
            .arg(env.recipe("base/packages"))
            .arg(env.recipe("base/overlay"))
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("SMOLVM_BASE_SUITE", BASE_SUITE),
        "the base rootfs build failed; its messages are above (it needs root and the Debian mirror)",
    )?;
    Ok(out)
}

/// Builds (or finds in the cache) the base rootfs around the given init binary.
pub fn build_base(env: &BuildEnv, init: &Path, epoch: i64) -> Result<(BaseBuild, bool), BuildError> {
    let key = recipe_key(env, init, epoch)?;
    let (dir, hit) = cache::entry(env, "base", &key, |tmp| build_base_into(env, init, epoch, tmp).map(|_| ()))?;
    Ok((BaseBuild { dir }, hit))
}
