//! Helpers shared by the integration tests. These tests use real parts only: the release built
//! by `smolvm image build all`, real QEMU, real sshd.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use smolvm::images::Manifest;

/// The release directory under test (`dist/<tag>`), from `SMOLVM_TEST_RELEASE`.
/// `scripts/test.sh` builds the release and sets it; run the tests through that script.
pub fn release_dir() -> PathBuf {
    let dir = std::env::var_os("SMOLVM_TEST_RELEASE").map(PathBuf::from).expect(
        "SMOLVM_TEST_RELEASE is not set: these tests boot a real release; run scripts/test.sh, \
         which builds one (cached) and sets it",
    );
    assert!(dir.join("manifest.json").is_file(), "{} has no manifest.json", dir.display());
    dir
}

pub fn manifest(dir: &Path) -> Manifest {
    Manifest::load(&dir.join("manifest.json")).expect("release manifest loads")
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decompresses a `.zst` asset of the release into `dir` (sparse) and returns the path.
pub fn unpack(release: &Path, asset: &str, dir: &Path) -> PathBuf {
    let out = dir.join(asset.trim_end_matches(".zst"));
    run(Command::new("zstd")
        .args(["-d", "-q", "-f", "--long=27", "--sparse"])
        .arg(release.join(asset))
        .arg("-o")
        .arg(&out));
    out
}
