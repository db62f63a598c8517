//! Presets end to end: each boots with its layer over the base and runs its tool's `--version`
//! with no network; two presets share one base download. `#[ignore]`d for a plain
//! `cargo test`; `scripts/test.sh` runs them against a release that includes the layers.

#![allow(clippy::unwrap_used)]

mod common;

use common::{ok, release_dir, smolvm};
use smolvm::images::{AssetKind, Manifest};
use smolvm_testkit::http::Server;

fn version_check(preset: &str, tool: &str) {
    let release = release_dir();
    let server = Server::start(release.parent().unwrap().to_path_buf()).unwrap();
    let home = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup(home.path().to_path_buf());
    let cmd = || smolvm(home.path(), &server.url, &release);
    let name = format!("p-{preset}");
    // The preset's first secret, set on the host, must never reach the guest: the guest's
    // variable is a placeholder, and the value is nowhere in it (nor in the kernel command line,
    // the status output or the console). The one host its key goes to is the only one allowed
    // (there is no internet here anyway: the tool must already be in the layer).
    let p = smolvm::sandbox::presets::find(preset).unwrap();
    let key = p.secrets[0];
    let secret = format!("sk-smolvm-test-{preset}-0123456789");
    ok(cmd().env(key.var, &secret).args([
        preset,
        "start",
        "--no-attach",
        "--allow-domain",
        key.hosts[0],
        "--name",
        &name,
    ]));
    let seen = ok(cmd().args(["exec", &name, "--", "printenv", key.var]));
    assert!(seen.contains("smolvm-placeholder-") && !seen.contains(&secret), "{}: {seen}", key.var);
    // Made here, after the images were built: only a file system the guest writes could hold it.
    let found = ok(cmd().args([
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        &format!("{}; true", common::find_in_writable_files(&secret)),
    ]));
    assert_eq!(found.trim(), "", "the key is in the guest");
    let cmdline = ok(cmd().args(["exec", &name, "--", "cat", "/proc/cmdline"]));
    let status = ok(cmd().args(["status", &name, "--json"]));
    let console = std::fs::read_to_string(home.path().join(format!("sandboxes/{name}/run/console.log"))).unwrap();
    for (what, text) in [("/proc/cmdline", &cmdline), ("status", &status), ("console", &console)] {
        assert!(!text.contains(&secret), "the API key leaked into {what}");
    }
    let out = cmd().args(["exec", &name, "--", tool, "--version"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tool} --version failed in the {preset} preset: {text}");
    assert!(text.chars().any(|c| c.is_ascii_digit()), "no version in: {text}");
    eprintln!("{preset}: {}", text.trim());
    ok(cmd().args(["delete", "--force", &name]));
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn every_preset_runs_its_tool_offline() {
    // The one preset table: a preset added there is tested here.
    for p in smolvm::sandbox::presets::PRESETS {
        version_check(p.name, p.command);
    }
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn two_presets_share_one_base_download() {
    let release = release_dir();
    let manifest = Manifest::load(&release.join("manifest.json")).unwrap();
    let tag = common::tag_of(&release);
    let server = Server::start(release.parent().unwrap().to_path_buf()).unwrap();
    let home = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup(home.path().to_path_buf());
    let cmd = || smolvm(home.path(), &server.url, &release);
    ok(cmd().args(["codex", "start", "--no-attach", "--name", "a"]));
    ok(cmd().args(["pi", "start", "--no-attach", "--name", "b"]));
    let path = |kind: AssetKind, preset: Option<&str>| {
        let a = manifest
            .assets
            .iter()
            .find(|a| a.kind == kind && a.preset.as_deref() == preset && a.name.ends_with(".zst"))
            .unwrap();
        (format!("/{tag}/{}", a.name), a.size)
    };
    let (base, base_size) = path(AssetKind::Rootfs, None);
    assert_eq!(server.requests_for(&base).len(), 1, "the base was downloaded more than once");
    for p in ["codex", "pi"] {
        let (layer, size) = path(AssetKind::Layer, Some(p));
        assert_eq!(server.requests_for(&layer).len(), 1, "{p}'s layer");
        eprintln!("{p} layer {size} bytes compressed; base {base_size}");
    }
    // Both guests see the base's files through their own layer.
    for (n, tool) in [("a", "codex"), ("b", "pi")] {
        ok(cmd().args(["exec", n, "--", "sh", "-c", &format!("command -v {tool} && test -x /init")]));
    }
    let images = json(&ok(cmd().args(["image", "list", "--json"])));
    assert_eq!(images.as_array().unwrap().len(), 4, "kernel, base and two layers: {images}");

    // Prune keeps what sandboxes use, layers included: a stopped preset sandbox starts again.
    ok(cmd().args(["stop", "a"]));
    let pruned = json(&ok(cmd().args(["image", "prune", "--json"])));
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 0, "{pruned}");
    ok(cmd().args(["start", "a"]));
    ok(cmd().args(["exec", "a", "--", "sh", "-c", "command -v codex"]));
    // Once no sandbox uses a layer, prune removes it (and only it).
    ok(cmd().args(["delete", "--force", "b"]));
    let pruned = json(&ok(cmd().args(["image", "prune", "--json"])));
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "pi's layer: {pruned}");
    let images = json(&ok(cmd().args(["image", "list", "--json"])));
    assert_eq!(images.as_array().unwrap().len(), 3, "kernel, base and codex's layer: {images}");
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// What each tool shows when it opens ready to work with the key it was handed, and what it
/// shows when it is not (its sign-in, key or trust questions).
const READY: &[(&str, &str, &str)] = &[
    ("codex", "To get started|Ask Codex to do anything", "Sign in with ChatGPT"),
    ("claude-code", "for shortcuts", "Select login method|Do you want to use this API key|trust this folder"),
    ("hermes", "Welcome to Hermes Agent", "Setup Wizard|No API key"),
    ("pi", "Pi can explain its own features", "No API key|/login"),
];

/// `smolvm <preset> start` in a pseudo-terminal, as a new user would run it (the key set on
/// the host): the text of the tool's first screen, once `marks` show or after 120 s.
fn first_screen(cmd: &mut std::process::Command, preset_args: &[&str], marks: &str) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/first_screen.py");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut c = std::process::Command::new("python3");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.arg(script).arg("120").arg(marks).arg("--").arg(program).args(args).args(preset_args);
    let out = c.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "boots the release under QEMU: run scripts/test.sh"]
fn each_preset_opens_its_tool_ready_with_the_key_it_was_handed() {
    let release = release_dir();
    let server = Server::start(release.parent().unwrap().to_path_buf()).unwrap();
    let home = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup(home.path().to_path_buf());
    let cmd = || smolvm(home.path(), &server.url, &release);
    for p in smolvm::sandbox::presets::PRESETS {
        let (_, ready, not_ready) = READY.iter().find(|(n, _, _)| *n == p.name).expect("a READY entry per preset");
        let key = p.secrets[0];
        let name = format!("tty-{}", p.name);
        let mut c = cmd();
        c.env(key.var, format!("sk-smolvm-test-{}-0123456789abcdef0123", p.name));
        let screen = first_screen(&mut c, &[p.name, "start", "--name", &name], &format!("{ready}|{not_ready}"));
        let flat: String = screen.split_whitespace().collect();
        let shows = |marks: &str| marks.split('|').any(|m| flat.contains(&m.split_whitespace().collect::<String>()));
        assert!(shows(ready) && !shows(not_ready), "{}'s first screen is not ready to work:\n{screen}", p.name);
        eprintln!("{}: ready", p.name);
        ok(cmd().args(["delete", &name]));
    }
    // The check can fail: codex given its key only as a variable (no auth setup, as
    // `create --preset` does) lands on its sign-in menu.
    ok(cmd().env("OPENAI_API_KEY", "sk-smolvm-test-x").args([
        "create",
        "--name",
        "bare",
        "--preset",
        "codex",
        "--secret",
        "OPENAI_API_KEY@api.openai.com",
    ]));
    let screen =
        first_screen(&mut cmd(), &["exec", "-t", "bare", "--", "bash", "-lc", "codex"], "Sign in with ChatGPT");
    assert!(screen.split_whitespace().collect::<String>().contains("SigninwithChatGPT"), "{screen}");
}
