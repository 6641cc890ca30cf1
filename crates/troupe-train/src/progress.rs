//! Progress on stderr for long commands (training, sampling): an `indicatif` bar redrawn in
//! place on a terminal; in a log (stderr not a terminal) one plain line at the start, then at
//! most one every [`LOG_INTERVAL`], and one at the end, so a long run's log stays readable.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Least time between two progress lines in a log.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// A progress display for `total` units of work.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_line: Option<Instant>,
    started: Instant,
}

impl Progress {
    /// A display for `total` units; `unit` names them in the bar (e.g. "steps").
    pub fn new(total: u64, unit: &str) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!("{{bar:30}} {{pos:>6}}/{{len}} {unit} | {{msg}} | ETA {{eta}}");
            bar.set_style(ProgressStyle::with_template(&template).expect("a valid template"));
            bar
        });
        Self {
            bar,
            total,
            last_line: None,
            started: Instant::now(),
        }
    }

    /// Reports `done` units, with `message` (loss, rate, …).
    pub fn set(&mut self, done: u64, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
            if done >= self.total {
                bar.finish();
            }
            return;
        }
        let due = self.last_line.is_none_or(|t| t.elapsed() >= LOG_INTERVAL);
        if due || done >= self.total {
            let secs = self.started.elapsed().as_secs_f64();
            let eta = secs / done.max(1) as f64 * self.total.saturating_sub(done) as f64;
            eprintln!(
                "{done}/{} | {message} | ETA {}",
                self.total,
                format_eta(eta)
            );
            self.last_line = Some(Instant::now());
        }
    }
}

/// `1h02m`, `3m05s`, `42s`.
pub fn format_eta(secs: f64) -> String {
    let s = if secs.is_finite() {
        secs.max(0.0).round() as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
