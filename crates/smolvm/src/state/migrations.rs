//! Schema migrations, applied in order; `PRAGMA user_version` records how far a database is.
//! Append new steps; never edit a released one.

use std::path::Path;

use rusqlite::Connection;

use super::StateError;

const STEPS: &[&str] = &[
    // 1: sandboxes, their environment variables and port forwards.
    "CREATE TABLE sandboxes (
        name TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        state TEXT NOT NULL,
        memory_mib INTEGER NOT NULL,
        cpus INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        network TEXT NOT NULL,
        accel TEXT NOT NULL,
        ssh_port INTEGER,
        pid INTEGER,
        pid_start INTEGER,
        tag TEXT NOT NULL,
        kernel_sha256 TEXT NOT NULL,
        rootfs_sha256 TEXT NOT NULL,
        host_key TEXT,
        boot_json TEXT
     );
     CREATE TABLE env (
        sandbox TEXT NOT NULL REFERENCES sandboxes(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (sandbox, key)
     );
     CREATE TABLE forwards (
        sandbox TEXT NOT NULL REFERENCES sandboxes(name) ON DELETE CASCADE,
        guest_port INTEGER NOT NULL,
        host_port INTEGER NOT NULL,
        PRIMARY KEY (sandbox, guest_port)
     );",
    // 2: the host-measured boot time of the last boot.
    "ALTER TABLE sandboxes ADD COLUMN ready_ms INTEGER;",
    // 3: the preset, and the SHA-256 of its layers (comma-separated, top first).
    "ALTER TABLE sandboxes ADD COLUMN preset TEXT;
     ALTER TABLE sandboxes ADD COLUMN layer_sha256s TEXT NOT NULL DEFAULT '';",
    // 4: the network policy (JSON of `net::NetworkPolicy`); NULL: the `network` mode alone.
    "ALTER TABLE sandboxes ADD COLUMN network_policy TEXT;",
    // 5: the slot of the uid and gid its processes run as (`config::VmUsers`), unique.
    "ALTER TABLE sandboxes ADD COLUMN uid_slot INTEGER;
     CREATE UNIQUE INDEX sandboxes_uid_slot ON sandboxes(uid_slot);",
    // 6: what the running guest started from: a boot, the boot snapshot, a snapshot, a resume.
    "ALTER TABLE sandboxes ADD COLUMN started_from TEXT;",
    // 7: the disk I/O ceiling (JSON of `state::DiskLimit`); NULL: none.
    "ALTER TABLE sandboxes ADD COLUMN disk_limit TEXT;",
    // 8: the host's boot id when the sandbox's VM started; NULL: not known (older rows).
    "ALTER TABLE sandboxes ADD COLUMN host_boot TEXT;",
];

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let known = STEPS.len() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > known {
        return Err(StateError::TooNew { path: path.display().to_string(), found: current, known });
    }
    for (i, sql) in STEPS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(STEPS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO sandboxes (name, created_at, state, memory_mib, cpus, disk_mib, network, accel, tag, \
                 kernel_sha256, rootfs_sha256) VALUES ('old', 1, 'stopped', 512, 1, 2048, 'nat', 'tcg', 't', 'k', 'r')",
                [],
            )
            .unwrap();
        }
        let db = super::super::Db::open(&path).unwrap();
        let row = db.get("old").unwrap().expect("the row survives the migration");
        assert_eq!(row.ready_ms, None);
        assert_eq!(row.policy, crate::net::NetworkPolicy::default(), "an old row's policy is its mode");
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, STEPS.len() as i64);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = super::super::Db::open(&path).unwrap_err().to_string();
        assert!(err.contains("upgrade smolvm"), "{err}");
    }
}
