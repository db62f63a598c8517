//! Resource limits on a sandbox's host processes: one cgroup per sandbox, holding its QEMU,
//! network process and agent proxy, with a memory ceiling, a task limit and a CPU weight.
//!
//! Why: a guest cannot allocate more than its RAM, but QEMU's own memory (device state, the
//! translation cache under emulation, buffers in the helpers) grows with what the guest does,
//! and a host with many sandboxes must be able to say "this one, and no more". The cgroup is
//! joined by each child between fork and exec (`child::Confine`), so no thread of a sandbox
//! ever runs outside it.
//!
//! Where: under the group of the unit running smolvm, so that the limits the host put on that
//! unit (a systemd service's `MemoryMax=`, a container's) hold for its sandboxes too; groups
//! are named `<name>.<home>` (`Smolvm::cgroup_name`: two homes may each have a sandbox of one
//! name). With cgroup v2 a group that holds processes may not hand controllers to children, so
//! the unit's group is *delegated* the way systemd's `Delegate=yes` expects: when everything in
//! it is this program, those processes move into `<unit>/smolvm-self` and sandboxes go under
//! `<unit>/smolvm/` ([`delegate`]). A unit's group that holds anything else (a login shell's
//! session) is not ours to reorganise: sandboxes then go under `<cgroup2 mount>/smolvm/`,
//! outside its limits, and `doctor`/`status` say so and how to avoid it. With only cgroup v1
//! hierarchies (older hosts, some containers), one group per hierarchy under this process's own
//! group (v1 has no such rule). Neither: no limits, and `doctor`/`status` say why. Where a
//! sandbox's groups were made is recorded in its directory (`cgroup`), so that a later command
//! run from elsewhere still finds and removes them.

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
    /// cgroup v2 with the memory, pids and cpu controllers: groups under `unit` (this
    /// process's group, delegated: [`delegate`]) when it can be, else under `parent` (the
    /// hierarchy's root). `unit` is `None` when this process is in the root group.
    V2 { parent: PathBuf, unit: Option<PathBuf> },
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
            let own = self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim();
            let rel = own.trim_start_matches('/');
            let unit = (!rel.is_empty()).then(|| m.at.join(rel));
            return Support::V2 { parent: m.at.join("smolvm"), unit };
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
    dirs: Vec<PathBuf>,
}

impl Group {
    /// The descriptors for `child::Confine::cgroup_procs`.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// The group directories of sandbox `name` (one per hierarchy), for `support`, where they
/// would be made now (v2: under the unit's group if it can be delegated, `placement` says).
pub fn group_dirs(support: &Support, name: &str) -> Vec<PathBuf> {
    match support {
        Support::V2 { .. } => vec![v2_parent(support).0.join(name)],
        Support::V1 { memory, pids, cpu } => vec![memory.join(name), pids.join(name), cpu.join(name)],
        Support::Unavailable { .. } => vec![],
    }
}

/// The name of the file in a sandbox's directory that records where its groups are.
pub const RECORD: &str = "cgroup";

/// The group directories recorded in `record` (absolute, under a cgroup mount), else where
/// they would be made now.
fn recorded_or_planned(support: &Support, name: &str, record: &Path) -> Vec<PathBuf> {
    let recorded: Vec<PathBuf> = fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.starts_with("/sys/fs/cgroup") && p.file_name().is_some_and(|f| f == name))
        .collect();
    if recorded.is_empty() {
        group_dirs(support, name)
    } else {
        recorded
    }
}

/// Where v2 groups go now, and why not under the unit when they do not.
fn v2_parent(support: &Support) -> (PathBuf, Option<String>) {
    let Support::V2 { parent, unit } = support else { return (PathBuf::new(), None) };
    match unit {
        None => (parent.clone(), None),
        Some(u) => match delegable(u, &is_this_program) {
            Ok(()) => (u.join("smolvm"), None),
            Err(why) => (parent.clone(), Some(outside_note(u, &why))),
        },
    }
}

fn outside_note(unit: &Path, why: &str) -> String {
    format!(
        "sandbox groups are at the root of the cgroup hierarchy, outside the limits of {}: {why}; \
         run smolvm in a unit of its own with Delegate=yes (e.g. systemd-run --scope -p Delegate=yes smolvm ...) \
         to keep its sandboxes under that unit's limits",
        unit.display()
    )
}

/// Where v2 sandbox groups go and why (for `doctor` and `status`): `None` when they are under
/// the unit running smolvm, or when smolvm runs in the root group.
pub fn placement_note(support: &Support) -> Option<String> {
    v2_parent(support).1
}

/// Whether `pid` runs this same executable (a group holding only those may be delegated).
fn is_this_program(pid: i32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = fs::metadata("/proc/self/exe").map_err(|e| e.to_string())?;
    let comm = || fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    match fs::metadata(format!("/proc/{pid}/exe")) {
        Ok(m) if (m.dev(), m.ino()) == (me.dev(), me.ino()) => Ok(()),
        // Gone since it was listed: nothing to move.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(format!("it holds other processes (pid {pid}: {})", comm())),
    }
}

/// Whether the unit's group `unit` holds only processes `ours` accepts.
fn delegable(unit: &Path, ours: &dyn Fn(i32) -> Result<(), String>) -> Result<(), String> {
    let procs = fs::read_to_string(unit.join("cgroup.procs")).map_err(|e| format!("cannot read its processes: {e}"))?;
    procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()).try_for_each(ours)
}

