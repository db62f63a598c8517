//! zstd compression of release assets, cached by input digest (`-19` is slow: a minute or two
//! for a rootfs, and the same input always compresses to the same output).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, RecipeHash};
use crate::run::run;
use crate::{BuildEnv, BuildError};

/// The zstd settings of the kernel and the base: every sandbox downloads them, and the base
/// has a size budget (60 MB). `--long` (a 128 MiB window) finds repeats far apart in a
/// filesystem image; decoders accept that window by default.
pub(crate) const ZSTD_ARGS: &[&str] = &["-19", "--long=27"];

/// The settings of preset layers: only that preset's users download one, and they are large
/// (up to 700 MB of ext4): at `-19` the four took 8.5 minutes on 2 cores, a quarter of a fresh
/// machine's test run; `-12` takes under 20 s each for ~14% more bytes (codex: 161 MB against
/// 141 MB), and decompresses as fast.
pub(crate) const ZSTD_LAYER_ARGS: &[&str] = &["-12", "--long=27"];

/// Returns `<cache>/zst/<key>/out.zst` for `input` (whose SHA-256 is `input_sha256`).
pub(crate) fn zstd_cached(
    env: &BuildEnv,
    input: &Path,
    input_sha256: &str,
    args: &[&str],
) -> Result<(PathBuf, bool), BuildError> {
    let mut h = RecipeHash::new("zstd");
    h.text("input", input_sha256).text("args", &args.join(" "));
    let (dir, hit) = cache::entry(env, "zst", &h.key(), |tmp| {
        run(
            Command::new("zstd")
                .args(args)
                .arg(format!("-T{}", env.jobs))
                .args(["-q", "-f"])
                .arg(input)
                .arg("-o")
                .arg(tmp.join("out.zst")),
            "is zstd installed (scripts/install-host-deps.sh) and is there free space?",
        )
    })?;
    Ok((dir.join("out.zst"), hit))
}
