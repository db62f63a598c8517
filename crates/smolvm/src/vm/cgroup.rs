//! Resource limits on a sandbox's host processes: one cgroup per sandbox, holding its QEMU,
//! network process and agent proxy, with a memory ceiling, a task limit and a CPU weight.
//!
//! Why: a guest cannot allocate more than its RAM, but QEMU's own memory (device state, the
//! translation cache under emulation, buffers in the helpers) grows with what the guest does,
//! and a host with many sandboxes must be able to say "this one, and no more". The cgroup is
//! joined by each child between fork and exec (`child::Confine`), so no thread of a sandbox
//! ever runs outside it.
//!
//! Where: with cgroup v2, `<cgroup2 mount>/smolvm/<name>.<home>` (`Smolvm::cgroup_name`: two
//! homes may each have a sandbox of one name), in the root's subtree (a non-root v2
//! group that holds processes may not hand controllers to children, so nesting under our own
//! group is not possible). With only cgroup v1 hierarchies (older hosts, some containers), one
//! group per hierarchy *under this process's own group*, so that limits the host put on us
//! still apply to the sandboxes. Neither: no limits, and `doctor`/`status` say why.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::accel::Accel;

/// What QEMU and the helpers may use beyond the guest's memory, under hardware virtualization.
pub const OVERHEAD_MIB_KVM: u64 = 192;
/// Under emulation QEMU also keeps its translation cache, capped at this size (`tb-size`).
pub const TCG_CACHE_MIB: u64 = 256;
/// Tasks (threads count) of one sandbox's host processes: QEMU's vCPU, I/O and worker threads
/// and the helpers' threads, with room to spare; a fork bomb in a compromised helper stops here.
pub const PIDS_MAX: u32 = 512;
/// The default CPU weight of cgroup v2: sandboxes share the CPU equally.
pub const CPU_WEIGHT: u32 = 100;

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub memory_max_bytes: u64,
    pub pids_max: u32,
    pub cpu_weight: u32,
}

impl Limits {
    pub fn for_guest(memory_mib: u32, accel: &Accel) -> Limits {
        let overhead = match accel {
            Accel::Kvm => OVERHEAD_MIB_KVM,
            Accel::Tcg { .. } => OVERHEAD_MIB_KVM + TCG_CACHE_MIB,
        };
        Limits { memory_max_bytes: (memory_mib as u64 + overhead) << 20, pids_max: PIDS_MAX, cpu_weight: CPU_WEIGHT }
    }
}

/// Which cgroup interface this host offers us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Support {
    /// cgroup v2 with the memory, pids and cpu controllers: groups under `parent`.
    V2 { parent: PathBuf },
    /// cgroup v1: a parent per hierarchy (memory, pids, cpu).
    V1 { memory: PathBuf, pids: PathBuf, cpu: PathBuf },
    /// No limits can be set; why.
    Unavailable { reason: String },
}

/// Why a group could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: String,
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError { path: path.display().to_string(), source }
}

