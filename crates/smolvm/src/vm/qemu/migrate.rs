//! Saving and loading a guest's state with QEMU's migration to a file: the machinery under
//! pause, snapshot, fork and the boot snapshot of `create`.
//!
//! Three forms of stream are written:
//! - **mapped-ram** (`save`): the RAM pages at fixed offsets of the file, zero pages left
//!   as holes, then the devices. What a pause of a booted guest writes and resume reads back
//!   into anonymous memory, and the first step of a snapshot of one. QEMU reads and checks
//!   every page of the RAM: ~0.1 s for a fresh 512 MiB guest under emulation, more for one
//!   whose RAM is a snapshot's image, and the file is as large as the RAM in use.
//! - **RAM left out** (`save` with `x-ignore-shared`): written by the sealing QEMU whose RAM
//!   is a shared file: the file is the RAM image, the stream only the devices (~100 KiB). A
//!   clone maps the image copy-on-write and loads the devices: nothing of the RAM is read.
//! - **devices alone** (`save_devices`): for a guest whose RAM is a snapshot's image, whose
//!   written pages are saved from outside QEMU (`vm::guest_ram`); ~2 ms. It has no
//!   configuration section, so the QEMU that loads it is told not to expect one
//!   (`qemu::Incoming::Devices`; it then notes "Expected vmdescription section" in its log,
//!   which is harmless: the description is for stream analysis tools only).
//!
//! The migration speed limit is lifted (QEMU's default keeps a save near 0.3 s; the file is
//! local), and the guest is stopped before a save, so that the stream is one consistent moment
//! together with the disk copied while it is stopped.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp::Qmp;

/// A save or a load that takes longer than this has failed.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

fn set_capabilities(q: &mut Qmp, caps: &[(&str, bool)]) -> std::io::Result<()> {
    let list: Vec<Value> = caps.iter().map(|(c, on)| json!({"capability": c, "state": on})).collect();
    q.execute("migrate-set-capabilities", Some(json!({ "capabilities": list }))).map(|_| ())
}

/// The guest's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
pub fn run_state(q: &mut Qmp) -> std::io::Result<String> {
    Ok(q.execute("query-status", None)?["status"].as_str().unwrap_or("").to_string())
}

pub fn stop(q: &mut Qmp) -> std::io::Result<()> {
    q.execute("stop", None).map(|_| ())
}

pub fn cont(q: &mut Qmp) -> std::io::Result<()> {
    q.execute("cont", None).map(|_| ())
}

/// Ends a migration a killed smolvm process left running in QEMU (it goes on without its
/// client), and waits until QEMU says it is over: a new save, or a `cont`, meets a QEMU that
/// is not mid-way through another.
pub fn end_stale_migration(q: &mut Qmp) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut cancelled = false;
    loop {
        let status = q.execute("query-migrate", None)?["status"].as_str().unwrap_or("").to_string();
        if !matches!(status.as_str(), "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug") {
            return Ok(());
        }
        if !cancelled {
            tracing::warn!("QEMU was still saving for a command that is gone ({status}): cancelled");
            let _ = q.execute("migrate_cancel", None);
            cancelled = true;
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other(format!("a stale save would not end (QEMU says {status})")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Saves the stopped guest to `path` (relative to QEMU's working directory) as a mapped-ram
/// stream, or devices only when `devices_only` (the RAM must be a shared file then).
pub fn save(q: &mut Qmp, path: &str, devices_only: bool) -> std::io::Result<()> {
    end_stale_migration(q)?;
    // A save completed for a command that was killed before it let the guest run leaves QEMU
    // in `postmigrate`, from which it refuses to save again ("paused due to previous
    // migration"): a `cont` and `stop` make it an ordinary stopped guest. Nothing was saved
    // of this capture yet, so the moment it is of is unchanged.
    if run_state(q)? == "postmigrate" {
        cont(q)?;
        stop(q)?;
    }
    set_capabilities(q, &[("x-ignore-shared", devices_only), ("mapped-ram", !devices_only)])?;
    q.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": 100u64 << 30 })))?;
    q.execute("migrate", Some(json!({ "uri": format!("file:{path}") })))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let r = q.execute("query-migrate", None)?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            s @ ("failed" | "cancelled") => {
                let why = r["error-desc"].as_str().unwrap_or("no reason given");
                return Err(std::io::Error::other(format!("QEMU's save {s}: {why}")));
            }
            _ if Instant::now() > deadline => {
                let _ = q.execute("migrate_cancel", None);
                return Err(std::io::Error::other(format!("QEMU's save took over {MIGRATION_TIMEOUT:?}")));
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Saves the stopped guest's devices alone (no RAM, no configuration section) to `path`
/// (relative to QEMU's working directory): ~2 ms and ~30 KiB, for a guest whose RAM is saved
/// another way (`vm::guest_ram`). Loaded by a QEMU started with `qemu::Incoming::Devices`.
pub fn save_devices(q: &mut Qmp, path: &str) -> std::io::Result<()> {
    q.execute("xen-save-devices-state", Some(json!({ "filename": path, "live": false }))).map(|_| ())
}

/// Loads the stream QEMU was given as `uri` into a QEMU started with `-incoming defer`, and
/// waits until it is loaded (the guest paused). `devices_only` as in [`save`].
pub fn load(q: &mut Qmp, uri: &str, devices_only: bool) -> std::io::Result<()> {
    set_capabilities(q, &[("x-ignore-shared", devices_only), ("mapped-ram", !devices_only)])?;
    q.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        // A stream that does not load makes QEMU exit: the connection closes (an error here).
        match run_state(q)?.as_str() {
            "paused" | "postmigrate" => return Ok(()),
            "running" => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(std::io::Error::other(format!("QEMU's load took over {MIGRATION_TIMEOUT:?}")))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Connects to a QEMU's QMP socket that may not be listening yet (a QEMU just started).
pub fn connect_new(socket: &std::path::Path, within: Duration, qemu: i32) -> std::io::Result<Qmp> {
    let deadline = Instant::now() + within;
    loop {
        match Qmp::connect(socket, qemu) {
            Ok(q) => return Ok(q),
            // Someone else's socket there: no use waiting.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(e),
            Err(e) if Instant::now() > deadline || !crate::vm::process::is_alive(qemu, None) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
