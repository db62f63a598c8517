//! Download progress on a terminal (bytes, rate, ETA); silent otherwise and with `--json`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use smolvm::images::fetch::FetchEvent;

/// Shows [`FetchEvent`]s.
pub struct Progress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        Progress { enabled: !json && std::io::stderr().is_terminal(), bar: None }
    }

    pub fn event(&mut self, e: FetchEvent) {
        match e {
            FetchEvent::Start { name, total, resumed } => {
                if !self.enabled {
                    return;
                }
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:32} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(name);
                bar.set_position(resumed);
                self.bar = Some(bar);
            }
            FetchEvent::Bytes(n) => {
                if let Some(b) = &self.bar {
                    b.inc(n);
                }
            }
            FetchEvent::Retry { name, attempt, reason, delay } => {
                if let Some(b) = self.bar.take() {
                    b.abandon();
                }
                eprintln!("{name}: attempt {attempt} failed ({reason}); retrying in {delay:?}");
            }
            FetchEvent::Waiting { name } => {
                eprintln!("{name}: another smolvm process is downloading it; waiting")
            }
            FetchEvent::Done { .. } => {
                if let Some(b) = self.bar.take() {
                    b.finish();
                }
            }
        }
    }
}