/// Delegates the unit's group `unit` to sandboxes: its processes (all this program) move into
/// `unit/smolvm-self`, and the controllers are handed down to `unit`'s children.
pub fn delegate(unit: &Path, ours: &dyn Fn(i32) -> Result<(), String>) -> Result<(), CgroupError> {
    let refused = |why: String| CgroupError { path: unit.display().to_string(), source: std::io::Error::other(why) };
    delegable(unit, ours).map_err(refused)?;
    let own = unit.join("smolvm-self");
    fs::create_dir_all(&own).map_err(err(&own))?;
    let procs = fs::read_to_string(unit.join("cgroup.procs")).map_err(err(unit))?;
    for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
        match write(&own.join("cgroup.procs"), pid.trim()) {
            Ok(()) => {}
            // Exited meanwhile.
            Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    write(&unit.join("cgroup.subtree_control"), "+memory +pids +cpu")
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(value.as_bytes())).map_err(err(path))
}

/// Makes (or re-makes) sandbox `name`'s group with `limits`, and records where in `record`
/// (a file in the sandbox's directory). `None` when the host has none.
pub fn create(support: &Support, name: &str, limits: &Limits, record: &Path) -> Result<Option<Group>, CgroupError> {
    remove(support, name, record);
    let group = make(support, name, limits)?;
    if let Some(g) = &group {
        let text: String = g.dirs.iter().map(|d| format!("{}\n", d.display())).collect();
        fs::write(record, text).map_err(err(record))?;
    }
    Ok(group)
}

fn make(support: &Support, name: &str, limits: &Limits) -> Result<Option<Group>, CgroupError> {
    let open_procs = |dir: &Path| fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).map_err(err(dir));
    match support {
        Support::Unavailable { .. } => Ok(None),
        Support::V2 { parent: root_parent, unit } => {
            let parent = match unit {
                Some(u) => match delegate(u, &is_this_program) {
                    Ok(()) => u.join("smolvm"),
                    Err(e) => {
                        tracing::debug!("{}", outside_note(u, &e.source.to_string()));
                        root_parent.clone()
                    }
                },
                None => root_parent.clone(),
            };
            let parent = &parent;
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
            Ok(Some(Group { procs: vec![open_procs(&dir)?], dirs: vec![dir] }))
        }
        Support::V1 { memory, pids, cpu } => {
            let (mut procs, mut dirs) = (Vec::new(), Vec::new());
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
                dirs.push(dir);
            }
            Ok(Some(Group { procs, dirs }))
        }
    }
}

/// Removes sandbox `name`'s group (where `record` says it is) once its processes are gone
/// (they may take a moment to be reaped after a kill); a group that stays busy is left for the
/// next boot to retry.
pub fn remove(support: &Support, name: &str, record: &Path) {
    for dir in recorded_or_planned(support, name, record) {
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

/// Reads sandbox `name`'s limits back from its group, where `record` says it is (`None`: no
/// group exists).
pub fn applied(support: &Support, name: &str, record: &Path) -> Option<Applied> {
    let dirs = recorded_or_planned(support, name, record);
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
        assert_eq!(
            s,
            Support::V2 { parent: "/sys/fs/cgroup/smolvm".into(), unit: Some("/sys/fs/cgroup/user.slice".into()) }
        );
        let s = detect_from(mi, "0::/", true, |_| Some("cpuset cpu io memory pids".into()));
        assert_eq!(s, Support::V2 { parent: "/sys/fs/cgroup/smolvm".into(), unit: None });
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

    /// A unit's group (a directory standing in for cgroupfs: this host has cgroup v1, whose
    /// controllers a v2 mount cannot have): delegated when it holds only this program, with
    /// its processes moved to a leaf and the controllers handed down; refused, untouched, when
    /// it holds anything else.
    #[test]
    fn a_unit_is_delegated_only_when_everything_in_it_is_ours() {
        let d = tempfile::tempdir().unwrap();
        let unit = d.path().join("smolvm.service");
        fs::create_dir(&unit).unwrap();
        fs::write(unit.join("cgroup.procs"), "100\n101\n").unwrap();
        fs::write(unit.join("cgroup.subtree_control"), "").unwrap();
        let theirs =
            |pid: i32| if pid == 101 { Err("it holds other processes (pid 101: bash)".into()) } else { Ok(()) };
        let e = delegate(&unit, &theirs).unwrap_err();
        assert!(e.to_string().contains("pid 101: bash"), "{e}");
        assert!(!unit.join("smolvm-self").exists(), "a refused unit was changed");
        assert_eq!(fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap(), "");

        // What cgroupfs makes with a group's directory.
        fs::create_dir(unit.join("smolvm-self")).unwrap();
        fs::write(unit.join("smolvm-self/cgroup.procs"), "").unwrap();
        delegate(&unit, &|_| Ok(())).unwrap();
        // cgroupfs takes one pid per write; a plain file keeps the last.
        assert_eq!(fs::read_to_string(unit.join("smolvm-self/cgroup.procs")).unwrap(), "101");
        assert_eq!(fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap(), "+memory +pids +cpu");
        assert!(outside_note(&unit, "it holds other processes").contains("Delegate=yes"));
    }

    #[test]
    fn a_recorded_place_is_trusted_only_under_the_cgroup_mount_and_by_name() {
        let d = tempfile::tempdir().unwrap();
        let record = d.path().join(RECORD);
        let support = Support::V1 { memory: "/m".into(), pids: "/p".into(), cpu: "/c".into() };
        fs::write(&record, "/sys/fs/cgroup/memory/unit/smolvm/box.1\n/etc\n/sys/fs/cgroup/x/other\n").unwrap();
        assert_eq!(
            recorded_or_planned(&support, "box.1", &record),
            vec![PathBuf::from("/sys/fs/cgroup/memory/unit/smolvm/box.1")]
        );
        fs::remove_file(&record).unwrap();
        assert_eq!(recorded_or_planned(&support, "box.1", &record).len(), 3, "planned, one per hierarchy");
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
