//! What to do about an error: the library says what failed, in its own terms; the CLI, which
//! knows its flags and commands, adds the hint (a line after the error).

use smolvm::agent::AgentError;
use smolvm::images::fetch::FetchError;
use smolvm::net::{NetError, PolicyError};
use smolvm::sandbox::{BootError, CreateError, LifecycleError, SandboxError, Status};

/// The hint for the first error in `chain` that has one.
pub fn for_chain<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> Option<String> {
    chain.into_iter().find_map(hint)
}

fn hint(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(e) = e.downcast_ref::<smolvm::state::StateError>() {
        use smolvm::error::{ErrorKind, Kind};
        if e.kind() == ErrorKind::ResourceExhausted {
            return Some(
                "the disk that holds SMOLVM_HOME is full: free space there (smolvm image prune, smolvm snapshot delete)"
                    .into(),
            );
        }
    }
    if let Some(e) = e.downcast_ref::<CreateError>() {
        return Some(match e {
            CreateError::Exists(n) => format!("smolvm delete {n}, or choose another --name"),
            CreateError::Memory(_) | CreateError::Cpus(_) | CreateError::DiskSize(_) => {
                "see --memory, --cpus and --disk-size in smolvm create --help".into()
            }
            CreateError::NoPreset(_) => "smolvm preset list names them".into(),
            CreateError::NoKvm(_) => "use --accel auto or --accel tcg; smolvm doctor explains".into(),
            CreateError::Disk(_) => "mkfs.ext4 comes with e2fsprogs (scripts/install-host-deps.sh)".into(),
            CreateError::Key(_) => "ssh-keygen comes with openssh-client (scripts/install-host-deps.sh)".into(),
            // Transparent wrappers: their source() skips the inner error, so look inside.
            CreateError::Fetch(f) => return hint(f),
            CreateError::Source(s) => return hint(s),
            CreateError::Boot(b) => return hint(b),
            CreateError::Sandbox(s) => return hint(s),
            CreateError::Network(p) => return hint(p),
            CreateError::Secret(s) => return hint(s),
            CreateError::Setup(l) => return hint(l.as_ref()),
            CreateError::State(s) => return hint(s),
            CreateError::Snapshot(e) => return snapshot_hint(e),
            CreateError::SnapshotImage { .. } => {
                "smolvm image pull (or image import) of the release the snapshot was taken with".into()
            }
            _ => return None,
        });
    }
    if let Some(e) = e.downcast_ref::<FetchError>() {
        return Some(match e {
            FetchError::Unreachable { .. } => "any of these works without it:\n\
                 - serve a release directory over HTTP and set SMOLVM_IMAGES_URL=http://HOST/DIR (assets at DIR/<tag>/<asset>)\n\
                 - load a locally built release: smolvm image import DIR/<tag>\n\
                 - build one here: smolvm image build all --out DIR"
                .into(),
            FetchError::Http { .. } => {
                "check SMOLVM_IMAGES_URL and SMOLVM_IMAGES_MANIFEST, or that the release is published (smolvm image show)"
                    .into()
            }
            FetchError::Mismatch { .. } => "Retry; if it happens again, the server (or a proxy) serves other bytes than \
                 the release pinned in this binary: check SMOLVM_IMAGES_URL and SMOLVM_IMAGES_MANIFEST, or rebuild \
                 and re-import the release (smolvm image import)"
                .into(),
            FetchError::Io { .. } => return None,
        });
    }
    if let Some(smolvm::images::source::SourceError::InsecureManifest { .. }) =
        e.downcast_ref::<smolvm::images::source::SourceError>()
    {
        return Some("serve it over https, give a local path, or set SMOLVM_ALLOW_INSECURE_MANIFEST=1".into());
    }
    if let Some(e) = e.downcast_ref::<SandboxError>() {
        return match e {
            SandboxError::NotFound(_) => Some("smolvm list shows the sandboxes".into()),
            SandboxError::NotRunning { name, status } => Some(match status {
                Status::Crashed => {
                    format!("its VM exited; see smolvm logs {name}, then smolvm delete {name} (or smolvm start {name})")
                }
                Status::Creating => "wait for smolvm create to finish".into(),
                Status::Paused => format!("smolvm resume {name} first"),
                _ => format!("smolvm start {name} first"),
            }),
            SandboxError::State(s) => hint(s),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<AgentError>() {
        return match e {
            AgentError::Connect { sandbox, .. } | AgentError::Lost { sandbox, .. } => {
                Some(format!("check smolvm status {sandbox} (the VM may have stopped) and smolvm logs {sandbox}"))
            }
            AgentError::Unsupported { .. } => Some(
                "the sandbox's image is older than this smolvm: recreate it from a newer release to use this".into(),
            ),
            AgentError::Sandbox(e) => hint(e.as_ref()),
            AgentError::Guest { errno: Some(libc::ENOSPC | libc::EDQUOT), sandbox, .. } => Some(format!(
                "the sandbox's disk is full: free space in it, or recreate it with a larger --disk ({sandbox})"
            )),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<smolvm::snapshot::SnapshotError>() {
        return snapshot_hint(e);
    }

    if let Some(e) = e.downcast_ref::<smolvm::sandbox::CopyError>() {
        return match e {
            smolvm::sandbox::CopyError::Agent(a) => hint(a),
            smolvm::sandbox::CopyError::Sandbox(s) => hint(s),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<BootError>() {
        return match e {
            BootError::Spawn { .. } => {
                Some("is QEMU installed? scripts/install-host-deps.sh installs it; smolvm doctor checks".into())
            }
            BootError::NoVmUsers => Some(
                "run scripts/install-host-deps.sh as root once: it creates the system user smolvm and its uid range \
                 in /etc/subuid and /etc/subgid (or run smolvm as an ordinary user)"
                    .into(),
            ),
            BootError::NoFreeUid { .. } => Some("delete sandboxes you no longer need (smolvm list)".into()),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<LifecycleError>() {
        return match e {
            LifecycleError::ImageGone { tag, .. } => {
                Some(format!("smolvm image pull (release {tag}), or smolvm image import DIR/{tag}"))
            }
            LifecycleError::StillRunning { name, .. } => {
                Some(format!("smolvm delete {name} stops it (and removes the sandbox)"))
            }
            LifecycleError::Sandbox(s) => hint(s),
            LifecycleError::State(s) => hint(s),
            LifecycleError::Boot(b) => hint(b),
            LifecycleError::Policy { source, .. } => hint(source),
            LifecycleError::Env { source, .. } => hint(source),
            LifecycleError::Secret { source, .. } => hint(source),
            LifecycleError::SecretsNotApplied { name, .. } => {
                Some(format!("smolvm stop {name} && smolvm start {name} hands them over at boot"))
            }
            LifecycleError::Snapshot(e) => snapshot_hint(e),
            LifecycleError::Fork(c) => hint(c.as_ref()),
            LifecycleError::NotPaused { name } => Some(format!("smolvm pause {name} first (it is running)")),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<smolvm::sandbox::secrets::SecretError>() {
        use smolvm::sandbox::secrets::SecretError as S;
        return Some(match e {
            S::NoHost { name } | S::BadHost { name, .. } => {
                format!("--secret {name}@api.example.com[,other.example.com]: the HTTPS hosts it is for")
            }
            S::Refused { .. } => "allow the host (--allow-domain HOST), or leave the secret out".into(),
            S::BadName { .. } => "the name is the guest's environment variable, such as OPENAI_API_KEY".into(),
            _ => "see SECRETS in smolvm --help".into(),
        });
    }
    if let Some(e) = e.downcast_ref::<PolicyError>() {
        return Some(match e {
            PolicyError::HostPort => "--allow-host-port takes a port from 1 to 65535".into(),
            PolicyError::NoneWithAllowList => "drop --network none, or the --allow-domain / --allow-cidr flags".into(),
            _ => "see the NETWORK section of smolvm --help".into(),
        });
    }
    if let Some(smolvm_release::BuildError::NoCheckout) = e.downcast_ref::<smolvm_release::BuildError>() {
        return Some("run smolvm from inside the repository, or pass --source DIR".into());
    }
    if let Some(smolvm_release::pinning::PinError::Mismatch { .. }) =
        e.downcast_ref::<smolvm_release::pinning::PinError>()
    {
        return Some("rebuild it: smolvm image build all --out DIR".into());
    }
    if let Some(NetError::NotRunning(_)) = e.downcast_ref::<NetError>() {
        return Some("the sandbox is not running, or its network process died: smolvm status shows which".into());
    }
    None
}

fn snapshot_hint(e: &smolvm::snapshot::SnapshotError) -> Option<String> {
    use smolvm::snapshot::SnapshotError as S;
    match e {
        S::NotFound(_) => Some("smolvm snapshot list shows the snapshots".into()),
        S::Corrupt { snapshot, .. } => Some(format!(
            "it cannot be used: delete it (smolvm snapshot delete {snapshot}) and take it again from a sandbox"
        )),
        S::Mismatch { .. } => Some(
            "give the options the snapshot was taken with (leave --memory/--cpus/--disk-size out), or take a new \
             snapshot on this host"
                .into(),
        ),
        _ => None,
    }
}
