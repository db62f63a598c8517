//! A running guest's RAM as its QEMU process holds it, seen from outside through `/proc`:
//! which pages the guest wrote since it was restored, and reading or writing them.
//!
//! A guest restored from a snapshot has its RAM in a private (copy-on-write) mapping of the
//! snapshot's RAM image (`qemu::Memory::SnapshotImage`). Every page it wrote since is then an
//! anonymous page of that mapping, every other page is still the file's: `/proc/<pid>/pagemap`
//! tells the two apart (bit 61, "file page or shared anonymous", is clear for a written page;
//! bit 62 is set for one swapped out). So its state is the image plus those pages, found in
//! ~2 ms for 512 MiB, where a migration stream has QEMU read and check every page of the RAM
//! (most of a pause of such a guest). The pages are read from `/proc/<pid>/mem` with the guest
//! stopped, and written the same way into a restoring QEMU before it loads the devices (whose
//! load reads the virtqueues in guest memory).
//!
//! Reading another process's `pagemap` and `mem` takes ptrace access to it: root has it (QEMU
//! runs as a sandbox's uid); a user running QEMU as themself may not (Yama). A caller that
//! gets `None` or an error saves the guest the general way (`vm::migrate`).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

pub const PAGE: u64 = 4096;

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// The guest RAM's mapping in a QEMU process: a private mapping of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMapping {
    pub pid: i32,
    pub start: u64,
    pub len: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The file's path as `/proc/<pid>/maps` shows it (` (deleted)` stripped, `deleted` set).
    pub path: PathBuf,
    pub deleted: bool,
}

impl RamMapping {
    /// The private file mapping of exactly `len` bytes in `pid` (the RAM backend of a restored
    /// guest), or `None` (a guest whose RAM is anonymous: booted, or resumed from a stream).
    pub fn find(pid: i32, len: u64) -> io::Result<Option<RamMapping>> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(maps.lines().find_map(|l| parse_maps_line(pid, l).filter(|m| m.len == len)))
    }

    /// Opens the mapped file (read-only): through `map_files` (works for an unlinked file,
    /// root only), else by its path, checked to be the mapped inode.
    pub fn open_file(&self) -> io::Result<File> {
        let via = format!("/proc/{}/map_files/{:x}-{:x}", self.pid, self.start, self.start + self.len);
        let f = match File::open(&via) {
            Ok(f) => f,
            Err(_) if !self.deleted => crate::text::open_untrusted(&self.path)?,
            Err(e) => return Err(e),
        };
        let m = f.metadata()?;
        let (maj, min) = (libc::major(m.dev()), libc::minor(m.dev()));
        if m.ino() != self.inode || maj != self.dev_major || min != self.dev_minor {
            return Err(io::Error::other(format!("{} is no longer the file QEMU maps", self.path.display())));
        }
        Ok(f)
    }

    /// The indices of the pages the guest (or QEMU) wrote: present and anonymous, or swapped.
    pub fn written_pages(&self) -> io::Result<Vec<u64>> {
        let pagemap = File::open(format!("/proc/{}/pagemap", self.pid))?;
        let pages = self.len / PAGE;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut index = 0u64;
        while index < pages {
            let n = ((pages - index) as usize).min(buf.len() / 8);
            let bytes = &mut buf[..n * 8];
            pagemap.read_exact_at(bytes, (self.start / PAGE + index) * 8)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                if is_written(e) {
                    out.push(index + i as u64);
                }
            }
            index += n as u64;
        }
        Ok(out)
    }

    /// Reads the pages at `indices` (sorted) into `each(index, bytes)`, runs of adjacent pages
    /// at a time. The guest must be stopped.
    pub fn read_pages(&self, indices: &[u64], mut each: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mem = File::open(format!("/proc/{}/mem", self.pid))?;
        let mut buf = Vec::new();
        for (first, count) in runs(indices, 256) {
            buf.resize((count * PAGE) as usize, 0);
            mem.read_exact_at(&mut buf, self.start + first * PAGE)?;
            for (i, page) in buf.chunks_exact(PAGE as usize).enumerate() {
                each(first + i as u64, page)?;
            }
        }
        Ok(())
    }

    /// Writes `bytes` (whole pages) at page `index` of the guest's RAM, through `mem` (opened
    /// by [`RamMapping::open_mem`]): the kernel copies the file's page first, as for a write
    /// of the guest's own. For a QEMU that has not run the guest yet.
    pub fn write_pages(&self, mem: &File, index: u64, bytes: &[u8]) -> io::Result<()> {
        if !(bytes.len() as u64).is_multiple_of(PAGE) || index * PAGE + bytes.len() as u64 > self.len {
            return Err(io::Error::other(format!("pages at {index} (+{} bytes) are outside the RAM", bytes.len())));
        }
        mem.write_all_at(bytes, self.start + index * PAGE)
    }

    pub fn open_mem(&self) -> io::Result<File> {
        std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{}/mem", self.pid))
    }
}

