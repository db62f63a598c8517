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
    private_source_dir(&dir)?;
    let deb = dir.join(&src.filename);
    if verified_file_sha256(&deb).as_deref() == Some(src.sha256.as_str()) {
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
    // Checked again where it now lies. The download directory had to be writable by apt's
    // sandbox user, so the file checked there could have been swapped (or made a symbolic
    // link) before the move; the source directory is writable by us only, and what is built
    // is what is verified here.
    let verified = verified_file_sha256(&deb);
    if verified.as_deref() != Some(src.sha256.as_str()) {
        let _ = fs::remove_file(&deb);
        return Err(BuildError::Invalid(format!(
            "{} changed while it was moved into {} (SHA-256 {}, apt's index says {}): run the build again",
            src.filename,
            dir.display(),
            verified.unwrap_or_else(|| "unreadable, or not a regular file".into()),
            src.sha256
        )));
    }
    Ok(deb)
}

/// The SHA-256 of `path` if it is a regular file (no symbolic link followed).
fn verified_file_sha256(path: &Path) -> Option<String> {
    use sha2::Digest;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(format!("{:x}", h.finalize()))
}

/// The directory of downloaded sources: ours, and writable by nobody else.
fn private_source_dir(dir: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    fs::create_dir_all(dir).map_err(BuildError::io(format!("create {}", dir.display())))?;
    let meta = fs::symlink_metadata(dir).map_err(BuildError::io(format!("stat {}", dir.display())))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(BuildError::Invalid(format!(
            "{} is not a directory of this user: remove it and run the build again",
            dir.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(BuildError::io(format!("chmod {}", dir.display())))?;
    }
    Ok(())
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
