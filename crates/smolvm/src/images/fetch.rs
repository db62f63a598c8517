//! The image cache: downloads verified by SHA-256, decompressed while they arrive, stored by
//! content digest, used only once verified.
//!
//! Layout under the cache directory:
//!
//! ```text
//! blobs/<content sha256>            verified, decompressed content (sparse)
//! blobs/<content sha256>.verified   stamp: size, mtime, inode at verification (a hit costs a stat)
//! partial/<asset sha256>.part       compressed bytes received so far (resumed with HTTP Range)
//! partial/<content sha256>.tmp      content being decompressed; renamed into blobs/ when verified
//! locks/<content sha256>.lock       single flight: one process downloads, the others wait
//! ```
//!
//! Nothing unverified is ever returned: the compressed bytes are hashed as they arrive, the
//! decompressed bytes as they are written, and the result is renamed into `blobs/` only when
//! both digests match the pins. A mismatch deletes the partial files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::asset::Asset;
use crate::lock::FileLock;

#[path = "sink.rs"]
mod sink;
use sink::{copy_through, CopyError, Sink};

/// Attempts for one asset when the transfer fails part-way (each resumes where the last ended).
const MAX_ATTEMPTS: u32 = 5;
/// Attempts when the server cannot be reached at all: an offline host should hear so quickly.
const MAX_CONNECT_ATTEMPTS: u32 = 3;
const CHUNK: usize = 256 * 1024;
/// Zero runs this long are skipped with a seek, leaving holes: a filesystem image is mostly zeros.
const SPARSE_BLOCK: usize = 64 * 1024;
/// The largest zstd window accepted (`--long=27`, 128 MiB); it also bounds the decoder's memory
/// while bytes are still unverified.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// What to tell the user about a download in progress.
#[derive(Debug, Clone)]
pub enum FetchEvent {
    /// A transfer starts: `total` bytes, of which `resumed` were already here.
    Start { name: String, total: u64, resumed: u64 },
    /// `n` more bytes arrived.
    Bytes(u64),
    /// A transient failure; the next attempt starts after `delay`.
    Retry { name: String, attempt: u32, reason: String, delay: Duration },
    /// Another process is downloading the same asset; we wait for it.
    Waiting { name: String },
    /// The asset is verified and cached.
    Done { name: String },
}

/// Why an image could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot download {url}: {reason}; the image release could not be reached")]
    Unreachable { url: String, reason: String },
    #[error("{url}: the server answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error(
        "{what} of {url} does not match its pin: expected sha256 {expected} ({expected_size} bytes), \
         got sha256 {actual} ({actual_size} bytes). Nothing of it was kept"
    )]
    Mismatch { url: String, what: &'static str, expected: String, actual: String, expected_size: u64, actual_size: u64 },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let what = what.into();
    move |source| FetchError::Io { what, source }
}

/// The HTTP client used for images: rustls, bounded connect and response waits, and no
/// transparent decompression (the bytes hashed are the bytes published). TLS trusts the
/// system's certificate store (so a host behind a TLS-inspecting proxy works as its other
/// tools do); integrity does not rest on TLS anyway: every byte is checked against its pin.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build())
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .user_agent(format!("smolvm/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// A verified-stamp: the file is the one that was hashed if these still match.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ino: u64,
    sha256: String,
}

impl Stamp {
    fn of(path: &Path, sha256: &str) -> io::Result<Stamp> {
        let m = fs::metadata(path)?;
        Ok(Stamp {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
            sha256: sha256.into(),
        })
    }
}

/// One cached, verified image.
#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    pub sha256: String,
    pub size: u64,
    /// Bytes actually allocated on disk (the files are sparse).
    pub allocated: u64,
    pub path: PathBuf,
}

/// The content-addressed image cache.
#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

impl ImageCache {
    pub fn new(root: impl Into<PathBuf>) -> ImageCache {
        ImageCache { root: root.into() }
    }

    fn blob(&self, sha: &str) -> PathBuf {
        self.root.join("blobs").join(sha)
    }

    fn stamp(&self, sha: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{sha}.verified"))
    }

