//! Refused connections: counted, the last few kept, every one written to a capped log.
//!
//! The network process appends one JSON line per refusal to `network.log` (rotated to
//! `network.log.1` at [`LOG_CAP`], so a guest that floods refusals costs at most twice that on
//! disk) and keeps `network-stats.json` (the count and the last [`RECENT`]) current: written
//! at each refusal, or at most every [`STATS_EVERY`] while a guest floods refusals (more than
//! [`BURST`] in one such interval). `status` and `logs --network` read those files, so they work
//! whether or not the sandbox runs.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One refused connection, flow or lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Unix time, seconds.
    pub time: i64,
    /// `tcp`, `udp` or `dns`.
    pub proto: String,
    /// `ip:port`, or the name looked up.
    pub dest: String,
    /// The name the client gave (TLS SNI, HTTP Host) or resolved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule that refused it.
    pub rule: String,
}

/// What `status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Refusals since the sandbox was created.
    pub refused: u64,
    /// The most recent, oldest first.
    pub recent: Vec<Refusal>,
}

pub const RECENT: usize = 10;
pub const LOG_CAP: u64 = 1 << 20;
const STATS_EVERY: Duration = Duration::from_millis(200);
const BURST: u32 = 20;

pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("network.log")
}

pub fn stats_path(dir: &Path) -> PathBuf {
    dir.join("network-stats.json")
}

/// Reads a sandbox's refusal figures (zero if it has none yet).
pub fn read_stats(dir: &Path) -> NetStats {
    crate::text::read_untrusted(&stats_path(dir), 1 << 20)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The refusal log of one sandbox, owned by its network process.
#[derive(Debug)]
pub struct RefusalLog {
    dir: PathBuf,
    stats: NetStats,
    recent: VecDeque<Refusal>,
    dirty: bool,
    written_at: Instant,
    /// Writes since `written_at` started an interval.
    writes: u32,
}

impl RefusalLog {
    /// Continues the figures already on disk (a restarted sandbox keeps its count).
    pub fn open(dir: &Path) -> RefusalLog {
        let stats = read_stats(dir);
        let recent = stats.recent.iter().cloned().collect();
        RefusalLog { dir: dir.to_path_buf(), stats, recent, dirty: false, written_at: Instant::now(), writes: 0 }
    }

    pub fn record(&mut self, r: Refusal) {
        tracing::info!("refused {} {} {}: {}", r.proto, r.dest, r.name.as_deref().unwrap_or(""), r.rule);
        self.append(&r);
        self.stats.refused += 1;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(r);
        self.dirty = true;
        self.flush(false);
    }

    fn append(&self, r: &Refusal) {
        let path = log_path(&self.dir);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= LOG_CAP) {
            let _ = std::fs::rename(&path, path.with_extension("log.1"));
        }
        let line = match serde_json::to_string(r) {
            Ok(l) => l,
            Err(e) => return tracing::warn!("encode a refusal: {e}"),
        };
        let res =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = res {
            tracing::warn!("write {}: {e}", path.display());
        }
    }

    /// Writes the stats file if it changed (during a flood at most every `STATS_EVERY`,
    /// unless `now`).
    pub fn flush(&mut self, now: bool) {
        if !self.dirty {
            return;
        }
        if self.written_at.elapsed() >= STATS_EVERY {
            self.written_at = Instant::now();
            self.writes = 0;
        }
        if !now && self.writes >= BURST {
            return;
        }
        self.writes += 1;
        self.stats.recent = self.recent.iter().cloned().collect();
        let path = stats_path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        let res = serde_json::to_vec(&self.stats)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::warn!("write {}: {e}", path.display());
        }
        self.dirty = false;
    }

    /// Whether a write is waiting for [`RefusalLog::flush`].
    pub fn pending(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(i: u64) -> Refusal {
        Refusal {
            time: i as i64,
            proto: "tcp".into(),
            dest: format!("10.0.0.1:{i}"),
            name: None,
            rule: "private".into(),
        }
    }

    #[test]
    fn counts_keep_the_last_few_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RefusalLog::open(dir.path());
        for i in 0..5 {
            log.record(refusal(i));
            assert_eq!(read_stats(dir.path()).refused, i + 1, "written at once when there is no flood");
        }
        for i in 5..25 {
            log.record(refusal(i));
        }
        log.flush(true);
        let s = read_stats(dir.path());
        assert_eq!(s.refused, 25);
        assert_eq!(s.recent.len(), RECENT);
        assert_eq!(s.recent.last().unwrap().dest, "10.0.0.1:24");
        let lines = std::fs::read_to_string(log_path(dir.path())).unwrap();
        assert_eq!(lines.lines().count(), 25);
        let mut again = RefusalLog::open(dir.path());
        again.record(refusal(99));
        again.flush(true);
        assert_eq!(read_stats(dir.path()).refused, 26);
    }
}
