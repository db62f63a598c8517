//! The files of a snapshot: copied without their holes, and digested so that holes do not
//! cost a read.
//!
//! A snapshot's RAM image and disk are mostly holes (a fresh 512 MiB guest touches ~50 MiB; a
//! 2 GiB sandbox disk holds a few MiB after boot), and each restore checks their digests: a
//! plain SHA-256 of the whole file would read gigabytes of zeros each time. So the digest is
//! defined over the content, not the allocation: SHA-256 of every 4 KiB page that is not all
//! zeros, each preceded by its index (u64, little-endian), then the file's length. Two files
//! with the same bytes have the same digest however they are allocated, any changed byte
//! changes it, and only the allocated extents (`SEEK_DATA`) are read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

const PAGE: usize = 4096;
/// Read in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

/// The allocated extents of `f` (offset, length), from `SEEK_DATA`/`SEEK_HOLE`.
fn extents(f: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let mut out = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    Ok(out)
}

/// Calls `each(offset, page)` for every page of `f` that is not all zeros, in order.
fn for_each_page(f: &File, mut each: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (start, len) in extents(f)? {
        // Extents are block-aligned in practice; align down to a page to be sure.
        let mut at = start - start % PAGE as u64;
        let end = start + len;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            let n = n.div_ceil(PAGE) * PAGE;
            let got = read_at_most(f, &mut buf[..n], at)?;
            if got == 0 {
                break;
            }
            for (i, page) in buf[..got].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    each(at + (i * PAGE) as u64, page)?;
                }
            }
            at += got as u64;
        }
    }
    Ok(())
}

fn read_at_most(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The content digest of `f` (see the module's doc), hex.
pub fn digest(f: &File) -> io::Result<String> {
    let mut h = Sha256::new();
    for_each_page(f, |off, page| {
        h.update((off / PAGE as u64).to_le_bytes());
        h.update(page);
        Ok(())
    })?;
    h.update(f.metadata()?.len().to_le_bytes());
    Ok(hex(&h.finalize()))
}

pub fn digest_path(path: &Path) -> io::Result<String> {
    digest(&crate::text::open_untrusted(path)?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Gives open file `f` the name `to` (a hard link): fails for a file with no name left
/// (ENOENT) or on another file system (EXDEV).
pub fn link_open_file(f: &File, to: &Path) -> io::Result<()> {
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(io::Error::other)?;
    let to_c = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid C strings; linkat reads them only. AT_SYMLINK_FOLLOW links the file
    // the descriptor's /proc entry names.
    let linked =
        unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if linked == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `FICLONE`: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Copies `src` into `dst` (a new file, 0600 until the caller says otherwise): a reflink
/// where the file system can (XFS, btrfs: copy-on-write, instant), else the pages that are not
/// zero, leaving holes for the rest.
pub fn copy_sparse(src: &File, dst: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)?;
    // SAFETY: both descriptors are ours and open; FICLONE reads no memory of ours.
    if unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
        return Ok(out);
    }
    for_each_page(src, |off, page| out.write_all_at(page, off))?;
    out.set_len(src.metadata()?.len())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_digest_is_of_the_content_not_the_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut f = File::create(&a).unwrap();
        f.write_all(&vec![0u8; 3 * PAGE]).unwrap(); // allocated zeros
        f.write_all(b"hello").unwrap();
        f.set_len(64 * PAGE as u64).unwrap(); // a hole to the end
        drop(f);
        let src = File::open(&a).unwrap();
        let b = dir.path().join("b");
        let copy = copy_sparse(&src, &b).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 64 * PAGE as u64);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(digest(&src).unwrap(), digest(&copy).unwrap());
        // One byte anywhere, even in what was a hole, changes it; so does the length.
        copy.write_all_at(b"x", 40 * PAGE as u64 + 7).unwrap();
        assert_ne!(digest(&src).unwrap(), digest(&copy).unwrap());
        let c = dir.path().join("c");
        let longer = copy_sparse(&src, &c).unwrap();
        longer.set_len(65 * PAGE as u64).unwrap();
        assert_ne!(digest(&src).unwrap(), digest(&longer).unwrap());
    }
}