    /// The verified content of `asset`, if cached. Costs a `stat` when the stamp matches; a
    /// blob whose stamp does not match (copied, touched) is re-hashed once, and deleted if wrong.
    pub fn lookup(&self, asset: &Asset) -> Option<PathBuf> {
        let sha = asset.content_sha256();
        let blob = self.blob(sha);
        if !blob.exists() {
            return None;
        }
        let stamp: Option<Stamp> = fs::read(self.stamp(sha)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if stamp.is_some() && stamp == Stamp::of(&blob, sha).ok() {
            return Some(blob);
        }
        match crate::digest::sha256_file(&blob) {
            Ok((_, actual)) if actual == sha => {
                let _ = self.write_stamp(sha);
                Some(blob)
            }
            _ => {
                tracing::warn!("cached image {} failed verification; removing it", blob.display());
                let _ = fs::remove_file(&blob);
                let _ = fs::remove_file(self.stamp(sha));
                None
            }
        }
    }

    /// The verified content with this SHA-256, if cached (for a sandbox that records only the
    /// digest of the image it was created from).
    pub fn lookup_sha(&self, sha: &str) -> Option<PathBuf> {
        let blob = self.blob(sha);
        let stamp: Stamp = serde_json::from_slice(&fs::read(self.stamp(sha)).ok()?).ok()?;
        (Stamp::of(&blob, sha).ok()? == stamp).then_some(blob)
    }

    fn write_stamp(&self, sha: &str) -> io::Result<()> {
        let stamp = Stamp::of(&self.blob(sha), sha)?;
        let tmp = self.stamp(sha).with_extension("verified.tmp");
        fs::write(&tmp, serde_json::to_vec(&stamp).expect("a stamp serializes"))?;
        fs::rename(tmp, self.stamp(sha))
    }

    /// Returns the verified content of `asset`, downloading it from `url` if needed.
    /// Concurrent callers (threads or processes) download it once; the others wait.
    pub fn ensure(&self, asset: &Asset, url: &str, on: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf, FetchError> {
        if let Some(p) = self.lookup(asset) {
            return Ok(p);
        }
        let _lock = self.lock(asset, on)?;
        if let Some(p) = self.lookup(asset) {
            return Ok(p);
        }
        self.download(asset, url, on)?;
        on(FetchEvent::Done { name: asset.name.clone() });
        self.lookup(asset).ok_or_else(|| FetchError::Io {
            what: format!("{} vanished from the cache right after verification", asset.name),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    /// Verifies a local copy of `asset` (compressed, as published) and adds its content.
    pub fn import(&self, asset: &Asset, file: &Path) -> Result<PathBuf, FetchError> {
        if let Some(p) = self.lookup(asset) {
            return Ok(p);
        }
        let _lock = self.lock(asset, &mut |_| {})?;
        let origin = file.display().to_string();
        let tmp = self.tmp_path(asset)?;
        let result = (|| {
            let mut sink = Sink::create(&tmp, asset)?;
            let mut hasher = Sha256::new();
            let mut f = File::open(file).map_err(io_err(format!("open {origin}")))?;
            let (total, sink_error) =
                copy_through(&mut f, &mut hasher, &mut sink, None, &mut |_| {}).map_err(|e| match e {
                    CopyError::Read(e) => FetchError::Io { what: format!("read {origin}"), source: e },
                    CopyError::Write(e) => FetchError::Io {
                        what: format!("write into the image cache {}", self.root.display()),
                        source: e,
                    },
                })?;
            self.finish(asset, &origin, sink, sink_error, hasher, total, &tmp)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.lookup(asset)
            .ok_or_else(|| FetchError::Io { what: "import".into(), source: io::ErrorKind::NotFound.into() })
    }

    fn lock(&self, asset: &Asset, on: &mut dyn FnMut(FetchEvent)) -> Result<FileLock, FetchError> {
        let path = self.root.join("locks").join(format!("{}.lock", asset.content_sha256()));
        let what = || format!("lock {}", path.display());
        if let Some(l) = FileLock::try_exclusive(&path).map_err(io_err(what()))? {
            return Ok(l);
        }
        on(FetchEvent::Waiting { name: asset.name.clone() });
        FileLock::exclusive(&path).map_err(io_err(what()))
    }

    fn tmp_path(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        let dir = self.root.join("partial");
        fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        fs::create_dir_all(self.root.join("blobs")).map_err(io_err("create the image cache"))?;
        Ok(dir.join(format!("{}.tmp", asset.content_sha256())))
    }

    fn download(&self, asset: &Asset, url: &str, on: &mut dyn FnMut(FetchEvent)) -> Result<(), FetchError> {
        let tmp = self.tmp_path(asset)?;
        let part = self.root.join("partial").join(format!("{}.part", asset.sha256));
        let agent = http_agent();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.attempt(&agent, asset, url, &part, &tmp, on) {
                Ok(()) => {
                    let _ = fs::remove_file(&part);
                    return Ok(());
                }
                Err(e) => e,
            };
            let (reason, limit) = match err {
                Failure::Fatal(e) => {
                    // Bytes that failed verification are never resumed from.
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                Failure::Connect(r) => (r, MAX_CONNECT_ATTEMPTS),
                Failure::Transfer(r) => (r, MAX_ATTEMPTS),
            };
            let _ = fs::remove_file(&tmp);
            if attempt >= limit {
                // The partial download stays: the next run resumes it (it is verified then).
                return Err(FetchError::Unreachable { url: url.to_string(), reason });
            }
            let delay = Duration::from_millis(500 << (attempt - 1).min(4));
            on(FetchEvent::Retry { name: asset.name.clone(), attempt, reason, delay });
            std::thread::sleep(delay);
        }
    }

    /// One attempt: replay what is already in `part`, then fetch the rest with a Range request.
    fn attempt(
        &self,
        agent: &ureq::Agent,
        asset: &Asset,
        url: &str,
        part: &Path,
        tmp: &Path,
        on: &mut dyn FnMut(FetchEvent),
    ) -> Result<(), Failure> {
        let fatal_io = |what: String| move |e: io::Error| Failure::Fatal(FetchError::Io { what, source: e });
        let mut have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > asset.size {
            let _ = fs::remove_file(part);
            have = 0;
        }
        let mut req = agent.get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let mut resp = req.call().map_err(|e| Failure::Connect(e.to_string()))?;
        let status = resp.status().as_u16();
        match status {
            206 if have > 0 => {}
            200 => have = 0, // the server ignored the range: start over
            416 if have == asset.size => {}
            416 => {
                let _ = fs::remove_file(part);
                return Err(Failure::Transfer("the server refused to resume; starting over".into()));
            }
            429 | 500..=599 => return Err(Failure::Transfer(format!("HTTP {status}"))),
            _ => return Err(Failure::Fatal(FetchError::Http { url: url.into(), status })),
        }
        let mut part_file = OpenOptions::new()
            .create(true)
            .append(have > 0)
            .write(true)
            .truncate(have == 0)
            .open(part)
            .map_err(fatal_io(format!("open {}", part.display())))?;
        let mut sink = Sink::create(tmp, asset).map_err(Failure::Fatal)?;
        let mut hasher = Sha256::new();
        if have > 0 {
            let mut f = File::open(part).map_err(fatal_io(format!("read {}", part.display())))?;
            match copy_through(&mut Read::by_ref(&mut f).take(have), &mut hasher, &mut sink, None, &mut |_| {}) {
                Ok((_, None)) => {}
                // What we kept does not decode, so it is not the pinned asset: start over.
                Ok((_, Some(_))) | Err(CopyError::Read(_)) => {
                    let _ = fs::remove_file(part);
                    return Err(Failure::Transfer("the partial download was unusable; starting over".into()));
                }
                Err(CopyError::Write(e)) => return Err(fatal_io(format!("write {}", tmp.display()))(e)),
            }
        }
        on(FetchEvent::Start { name: asset.name.clone(), total: asset.size, resumed: have });
        let mut body = resp.body_mut().with_config().limit(asset.size.saturating_sub(have) + 1).reader();
        let received =
            copy_through(&mut body, &mut hasher, &mut sink, Some(&mut part_file), &mut |n| on(FetchEvent::Bytes(n)));
        let sink_error = match received {
            Ok((_, sink_error)) => sink_error,
            Err(CopyError::Write(e)) => {
                return Err(Failure::Fatal(FetchError::Io {
                    what: format!(
                        "writing {} into the image cache {} (if the disk is full: free space, or set SMOLVM_HOME elsewhere)",
                        asset.name,
                        self.root.display()
                    ),
                    source: e,
                }));
            }
            // The connection broke: what arrived is kept in `part` for the next attempt.
            Err(CopyError::Read(e)) => return Err(Failure::Transfer(e.to_string())),
        };
        let total = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        self.finish(asset, url, sink, sink_error, hasher, total, tmp).map_err(Failure::Fatal)
    }

    /// Checks both digests, then renames the content into `blobs/` and stamps it.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        asset: &Asset,
        origin: &str,
        sink: Sink,
        sink_error: Option<io::Error>,
        hasher: Sha256,
        total: u64,
        tmp: &Path,
    ) -> Result<(), FetchError> {
        let actual = hex::encode(hasher.finalize());
        if total != asset.size || actual != asset.sha256 {
            return Err(FetchError::Mismatch {
                url: origin.into(),
                what: "the download",
                expected: asset.sha256.clone(),
                actual,
                expected_size: asset.size,
                actual_size: total,
            });
        }
        let finished = match sink_error {
            Some(e) => Err(e),
            None => sink.finish(),
        };
        let (size, sha) = match finished {
            Ok(v) => v,
            Err(e) => {
                return Err(FetchError::Mismatch {
                    url: origin.into(),
                    what: "the decompressed content",
                    expected: asset.content_sha256().into(),
                    actual: format!("(undecodable: {e})"),
                    expected_size: asset.uncompressed.as_ref().map_or(asset.size, |u| u.size),
                    actual_size: 0,
                })
            }
        };
        let expected_size = asset.uncompressed.as_ref().map_or(asset.size, |u| u.size);
        if size != expected_size || sha != asset.content_sha256() {
            return Err(FetchError::Mismatch {
                url: origin.into(),
                what: "the decompressed content",
                expected: asset.content_sha256().into(),
                actual: sha,
                expected_size,
                actual_size: size,
            });
        }
        let blob = self.blob(&sha);
        fs::rename(tmp, &blob).map_err(io_err(format!("move into {}", blob.display())))?;
        self.write_stamp(&sha).map_err(io_err("write the verified-stamp"))?;
        Ok(())
    }

    /// Every verified image in the cache.
    pub fn list(&self) -> Vec<CachedImage> {
        let Ok(rd) = fs::read_dir(self.root.join("blobs")) else {
            return Vec::new();
        };
        let mut out: Vec<CachedImage> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if !crate::digest::is_sha256_hex(&name) {
                    return None;
                }
                let m = e.metadata().ok()?;
                Some(CachedImage { sha256: name, size: m.len(), allocated: m.blocks() * 512, path: e.path() })
            })
            .collect();
        out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        out
    }

    /// Re-hashes one cached image; a bad one is removed. Returns whether it was good.
    pub fn verify(&self, image: &CachedImage) -> io::Result<bool> {
        let (_, sha) = crate::digest::sha256_file(&image.path)?;
        if sha == image.sha256 {
            self.write_stamp(&sha)?;
            return Ok(true);
        }
        self.remove(&image.sha256)?;
        Ok(false)
    }

    /// Removes a cached image and its stamp.
    pub fn remove(&self, sha: &str) -> io::Result<()> {
        let _ = fs::remove_file(self.stamp(sha));
        match fs::remove_file(self.blob(sha)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes partial downloads. Returns the bytes freed.
    pub fn remove_partials(&self) -> u64 {
        let Ok(rd) = fs::read_dir(self.root.join("partial")) else {
            return 0;
        };
        rd.flatten()
            .filter_map(|e| {
                let len = e.metadata().ok()?.len();
                fs::remove_file(e.path()).ok().map(|_| len)
            })
            .sum()
    }
}

/// How an attempt failed.
enum Failure {
    /// Could not talk to the server.
    Connect(String),
    /// The transfer broke part-way; resumable.
    Transfer(String),
    /// Not worth retrying: wrong bytes, HTTP 404, local I/O.
    Fatal(FetchError),
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    #[test]
    fn content_past_the_pinned_size_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("out")).unwrap();
        let mut w = super::sink::ContentWriter { file, hasher: sha2::Sha256::new(), pos: 0, limit: 8 };
        use std::io::Write;
        assert!(w.write_all(&[1; 8]).is_ok());
        let err = w.write_all(&[1]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(w.pos, 8);
    }
}
