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
//! A connection starts with the host's [`HostMsg::Hello`]; the guest answers
//! [`GuestMsg::Hello`] with its version and its [`crate::ready::Ready`] facts. Both sides
//! speak `min(host, guest)`. When the host side disconnects, the guest ends the session:
//! processes it started are killed, unfinished file writes discarded.
//!
//! # Compatible changes
//! postcard encodes enum variants by index and struct fields by position. So: new message
//! kinds are appended at the end of an enum (old peers answer [`GuestMsg::Error`] to an
//! unknown one); fields are never removed, reordered or retyped; a new field needs a new
//! message kind or a version bump. The snapshot tests pin every encoding: a change that fails
//! them is a breaking change.

use serde::{Deserialize, Serialize};

use crate::ready::Ready;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
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
    Hello {
        version: u32,
        ready: Ready,
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
}

impl HostMsg {
    /// The request id this message refers to (`None` for Hello and Shutdown).
    pub fn id_mut(&mut self) -> Option<&mut u32> {
        match self {
            HostMsg::Hello { .. } | HostMsg::Shutdown => None,
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
        )
    }
}

impl GuestMsg {
    /// The request id this message answers (`None` for Hello).
    pub fn id_mut(&mut self) -> Option<&mut u32> {
        match self {
            GuestMsg::Hello { .. } => None,
            GuestMsg::Stdout { id, .. }
            | GuestMsg::Stderr { id, .. }
            | GuestMsg::Exit { id, .. }
            | GuestMsg::FileData { id, .. }
            | GuestMsg::FileEnd { id, .. }
            | GuestMsg::StatResult { id, .. }
            | GuestMsg::Done { id }
            | GuestMsg::Error { id, .. } => Some(id),
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
                | GuestMsg::Error { .. }
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
    // Serializing our own message types into a Vec cannot fail.
    let payload = postcard::to_stdvec(msg).unwrap_or_default();
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Reads one frame and decodes it. `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl std::io::Read) -> Result<Option<T>, FrameError> {
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
    postcard::from_bytes(&buf).map(Some).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ready::{BootPhases, READY_VERSION};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Each message kind, with its exact frame. If one of these changes, the wire format
    /// changed: that breaks deployed guests unless the version is bumped (see module docs).
    #[test]
    fn host_messages_are_pinned() {
        let exec = ExecRequest {
            command: Command::Argv(vec!["ls".into(), "-l".into()]),
            env: vec![("A".into(), "1".into())],
            cwd: Some("/".into()),
            stdin: true,
            timeout_ms: Some(1000),
            pty: Some(PtySize { rows: 24, cols: 80 }),
        };
        let cases: Vec<(HostMsg, &str)> = vec![
            (HostMsg::Hello { version: 1 }, "000000020001"),
            (HostMsg::Exec { id: 7, request: exec }, "0000001901070002026c73022d6c010141013101012f0101e807011850"),
            (HostMsg::Stdin { id: 7, data: b"hi".to_vec() }, "000000050207026869"),
            (HostMsg::StdinClose { id: 7 }, "000000020307"),
            (HostMsg::Signal { id: 7, signal: 2 }, "00000003040704"),
            (
                HostMsg::WriteFile { id: 1, file: WriteFile { path: "/f".into(), mode: 0o644, uid: 0, gid: 0 } },
                "000000090501022f66a4030000",
            ),
            (HostMsg::FileData { id: 1, data: vec![0, 255] }, "0000000506010200ff"),
            (HostMsg::FileEnd { id: 1 }, "000000020701"),
            (HostMsg::ReadFile { id: 2, path: "/f".into() }, "000000050802022f66"),
            (HostMsg::Stat { id: 3, path: "/".into() }, "000000040903012f"),
            (HostMsg::SetEnv { id: 4, vars: vec![("K".into(), "v".into())] }, "000000070a0401014b0176"),
            (HostMsg::Shutdown, "000000010b"),
        ];
        for (msg, want) in cases {
            let frame = encode(&msg);
            assert_eq!(hex(&frame), want, "{msg:?}");
            let back: HostMsg = read_frame(&mut frame.as_slice()).unwrap().unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn guest_messages_are_pinned() {
        let ready = Ready {
            v: READY_VERSION,
            host_key: "k".into(),
            boot_us: BootPhases { init: 1, mounts: 2, network: 3, sshd: 4 },
        };
        let stat = FileStat { size: 5, mode: 0o100644, uid: 0, gid: 0, mtime: 10, is_dir: false };
        let cases: Vec<(GuestMsg, &str)> = vec![
            (GuestMsg::Hello { version: 1, ready }, "00000009000101016b01020304"),
            (GuestMsg::Stdout { id: 7, data: b"ok".to_vec() }, "000000050107026f6b"),
            (GuestMsg::Stderr { id: 7, data: vec![] }, "00000003020700"),
            (GuestMsg::Exit { id: 7, status: ExitStatus::Code(1), timed_out: false }, "000000050307000200"),
            (GuestMsg::Exit { id: 7, status: ExitStatus::Signal(9), timed_out: true }, "000000050307011201"),
            (GuestMsg::FileData { id: 1, data: vec![1] }, "0000000404010101"),
            (GuestMsg::FileEnd { id: 1, stat: stat.clone() }, "0000000a050105a4830200001400"),
            (GuestMsg::StatResult { id: 3, stat: None }, "00000003060300"),
            (GuestMsg::StatResult { id: 3, stat: Some(stat) }, "0000000b06030105a4830200001400"),
            (GuestMsg::Done { id: 4 }, "000000020704"),
            (GuestMsg::Error { id: 4, message: "no".into() }, "000000050804026e6f"),
        ];
        for (msg, want) in cases {
            let frame = encode(&msg);
            assert_eq!(hex(&frame), want, "{msg:?}");
            let back: GuestMsg = read_frame(&mut frame.as_slice()).unwrap().unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn a_full_chunk_fits_and_oversized_frames_are_refused() {
        let m = GuestMsg::Stdout { id: u32::MAX, data: vec![0xaa; CHUNK] };
        let frame = encode(&m);
        assert!(frame.len() - 4 <= CHUNK + CHUNK_OVERHEAD);
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(read_frame::<GuestMsg>(&mut huge.as_slice()), Err(FrameError::TooLarge(_))));
        assert!(read_frame::<GuestMsg>(&mut [].as_slice()).unwrap().is_none());
    }
}
