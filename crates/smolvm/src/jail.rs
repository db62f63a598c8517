//! Confining QEMU and the agent proxy the way Firecracker's jailer confines its VMM: between
//! fork and exec (still root, before the uid is dropped) the child enters
//!
//! - an empty **network** namespace (QEMU's wire is a socket pair it inherited; the proxy needs
//!   no network), so that a QEMU escape reaches no host service, metadata address, LAN or other
//!   sandbox's forward, and no abstract unix socket of the host;
//! - a **mount** namespace pivoted into a small read-only root: `/usr` (and the host's
//!   `/bin`, `/lib`... links into it) read-only for the program's libraries and QEMU's
//!   firmware, a few device nodes, its own `run/` directory as `/run` (its working directory),
//!   and a procfs that shows it its own processes only (`hidepid=invisible,subset=pid`); no
//!   home, no other sandbox, no `/etc`, no `/tmp`;
//! - an **IPC** namespace;
//! - a **seccomp** filter of ours that refuses new namespaces (`unshare`, `setns`, `clone`
//!   with a `CLONE_NEW*` flag, `clone3`): no user namespace from which to attack the kernel.
//!   QEMU's own `-sandbox` (spawn, elevateprivileges, resourcecontrol denied) stacks on it.
//!
//! Why no PID namespace: QEMU would have to be the namespace's first process, which means a
//! second fork between smolvm and QEMU; every pid smolvm records (the pidfd it waits on, the
//! `SO_PEERCRED` check of its QMP socket, `kill -9` on delete) would name that intermediate
//! instead. With `spawn=deny` QEMU makes no process, its uid is its own (no signal reaches
//! another's processes) and its procfs lists only its own: what a PID namespace would hide
//! is hidden.
//!
//! Everything is prepared before the fork ([`Jail::new`]): the child only makes system calls
//! on ready values (no allocation between fork and exec).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the confined process works, inside its root.
pub const JAIL_CWD: &str = "/run";

#[derive(Debug)]
enum Step {
    Dir(CString),
    Link {
        target: CString,
        at: CString,
    },
    /// A read-only bind of a directory (`exec` allowed: libraries are mapped from it).
    BindDir {
        src: CString,
        at: CString,
    },
    /// A writable bind of a directory (the run directory).
    BindDirRw {
        src: CString,
        at: CString,
    },
    /// A bind of a device node or file onto an empty file.
    BindFile {
        src: CString,
        at: CString,
    },
    Proc(CString),
}

/// A prepared confinement (see the module documentation).
#[derive(Debug)]
pub struct Jail {
    /// The mount point of the new root: an empty directory of root's.
    root: CString,
    steps: Vec<Step>,
    cwd: CString,
    /// A new, empty network namespace.
    pub new_net: bool,
}

/// What a sandbox's processes are confined with on this host, for `status` and `doctor`.
pub fn confinement() -> Vec<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        CONFINEMENT.to_vec()
    } else {
        vec![
            "the calling user's uid (namespaces and a uid per sandbox need root)",
            "no_new_privs",
            "seccomp: no new namespaces; QEMU -sandbox (spawn, elevateprivileges, resourcecontrol denied)",
        ]
    }
}

const CONFINEMENT: &[&str] = &[
    "own uid and gid",
    "no_new_privs",
    "cgroup limits",
    "network namespace (empty): QEMU, agent proxy",
    "mount namespace (read-only /usr, its run directory, own processes only): QEMU, agent proxy",
    "IPC namespace",
    "seccomp: no new namespaces; QEMU -sandbox (spawn, elevateprivileges, resourcecontrol denied)",
];

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| CString::from(c"/nonexistent"))
}

