//! The pages a restored guest wrote over the RAM image it was restored from
//! (`vm::guest_ram`): what a pause of such a guest keeps instead of its whole RAM, next to a
//! link to that image (`base`).
//!
//! Layout of a `pages` file (little-endian): the magic `SMOLVMPG`, the format (u32, 1), the
//! page size (u32), the RAM's size in bytes (u64), the number of pages N (u64); N page
//! indices (u64, ascending); zeros to the next page boundary; then the N pages in that order.
//! Every written page is there, zero pages too: a page the guest zeroed must not show the
//! image's bytes again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::vm::guest_ram::{runs, RamMapping, PAGE};

const MAGIC: &[u8; 8] = b"SMOLVMPG";
const FORMAT: u32 = 1;
const HEADER: u64 = 32;
/// Pages copied per read or write.
const RUN: u64 = 256;

fn bad(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

/// Writes the pages `ram` holds at `indices` (sorted; the guest stopped) into a new `path`.
pub fn save(ram: &RamMapping, indices: &[u64], path: &Path) -> io::Result<()> {
    let f = crate::text::create_private(path)?;
    let mut head = Vec::with_capacity((HEADER + 8 * indices.len() as u64) as usize);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT.to_le_bytes());
    head.extend_from_slice(&(PAGE as u32).to_le_bytes());
    head.extend_from_slice(&ram.len.to_le_bytes());
    head.extend_from_slice(&(indices.len() as u64).to_le_bytes());
    for i in indices {
        head.extend_from_slice(&i.to_le_bytes());
    }
    f.write_all_at(&head, 0)?;
    let data = data_offset(indices.len() as u64);
    let mut at = data;
    ram.read_pages(indices, |_, page| {
        f.write_all_at(page, at)?;
        at += PAGE;
        Ok(())
    })?;
    f.set_len(at)
}

fn data_offset(count: u64) -> u64 {
    (HEADER + 8 * count).div_ceil(PAGE) * PAGE
}

/// An open `pages` file, checked: its header, its indices (ascending, inside `ram_len`), its
/// length.
#[derive(Debug)]
pub struct Pages {
    file: File,
    indices: Vec<u64>,
    data: u64,
}

impl Pages {
    pub fn open(path: &Path, ram_len: u64) -> io::Result<Pages> {
        let file = crate::text::open_untrusted(path)?;
        let mut head = [0u8; HEADER as usize];
        file.read_exact_at(&mut head, 0).map_err(|e| bad(path, format!("no header ({e})")))?;
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or([0; 8]));
        if &head[..8] != MAGIC || u32_at(8) != FORMAT || u32_at(12) != PAGE as u32 {
            return Err(bad(path, "not a smolvm pages file of format 1 with 4 KiB pages"));
        }
        if u64_at(16) != ram_len {
            return Err(bad(path, format!("saved from {} bytes of RAM, not {ram_len}", u64_at(16))));
        }
        let count = u64_at(24);
        if count > ram_len / PAGE {
            return Err(bad(path, format!("{count} pages, more than the RAM holds")));
        }
        let mut raw = vec![0u8; (8 * count) as usize];
        file.read_exact_at(&mut raw, HEADER).map_err(|e| bad(path, format!("short index ({e})")))?;
        let indices: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        if indices.windows(2).any(|w| w[0] >= w[1]) || indices.last().is_some_and(|l| *l >= ram_len / PAGE) {
            return Err(bad(path, "page indices out of order or outside the RAM"));
        }
        let data = data_offset(count);
        if file.metadata()?.len() != data + count * PAGE {
            return Err(bad(path, "its length does not match its page count"));
        }
        Ok(Pages { file, indices, data })
    }

    pub fn count(&self) -> usize {
        self.indices.len()
    }

    /// Calls `each(first_index, bytes)` for runs of adjacent pages, in order.
    pub fn for_each_run(&self, mut each: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut at = self.data;
        for (first, count) in runs(&self.indices, RUN) {
            buf.resize((count * PAGE) as usize, 0);
            self.file.read_exact_at(&mut buf, at)?;
            each(first, &buf)?;
            at += count * PAGE;
        }
        Ok(())
    }

    /// Writes the pages into a restoring guest's RAM (its QEMU not yet running it).
    pub fn apply(&self, ram: &RamMapping) -> io::Result<()> {
        let mem = ram.open_mem()?;
        self.for_each_run(|first, bytes| ram.write_pages(&mem, first, bytes))
    }
}

