//! Progress of long work on stderr (CONTRACT.md: a bar on a terminal, a plain line now and
//! then otherwise).
use std::time::Instant;

/// Progress on stderr: a bar with rate and time left on a terminal, a plain line every few
/// seconds otherwise (logs, CI).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Progress { bar, label: label.into(), total, done: 0, start: Instant::now(), last_line: Instant::now() }
    }

    pub fn inc(&mut self, n: u64, msg: &str) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
            bar.inc(n);
        } else if self.last_line.elapsed().as_secs_f64() >= 10.0 || self.done == self.total {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let left = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
            eprintln!("{}: {}/{} ({rate:.2}/s, {left:.0}s left) {msg}", self.label, self.done, self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