/// A mount from `/proc/self/mountinfo`: its root within the hierarchy, where it is, its type
/// and its super options (the v1 controllers).
struct Mount {
    root: String,
    at: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: f.get(3)?.to_string(),
                at: PathBuf::from(f.get(4)?),
                fstype: r.first()?.to_string(),
                options: r.get(2).map(|o| o.split(',').map(str::to_string).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Decides from the texts of `/proc/self/mountinfo`, `/proc/self/cgroup` and a reader of
/// `cgroup.controllers` files (so that it can be tested without a host).
pub fn detect_from(
    mountinfo: &str,
    self_cgroup: &str,
    is_root: bool,
    controllers: impl Fn(&Path) -> Option<String>,
) -> Support {
    if !is_root {
        return Support::Unavailable {
            reason: "smolvm is not running as root, and makes no cgroups of its own".into(),
        };
    }
    let all = mounts(mountinfo);
    let wanted = ["memory", "pids", "cpu"];
    if let Some(m) = all.iter().find(|m| m.fstype == "cgroup2") {
        let have = controllers(&m.at.join("cgroup.controllers")).unwrap_or_default();
        let have: Vec<&str> = have.split_whitespace().collect();
        if wanted.iter().all(|w| have.contains(w)) {
            return Support::V2 { parent: m.at.join("smolvm") };
        }
    }
    // v1: the group of this process in each hierarchy, relative to where it is mounted.
    let own = |controller: &str| -> Option<PathBuf> {
        let m = all.iter().find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))?;
        let path = self_cgroup.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, list, path) = (f.next()?, f.next()?, f.next()?);
            list.split(',').any(|c| c == controller).then(|| path.to_string())
        })?;
        let rel = path.strip_prefix(m.root.as_str()).unwrap_or(&path).trim_start_matches('/');
        Some(m.at.join(rel).join("smolvm"))
    };
    if let (Some(memory), Some(pids), Some(cpu)) = (own("memory"), own("pids"), own("cpu")) {
        return Support::V1 { memory, pids, cpu };
    }
    let v2 = all.iter().find(|m| m.fstype == "cgroup2").map(|m| {
        let c = controllers(&m.at.join("cgroup.controllers")).unwrap_or_default();
        format!("the cgroup v2 hierarchy at {} offers only [{}]", m.at.display(), c.trim())
    });
    Support::Unavailable {
        reason: format!(
            "no cgroup hierarchy with the memory, pids and cpu controllers ({})",
            v2.unwrap_or_else(|| "no cgroup v2 mount".into())
        ),
    }
}

/// What this host offers, read from `/proc`.
pub fn detect() -> Support {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    detect_from(&mountinfo, &own, root, |p| fs::read_to_string(p).ok())
}

/// A sandbox's group, made and limited; the `cgroup.procs` files its children join through.
#[derive(Debug)]
pub struct Group {
    procs: Vec<fs::File>,
}

impl Group {
    /// The descriptors for `child::Confine::cgroup_procs`.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// The group directories of sandbox `name` (one per hierarchy), for `support`.
pub fn group_dirs(support: &Support, name: &str) -> Vec<PathBuf> {
    match support {
        Support::V2 { parent } => vec![parent.join(name)],
        Support::V1 { memory, pids, cpu } => vec![memory.join(name), pids.join(name), cpu.join(name)],
        Support::Unavailable { .. } => vec![],
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(value.as_bytes())).map_err(err(path))
}

/// Makes (or re-makes) sandbox `name`'s group with `limits`. `None` when the host has none.
pub fn create(support: &Support, name: &str, limits: &Limits) -> Result<Option<Group>, CgroupError> {
    remove(support, name);
    let open_procs = |dir: &Path| fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).map_err(err(dir));
    match support {
        Support::Unavailable { .. } => Ok(None),
        Support::V2 { parent } => {
            // Controllers are handed down level by level: to our parent, then to the group.
            if let Some(top) = parent.parent() {
                write(&top.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
            }
            fs::create_dir_all(parent).map_err(err(parent))?;
            write(&parent.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
            let dir = parent.join(name);
            fs::create_dir(&dir).map_err(err(&dir))?;
            write(&dir.join("memory.max"), &limits.memory_max_bytes.to_string())?;
            write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
            write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
            Ok(Some(Group { procs: vec![open_procs(&dir)?] }))
        }
        Support::V1 { memory, pids, cpu } => {
            let mut procs = Vec::new();
            for (parent, file, value) in [
                (memory, "memory.limit_in_bytes", limits.memory_max_bytes.to_string()),
                (pids, "pids.max", limits.pids_max.to_string()),
                // v1 shares: 1024 is the default, as weight 100 is in v2.
                (cpu, "cpu.shares", (limits.cpu_weight as u64 * 1024 / 100).to_string()),
            ] {
                let dir = parent.join(name);
                fs::create_dir_all(&dir).map_err(err(&dir))?;
                write(&dir.join(file), &value)?;
                procs.push(open_procs(&dir)?);
            }
            Ok(Some(Group { procs }))
        }
    }
}

/// Removes sandbox `name`'s group once its processes are gone (they may take a moment to be
/// reaped after a kill); a group that stays busy is left for the next boot to retry.
pub fn remove(support: &Support, name: &str) {
    for dir in group_dirs(support, name) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while dir.exists() {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    tracing::debug!("cgroup {}: {e}", dir.display());
                    break;
                }
            }
        }
    }
}

