//! PID 1's duties after boot: reap orphans, and turn SIGTERM / Ctrl-Alt-Del into a clean
//! power-off (sync, unmount, power off).

use std::time::{Duration, Instant};

use crate::{log, mounts};

/// The signals PID 1 acts on; they are blocked and taken synchronously with `sigwaitinfo`.
const HANDLED: [libc::c_int; 4] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGPWR];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks [`HANDLED`] and asks the kernel to send SIGINT on Ctrl-Alt-Del instead of rebooting.
pub fn block_signals() {
    let set = handled_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: reboot(2) with CAD_OFF changes only the Ctrl-Alt-Del behaviour.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) };
}

/// For `pre_exec`: children start with an empty signal mask.
pub fn unblock_signals_in_child() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; sigprocmask is
    // async-signal-safe, as required between fork and exec.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    Ok(())
}

/// Reaps every exited child without blocking.
fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        crate::reaper::exited(pid, status);
    }
}

/// Runs until asked to power off; never returns.
pub fn run() -> ! {
    let set = handled_set();
    loop {
        // SAFETY: `info` is plain data filled in by sigwaitinfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is initialised and `info` writable.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        match sig {
            libc::SIGCHLD => reap(),
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => power_off(sig),
            _ => {} // EINTR
        }
    }
}

/// Stops every process (TERM, then KILL after a grace period), syncs, unmounts, powers off.
fn power_off(sig: libc::c_int) -> ! {
    log::info!("signal {sig}: shutting down");
    // SAFETY: kill(-1, …) signals every process but PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            break; // ECHILD: nothing left
        }
        if pid == 0 {
            // Bounded by the deadline above; SIGCHLD is blocked in PID 1 (the supervisor
            // waits for it with sigwait elsewhere), so a short sleep is the simple wait here.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap();
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    mounts::unmount_all();
    // SAFETY: as above.
    unsafe { libc::sync() };
    log::info!("power off");
    // SAFETY: reboot(2) with POWER_OFF; it returns only on failure.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    // Without ACPI power-off the VMM still exits on reset (QEMU -no-reboot, Firecracker).
    // SAFETY: as above.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
