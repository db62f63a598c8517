//! Directory watches for the host (protocol v4 `Watch`): inotify on a directory (and, when
//! recursive, on each subdirectory, those created later included); changes go back in batches
//! as `FsEvents` until the host sends `Cancel` (or disconnects), then `Done`.
//!
//! Why inotify in the guest rather than polling listings from the host: a poll misses a file
//! that comes and goes between two polls, and costs a listing per interval per watch.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use smolvm_protocol::agent::{FsEvent, FsOp, GuestMsg, WatchRequest};

use super::Writer;

/// How often the watch thread looks at its cancel flag.
const TICK_MS: i32 = 100;
/// Events per message at most (a frame holds 1 MiB).
const BATCH: usize = 512;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF;

struct Inotify {
    fd: OwnedFd,
    /// Watch descriptor to the directory's path relative to the root ("" for the root).
    dirs: HashMap<i32, String>,
}

impl Inotify {
    fn new() -> std::io::Result<Inotify> {
        // SAFETY: inotify_init1 takes flags only; the result is checked before use.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Inotify { fd: unsafe { OwnedFd::from_raw_fd(fd) }, dirs: HashMap::new() })
    }

    fn add(&mut self, dir: &Path, rel: &str) -> std::io::Result<()> {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK | libc::IN_ONLYDIR) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.to_string());
        Ok(())
    }

    /// Adds `dir` and, for a recursive watch, every directory under it.
    fn add_tree(&mut self, root: &Path, dir: &Path, recursive: bool) -> std::io::Result<()> {
        let rel = dir.strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        self.add(dir, &rel)?;
        if recursive {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = self.add_tree(root, &e.path(), true);
                }
            }
        }
        Ok(())
    }
}

/// Starts a watch in its own thread; `cancel` ends it.
pub fn start(out: Writer, id: u32, json: &str, cancel: Arc<AtomicBool>) {
    let req: WatchRequest = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => return out.error(id, format!("an unreadable Watch: {e}")),
    };
    let root = PathBuf::from(&req.path);
    let mut ino = match Inotify::new() {
        Ok(i) => i,
        Err(e) => return out.error(id, format!("inotify: {e}")),
    };
    if !root.is_absolute() {
        return out.error(id, format!("{}: need an absolute path", req.path));
    }
    if let Err(e) = ino.add_tree(&root, &root, req.recursive) {
        return out.io_error(id, format!("watch {}: {e}", req.path), &e);
    }
    let spawned = std::thread::Builder::new().name(format!("watch-{id}")).spawn(move || {
        run(&out, id, &root, req.recursive, &mut ino, &cancel);
        out.send(&GuestMsg::Done { id });
    });
    if let Err(e) = spawned {
        log_error(id, &e);
    }
}

fn log_error(id: u32, e: &std::io::Error) {
    crate::log::error!("watch {id}: cannot start its thread: {e}");
}

fn run(out: &Writer, id: u32, root: &Path, recursive: bool, ino: &mut Inotify, cancel: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !cancel.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: ino.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, TICK_MS) };
        if n <= 0 {
            continue;
        }
        // SAFETY: reads into our buffer, at most its length.
        let len = unsafe { libc::read(ino.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if len <= 0 {
            continue;
        }
        let events = parse(&buf[..len as usize], ino, root, recursive);
        let mut gone = false;
        for chunk in events.chunks(BATCH) {
            gone |= chunk.iter().any(|e| e.name.is_empty() && e.op == FsOp::Remove);
            let json = serde_json::to_string(chunk).unwrap_or_default();
            if !out.send(&GuestMsg::FsEvents { id, json }) {
                return;
            }
        }
        if gone {
            // The watched directory itself was removed: nothing more can come.
            return;
        }
    }
}

/// Decodes `struct inotify_event`s; new subdirectories of a recursive watch are added.
fn parse(mut b: &[u8], ino: &mut Inotify, root: &Path, recursive: bool) -> Vec<FsEvent> {
    const HEAD: usize = 16;
    let mut events = Vec::new();
    while b.len() >= HEAD {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (wd, mask, name_len) = (word(0) as i32, word(4), word(12) as usize);
        let Some(raw) = b.get(HEAD..HEAD + name_len) else { break };
        let name = String::from_utf8_lossy(raw.split(|&c| c == 0).next().unwrap_or_default()).into_owned();
        b = &b[HEAD + name_len..];
        let Some(dir) = ino.dirs.get(&wd).cloned() else { continue };
        let rel = match (dir.is_empty(), name.is_empty()) {
            (_, true) => dir.clone(),
            (true, false) => name.clone(),
            (false, false) => format!("{dir}/{name}"),
        };
        if mask & libc::IN_DELETE_SELF != 0 {
            ino.dirs.remove(&wd);
            if dir.is_empty() {
                events.push(FsEvent { name: String::new(), op: FsOp::Remove });
            }
            continue;
        }
        let op = if mask & libc::IN_CREATE != 0 || mask & libc::IN_MOVED_TO != 0 {
            FsOp::Create
        } else if mask & libc::IN_DELETE != 0 {
            FsOp::Remove
        } else if mask & libc::IN_MOVED_FROM != 0 {
            FsOp::Rename
        } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
            FsOp::Write
        } else if mask & libc::IN_ATTRIB != 0 {
            FsOp::Chmod
        } else {
            continue;
        };
        let mut inside = Vec::new();
        if recursive && op == FsOp::Create && mask & libc::IN_ISDIR != 0 {
            let _ = ino.add_tree(root, &root.join(&rel), true);
            // What was made in it before its watch was added has no event of its own (a
            // `mkdir d && touch d/f`): reported as created, once the watch is in place.
            existing(&root.join(&rel), &rel, &mut inside, 0);
        }
        // A write is reported once per burst: IN_MODIFY and the IN_CLOSE_WRITE after it.
        let dup = events.last().is_some_and(|l: &FsEvent| l.name == rel && l.op == op && op == FsOp::Write);
        if !dup {
            events.push(FsEvent { name: rel, op });
        }
        events.append(&mut inside);
    }
    events
}

/// The entries under `dir` (named from `rel`) as Create events, at most 32 levels down.
fn existing(dir: &Path, rel: &str, out: &mut Vec<FsEvent>, depth: usize) {
    if depth > 32 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = format!("{rel}/{}", e.file_name().to_string_lossy());
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        out.push(FsEvent { name: name.clone(), op: FsOp::Create });
        if is_dir {
            existing(&e.path(), &name, out, depth + 1);
        }
    }
}
