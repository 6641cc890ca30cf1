//! What a run records as it goes: one `metrics.jsonl` line and TensorBoard scalars per logged
//! step, and progress on stderr ([`crate::progress`]).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::progress::Progress;
use crate::tensorboard::EventWriter;

/// Measurements of one optimizer step.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Total loss (mean over micro-batches).
    pub loss: f64,
    /// Noise-MSE term.
    pub noise_loss: f64,
    /// Attention-map term.
    pub attn_loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the PPR group.
    pub lr: f64,
    /// Learning rate of the processor group.
    pub lr_adapter: f64,
    /// Samples consumed.
    pub samples: usize,
    /// Compute time (forward, backward, update), without waiting for data.
    pub step_s: f64,
    /// Time spent waiting for the loader.
    pub data_wait_s: f64,
    /// Whether the loss and the gradient were finite (the update was applied).
    pub finite: bool,
}

/// The run's metrics file, event file and progress display.
pub struct Records {
    metrics: std::fs::File,
    events: EventWriter,
    progress: Progress,
    started: Instant,
    start_step: u64,
    samples: usize,
}

impl Records {
    /// Opens (appending) `metrics.jsonl` and a new TensorBoard event file in `dir`; progress
    /// rates count from `start_step`. Records of steps after `start_step` (logged by an earlier
    /// process after the checkpoint it resumes from, or torn by a kill) are cut first, from
    /// both, so a resumed run's records equal an uninterrupted run's.
    pub fn open(dir: &Path, start_step: u64, max_steps: u64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        cut_metrics(&path, start_step)?;
        crate::tensorboard::cut_event_files(dir, start_step)
            .with_context(|| format!("cutting the TensorBoard events in {}", dir.display()))?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let events = EventWriter::create(dir)
            .with_context(|| format!("creating a TensorBoard event file in {}", dir.display()))?;
        Ok(Self {
            metrics,
            events,
            progress: Progress::new(max_steps.saturating_sub(start_step), "steps"),
            started: Instant::now(),
            start_step,
            samples: 0,
        })
    }

    /// Counts the step's samples; when `log` is set, writes its metrics line, scalars and
    /// progress (`skipped` non-finite steps so far).
    pub fn step(&mut self, s: &StepStats, step: u64, skipped: u64, log: bool) -> Result<()> {
        self.samples += s.samples;
        if !log {
            return Ok(());
        }
        let secs = self.started.elapsed().as_secs_f64();
        let rate = self.samples as f64 / secs.max(1e-9);
        let line = serde_json::json!({
            "step": step, "loss": s.loss, "noise_loss": s.noise_loss, "attn_loss": s.attn_loss,
            "lr": s.lr, "lr_adapter": s.lr_adapter, "grad_norm": s.grad_norm,
            "samples_per_s": rate, "skipped_nonfinite": skipped, "elapsed_s": secs,
            "step_s": s.step_s, "data_wait_s": s.data_wait_s,
        });
        self.append(&line)?;
        self.events.scalars(
            step,
            &[
                ("loss/total", s.loss),
                ("loss/noise", s.noise_loss),
                ("loss/attention", s.attn_loss),
                ("lr/ppr", s.lr),
                ("lr/processors", s.lr_adapter),
                ("grad_norm", s.grad_norm),
                ("samples_per_s", rate),
            ],
        )?;
        let message = format!(
            "loss {:.4} (noise {:.4}, attn {:.4}) | lr {:.2e} | {rate:.2} samples/s",
            s.loss, s.noise_loss, s.attn_loss, s.lr,
        );
        self.progress.set(step - self.start_step, &message);
        Ok(())
    }

    /// Writes extra scalars (validation, sample scores) at `step`, to both records.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for (k, v) in values {
            line.insert((*k).into(), (*v).into());
        }
        self.append(&serde_json::Value::Object(line))?;
        self.events.scalars(step, values)?;
        Ok(())
    }

    /// Appends one record in a single write, so a kill cannot leave half a line followed by
    /// more records.
    fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        self.metrics.write_all(format!("{record}\n").as_bytes())?;
        crate::faults::write_point();
        Ok(())
    }

    /// Writes an image summary (PNG bytes) at `step` to the event file.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> Result<()> {
        self.events.image(step, tag, png, width, height)?;
        Ok(())
    }

    /// Flushes the metrics file to disk.
    pub fn sync(&self) -> Result<()> {
        self.metrics.sync_all()?;
        Ok(())
    }
}

/// The records of a `metrics.jsonl` in file order. A last line that does not parse (torn by a
/// kill mid-write) is left out and reported in the second value; any other bad line is an
/// error naming its line. A missing file has no records.
pub fn read_metrics(path: &Path) -> Result<(Vec<serde_json::Value>, Option<String>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let mut records = Vec::with_capacity(lines.len());
    let mut torn = None;
    for (k, (i, l)) in lines.iter().enumerate() {
        let parsed = serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v["step"].as_u64().is_some());
        match parsed {
            Some(v) => records.push(v),
            None if k + 1 == lines.len() && !text.ends_with('\n') => {
                torn = Some(format!(
                    "{}: line {} is cut off (a write interrupted by a kill); left out",
                    path.display(),
                    i + 1
                ));
            }
            None => anyhow::bail!(
                "{}: line {} is not a metrics record (JSON with a `step`)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok((records, torn))
}

/// Rewrites `metrics.jsonl` without the records after `step` (and without a torn last line),
/// atomically; leaves a file that needs no cut untouched.
fn cut_metrics(path: &Path, step: u64) -> Result<()> {
    let (records, torn) = read_metrics(path)?;
    let keep: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["step"].as_u64().is_some_and(|s| s <= step))
        .collect();
    if keep.len() == records.len() && torn.is_none() {
        return Ok(());
    }
    let mut text = String::new();
    for r in keep {
        text.push_str(&format!("{r}\n"));
    }
    crate::checkpoint::write_atomic(path, text.as_bytes())
        .with_context(|| format!("rewriting {} up to step {step}", path.display()))
}