/// What `status` shows: where the group is and what it allows, read back from the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub groups: Vec<PathBuf>,
    pub memory_max_bytes: Option<u64>,
    pub pids_max: Option<u32>,
    pub cpu_weight: Option<u32>,
}

/// Reads sandbox `name`'s limits back from its group (`None`: no group exists).
pub fn applied(support: &Support, name: &str) -> Option<Applied> {
    let dirs = group_dirs(support, name);
    if dirs.is_empty() || !dirs.iter().all(|d| d.is_dir()) {
        return None;
    }
    let num = |p: PathBuf| fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let (memory, pids, cpu) = match support {
        Support::V2 { .. } => {
            (num(dirs[0].join("memory.max")), num(dirs[0].join("pids.max")), num(dirs[0].join("cpu.weight")))
        }
        Support::V1 { .. } => (
            num(dirs[0].join("memory.limit_in_bytes")),
            num(dirs[1].join("pids.max")),
            num(dirs[2].join("cpu.shares")).map(|s| s * 100 / 1024),
        ),
        Support::Unavailable { .. } => return None,
    };
    Some(Applied {
        groups: dirs,
        memory_max_bytes: memory,
        pids_max: pids.map(|p| p as u32),
        cpu_weight: cpu.map(|c| c as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_HOST: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
    const V1_SELF: &str = "8:pids:/\n4:memory:/job/42\n1:cpu:/\n0::/";

    #[test]
    fn v2_with_its_controllers_is_preferred() {
        let mi = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let s = detect_from(mi, "0::/user.slice", true, |_| Some("cpuset cpu io memory pids".into()));
        assert_eq!(s, Support::V2 { parent: "/sys/fs/cgroup/smolvm".into() });
    }

    #[test]
    fn v1_nests_under_our_own_group_when_v2_has_no_controllers() {
        let s = detect_from(V1_HOST, V1_SELF, true, |_| Some("hugetlb".into()));
        assert_eq!(
            s,
            Support::V1 {
                memory: "/sys/fs/cgroup/memory/job/42/smolvm".into(),
                pids: "/sys/fs/cgroup/pids/smolvm".into(),
                cpu: "/sys/fs/cgroup/cpu/smolvm".into(),
            }
        );
    }

    #[test]
    fn without_controllers_or_root_it_says_why() {
        let mi = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        match detect_from(mi, "0::/", true, |_| Some("hugetlb\n".into())) {
            Support::Unavailable { reason } => assert!(reason.contains("offers only [hugetlb]"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(detect_from(V1_HOST, V1_SELF, false, |_| None), Support::Unavailable { .. }));
    }

    #[test]
    fn the_memory_ceiling_is_the_guest_plus_a_stated_overhead() {
        let kvm = Limits::for_guest(512, &Accel::Kvm);
        assert_eq!(kvm.memory_max_bytes, (512 + OVERHEAD_MIB_KVM) << 20);
        let tcg = Limits::for_guest(512, &Accel::Tcg { reason: "t".into() });
        assert_eq!(tcg.memory_max_bytes, (512 + OVERHEAD_MIB_KVM + TCG_CACHE_MIB) << 20);
        assert_eq!((kvm.pids_max, kvm.cpu_weight), (PIDS_MAX, CPU_WEIGHT));
    }
}
