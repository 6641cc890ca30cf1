//! `troupe`: the command-line front end. It only parses arguments and wires library calls;
//! the work lives in the library crates.

mod adapter;
mod bench;
mod data;
mod debug;
mod eval;
mod inspect;
mod plot;
mod sample;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Train StoryMaker-style reference-conditioned adapters on SDXL.
#[derive(Parser)]
#[command(name = "troupe", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dataset tools: pack, import, check, inspect and benchmark shards.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Debugging tools: tokenize prompts, run one component's forward pass, benchmark the UNet.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Evaluation: score images (`clip`: CLIP-T / CLIP-I; `faces`, `face-sim`: face analysis).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Report a model folder's component, config, parameter count, dtypes and any missing or
    /// unexpected keys (reads file headers; an adapter's tensors are also checked finite, one at
    /// a time). Accepts a component folder, an SDXL pipeline folder (`model_index.json`) or an
    /// adapter file (`.safetensors` or `mask.bin`), which must match its architecture.
    Inspect(inspect::InspectArgs),
    /// Write an adapter in the reference layouts (`safetensors` or the StoryMaker `mask.bin`).
    Export(adapter::ExportArgs),
    /// Adapter tools (`init`).
    #[command(subcommand)]
    Adapter(adapter::AdapterCommand),
    /// Render a run's loss curves (`metrics.jsonl`) to a PNG.
    Plot(plot::PlotArgs),
    /// Generate images with an adapter: the StoryMaker pipeline (prompt + 1–3 character
    /// references) on an SDXL base model.
    Sample(Box<sample::SampleArgs>),
    /// Train a StoryMaker adapter: `--config FILE.toml [--set key=value …]` or `--resume RUN_DIR`.
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(cmd) => data::run(cmd),
        Command::Debug(cmd) => debug::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Inspect(args) => inspect::run(args),
        Command::Train(args) => train::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Sample(args) => sample::run(*args),
        Command::Export(args) => adapter::export(args),
        Command::Adapter(cmd) => adapter::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress display for `(done, total)` reports, made at the first (when the total is known).
pub(crate) fn progress(unit: &'static str) -> impl FnMut(u64, u64) {
    let mut bar: Option<troupe_train::progress::Progress> = None;
    move |done, total| {
        bar.get_or_insert_with(|| troupe_train::progress::Progress::new(total, unit))
            .set(done, unit)
    }
}
