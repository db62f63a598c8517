//! The file system requests of protocol v4 (`HostMsg::Fs`, `HostMsg::Watch`) and their
//! answers, which travel as JSON inside the frames.

use serde::{Deserialize, Serialize};

/// A file system operation of [`HostMsg::Fs`](super::HostMsg::Fs). Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FsRequest {
    /// The entry itself (`lstat`: a symlink is reported as one, with its target).
    Stat { path: String },
    /// The entries under a directory, `depth` levels down (1 = its children).
    ListDir { path: String, depth: u32 },
    /// `mkdir -p`; a directory that exists already is the `AlreadyExists` failure.
    MakeDir { path: String },
    /// `rename(2)`, or a copy and remove across file systems.
    Move { source: String, destination: String },
    /// `rm -rf` (a missing path is `NotFound`).
    Remove { path: String },
}

/// The answer to an [`FsRequest`]: entries (one for Stat, MakeDir and Move; the listing for
/// ListDir; none for Remove), or a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FsReply {
    #[serde(default)]
    pub entries: Vec<FsEntry>,
    #[serde(default)]
    pub error: Option<FsFailure>,
    /// A listing that stopped early (a frame holds 1 MiB): what is here is its beginning.
    #[serde(default)]
    pub truncated: bool,
}

/// Why an [`FsRequest`] failed, in a kind the host can map (to HTTP statuses, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsFailure {
    pub kind: FsErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsErrorKind {
    NotFound,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    PermissionDenied,
    Invalid,
    Other,
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One file system entry (as `lstat` sees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    pub name: String,
    /// Absolute.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The user and group names (from the guest's `/etc/passwd`, `/etc/group`), else the ids.
    pub owner: String,
    pub group: String,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// What [`HostMsg::Watch`](super::HostMsg::Watch) watches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub path: String,
    /// Subdirectories too (and those created later).
    pub recursive: bool,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// The path relative to the watched directory.
    pub name: String,
    pub op: FsOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsOp {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}
