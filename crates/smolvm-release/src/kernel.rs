//! The guest kernel, from Debian's `linux-source-6.12` package (the 6.12 LTS series of trixie).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, RecipeHash};
use crate::run::{output, run};
use crate::{BuildEnv, BuildError};
use smolvm::digest::sha256_file;

/// Debian's kernel source package, and the suite it is taken from.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
pub const SOURCE_SUITE: &str = "trixie";
/// Output names (inside a build directory; the release compresses the ELF).
pub const KERNEL_ELF_FILE: &str = "vmlinux-x86_64.elf";
pub const KERNEL_BZIMAGE_FILE: &str = "vmlinux-x86_64.image";

/// A built kernel.
#[derive(Debug, Clone)]
pub struct KernelBuild {
    /// Directory holding [`KERNEL_ELF_FILE`], [`KERNEL_BZIMAGE_FILE`] and the final `config`.
    pub dir: PathBuf,
    /// The Debian source package version, e.g. `6.12.117-1`.
    pub source_version: String,
}

/// What apt knows of the source package.
struct Source {
    version: String,
    sha256: String,
    filename: String,
}

fn query_source() -> Result<Source, BuildError> {
    let hint = format!(
        "apt does not offer {SOURCE_PACKAGE} from {SOURCE_SUITE}: run scripts/install-host-deps.sh (it adds the suite, pinned low)"
    );
    let text = output(
        Command::new("apt-cache").args(["show", "--no-all-versions", &format!("{SOURCE_PACKAGE}/{SOURCE_SUITE}")]),
        &hint,
    )?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .ok_or_else(|| BuildError::Invalid(format!("apt-cache show {SOURCE_PACKAGE}: no {name} field; {hint}")))
    };
    let filename = field("Filename:")?;
    let filename = filename.rsplit('/').next().unwrap_or(&filename).to_string();
    Ok(Source { version: field("Version:")?, sha256: field("SHA256:")?, filename })
}

/// Downloads the source package into `<cache>/src/` (once), checking apt's SHA-256.
fn fetch_source(env: &BuildEnv, src: &Source) -> Result<PathBuf, BuildError> {
    let dir = env.cache.join("src");
    let deb = dir.join(&src.filename);
    if deb.exists() && sha256_file(&deb).map(|(_, h)| h == src.sha256).unwrap_or(false) {
        return Ok(deb);
    }
    let tmp = tempdir_in(&dir)?;
    run(
        Command::new("apt-get")
            .args(["download", "-q", &format!("{SOURCE_PACKAGE}={}", src.version)])
            .current_dir(&tmp),
        "apt-get download failed: run scripts/install-host-deps.sh, and check the Debian mirror is reachable",
    )?;
    let got = tmp.join(&src.filename);
    let (_, sha) = sha256_file(&got).map_err(BuildError::io(format!("read {}", got.display())))?;
    if sha != src.sha256 {
        let _ = fs::remove_dir_all(&tmp);
        return Err(BuildError::Invalid(format!(
            "{} has SHA-256 {sha}, apt's index says {}; the download is corrupt: run the build again",
            src.filename, src.sha256
        )));
    }
    fs::rename(&got, &deb).map_err(BuildError::io(format!("move into {}", deb.display())))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(deb)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, BuildError> {
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(BuildError::io(format!("create {}", tmp.display())))?;
    // apt drops privileges to _apt for downloads; let it write here.
    let _ = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o777));
    Ok(tmp)
}

/// Builds (or finds in the cache) the kernel. The cache key is the source package version
/// and SHA-256, the config, the fragment it was resolved from, and the build script.
pub fn build_kernel(env: &BuildEnv) -> Result<(KernelBuild, bool), BuildError> {
    let src = query_source()?;
    let (config, fragment, script) =
        (env.recipe("kernel/x86_64.config"), env.recipe("kernel/x86_64.fragment"), env.recipe("kernel/build.sh"));
    let mut h = RecipeHash::new("kernel");
    h.text("package", SOURCE_PACKAGE).text("version", &src.version).text("deb-sha256", &src.sha256);
    h.file("config", &config)?.file("fragment", &fragment)?.file("build.sh", &script)?;
    let (dir, hit) = cache::entry(env, "kernel", &h.key(), |tmp| {
        let deb = fetch_source(env, &src)?;
        tracing::info!(
            "kernel: building {SOURCE_PACKAGE} {} with {} jobs (minutes: the config is small)",
            src.version,
            env.jobs
        );
        run(
            Command::new("bash")
                .arg(&script)
                .arg(&deb)
                .arg(&config)
                .arg(&fragment)
                .arg(tmp)
                .env("SMOLVM_BUILD_JOBS", env.jobs.to_string()),
            "the kernel build failed; its messages are above",
        )
    })?;
    for f in [KERNEL_ELF_FILE, KERNEL_BZIMAGE_FILE] {
        if !dir.join(f).is_file() {
            return Err(BuildError::Invalid(format!("kernel build produced no {f} in {}", dir.display())));
        }
    }
    Ok((KernelBuild { dir, source_version: src.version }, hit))
}