fn is_written(entry: u64) -> bool {
    entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE_OR_SHARED == 0)
}

/// Sorted page indices as (first, count) runs of at most `max` pages.
pub fn runs(indices: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some((first, count)) if *first + *count == i && *count < max => *count += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// One line of `/proc/<pid>/maps`, if it is a private mapping of a file:
/// `start-end perms offset maj:min inode path`.
fn parse_maps_line(pid: i32, line: &str) -> Option<RamMapping> {
    let mut f = line.splitn(6, ' ');
    let range = f.next()?;
    let perms = f.next()?;
    let offset = f.next()?;
    let dev = f.next()?;
    let inode: u64 = f.next()?.parse().ok()?;
    let path = f.next()?.trim_start();
    if inode == 0
        || !perms.starts_with("rw")
        || !perms.ends_with('p')
        || !offset.trim_start_matches('0').is_empty()
        || !path.starts_with('/')
    {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
    let (maj, min) = dev.split_once(':')?;
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(RamMapping {
        pid,
        start,
        len: end.checked_sub(start)?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode,
        path: PathBuf::from(path),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse_to_private_file_mappings_only() {
        let l = "7f1783fff000-7f17a3fff000 rw-p 00000000 fe:00 10281145                   /tmp/lab/src/ram";
        let m = parse_maps_line(7, l).unwrap();
        assert_eq!((m.start, m.len, m.dev_major, m.dev_minor, m.inode), (0x7f1783fff000, 512 << 20, 0xfe, 0, 10281145));
        assert_eq!((m.path.to_str().unwrap(), m.deleted), ("/tmp/lab/src/ram", false));
        let gone = parse_maps_line(7, &format!("{l} (deleted)")).unwrap();
        assert!(gone.deleted && gone.path.ends_with("ram"));
        for other in [
            "7fdcc4000000-7fdcc4021000 rw-p 00000000 00:00 0 ",
            "7f25a3fff000-7f25c3fff000 rw-s 00000000 fe:00 10281145 /dev/shm/x",
            "7f25a3fff000-7f25c3fff000 r--p 00001000 fe:00 10281145 /usr/lib/x.so",
            "7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]",
        ] {
            assert_eq!(parse_maps_line(7, other), None, "{other}");
        }
    }

    #[test]
    fn a_written_page_is_anonymous_or_swapped() {
        assert!(is_written(PM_PRESENT));
        assert!(is_written(PM_SWAPPED));
        assert!(!is_written(PM_PRESENT | PM_FILE_OR_SHARED), "the file's own page, read");
        assert!(!is_written(0), "never touched");
    }

    #[test]
    fn runs_join_adjacent_pages_up_to_a_bound() {
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10], 100), vec![(1, 3), (7, 2), (10, 1)]);
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert!(runs(&[], 4).is_empty());
    }

    /// This process's own private mapping of a file, written to in one page: found, and
    /// exactly that page reported written, its bytes read back through `mem`.
    #[test]
    fn the_pages_a_process_wrote_into_a_private_file_mapping_are_found() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let len = 61 * PAGE; // a size no library's mapping has
        std::fs::write(&path, vec![1u8; len as usize]).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a new private mapping of a file we opened; unmapped below, used in between.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping: page 5 written, page 9 read.
        let seen = unsafe {
            std::ptr::write_volatile((p as *mut u8).add(5 * PAGE as usize + 3), 42);
            std::ptr::read_volatile((p as *const u8).add(9 * PAGE as usize))
        };
        assert_eq!(seen, 1);
        let me = std::process::id() as i32;
        let m = RamMapping::find(me, len).unwrap().expect("the mapping");
        assert_eq!(m.start, p as u64);
        assert_eq!(m.written_pages().unwrap(), vec![5]);
        let mut got = Vec::new();
        m.read_pages(&[5], |i, b| {
            got.push((i, b[3], b[4]));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(5, 42, 1)]);
        assert_eq!(m.open_file().unwrap().metadata().unwrap().ino(), f.metadata().unwrap().ino());
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len as usize) };
    }
}
