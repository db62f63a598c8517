//! The sandbox layer over the fake VMM (`vm::fake`): what it does with each answer of the VMM,
//! failures included, in milliseconds and without a guest. The real-VM suites
//! (`smolvm-cli/tests/`) test the same paths against QEMU.

use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::snapshots::{After, Captured, CAPTURING};
use super::Smolvm;
use crate::paths::Home;
use crate::state::{SandboxRow, SandboxState};
use crate::vm::fake::FakeVmm;
use crate::vm::process;

struct World {
    tmp: tempfile::TempDir,
    sm: Smolvm,
    vmm: FakeVmm,
    vm: Child,
    row: SandboxRow,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.vm.kill();
        let _ = self.vm.wait();
    }
}

/// A home with one sandbox, `box`, recorded as running on a stand-in VM process.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let vmm = FakeVmm::default();
    let sm = Smolvm::open_at(Home::at(&tmp.path().join("home"))).unwrap().with_vmm(Arc::new(vmm.clone()));
    let vm = FakeVmm::start_process();
    let pid = vm.id() as i32;
    let mut row = crate::state::tests::sample("box");
    row.state = SandboxState::Running;
    row.pid = Some(pid);
    row.pid_start = process::start_time(pid);
    assert!(sm.db().insert(&row).unwrap());
    std::fs::create_dir_all(crate::paths::run_dir(&sm.dir("box"))).unwrap();
    World { tmp, sm, vmm, vm, row }
}

