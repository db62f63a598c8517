//! Preset layers: a preset's tooling installed over the base rootfs, published as only what it
//! adds (an ext4 image the guest stacks over the base with overlayfs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, RecipeHash};
use crate::run::run;
use crate::{BuildEnv, BuildError};
use smolvm::digest::sha256_file;

/// The presets every release carries (the one table: `smolvm::sandbox::presets::PRESETS`),
/// each built by `recipes/presets/<name>.sh`.
pub fn presets() -> impl Iterator<Item = &'static str> {
    smolvm::sandbox::presets::PRESETS.iter().map(|p| p.name)
}

/// The layer image's file name inside a build directory (the release asset adds `.zst`).
pub fn layer_file(preset: &str) -> String {
    format!("{preset}-x86_64-layer.ext4")
}

/// Builds (or finds in the cache) the layer of `preset` over `base` (the base rootfs ext4 of
/// the same release). The key: the base's bytes, the preset's recipe, its lock files
/// (`recipes/presets/<name>/`: the exact versions and digests of what it installs) and the
/// layer script.
pub fn build_layer(env: &BuildEnv, preset: &str, base: &Path, epoch: i64) -> Result<(PathBuf, bool), BuildError> {
    if smolvm::sandbox::presets::find(preset).is_none() {
        let all: Vec<&str> = presets().collect();
        return Err(BuildError::Invalid(format!("no preset named {preset:?}; the presets are {}", all.join(", "))));
    }
    let recipe = env.recipe(&format!("presets/{preset}.sh"));
    let script = env.recipe("presets/build-layer.sh");
    let (_, base_sha) = sha256_file(base).map_err(BuildError::io(format!("read {}", base.display())))?;
    let mut h = RecipeHash::new("layer");
    h.text("preset", preset).text("base-sha256", &base_sha).text("epoch", &epoch.to_string());
    h.file("recipe", &recipe)?.file("build-layer.sh", &script)?;
    let locks = env.recipe(&format!("presets/{preset}"));
    for lock in lock_files(&locks)? {
        let name = lock.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.file(&format!("lock/{name}"), &lock)?;
    }
    let (dir, hit) = cache::entry(env, "layer", &h.key(), |tmp| {
        run(
            Command::new("bash")
                .arg(&script)
                .arg(base)
                .arg(&recipe)
                .arg(tmp.join(layer_file(preset)))
                .arg(&locks)
                .env("SOURCE_DATE_EPOCH", epoch.to_string()),
            "the preset layer build failed; its messages are above (it needs root and the package registries)",
        )
    })?;
    Ok((dir.join(layer_file(preset)), hit))
}

/// The lock files of a preset (sorted, so that the key does not depend on directory order).
fn lock_files(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(BuildError::io(format!("read the preset's lock files in {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(BuildError::Invalid(format!(
            "{} has no lock files: a preset installs exact versions (recipes/presets/lock.sh writes them)",
            dir.display()
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::lock_files;

    #[test]
    fn every_preset_has_a_recipe_and_a_pinned_layer() {
        let env = crate::BuildEnv::discover(None, None).expect("the checkout");
        let pins = smolvm::images::ReleasePins::compiled().expect("the compiled pins");
        for p in super::presets() {
            assert!(env.recipe(&format!("presets/{p}.sh")).is_file(), "no recipe for preset {p}");
            // Exact versions with digests: a lock the recipe installs from, and no bare
            // "install the latest" left in it.
            let locks = lock_files(&env.recipe(&format!("presets/{p}"))).unwrap();
            let text = std::fs::read_to_string(env.recipe(&format!("presets/{p}.sh"))).unwrap();
            let pinned = locks.iter().any(|l| {
                let body = std::fs::read_to_string(l).unwrap();
                body.contains("\"integrity\": \"sha512-") || body.lines().skip(1).all(|l| l.contains("--hash=sha256:"))
            });
            assert!(pinned, "the lock files of {p} carry no digests");
            assert!(text.contains("npm ci") || text.contains("--require-hashes"), "{p} does not install from its lock");
            assert!(
                !text.contains("npm install -g")
                    && !text.contains("pip install --no-cache-dir --disable-pip-version-check hermes"),
                "{p}"
            );
            assert!(
                pins.assets.iter().any(|a| a.preset.as_deref() == Some(p)),
                "no layer of preset {p} in recipes/release.toml"
            );
        }
    }
}
