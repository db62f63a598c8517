//! Frozen wire fixtures, one file per protocol version (`tests/fixtures/v<N>.txt`): each
//! message kind of that version, encoded from the sample below, must give exactly the bytes
//! recorded when the version was released, and decode back. A message's fixture lives in the
//! file of the version that introduced it (`since()`), and every kind has one.
//!
//! A new version adds a file (`SMOLVM_WRITE_FIXTURES=v<N> cargo test -p smolvm-protocol`
//! writes that one file, for messages of that version only); released files are never
//! rewritten. See VERSIONING.md.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use smolvm_protocol::agent::*;
use smolvm_protocol::ready::{BootPhases, Ready};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ready() -> Ready {
    Ready { v: 1, host_key: "k".into(), boot_us: BootPhases { init: 1, mounts: 2, network: 3, sshd: 4 } }
}

fn host_samples() -> Vec<(&'static str, HostMsg)> {
    let exec = ExecRequest {
        command: Command::Argv(vec!["ls".into(), "-l".into()]),
        env: vec![("A".into(), "1".into())],
        cwd: Some("/".into()),
        stdin: true,
        timeout_ms: Some(1000),
        pty: Some(PtySize { rows: 24, cols: 80 }),
    };
    vec![
        ("hello", HostMsg::Hello { version: 1 }),
        ("exec", HostMsg::Exec { id: 7, request: exec }),
        ("stdin", HostMsg::Stdin { id: 7, data: b"hi".to_vec() }),
        ("stdin_close", HostMsg::StdinClose { id: 7 }),
        ("signal", HostMsg::Signal { id: 7, signal: 2 }),
        (
            "write_file",
            HostMsg::WriteFile { id: 1, file: WriteFile { path: "/f".into(), mode: 0o644, uid: 0, gid: 0 } },
        ),
        ("file_data", HostMsg::FileData { id: 1, data: vec![0, 255] }),
        ("file_end", HostMsg::FileEnd { id: 1 }),
        ("read_file", HostMsg::ReadFile { id: 2, path: "/f".into() }),
        ("stat", HostMsg::Stat { id: 3, path: "/".into() }),
        ("set_env", HostMsg::SetEnv { id: 4, vars: vec![("K".into(), "v".into())] }),
        ("shutdown", HostMsg::Shutdown),
        ("ping", HostMsg::Ping { id: 5 }),
        ("refresh", HostMsg::Refresh { id: 6, json: "{}".into() }),
        ("wait_ssh", HostMsg::WaitSsh { id: 7, timeout_ms: 1000 }),
        ("fs", HostMsg::Fs { id: 8, json: "{}".into() }),
        ("watch", HostMsg::Watch { id: 9, json: "{}".into() }),
        ("cancel", HostMsg::Cancel { id: 9 }),
        ("credit", HostMsg::Credit { id: 7, bytes: 65536 }),
    ]
}

fn guest_samples() -> Vec<(&'static str, GuestMsg)> {
    let stat = FileStat { size: 5, mode: 0o100644, uid: 0, gid: 0, mtime: 10, is_dir: false };
    vec![
        ("hello", GuestMsg::hello(1, &ready())),
        ("stdout", GuestMsg::Stdout { id: 7, data: b"ok".to_vec() }),
        ("stderr_empty", GuestMsg::Stderr { id: 7, data: vec![] }),
        ("exit_code", GuestMsg::Exit { id: 7, status: ExitStatus::Code(1), timed_out: false }),
        ("exit_signal", GuestMsg::Exit { id: 7, status: ExitStatus::Signal(9), timed_out: true }),
        ("file_data", GuestMsg::FileData { id: 1, data: vec![1] }),
        ("file_end", GuestMsg::FileEnd { id: 1, stat: stat.clone() }),
        ("stat_none", GuestMsg::StatResult { id: 3, stat: None }),
        ("stat_some", GuestMsg::StatResult { id: 3, stat: Some(stat) }),
        ("done", GuestMsg::Done { id: 4 }),
        ("error", GuestMsg::Error { id: 4, message: "no".into() }),
        ("hello_v2", GuestMsg::hello(2, &ready())),
        ("refreshed", GuestMsg::Refreshed { id: 6, json: "{}".into() }),
        ("fs_result", GuestMsg::FsResult { id: 8, json: "{}".into() }),
        ("fs_events", GuestMsg::FsEvents { id: 9, json: "[]".into() }),
        ("failed", GuestMsg::Failed { id: 4, message: "no".into(), errno: 28 }),
    ]
}

fn fixture_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/v{version}.txt"))
}

/// (direction, name) -> hex, for one version's file.
fn load(version: u32) -> BTreeMap<(String, String), String> {
    let text = std::fs::read_to_string(fixture_path(version)).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let (d, n, h) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
            ((d.to_string(), n.to_string()), h.to_string())
        })
        .collect()
}

/// Every sample as (direction, name, since, frame).
fn samples() -> Vec<(&'static str, &'static str, u32, Vec<u8>)> {
    let mut v: Vec<_> = host_samples().into_iter().map(|(n, m)| ("host", n, m.since(), encode(&m))).collect();
    v.extend(guest_samples().into_iter().map(|(n, m)| ("guest", n, m.since(), encode(&m))));
    v
}

#[test]
fn every_message_matches_the_fixture_of_its_version() {
    if let Ok(which) = std::env::var("SMOLVM_WRITE_FIXTURES") {
        let version: u32 = which.trim_start_matches('v').parse().unwrap();
        assert!(load(version).is_empty(), "v{version}.txt exists: released fixtures are never rewritten");
        let mut out = format!("# Protocol version {version}: messages introduced in it, frozen. See VERSIONING.md.\n");
        for (d, n, since, frame) in samples().into_iter().filter(|s| s.2 == version) {
            let _ = since;
            out.push_str(&format!("{d} {n} {}\n", hex(&frame)));
        }
        std::fs::write(fixture_path(version), out).unwrap();
    }
    let mut seen = 0;
    for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let fixtures = load(version);
        assert!(!fixtures.is_empty(), "no fixtures for protocol v{version}: {}", fixture_path(version).display());
        for ((d, n), want) in &fixtures {
            let (_, _, since, frame) = samples()
                .into_iter()
                .find(|(sd, sn, _, _)| sd == d && sn == n)
                .unwrap_or_else(|| panic!("v{version}.txt has {d} {n}, which no sample produces"));
            assert_eq!(since, version, "{d} {n} is pinned in v{version}.txt but since() says v{since}");
            assert_eq!(&hex(&frame), want, "{d} {n}: the bytes of a released message changed");
            seen += 1;
        }
    }
    assert_eq!(seen, samples().len(), "every sample message must be pinned in the file of its version");
}

#[test]
fn every_message_decodes_back() {
    for (n, m) in host_samples() {
        let back: HostMsg = read_frame(&mut encode(&m).as_slice()).unwrap().unwrap();
        assert_eq!(back, m, "host {n}");
    }
    for (n, m) in guest_samples() {
        let back: GuestMsg = read_frame(&mut encode(&m).as_slice()).unwrap().unwrap();
        assert_eq!(back, m, "guest {n}");
    }
}
