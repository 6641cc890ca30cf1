//! `troupe train`: start a run from a TOML config, or resume one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use troupe_train::config::TrainConfig;
use troupe_train::trainer::{resume, train};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run config (e.g. `configs/tiny.toml`).
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Override a config value, e.g. `--set train.max_steps=100` (repeatable). With `--resume`,
    /// only the keys that leave the steps taken valid (max_steps, logging, checkpoint and
    /// sample cadence, the LR schedule); others are refused.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    // SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let outcome = match (args.config, args.resume) {
        (Some(path), None) => train(TrainConfig::load(&path, &args.set)?, stop)?,
        (None, Some(dir)) => resume(&dir, &args.set, stop)?,
        _ => bail!("give --config FILE or --resume RUN_DIR"),
    };
    if let Some(c) = &outcome.checkpoint {
        eprintln!("checkpoint: {}", c.display());
    }
    if let Some((a, b)) = outcome.loss_trend() {
        let k = (outcome.losses.len() / 5).clamp(1, 50);
        eprintln!("loss, mean of the first {k} steps: {a:.4} → mean of the last {k}: {b:.4}");
    }
    if outcome.interrupted {
        eprintln!(
            "interrupted at step {}; continue with `troupe train --resume`",
            outcome.step
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}
