//! `smolvm-init`, built as a static binary for the base rootfs.

use std::path::PathBuf;
use std::process::Command;

use crate::run::run;
use crate::{BuildEnv, BuildError};

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `smolvm-init` statically (`+crt-static` on the gnu target: the only target this
/// toolchain has) and returns its path.
///
/// Source paths are remapped so that the binary, and so the base rootfs's recipe hash, does not
/// depend on where the checkout or the cargo registry lives: a CI clone in another directory
/// still hits the cache.
pub fn build_init(env: &BuildEnv) -> Result<PathBuf, BuildError> {
    let target_dir = env.source.join("target/init");
    let cargo_home = std::env::var("CARGO_HOME")
        .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cargo")))
        .unwrap_or_else(|_| "/root/.cargo".into());
    let rustflags = format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/smolvm --remap-path-prefix={cargo_home}=/cargo",
        env.source.display()
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--locked", "--release", "-p", "smolvm-init", "--target", TARGET])
            // PID 1 has nothing to unwind to: abort (smaller, and as the init always was).
            .args(["--config", "profile.release.panic=\"abort\""])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", rustflags)
            .current_dir(&env.source),
        "building smolvm-init failed; its messages are above",
    )?;
    let bin = target_dir.join(TARGET).join("release/smolvm-init");
    let bytes = std::fs::read(&bin).map_err(BuildError::io(format!("read {}", bin.display())))?;
    if has_interpreter(&bytes) {
        return Err(BuildError::Invalid(format!(
            "{} is dynamically linked; the guest init must be static",
            bin.display()
        )));
    }
    Ok(bin)
}

/// True if an ELF64 little-endian file has a `PT_INTERP` program header (needs ld.so).
fn has_interpreter(elf: &[u8]) -> bool {
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = elf.get(off..off + n)?;
        Some(b.iter().rev().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2)) else {
        return true;
    };
    (0..phnum).any(|i| rd((phoff + i * phentsize) as usize, 4) == Some(3))
}

#[cfg(test)]
mod tests {
    #[test]
    fn detects_a_dynamic_executable() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(super::has_interpreter(&sh));
        assert!(super::has_interpreter(b"short"));
    }
}
