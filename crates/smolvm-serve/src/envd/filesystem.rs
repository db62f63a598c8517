//! `filesystem.Filesystem`: Stat, ListDir, MakeDir, Move, Remove on the agent's v4 `Fs`; the
//! watches (WatchDir as a stream, and the polled CreateWatcher / GetWatcherEvents /
//! RemoveWatcher of the synchronous Python SDK) on its `Watch`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use smolvm_protocol::agent::{EntryKind, FsEntry, FsErrorKind, FsEvent, FsOp, FsReply, FsRequest};

use super::connect::{self, Code, RpcError};
use super::{agent_error, target, Target};
use crate::app::{lock, App};

/// Events a polled watcher keeps between two polls, at most.
const MAX_PENDING_EVENTS: usize = 65_536;

/// A polled watcher nobody asked for events this long is stopped (its caller forgot it, or
/// went away without RemoveWatcher): it holds a thread and a watch in the guest.
const WATCHER_IDLE: Duration = Duration::from_secs(600);

/// A watch polled by GetWatcherEvents: what it saw since the last poll.
#[derive(Debug)]
pub struct Watcher {
    events: Mutex<Vec<FsEvent>>,
    failed: Mutex<Option<String>>,
    cancel: AtomicBool,
    /// Its watch ended (failed, removed, idle): the entry can go.
    ended: AtomicBool,
    polled: Mutex<std::time::Instant>,
}

impl Default for Watcher {
    fn default() -> Watcher {
        Watcher {
            events: Mutex::default(),
            failed: Mutex::default(),
            cancel: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            polled: Mutex::new(std::time::Instant::now()),
        }
    }
}