/// A new RAM image at `dst`: `base` (a copy: a reflink where the file system can, else its
/// non-zero pages) with `pages` written over it, each `(first_index, bytes)` run from `over`.
pub fn materialize(
    base: &File,
    dst: &Path,
    over: impl FnOnce(&mut dyn FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()>,
) -> io::Result<File> {
    let out = super::files::copy_sparse(base, dst)?;
    let len = out.metadata()?.len();
    over(&mut |first, bytes| {
        if first * PAGE + bytes.len() as u64 > len {
            return Err(io::Error::other(format!("a page at {first} is outside the {len}-byte RAM image")));
        }
        out.write_all_at(bytes, first * PAGE)
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_file(dir: &Path, indices: &[u64], ram_len: u64) -> std::path::PathBuf {
        // Written as `save` does, from bytes: page i is filled with (i % 251) as u8.
        let path = dir.join("pages");
        let f = File::create(&path).unwrap();
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT.to_le_bytes());
        head.extend_from_slice(&(PAGE as u32).to_le_bytes());
        head.extend_from_slice(&ram_len.to_le_bytes());
        head.extend_from_slice(&(indices.len() as u64).to_le_bytes());
        for i in indices {
            head.extend_from_slice(&i.to_le_bytes());
        }
        f.write_all_at(&head, 0).unwrap();
        let mut at = data_offset(indices.len() as u64);
        for i in indices {
            f.write_all_at(&vec![(i % 251) as u8; PAGE as usize], at).unwrap();
            at += PAGE;
        }
        f.set_len(at).unwrap();
        path
    }

    #[test]
    fn pages_over_a_base_make_the_image_zeroed_pages_included() {
        let dir = tempfile::tempdir().unwrap();
        let ram_len = 32 * PAGE;
        let base_path = dir.path().join("base");
        std::fs::write(&base_path, vec![9u8; ram_len as usize]).unwrap();
        let base = File::open(&base_path).unwrap();
        // Page 0 is written as zeros (0 % 251): it must not show the base's 9s again.
        let p = pages_file(dir.path(), &[0, 3, 4, 31], ram_len);
        let pages = Pages::open(&p, ram_len).unwrap();
        assert_eq!(pages.count(), 4);
        let out = materialize(&base, &dir.path().join("ram"), |each| pages.for_each_run(each)).unwrap();
        drop(out);
        let img = std::fs::read(dir.path().join("ram")).unwrap();
        let page = |i: usize| &img[i * PAGE as usize..(i + 1) * PAGE as usize];
        assert!(page(0).iter().all(|b| *b == 0));
        assert!(page(1).iter().all(|b| *b == 9));
        assert!(page(3).iter().all(|b| *b == 3) && page(4).iter().all(|b| *b == 4));
        assert!(page(31).iter().all(|b| *b == 31));
    }

    #[test]
    fn a_damaged_or_foreign_pages_file_is_refused_with_why() {
        let dir = tempfile::tempdir().unwrap();
        let ram_len = 16 * PAGE;
        let p = pages_file(dir.path(), &[1, 2], ram_len);
        let e = Pages::open(&p, 32 * PAGE).unwrap_err().to_string();
        assert!(e.contains("not 131072"), "{e}");
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(data_offset(2) + PAGE).unwrap();
        assert!(Pages::open(&p, ram_len).unwrap_err().to_string().contains("length"));
        let p = pages_file(dir.path(), &[2, 1], ram_len);
        assert!(Pages::open(&p, ram_len).unwrap_err().to_string().contains("out of order"));
        let p = pages_file(dir.path(), &[16], ram_len);
        assert!(Pages::open(&p, ram_len).unwrap_err().to_string().contains("outside"));
        std::fs::write(&p, b"SMOLVMPGxxxx").unwrap();
        assert!(Pages::open(&p, ram_len).unwrap_err().to_string().contains("no header"));
    }
}
