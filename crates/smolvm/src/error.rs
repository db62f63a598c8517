//! What kind of failure an error is, whatever operation raised it: the one thing each front
//! end (CLI, `smolvm serve`, MCP) needs to choose an exit code, an HTTP status or a hint,
//! without reading the message. Every public error type of the library has a [`Kind`].
//!
//! Why a kind beside the typed enums rather than one error type for everything: the enums
//! keep what each operation can say (a snapshot's differences, the console tail of a boot);
//! the kind is the part every caller shares. Front ends map kinds once (`hints.rs`,
//! `serve::envd::agent_error`, `serve::control::sandbox_error`).

use serde::Serialize;

use crate::agent::AgentError;
use crate::sandbox::{BootError, CopyError, CreateError, LifecycleError, SandboxError};
use crate::snapshot::SnapshotError;
use crate::state::StateError;

/// The kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such sandbox, snapshot, file or image.
    NotFound,
    /// The thing exists but is in the wrong state for this (paused, stopped, already there).
    Conflict,
    /// The request itself is wrong (a bad name, size, policy, path); retrying will not help.
    InvalidInput,
    /// Not allowed (a permission in the guest, a host resource the caller may not have).
    PermissionDenied,
    /// A limit was reached: disk full, too many processes, no free uid.
    ResourceExhausted,
    /// A part that should answer does not (the VM stopped, the agent went away, a download
    /// failed): retrying later may help.
    Unavailable,
    /// Anything else, including failures inside the guest that carry no errno.
    Internal,
}

/// An error that knows its kind, and the guest's errno when the guest failed a system call.
pub trait Kind {
    fn kind(&self) -> ErrorKind;

    /// The guest's errno (agent protocol v6), when the failure was one of its system calls.
    fn guest_errno(&self) -> Option<i32> {
        None
    }
}

/// The kind an errno means.
pub fn kind_of_errno(errno: i32) -> ErrorKind {
    match errno {
        libc::ENOENT | libc::ESRCH => ErrorKind::NotFound,
        libc::EEXIST | libc::ENOTEMPTY | libc::EBUSY | libc::ETXTBSY => ErrorKind::Conflict,
        libc::EINVAL | libc::EISDIR | libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP | libc::ENOEXEC => {
            ErrorKind::InvalidInput
        }
        libc::EACCES | libc::EPERM | libc::EROFS => ErrorKind::PermissionDenied,
        libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EFBIG | libc::EAGAIN => {
            ErrorKind::ResourceExhausted
        }
        _ => ErrorKind::Internal,
    }
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    e.raw_os_error().map_or(ErrorKind::Internal, kind_of_errno)
}

impl Kind for StateError {
    fn kind(&self) -> ErrorKind {
        match self {
            StateError::Transition { .. } => ErrorKind::Conflict,
            StateError::SharedHome { .. } | StateError::ForeignHome { .. } => ErrorKind::PermissionDenied,
            StateError::TooNew { .. } => ErrorKind::InvalidInput,
            StateError::Lock { source, .. } | StateError::Home { source, .. } => io_kind(source),
            StateError::Query(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull => {
                ErrorKind::ResourceExhausted
            }
            StateError::Open { .. } | StateError::Query(_) => ErrorKind::Internal,
        }
    }
}

impl Kind for SandboxError {
    fn kind(&self) -> ErrorKind {
        match self {
            SandboxError::NotFound(_) => ErrorKind::NotFound,
            SandboxError::BadName(_) => ErrorKind::InvalidInput,
            SandboxError::NotRunning { .. } => ErrorKind::Conflict,
            SandboxError::State(e) => e.kind(),
            SandboxError::Io { source, .. } => io_kind(source),
        }
    }
}

impl Kind for AgentError {
    fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Connect { .. } | AgentError::Lost { .. } => ErrorKind::Unavailable,
            AgentError::Guest { errno, .. } => errno.map_or(ErrorKind::Internal, kind_of_errno),
            AgentError::Sandbox(e) => e.kind(),
            AgentError::Unsupported { .. } => ErrorKind::InvalidInput,
            AgentError::Io(e) => io_kind(e),
        }
    }

    fn guest_errno(&self) -> Option<i32> {
        match self {
            AgentError::Guest { errno, .. } => *errno,
            _ => None,
        }
    }
}

impl Kind for CopyError {
    fn kind(&self) -> ErrorKind {
        match self {
            CopyError::Agent(e) => e.kind(),
            CopyError::Sandbox(e) => e.kind(),
            CopyError::NoSuchFile { .. } => ErrorKind::NotFound,
            CopyError::Directory { .. } => ErrorKind::InvalidInput,
            CopyError::TooLong { .. } | CopyError::Guest { .. } => ErrorKind::Internal,
            CopyError::NoSpace { .. } => ErrorKind::ResourceExhausted,
            CopyError::Exists { .. } => ErrorKind::Conflict,
            CopyError::Io { source, .. } => io_kind(source),
        }
    }

