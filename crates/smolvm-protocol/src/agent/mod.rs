//! The guest agent protocol: commands and files without SSH.
//!
//! # Transport
//! A byte stream between the host and `smolvm-init`: the virtio-serial port named
//! [`AGENT_PORT_NAME`] (QEMU), or a vsock connection (Firecracker). A virtio-serial port has
//! one host-side client at a time, so the host keeps one long-lived connection per sandbox (the
//! agent proxy) and multiplexes its own clients onto it; one connection carries any number of
//! concurrent requests, told apart by their `id`.
//!
//! # Framing
//! A frame is a 4-byte big-endian length, then that many bytes of payload: one [`HostMsg`]
//! (host to guest) or [`GuestMsg`] (guest to host) encoded with postcard. A length above
//! [`MAX_FRAME`] is a protocol error; the receiver drops the connection.
//!
//! # Why postcard
//! Its wire format is specified and stable (postcard 1.0), compact (varints, no field names),
//! and maps serde types directly, so the message definitions below *are* the protocol. Byte
//! payloads go through `serde_bytes`: a length and the raw bytes, no per-byte overhead.
//!
//! # Sessions and versions
//! A connection starts with the host's [`HostMsg::Hello`] carrying the host's version; the
//! guest answers with the version both speak, `min(host, guest)`, and its readiness facts
//! ([`GuestMsg::hello`] picks the answer's form for that version). Each side then sends only
//! messages whose [`HostMsg::since`] / [`GuestMsg::since`] is at most the negotiated version:
//! the host checks before sending and reports "the guest is too old" instead of sending. When
//! the host side disconnects, the guest ends the session: processes it started are killed,
//! unfinished file writes removed.
//!
//! `start` boots the rootfs a sandbox was created with, so an old guest with a new host is the
//! normal case, and the rules below are what keeps it working. They are written down, with the
//! history of each version, in `crates/smolvm-protocol/VERSIONING.md`; the frozen fixtures in
//! `tests/fixtures/v<N>.txt` pin every message's bytes per version.
//!
//! # Compatible changes
//! postcard encodes enum variants by index and struct fields by position. So: new message
//! kinds are appended at the end of an enum, with `since` = the new version; fields are never
//! removed, reordered or retyped (a struct that must grow travels as JSON, like the readiness
//! facts in [`GuestMsg::HelloV2`]). Every message that belongs to a request has `id: u32` as its
//! first field, so that a peer that cannot decode a frame can still answer that request with
//! an error ([`frame_id`]) and keep the session for everything else.

use serde::{Deserialize, Serialize};

use crate::ready::{BootPhases, Ready};

mod fs;
mod refresh;
pub use fs::*;
pub use refresh::*;

/// The readiness facts as version 1 of the protocol carries them, inside the postcard Hello:
/// frozen, field for field (postcard fields are positional). Newer facts travel as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyV1 {
    pub v: u32,
    pub host_key: String,
    pub boot_us: BootPhases,
}

/// The protocol version this crate speaks (the newest).
pub const PROTOCOL_VERSION: u32 = 6;
/// The oldest version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The virtio-serial port's name (`/sys/class/virtio-ports/*/name` in the guest).
pub const AGENT_PORT_NAME: &str = "smolvm.agent";
/// The vsock port of the agent, where the transport is vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk (stdout, stdin, file contents) in one message.
pub const CHUNK: usize = 64 * 1024;
/// Bytes a message adds around a chunk, at most (variant, id, lengths).
pub const CHUNK_OVERHEAD: usize = 64;

/// v5 flow control: the data bytes (`Stdout` and `Stderr` of an exec together, `FileData` of a
/// read) a guest sends for one request before the host grants more with [`HostMsg::Credit`].
/// The host grants what it has taken off its queue, so its queue for a request never holds
/// more than this, and a reader that stops reading stops the process writing, in the guest.
pub const INITIAL_WINDOW: u32 = 1 << 20;

// A full chunk with its envelope always fits in a frame.
const _: () = assert!(CHUNK + CHUNK_OVERHEAD <= MAX_FRAME);

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Executed directly (`execvp`), no shell.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

/// A terminal size, for PTY execs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// An exec request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Command,
    /// Added to the agent's environment (PATH, HOME=/root, and the sandbox's variables).
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// When false, the process's stdin is `/dev/null`; when true, it is fed by
    /// [`HostMsg::Stdin`] until [`HostMsg::StdinClose`].
    pub stdin: bool,
    /// Killed (SIGKILL to its process group) after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run on a pseudo-terminal of this size (stdout carries the terminal's output).
    pub pty: Option<PtySize>,
}