impl World {
    fn dest(&self) -> std::path::PathBuf {
        let d = self.tmp.path().join("dest");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn pid(&self) -> i32 {
        self.vm.id() as i32
    }

    /// Whether the stand-in VM ends within 5 s (reaped: it is our child).
    fn vm_ends(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.vm.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

#[test]
fn a_capture_stops_saves_takes_the_file_out_of_run_and_continues() {
    let w = world();
    let dest = w.dest();
    let (_, captured) = w.sm.capture(&w.row, &dest, false, After::Continue).unwrap();
    assert!(matches!(captured, Captured::Stream));
    let pid = w.pid();
    assert_eq!(
        w.vmm.calls(),
        [format!("connect {pid}"), "stop".into(), "save capture.mem Included".into(), "cont".into()]
    );
    assert_eq!(std::fs::read(dest.join("memory")).unwrap(), b"fake saved state");
    let dir = w.sm.dir("box");
    assert!(!crate::paths::run_dir(&dir).join("capture.mem").exists(), "taken out of the VMM's reach");
    assert!(!dir.join(CAPTURING).exists(), "the marker goes once the guest runs");
}

#[test]
fn a_capture_whose_save_fails_lets_the_guest_run_again_and_keeps_nothing() {
    let w = world();
    w.vmm.fail("save");
    let dest = w.dest();
    let err = w.sm.capture(&w.row, &dest, false, After::Stopped).err().expect("the save failed").to_string();
    assert!(err.contains("save the guest") && err.contains("fake VMM fails save"), "{err}");
    assert_eq!(w.vmm.calls().last().map(String::as_str), Some("cont"), "{:?}", w.vmm.calls());
    assert!(!dest.join("memory").exists());
    assert!(!w.sm.dir("box").join(CAPTURING).exists());
}

#[test]
fn a_capture_for_a_pause_leaves_the_guest_stopped_and_the_marker_for_the_pause_to_end() {
    let w = world();
    let dest = w.dest();
    let (mut control, _) = w.sm.capture(&w.row, &dest, false, After::Stopped).unwrap();
    assert!(!w.vmm.calls().contains(&"cont".to_string()));
    assert!(!control.is_running().unwrap());
    assert!(w.sm.dir("box").join(CAPTURING).exists());
}

#[test]
fn a_capture_that_cannot_reach_the_vmm_changes_nothing() {
    let w = world();
    w.vmm.fail("connect");
    let err = w.sm.capture(&w.row, &w.dest(), false, After::Continue).err().unwrap().to_string();
    assert!(err.contains("connect to its VMM"), "{err}");
    assert_eq!(w.vmm.calls().len(), 1, "nothing after the failed connect: {:?}", w.vmm.calls());
    assert!(!w.sm.dir("box").join(CAPTURING).exists(), "no marker of a capture that never stopped the guest");
}

#[test]
fn a_capture_whose_process_died_is_settled_by_letting_the_guest_run() {
    let w = world();
    let dir = w.sm.dir("box");
    // What a capture killed between its stop and its cont leaves: the marker, a stopped guest.
    std::fs::write(dir.join(CAPTURING), "1").unwrap();
    w.vmm.set_stopped(true);
    w.sm.settle("box");
    let calls = w.vmm.calls();
    assert_eq!(calls[1..], ["is_running".to_string(), "cont".to_string()], "{calls:?}");
    assert!(!dir.join(CAPTURING).exists());
    // A guest found running is left alone.
    std::fs::write(dir.join(CAPTURING), "1").unwrap();
    w.sm.settle("box");
    assert_eq!(w.vmm.calls().iter().filter(|c| *c == "cont").count(), 1);
}

#[test]
fn a_pid_in_the_pid_file_is_killed_only_if_the_vmm_says_it_is_this_sandboxs_vm() {
    let mut w = world();
    let dir = w.sm.dir("box");
    // The row forgot its pid (a pause recorded, say): only the pid file, which the sandbox's
    // uid could have written, names the process.
    let row = SandboxRow { pid: None, pid_start: None, ..w.row.clone() };
    let start = process::start_time(w.pid()).unwrap();
    std::fs::write(crate::paths::vm_pid_file(&dir), format!("{} {start}", w.pid())).unwrap();
    w.vmm.set_owns_pids(false);
    w.sm.kill_vm("box", &row);
    assert!(process::is_alive(w.pid(), Some(start)), "a process the VMM does not own is not killed");
    w.vmm.set_owns_pids(true);
    w.sm.kill_vm("box", &row);
    assert!(w.vm_ends(), "the sandbox's VM is killed");
}

#[test]
fn the_recorded_pid_is_killed_whatever_the_pid_file_says() {
    let mut w = world();
    std::fs::write(crate::paths::vm_pid_file(&w.sm.dir("box")), "1 0").unwrap();
    let row = w.row.clone();
    w.sm.kill_vm("box", &row);
    assert!(w.vm_ends());
    assert!(process::is_alive(1, None), "pid 1 from the file is not touched (the fake owns no pid)");
}

#[test]
fn a_stop_that_fails_leaves_the_marker_and_the_next_command_settles_it() {
    let w = world();
    w.vmm.fail("stop");
    assert!(w.sm.capture(&w.row, &w.dest(), false, After::Continue).is_err());
    let marker = w.sm.dir("box").join(CAPTURING);
    assert!(marker.exists(), "whether the guest stopped is unknown");
    // Say it did stop before the VMM reported the failure.
    w.vmm.set_stopped(true);
    w.sm.settle("box");
    assert_eq!(w.vmm.calls().last().map(String::as_str), Some("cont"), "{:?}", w.vmm.calls());
    assert!(!marker.exists());
}

#[test]
fn a_running_row_from_another_boot_of_the_host_is_stopped_on_open() {
    let w = world();
    let mut row = w.row.clone();
    row.host_boot = Some("another-boot".into());
    w.sm.db().update(&row).unwrap();
    std::fs::create_dir_all(w.sm.dir("box").join(super::pause::PAUSED_TMP)).unwrap();
    w.sm.reconcile();
    let now = w.sm.db().get("box").unwrap().unwrap();
    assert_eq!(now.state, SandboxState::Stopped);
    assert_eq!((now.pid, now.pid_start, now.ssh_port), (None, None, None), "nothing of that boot is kept");
    assert!(!w.sm.dir("box").join(super::pause::PAUSED_TMP).exists(), "a half-written pause is removed");
    // The pid it recorded was not touched: under another boot it names someone else.
    assert!(process::is_alive(w.pid(), None));
}

#[test]
fn a_running_row_of_this_boot_whose_vm_died_shows_as_crashed_not_stopped() {
    let mut w = world();
    let mut row = w.row.clone();
    row.host_boot = process::host_boot_id();
    w.sm.db().update(&row).unwrap();
    w.vm.kill().unwrap();
    w.vm.wait().unwrap();
    w.sm.reconcile();
    assert_eq!(w.sm.db().get("box").unwrap().unwrap().state, SandboxState::Running);
    assert_eq!(w.sm.info("box").unwrap().status, super::Status::Crashed);
}

#[test]
fn a_transition_another_process_made_impossible_is_refused_not_written() {
    let w = world();
    let mut stopped = w.row.clone();
    stopped.state = SandboxState::Stopped;
    w.sm.db().update(&stopped).unwrap();
    // A pause that read the row as running before the stop was recorded.
    let mut paused = w.row.clone();
    paused.state = SandboxState::Paused;
    let err = w.sm.db().update(&paused).unwrap_err().to_string();
    assert!(err.contains("is stopped now and cannot become paused"), "{err}");
    assert_eq!(w.sm.db().get("box").unwrap().unwrap().state, SandboxState::Stopped);
}

#[test]
fn a_vm_left_by_a_killed_boot_is_ended_on_open_and_the_row_keeps_its_phase() {
    let mut w = world();
    // A start killed after it spawned the VM and recorded its pid, before "running".
    let mut row = w.row.clone();
    row.state = SandboxState::Stopped;
    w.sm.db().update(&row).unwrap();
    w.sm.reconcile();
    assert!(w.vm_ends(), "the VM no command owns is ended");
    let now = w.sm.db().get("box").unwrap().unwrap();
    assert_eq!((now.state, now.pid), (SandboxState::Stopped, None));
}
