//! The write side of a download: the bytes hashed as they arrive, decompressed, and written
//! sparse, never past the pinned size.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{io_err, FetchError, CHUNK, SPARSE_BLOCK, ZSTD_WINDOW_LOG_MAX};
use crate::images::asset::Asset;

/// How reading a stream through the pipeline failed.
pub(super) enum CopyError {
    /// Reading the source failed (for a download: the connection broke).
    Read(io::Error),
    /// Writing locally failed (disk full, I/O error).
    Write(io::Error),
}

/// Reads `from` to the end, hashing it, decompressing it into `sink` and appending it to `tee`.
/// If the sink rejects the data (not a valid zstd stream), the rest is still read and hashed,
/// so that the error can name the digest of what was served; the sink's error comes back
/// beside the byte count.
pub(super) fn copy_through(
    from: &mut dyn Read,
    hasher: &mut Sha256,
    sink: &mut Sink,
    mut tee: Option<&mut File>,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<(u64, Option<io::Error>), CopyError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut sink_error = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok((total, sink_error)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        if let Some(t) = tee.as_deref_mut() {
            t.write_all(&buf[..n]).map_err(CopyError::Write)?;
        }
        hasher.update(&buf[..n]);
        if sink_error.is_none() {
            if let Err(e) = sink.write_all(&buf[..n]) {
                if is_local_write_error(&e) {
                    return Err(CopyError::Write(e));
                }
                sink_error = Some(e);
            }
        }
        total += n as u64;
        on_bytes(n as u64);
    }
}

/// Disk full or a failing disk, as opposed to data that does not decode.
fn is_local_write_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EIO) | Some(libc::EROFS))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Writes content to a file, hashing it and leaving holes where it is zero, and never more
/// than `limit` bytes: a decompression bomb stops at the pinned size.
pub(super) struct ContentWriter {
    pub(super) file: File,
    pub(super) hasher: Sha256,
    pub(super) pos: u64,
    pub(super) limit: u64,
}

impl Write for ContentWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the content is longer than its pinned {} bytes", self.limit),
            ));
        }
        self.hasher.update(buf);
        for block in buf.chunks(SPARSE_BLOCK) {
            if block.iter().all(|b| *b == 0) {
                self.file.seek(SeekFrom::Current(block.len() as i64))?;
            } else {
                self.file.write_all(block)?;
            }
            self.pos += block.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The content side of a download: plain, or through a zstd decoder.
pub(super) enum Sink {
    Plain(ContentWriter),
    Zstd(Box<zstd::stream::write::Decoder<'static, ContentWriter>>),
}

impl Sink {
    pub(super) fn create(path: &Path, asset: &Asset) -> Result<Sink, FetchError> {
        let zstd = asset.is_zstd();
        let limit = asset.uncompressed.as_ref().map_or(asset.size, |u| u.size);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(format!("create {}", path.display())))?;
        let w = ContentWriter { file, hasher: Sha256::new(), pos: 0, limit };
        if !zstd {
            return Ok(Sink::Plain(w));
        }
        let mut d = zstd::stream::write::Decoder::new(w).map_err(io_err("start the zstd decoder"))?;
        d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(io_err("configure the zstd decoder"))?;
        Ok(Sink::Zstd(Box::new(d)))
    }

    /// Flushes, sets the final length (trailing holes) and syncs. Returns size and SHA-256.
    pub(super) fn finish(self) -> io::Result<(u64, String)> {
        let w = match self {
            Sink::Plain(w) => w,
            Sink::Zstd(mut d) => {
                d.flush()?;
                d.into_inner()
            }
        };
        w.file.set_len(w.pos)?;
        w.file.sync_all()?;
        Ok((w.pos, hex::encode(w.hasher.finalize())))
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(d) => d.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(d) => d.flush(),
        }
    }
}