impl Jail {
    /// A root made in `mount_point` (created here: empty, root's) holding `run` (the process's
    /// working directory) and what a dynamically linked program and QEMU need to start.
    pub fn new(mount_point: &Path, run: &Path, new_net: bool) -> std::io::Result<Jail> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(mount_point) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let inside = |p: &str| cstr(&mount_point.join(p.trim_start_matches('/')));
        let mut steps = vec![Step::BindDir { src: cstr(Path::new("/usr")), at: inside("/usr") }];
        // The host's top-level links into /usr (merged /usr), or directories bound as they are.
        for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            match std::fs::read_link(top) {
                Ok(target) => steps.push(Step::Link { target: cstr(&target), at: inside(top) }),
                Err(_) if Path::new(top).is_dir() => {
                    steps.push(Step::BindDir { src: cstr(Path::new(top)), at: inside(top) })
                }
                Err(_) => {}
            }
        }
        steps.push(Step::Dir(inside("/etc")));
        if Path::new("/etc/ld.so.cache").is_file() {
            steps.push(Step::BindFile { src: cstr(Path::new("/etc/ld.so.cache")), at: inside("/etc/ld.so.cache") });
        }
        steps.push(Step::Dir(inside("/dev")));
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/kvm"] {
            if Path::new(dev).exists() {
                steps.push(Step::BindFile { src: cstr(Path::new(dev)), at: inside(dev) });
            }
        }
        steps.push(Step::Proc(inside("/proc")));
        steps.push(Step::BindDirRw { src: cstr(run), at: inside(JAIL_CWD) });
        Ok(Jail { root: cstr(mount_point), steps, cwd: cstr(Path::new(JAIL_CWD)), new_net })
    }

    /// Enters the jail. Between fork and exec, as root.
    ///
    /// # Safety
    /// Only async-signal-safe system calls on prepared values: callable in a `pre_exec`.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        let null = std::ptr::null::<libc::c_char>();
        let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | if self.new_net { libc::CLONE_NEWNET } else { 0 };
        // SAFETY: every call below is a system call on NUL-terminated strings prepared before
        // the fork, which outlive this function.
        unsafe {
            // The directories made below must be traversable by the sandbox's uid whatever
            // this process's umask is (smolvm's is 077); the child sets its own after.
            libc::umask(0o022);
            check(libc::unshare(flags))?;
            // Nothing mounted here propagates back to the host.
            check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=256k".as_ptr().cast(),
            ))?;
            let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            for step in &self.steps {
                match step {
                    Step::Dir(at) => check(libc::mkdir(at.as_ptr(), 0o755))?,
                    Step::Link { target, at } => check(libc::symlink(target.as_ptr(), at.as_ptr()))?,
                    Step::BindDir { src, at } | Step::BindDirRw { src, at } => {
                        check(libc::mkdir(at.as_ptr(), 0o755))?;
                        check(libc::mount(
                            src.as_ptr(),
                            at.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        if matches!(step, Step::BindDir { .. }) {
                            check(libc::mount(null, at.as_ptr(), null, ro, std::ptr::null()))?;
                        }
                    }
                    Step::BindFile { src, at } => {
                        let fd = libc::open(at.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                        check(fd)?;
                        libc::close(fd);
                        check(libc::mount(src.as_ptr(), at.as_ptr(), null, libc::MS_BIND, std::ptr::null()))?;
                        // Device nodes stay usable on a read-only mount; the node cannot be
                        // replaced.
                        check(libc::mount(null, at.as_ptr(), null, ro & !libc::MS_NODEV, std::ptr::null()))?;
                    }
                    Step::Proc(at) => {
                        check(libc::mkdir(at.as_ptr(), 0o555))?;
                        let f = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                        let proc_ = c"proc".as_ptr();
                        // Its own processes only, and no /proc/sys, kcore, ... (subset=pid:
                        // Linux 5.8); an older kernel gets hidepid alone.
                        if libc::mount(proc_, at.as_ptr(), proc_, f, c"hidepid=invisible,subset=pid".as_ptr().cast())
                            < 0
                        {
                            check(libc::mount(proc_, at.as_ptr(), proc_, f, c"hidepid=2".as_ptr().cast()))?;
                        }
                    }
                }
            }
            // The root itself read-only: nothing can be created beside what is bound.
            check(libc::mount(null, self.root.as_ptr(), null, ro, std::ptr::null()))?;
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            // The old root, stacked under the new one, goes away.
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

/// The seccomp filter that refuses new namespaces (see the module documentation), as a
/// classic BPF program for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn no_namespaces_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const JGE: u16 = 0x35;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_BIT: u32 = 0x4000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ERRNO: u32 = 0x0005_0000;
    let new_flags = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP) as u32;
    let s = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    vec![
        /* 0 */ s(LD_W_ABS, 0, 0, 4), // arch
        /* 1 */ s(JEQ, 1, 0, AUDIT_ARCH_X86_64),
        /* 2 */ s(RET, 0, 0, KILL_PROCESS),
        /* 3 */ s(LD_W_ABS, 0, 0, 0), // nr
        /* 4 */ s(JGE, 0, 1, X32_BIT),
        /* 5 */ s(RET, 0, 0, KILL_PROCESS),
        /* 6 */ s(JEQ, 5, 0, libc::SYS_unshare as u32),
        /* 7 */ s(JEQ, 4, 0, libc::SYS_setns as u32),
        /* 8 */ s(JEQ, 4, 0, libc::SYS_clone3 as u32),
        /* 9 */ s(JEQ, 0, 5, libc::SYS_clone as u32),
        /* 10 */ s(LD_W_ABS, 0, 0, 16), // args[0], its low 32 bits: clone's flags
        /* 11 */ s(JSET, 0, 3, new_flags),
        /* 12 */ s(RET, 0, 0, ERRNO | libc::EPERM as u32),
        /* 13 */ s(RET, 0, 0, ERRNO | libc::ENOSYS as u32),
        /* 14 */ s(RET, 0, 0, ALLOW),
        /* 15 */ s(RET, 0, 0, ALLOW),
    ]
}

/// Installs [`no_namespaces_filter`] (prepared before the fork) on this process: call after
/// `no_new_privs`.
///
/// # Safety
/// Async-signal-safe; `prog` must outlive the call.
pub unsafe fn install_filter(prog: &libc::sock_fprog) -> std::io::Result<()> {
    // SAFETY: PR_SET_SECCOMP with a valid sock_fprog, which the kernel copies.
    let rc =
        unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, prog as *const libc::sock_fprog, 0, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The mount point for a sandbox's jails, beside its `run/` directory.
pub fn mount_point(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("jail-{what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter's jumps land where the comments say: unshare and setns get EPERM, clone3
    /// ENOSYS (glibc falls back to clone), clone with a namespace flag EPERM, the rest pass.
    #[test]
    fn the_filter_refuses_new_namespaces_and_nothing_else() {
        let prog = no_namespaces_filter();
        let run = |nr: i64, flags: u32, arch: u32| -> u32 {
            let mut acc = 0u32;
            let mut pc = 0usize;
            loop {
                let i = prog[pc];
                match i.code {
                    0x20 => {
                        acc = match i.k {
                            0 => nr as u32,
                            4 => arch,
                            16 => flags,
                            _ => panic!("load {}", i.k),
                        }
                    }
                    0x15 => {
                        pc += if acc == i.k { i.jt } else { i.jf } as usize;
                    }
                    0x35 => {
                        pc += if acc >= i.k { i.jt } else { i.jf } as usize;
                    }
                    0x45 => {
                        pc += if acc & i.k != 0 { i.jt } else { i.jf } as usize;
                    }
                    0x06 => return i.k,
                    c => panic!("opcode {c:#x}"),
                }
                pc += 1;
            }
        };
        let x86 = 0xC000_003E;
        assert_eq!(run(libc::SYS_unshare, 0, x86), 0x0005_0000 | libc::EPERM as u32);
        assert_eq!(run(libc::SYS_setns, 0, x86), 0x0005_0000 | libc::EPERM as u32);
        assert_eq!(run(libc::SYS_clone3, 0, x86), 0x0005_0000 | libc::ENOSYS as u32);
        assert_eq!(run(libc::SYS_clone, libc::CLONE_NEWUSER as u32, x86), 0x0005_0000 | libc::EPERM as u32);
        let thread =
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u32;
        assert_eq!(run(libc::SYS_clone, thread, x86), 0x7fff_0000);
        assert_eq!(run(libc::SYS_read, 0, x86), 0x7fff_0000);
        assert_eq!(run(libc::SYS_read | 0x4000_0000, 0, x86), 0x8000_0000, "x32 calls kill");
        assert_eq!(run(libc::SYS_read, 0, 0x4000_0003), 0x8000_0000, "another arch kills");
    }

    /// The filter in the kernel: a process under it cannot make a user namespace (nor any
    /// other). (That threads still start under it, QEMU shows in the VM tests.)
    #[test]
    fn under_the_filter_no_namespace_can_be_made() {
        let prog = no_namespaces_filter();
        // SAFETY: the child only makes system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above; `prog` outlives the calls.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
                if install_filter(&fprog).is_err() {
                    libc::_exit(10);
                }
                if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    libc::_exit(11);
                }
                if *libc::__errno_location() != libc::EPERM {
                    libc::_exit(12);
                }
                if libc::unshare(libc::CLONE_NEWNET) == 0 {
                    libc::_exit(13);
                }
                // clone3 says ENOSYS, so that glibc falls back to clone, which the filter reads.
                if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1
                    || *libc::__errno_location() != libc::ENOSYS
                {
                    libc::_exit(14);
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "10: no filter, 11-13: a namespace was made, 14: clone3 ran");
    }
}