/// The polled watchers of every sandbox, by id.
pub type Watchers = Mutex<HashMap<String, (String, Arc<Watcher>)>>;

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct PathReq {
    path: String,
    depth: Option<u32>,
    recursive: bool,
    #[serde(alias = "watcher_id", rename = "watcherId")]
    watcher_id: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct MoveReq {
    source: String,
    destination: String,
}

pub async fn call(
    State(app): State<Arc<App>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let t = match target(&app, &headers, None, |_| false).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let streaming = method == "WatchDir";
    let result = match method.as_str() {
        "Stat" | "ListDir" | "MakeDir" | "Remove" | "Move" => fs_call(&t, &method, &headers, &body).await,
        "WatchDir" => watch_dir(&t, &headers, &body).await,
        "CreateWatcher" => create_watcher(&app, &t, &headers, &body).await,
        "GetWatcherEvents" => watcher_events(&app, &t, &headers, &body),
        "RemoveWatcher" => remove_watcher(&app, &t, &headers, &body),
        other => Err(RpcError::new(Code::Unimplemented, format!("filesystem.Filesystem/{other} is not served"))),
    };
    match result {
        Ok(r) => r,
        Err(e) if streaming => connect::stream_error(&e),
        Err(e) => e.into_response(),
    }
}

/// Runs an `Fs` request on the blocking pool; a failure becomes its RPC code.
pub async fn fs(t: &Target, req: FsRequest) -> Result<FsReply, RpcError> {
    let conn = t.conn.clone();
    let reply = tokio::task::spawn_blocking(move || conn.client.fs(&req))
        .await
        .map_err(|e| RpcError::new(Code::Internal, e.to_string()))?
        .map_err(agent_error)?;
    if let Some(f) = &reply.error {
        let code = match f.kind {
            FsErrorKind::NotFound => Code::NotFound,
            FsErrorKind::AlreadyExists => Code::AlreadyExists,
            FsErrorKind::PermissionDenied => Code::PermissionDenied,
            FsErrorKind::NotADirectory | FsErrorKind::IsADirectory | FsErrorKind::Invalid => Code::InvalidArgument,
            FsErrorKind::Other => Code::Internal,
        };
        return Err(RpcError::new(code, f.message.clone()));
    }
    Ok(reply)
}

async fn fs_call(t: &Target, method: &str, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    if method == "Move" {
        let m: MoveReq = connect::request(headers, body)?;
        let r = fs(t, FsRequest::Move { source: t.path(&m.source), destination: t.path(&m.destination) }).await?;
        return Ok(connect::unary(&json!({"entry": r.entries.first().map(entry_json)})));
    }
    let p: PathReq = connect::request(headers, body)?;
    let path = t.path(&p.path);
    Ok(match method {
        "Stat" => {
            let r = fs(t, FsRequest::Stat { path }).await?;
            connect::unary(&json!({"entry": r.entries.first().map(entry_json)}))
        }
        "ListDir" => {
            let r = fs(t, FsRequest::ListDir { path, depth: p.depth.unwrap_or(1) }).await?;
            connect::unary(&json!({"entries": r.entries.iter().map(entry_json).collect::<Vec<_>>()}))
        }
        "MakeDir" => {
            let r = fs(t, FsRequest::MakeDir { path }).await?;
            connect::unary(&json!({"entry": r.entries.first().map(entry_json)}))
        }
        _ => {
            fs(t, FsRequest::Remove { path }).await?;
            connect::unary(&json!({}))
        }
    })
}

/// `ls -l`'s permission string of a mode.
fn permissions(mode: u32, kind: EntryKind) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub fn entry_json(e: &FsEntry) -> Value {
    let kind = match e.kind {
        EntryKind::File => "FILE_TYPE_FILE",
        EntryKind::Dir => "FILE_TYPE_DIRECTORY",
        EntryKind::Symlink => "FILE_TYPE_SYMLINK",
        EntryKind::Other => "FILE_TYPE_UNSPECIFIED",
    };
    let secs = e.mtime_ns.div_euclid(1_000_000_000);
    let nanos = e.mtime_ns.rem_euclid(1_000_000_000);
    let base = smolvm::timefmt::rfc3339_utc(secs);
    let modified = format!("{}.{nanos:09}Z", base.trim_end_matches('Z'));
    let mut v = json!({
        "name": e.name, "type": kind, "path": e.path, "size": e.size.to_string(), "mode": e.mode & 0o7777,
        "permissions": permissions(e.mode, e.kind), "owner": e.owner, "group": e.group, "modifiedTime": modified,
    });
    if let Some(target) = &e.symlink_target {
        v["symlinkTarget"] = json!(target);
    }
    v
}

fn event_json(e: &FsEvent) -> Value {
    let kind = match e.op {
        FsOp::Create => "EVENT_TYPE_CREATE",
        FsOp::Write => "EVENT_TYPE_WRITE",
        FsOp::Remove => "EVENT_TYPE_REMOVE",
        FsOp::Rename => "EVENT_TYPE_RENAME",
        FsOp::Chmod => "EVENT_TYPE_CHMOD",
    };
    json!({"name": e.name, "type": kind})
}

/// Checks the path is a directory before a watch starts (so the caller gets `not_found`).
async fn watched_dir(t: &Target, p: &str) -> Result<String, RpcError> {
    let path = t.path(p);
    let r = fs(t, FsRequest::Stat { path: path.clone() }).await?;
    if r.entries.first().is_some_and(|e| e.kind != EntryKind::Dir) {
        return Err(RpcError::new(Code::InvalidArgument, format!("{path} is not a directory")));
    }
    Ok(path)
}

/// A place among the sandbox's watches, or the error that says there is none.
fn watch_slot(t: &Target) -> Result<crate::limits::Slot, RpcError> {
    t.conn.limits.watches.take(crate::limits::MAX_WATCHES).ok_or_else(|| {
        RpcError::new(
            Code::ResourceExhausted,
            format!(
                "this sandbox has {} watches already; end some (close the stream, RemoveWatcher) first",
                crate::limits::MAX_WATCHES
            ),
        )
    })
}

/// Runs a watch on its own thread, handing each batch to `sink` until it says stop; `slot`
/// is held as long.
fn run_watch(
    t: &Target,
    path: String,
    recursive: bool,
    slot: crate::limits::Slot,
    mut sink: impl FnMut(Result<Vec<FsEvent>, String>) -> bool + Send + 'static,
) {
    let conn = t.conn.clone();
    std::thread::spawn(move || {
        let _slot = slot;
        let h = match conn.client.watch(&path, recursive) {
            Ok(h) => h,
            Err(e) => {
                sink(Err(e.to_string()));
                return;
            }
        };
        loop {
            match h.next_timeout(Duration::from_millis(500)) {
                Ok(Some(batch)) => {
                    if !sink(Ok(batch)) {
                        return;
                    }
                }
                Ok(None) => {
                    if !sink(Ok(Vec::new())) {
                        return;
                    }
                }
                Err(e) => {
                    sink(Err(e.to_string()));
                    return;
                }
            }
        }
    });
}

async fn watch_dir(t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let p: PathReq = connect::request(headers, body)?;
    let path = watched_dir(t, &p.path).await?;
    let slot = watch_slot(t)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    if tx.send(connect::message(&json!({"start": {}}))).await.is_err() {
        return Err(RpcError::new(Code::Unavailable, "the client went away"));
    }
    run_watch(t, path, p.recursive, slot, move |batch| match batch {
        Ok(events) if events.is_empty() => !tx.is_closed(),
        Ok(events) => {
            events.iter().all(|e| tx.blocking_send(connect::message(&json!({"filesystem": event_json(e)}))).is_ok())
        }
        Err(e) => {
            let _ = tx.blocking_send(connect::end(Some(&RpcError::new(Code::Unavailable, e))));
            false
        }
    });
    Ok(connect::stream(rx))
}

async fn create_watcher(app: &Arc<App>, t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let p: PathReq = connect::request(headers, body)?;
    let path = watched_dir(t, &p.path).await?;
    let slot = watch_slot(t)?;
    let w = Arc::new(Watcher::default());
    let id = crate::key::random_hex(8);
    {
        let mut watchers = lock(&app.watchers);
        watchers.retain(|_, (_, w)| !w.ended.load(Ordering::Relaxed));
        watchers.insert(id.clone(), (t.id.clone(), w.clone()));
    }
    run_watch(t, path, p.recursive, slot, move |batch| {
        let idle = lock(&w.polled).elapsed() > WATCHER_IDLE;
        if w.cancel.load(Ordering::Relaxed) || idle {
            if idle {
                *lock(&w.failed) = Some(format!("not polled for {}s: the watcher was stopped", WATCHER_IDLE.as_secs()));
            }
            w.ended.store(true, Ordering::Relaxed);
            return false;
        }
        match batch {
            Ok(events) => {
                // A guest (root inside, maybe hostile) can make changes faster than a client
                // polls: past the cap the oldest are dropped, so the server's memory is not
                // the guest's to fill.
                let mut kept = lock(&w.events);
                kept.extend(events);
                let over = kept.len().saturating_sub(MAX_PENDING_EVENTS);
                kept.drain(..over);
                true
            }
            Err(e) => {
                *lock(&w.failed) = Some(e);
                w.ended.store(true, Ordering::Relaxed);
                false
            }
        }
    });
    Ok(connect::unary(&json!({"watcherId": id})))
}

fn watcher(app: &App, t: &Target, id: &str) -> Result<Arc<Watcher>, RpcError> {
    lock(&app.watchers)
        .get(id)
        .filter(|(sandbox, _)| *sandbox == t.id)
        .map(|(_, w)| w.clone())
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher {id} not found")))
}

fn watcher_events(app: &App, t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let p: PathReq = connect::request(headers, body)?;
    let w = watcher(app, t, &p.watcher_id)?;
    *lock(&w.polled) = std::time::Instant::now();
    let events: Vec<FsEvent> = std::mem::take(&mut *lock(&w.events));
    if events.is_empty() {
        if let Some(e) = lock(&w.failed).clone() {
            return Err(RpcError::new(Code::Unavailable, e));
        }
    }
    Ok(connect::unary(&json!({"events": events.iter().map(event_json).collect::<Vec<_>>()})))
}

fn remove_watcher(app: &App, t: &Target, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let p: PathReq = connect::request(headers, body)?;
    let w = watcher(app, t, &p.watcher_id)?;
    w.cancel.store(true, Ordering::Relaxed);
    lock(&app.watchers).remove(&p.watcher_id);
    Ok(connect::unary(&json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_as_envd_writes_them() {
        let e = FsEntry {
            name: "f".into(),
            path: "/root/f".into(),
            kind: EntryKind::File,
            size: 5,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            owner: "root".into(),
            group: "root".into(),
            mtime_ns: 1_700_000_000_000_000_123,
            symlink_target: None,
        };
        let v = entry_json(&e);
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["size"], "5");
        assert_eq!(v["modifiedTime"], "2023-11-14T22:13:20.000000123Z");
        assert_eq!(permissions(0o40755, EntryKind::Dir), "drwxr-xr-x");
    }
}
