//! Tests of the state database: rows, transitions, origins, homes.

use super::*;

pub(crate) fn sample(name: &str) -> SandboxRow {
    SandboxRow {
        name: name.into(),
        created_at: 1,
        state: SandboxState::Creating,
        memory_mib: 512,
        cpus: 1,
        disk_mib: 2048,
        policy: NetworkPolicy { allow_domains: vec!["a.test".parse().unwrap()], ..NetworkPolicy::default() },
        accel: AccelKind::Tcg,
        ssh_port: None,
        pid: None,
        pid_start: None,
        tag: "images-2026.12.01.1".into(),
        kernel_sha256: "k".repeat(64),
        rootfs_sha256: "r".repeat(64),
        host_key: None,
        boot_json: None,
        ready_ms: None,
        preset: None,
        layer_sha256s: vec![],
        started_from: None,
        disk_limit: DiskLimit { bytes_per_sec: Some(1 << 20), iops: None },
        host_boot: None,
    }
}

#[test]
fn an_origin_reads_back_as_it_was_written() {
    for o in
        [Origin::Boot, Origin::BootSnapshot, Origin::Resume, Origin::Snapshot("s:1".into()), Origin::Fork("box".into())]
    {
        assert_eq!(o.to_string().parse::<Origin>().unwrap(), o);
    }
    assert!("booted".parse::<Origin>().is_err());
}

#[test]
fn the_transitions_are_the_lifecycle_and_nothing_else() {
    use SandboxState::*;
    let all = [Creating, Running, Stopped, Paused];
    let valid: Vec<(SandboxState, SandboxState)> = all
        .iter()
        .flat_map(|f| all.iter().map(move |t| (*f, *t)))
        .filter(|(f, t)| f != t && f.valid_transition(*t))
        .collect();
    assert_eq!(
        valid,
        [
            (Creating, Running),
            (Creating, Stopped),
            (Running, Stopped),
            (Running, Paused),
            (Stopped, Running),
            (Paused, Running),
            (Paused, Stopped)
        ]
    );
    assert!(all.iter().all(|s| s.valid_transition(*s)), "a row may be rewritten in its state");
    assert_eq!(SandboxState::valid_sources(Paused), [Running, Paused]);
}

#[test]
fn a_home_other_users_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    private_dir(&home).unwrap();
    assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o700);
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = private_dir(&home).unwrap_err().to_string();
    assert!(err.contains("written by other users"), "{err}");
    assert!(err.contains("chmod 700"), "{err}");
    // Readable by others (0755, what `mkdir` gives): ours, so made 0700.
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    private_dir(&home).unwrap();
    assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn insert_update_list_delete_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("state.db")).unwrap();
    assert!(db.insert(&sample("a")).unwrap());
    assert!(!db.insert(&sample("a")).unwrap(), "a name is unique");
    let mut a = db.get("a").unwrap().unwrap();
    a.state = SandboxState::Running;
    a.ssh_port = Some(2222);
    a.pid = Some(42);
    db.update(&a).unwrap();
    assert_eq!(db.get("a").unwrap().unwrap(), a);
    let p = NetworkPolicy::none();
    db.set_policy("a", &p).unwrap();
    assert_eq!(db.get("a").unwrap().unwrap().policy, p, "the policy round-trips");
    db.env_set("a", "K", "1").unwrap();
    db.env_set("a", "K", "2").unwrap();
    assert_eq!(db.env("a").unwrap(), vec![("K".to_string(), "2".to_string())]);
    assert_eq!(db.images_in_use().unwrap().len(), 2, "kernel and base");
    let mut p = sample("p");
    p.layer_sha256s = vec!["l".repeat(64)];
    assert!(db.insert(&p).unwrap());
    let used = db.images_in_use().unwrap();
    assert_eq!(used.len(), 3, "a preset sandbox's layer is in use too: {used:?}");
    assert!(used.contains(&"l".repeat(64)));
    db.delete("p").unwrap();
    db.delete("a").unwrap();
    assert!(db.get("a").unwrap().is_none());
    assert!(db.env("a").unwrap().is_empty(), "env rows go with the sandbox");
    // Reopening runs no migration twice.
    drop(db);
    Db::open(&dir.path().join("state.db")).unwrap();
}

#[test]
fn uid_slots_are_unique_and_reused_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("state.db")).unwrap();
    for n in ["a", "b", "c"] {
        assert!(db.insert(&sample(n)).unwrap());
    }
    assert_eq!(db.uid_slot("a").unwrap(), 0);
    assert_eq!(db.uid_slot("b").unwrap(), 1);
    assert_eq!(db.uid_slot("a").unwrap(), 0, "kept");
    db.delete("a").unwrap();
    assert_eq!(db.uid_slot("c").unwrap(), 0, "the lowest free slot");
    assert_eq!(db.uid_slot_of("b").unwrap(), Some(1));
}