    fn guest_errno(&self) -> Option<i32> {
        match self {
            CopyError::Agent(e) => e.guest_errno(),
            _ => None,
        }
    }
}

impl Kind for SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::NotFound(_) => ErrorKind::NotFound,
            SnapshotError::Exists(_) => ErrorKind::Conflict,
            SnapshotError::Name(_) => ErrorKind::InvalidInput,
            SnapshotError::Mismatch { .. } => ErrorKind::Conflict,
            SnapshotError::Io { source, .. } => io_kind(source),
            SnapshotError::Corrupt { .. } | SnapshotError::Meta { .. } => ErrorKind::Internal,
        }
    }
}

impl Kind for BootError {
    fn kind(&self) -> ErrorKind {
        match self {
            BootError::NoFreeUid { .. } => ErrorKind::ResourceExhausted,
            BootError::NoVmUsers => ErrorKind::PermissionDenied,
            BootError::State(e) => e.kind(),
            BootError::Io { source, .. } => io_kind(source),
            _ => ErrorKind::Unavailable,
        }
    }
}

impl Kind for LifecycleError {
    fn kind(&self) -> ErrorKind {
        match self {
            LifecycleError::Sandbox(e) => e.kind(),
            LifecycleError::State(e) => e.kind(),
            LifecycleError::Boot(e) => e.kind(),
            LifecycleError::Snapshot(e) => e.kind(),
            LifecycleError::Env { source, .. } => source.kind(),
            LifecycleError::Fork(e) => e.kind(),
            LifecycleError::StillRunning { .. } | LifecycleError::NotPaused { .. } => ErrorKind::Conflict,
            LifecycleError::ImageGone { .. } => ErrorKind::NotFound,
            LifecycleError::VarName { .. } | LifecycleError::Policy { .. } | LifecycleError::Secret { .. } => {
                ErrorKind::InvalidInput
            }
            LifecycleError::Forward { .. }
            | LifecycleError::PolicyNotApplied { .. }
            | LifecycleError::SecretsNotApplied { .. } => ErrorKind::Unavailable,
        }
    }
}

impl Kind for CreateError {
    fn kind(&self) -> ErrorKind {
        match self {
            CreateError::Exists(_) => ErrorKind::Conflict,
            CreateError::Name(_)
            | CreateError::Memory(_)
            | CreateError::Cpus(_)
            | CreateError::DiskSize(_)
            | CreateError::NoPreset(_)
            | CreateError::Network(_)
            | CreateError::Secret(_)
            | CreateError::PresetWithSnapshot(_) => ErrorKind::InvalidInput,
            CreateError::Boot(e) => e.kind(),
            CreateError::State(e) => e.kind(),
            CreateError::Sandbox(e) => e.kind(),
            CreateError::Snapshot(e) => e.kind(),
            CreateError::Setup(e) => e.kind(),
            CreateError::Dir { source, .. } => io_kind(source),
            CreateError::SnapshotImage { .. } => ErrorKind::NotFound,
            CreateError::NoKvm(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_errno_decides_the_kind_and_text_does_not() {
        let guest = |errno| AgentError::Guest { sandbox: "b".into(), message: "anything at all".into(), errno };
        assert_eq!(guest(Some(libc::ENOSPC)).kind(), ErrorKind::ResourceExhausted);
        assert_eq!(guest(Some(libc::ENOENT)).kind(), ErrorKind::NotFound);
        assert_eq!(guest(Some(libc::EACCES)).kind(), ErrorKind::PermissionDenied);
        assert_eq!(guest(None).kind(), ErrorKind::Internal, "no errno, no guess from the text");
        let no_space =
            AgentError::Guest { sandbox: "b".into(), message: "No space left on device".into(), errno: None };
        assert_eq!(no_space.kind(), ErrorKind::Internal);
        let copy = CopyError::Agent(guest(Some(libc::EDQUOT)));
        assert_eq!((copy.kind(), copy.guest_errno()), (ErrorKind::ResourceExhausted, Some(libc::EDQUOT)));
    }

    #[test]
    fn a_sandbox_in_the_wrong_state_is_a_conflict_wherever_it_surfaces() {
        let paused = SandboxError::NotRunning { name: "b".into(), status: crate::sandbox::Status::Paused };
        assert_eq!(paused.kind(), ErrorKind::Conflict);
        let through_agent = AgentError::Sandbox(Box::new(paused));
        assert_eq!(through_agent.kind(), ErrorKind::Conflict);
        assert_eq!(through_agent.to_string(), "sandbox b is paused, not running");
        assert_eq!(SandboxError::NotFound("b".into()).kind(), ErrorKind::NotFound);
    }
}