/// Metadata of a file written by [`HostMsg::WriteFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    Hello {
        version: u32,
    },
    Exec {
        id: u32,
        request: ExecRequest,
    },
    Stdin {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    StdinClose {
        id: u32,
    },
    Signal {
        id: u32,
        signal: i32,
    },
    /// Starts a file write; data follows in [`HostMsg::FileData`], then [`HostMsg::FileEnd`].
    /// The guest writes a temporary file beside `path` and renames it at the end.
    WriteFile {
        id: u32,
        file: WriteFile,
    },
    FileData {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    FileEnd {
        id: u32,
    },
    ReadFile {
        id: u32,
        path: String,
    },
    Stat {
        id: u32,
        path: String,
    },
    /// Replaces the sandbox's variables (for login shells and for later execs).
    SetEnv {
        id: u32,
        vars: Vec<(String, String)>,
    },
    /// Power off cleanly (as SIGTERM to init).
    Shutdown,
    /// v2: answered with [`GuestMsg::Done`] (an agent that answers is an agent that works).
    Ping {
        id: u32,
    },
    /// v3: after a restore from a snapshot: reseed the kernel's random state, step the clock,
    /// and (for a clone) take a new identity. A [`Refresh`] as JSON, so that it can grow;
    /// answered with [`GuestMsg::Refreshed`].
    Refresh {
        id: u32,
        json: String,
    },
    /// v3: answered with [`GuestMsg::Done`] once sshd accepts connections (readiness does not
    /// wait for it), or an error after `timeout_ms`.
    WaitSsh {
        id: u32,
        timeout_ms: u64,
    },
    /// v4: a file system operation ([`FsRequest`] as JSON: list, lstat, mkdir, move, remove);
    /// answered with [`GuestMsg::FsResult`].
    Fs {
        id: u32,
        json: String,
    },
    /// v4: watch a directory ([`WatchRequest`] as JSON): changes arrive as
    /// [`GuestMsg::FsEvents`] until [`HostMsg::Cancel`], answered with `Done`.
    Watch {
        id: u32,
        json: String,
    },
    /// v4: ends request `id` (a watch). v5: for an exec or a read, the host takes no more of
    /// its data: the guest drains the process's output without sending it (the process goes on
    /// and its `Exit` still comes), or ends the read.
    Cancel {
        id: u32,
    },
    /// v5: the host took `bytes` more of request `id`'s data off its queue: the guest may send
    /// that much more ([`INITIAL_WINDOW`]).
    Credit {
        id: u32,
        bytes: u32,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// File metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub is_dir: bool,
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// The answer to Hello in version 1.
    Hello {
        version: u32,
        ready: ReadyV1,
    },
    Stdout {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Stderr {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The process ended; all its output was sent before this. `timed_out` is set when the
    /// agent killed it for its timeout.
    Exit {
        id: u32,
        status: ExitStatus,
        timed_out: bool,
    },
    /// A chunk of a file being read.
    FileData {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The end of a file read, with its metadata.
    FileEnd {
        id: u32,
        stat: FileStat,
    },
    StatResult {
        id: u32,
        stat: Option<FileStat>,
    },
    /// The request `id` succeeded (file written, env set).
    Done {
        id: u32,
    },
    /// The request `id` failed; `message` says why (errno text, path).
    Error {
        id: u32,
        message: String,
    },
    /// v2: the answer to Hello, the readiness facts as their JSON object (so that they can grow
    /// without a protocol version).
    HelloV2 {
        version: u32,
        ready_json: String,
    },
    /// v3: the answer to [`HostMsg::Refresh`]: a [`Refreshed`] as JSON.
    Refreshed {
        id: u32,
        json: String,
    },
    /// v4: the answer to [`HostMsg::Fs`]: an [`FsReply`] as JSON.
    FsResult {
        id: u32,
        json: String,
    },
    /// v4: changes seen by a [`HostMsg::Watch`]: a `Vec<FsEvent>` as JSON.
    FsEvents {
        id: u32,
        json: String,
    },
    /// v6: the request `id` failed as [`GuestMsg::Error`], with the guest's `errno` (0 when
    /// the failure was not a system call's), so that the host tells "no such file" or "disk
    /// full" from other failures without reading the text. A peer below v6 gets `Error`
    /// ([`GuestMsg::for_version`]).
    Failed {
        id: u32,
        message: String,
        errno: i32,
    },
}

impl HostMsg {
    /// The protocol version that introduced this message: a peer that negotiated less does
    /// not know it.
    pub fn since(&self) -> u32 {
        match self {
            HostMsg::Ping { .. } => 2,
            HostMsg::Refresh { .. } | HostMsg::WaitSsh { .. } => 3,
            HostMsg::Fs { .. } | HostMsg::Watch { .. } | HostMsg::Cancel { .. } => 4,
            HostMsg::Credit { .. } => 5,
            _ => 1,
        }
    }

    /// The message's kind, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            HostMsg::Hello { .. } => "Hello",
            HostMsg::Exec { .. } => "Exec",
            HostMsg::Stdin { .. } => "Stdin",
            HostMsg::StdinClose { .. } => "StdinClose",
            HostMsg::Signal { .. } => "Signal",
            HostMsg::WriteFile { .. } => "WriteFile",
            HostMsg::FileData { .. } => "FileData",
            HostMsg::FileEnd { .. } => "FileEnd",
            HostMsg::ReadFile { .. } => "ReadFile",
            HostMsg::Stat { .. } => "Stat",
            HostMsg::SetEnv { .. } => "SetEnv",
            HostMsg::Shutdown => "Shutdown",
            HostMsg::Ping { .. } => "Ping",
            HostMsg::Refresh { .. } => "Refresh",
            HostMsg::WaitSsh { .. } => "WaitSsh",
            HostMsg::Fs { .. } => "Fs",
            HostMsg::Watch { .. } => "Watch",
            HostMsg::Cancel { .. } => "Cancel",
            HostMsg::Credit { .. } => "Credit",
        }
    }

    /// The request id this message refers to (`None` for Hello and Shutdown).
    pub fn id_mut(&mut self) -> Option<&mut u32> {
        match self {
            HostMsg::Hello { .. } | HostMsg::Shutdown => None,
            HostMsg::Ping { id } | HostMsg::Refresh { id, .. } | HostMsg::WaitSsh { id, .. } => Some(id),
            HostMsg::Fs { id, .. } | HostMsg::Watch { id, .. } | HostMsg::Cancel { id } => Some(id),
            HostMsg::Credit { id, .. } => Some(id),
            HostMsg::Exec { id, .. }
            | HostMsg::Stdin { id, .. }
            | HostMsg::StdinClose { id }
            | HostMsg::Signal { id, .. }
            | HostMsg::WriteFile { id, .. }
            | HostMsg::FileData { id, .. }
            | HostMsg::FileEnd { id }
            | HostMsg::ReadFile { id, .. }
            | HostMsg::Stat { id, .. }
            | HostMsg::SetEnv { id, .. } => Some(id),
        }
    }

    /// True for a message that opens a new request (and so a new id).
    pub fn opens_request(&self) -> bool {
        matches!(
            self,
            HostMsg::Exec { .. }
                | HostMsg::WriteFile { .. }
                | HostMsg::ReadFile { .. }
                | HostMsg::Stat { .. }
                | HostMsg::SetEnv { .. }
                | HostMsg::Ping { .. }
                | HostMsg::Refresh { .. }
                | HostMsg::WaitSsh { .. }
                | HostMsg::Fs { .. }
                | HostMsg::Watch { .. }
        )
    }
}

impl GuestMsg {
    /// The protocol version that introduced this message.
    pub fn since(&self) -> u32 {
        match self {
            GuestMsg::HelloV2 { .. } => 2,
            GuestMsg::Refreshed { .. } => 3,
            GuestMsg::FsResult { .. } | GuestMsg::FsEvents { .. } => 4,
            GuestMsg::Failed { .. } => 6,
            _ => 1,
        }
    }

    /// This message as a peer that speaks `version` can read it: a v6 `Failed` becomes the
    /// `Error` it refines. (The guest sends `Failed` only to a v6 host; the agent proxy
    /// passes it on to each client in the form of the version the two share.)
    pub fn for_version(self, version: u32) -> GuestMsg {
        match self {
            GuestMsg::Failed { id, message, .. } if version < 6 => GuestMsg::Error { id, message },
            m => m,
        }
    }

    /// A failure's text and errno (`Error` has none), or `None` for every other message.
    pub fn as_failure(&self) -> Option<(&str, Option<i32>)> {
        match self {
            GuestMsg::Error { message, .. } => Some((message, None)),
            GuestMsg::Failed { message, errno, .. } => Some((message, Some(*errno).filter(|e| *e != 0))),
            _ => None,
        }
    }

    /// The answer to a Hello, in the form of the negotiated `version`.
    pub fn hello(version: u32, ready: &Ready) -> GuestMsg {
        if version >= 2 {
            GuestMsg::HelloV2 { version, ready_json: serde_json::to_string(ready).expect("plain strings and integers") }
        } else {
            let r = ReadyV1 { v: ready.v, host_key: ready.host_key.clone(), boot_us: ready.boot_us };
            GuestMsg::Hello { version, ready: r }
        }
    }

    /// The version and readiness facts of a Hello answer, in either form.
    pub fn as_hello(&self) -> Option<Result<(u32, Ready), serde_json::Error>> {
        match self {
            GuestMsg::Hello { version, ready } => {
                Some(Ok((*version, Ready { v: ready.v, host_key: ready.host_key.clone(), boot_us: ready.boot_us })))
            }
            GuestMsg::HelloV2 { version, ready_json } => Some(serde_json::from_str(ready_json).map(|r| (*version, r))),
            _ => None,
        }
    }

    /// The request id this message answers (`None` for Hello).
    pub fn id_mut(&mut self) -> Option<&mut u32> {
        match self {
            GuestMsg::Hello { .. } | GuestMsg::HelloV2 { .. } => None,
            GuestMsg::Stdout { id, .. }
            | GuestMsg::Stderr { id, .. }
            | GuestMsg::Exit { id, .. }
            | GuestMsg::FileData { id, .. }
            | GuestMsg::FileEnd { id, .. }
            | GuestMsg::StatResult { id, .. }
            | GuestMsg::Done { id }
            | GuestMsg::Refreshed { id, .. }
            | GuestMsg::FsResult { id, .. }
            | GuestMsg::FsEvents { id, .. }
            | GuestMsg::Error { id, .. }
            | GuestMsg::Failed { id, .. } => Some(id),
        }
    }

    /// The bytes this message counts against its request's flow-control window (v5): the data
    /// of `Stdout`, `Stderr` and `FileData`; nothing for every other message.
    pub fn flow_bytes(&self) -> usize {
        match self {
            GuestMsg::Stdout { data, .. } | GuestMsg::Stderr { data, .. } | GuestMsg::FileData { data, .. } => {
                data.len()
            }
            _ => 0,
        }
    }

    /// True for the last message of a request.
    pub fn ends_request(&self) -> bool {
        matches!(
            self,
            GuestMsg::Exit { .. }
                | GuestMsg::FileEnd { .. }
                | GuestMsg::StatResult { .. }
                | GuestMsg::Done { .. }
                | GuestMsg::Refreshed { .. }
                | GuestMsg::FsResult { .. }
                | GuestMsg::Error { .. }
                | GuestMsg::Failed { .. }
        )
    }
}

/// Why a frame could not be read or decoded.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    TooLarge(usize),
    Decode(postcard::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the limit of {MAX_FRAME}"),
            FrameError::Decode(e) => write!(f, "undecodable message: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Encodes one message as a frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = postcard::to_stdvec(msg).expect("our message types always serialize into a Vec");
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Reads one frame's payload, undecoded. `Ok(None)` on a clean end of stream before a frame.
/// After an error other than [`FrameError::Decode`] the stream is out of step: drop it.
pub fn read_payload(r: &mut impl std::io::Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(FrameError::Io)?;
    Ok(Some(buf))
}

/// Decodes a payload read by [`read_payload`].
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Reads one frame and decodes it. `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl std::io::Read) -> Result<Option<T>, FrameError> {
    read_payload(r)?.map(|p| decode(&p)).transpose()
}

fn varint(b: &[u8]) -> Option<(u32, &[u8])> {
    let mut v: u32 = 0;
    for (i, byte) in b.iter().enumerate().take(5) {
        v |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// The kind (variant index) and request id of a payload that may not decode (a message kind
/// newer than this side): every request message starts with its `id` (see module docs).
pub fn frame_id(payload: &[u8]) -> Option<(u32, u32)> {
    let (kind, rest) = varint(payload)?;
    let (id, _) = varint(rest)?;
    Some((kind, id))
}

#[cfg(test)]
mod tests;
