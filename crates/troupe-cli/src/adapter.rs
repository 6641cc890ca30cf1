//! `troupe export` and `troupe adapter init`: adapter files in the reference layouts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use troupe_models::adapter::{Adapter, AdapterSpec};
use troupe_models::adapter_file::{AdapterFormat, ExportDType, export_adapter};
use troupe_models::unet::UNet2DConditionConfig;

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// `.safetensors`, keys `image_proj_model.*` / `ip_adapter.*`, with metadata.
    Safetensors,
    /// The reference `mask.bin` (torch zip, `torch.load(weights_only=True)`).
    StorymakerBin,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A run directory (its newest complete checkpoint), a checkpoint directory, or an adapter
    /// file (`.safetensors`, or a torch `.bin`).
    source: PathBuf,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "safetensors")]
    format: FormatArg,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
}

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Write a freshly initialised adapter (reference zero-inits) for any UNet config.
    Init {
        /// A diffusers `unet/config.json`.
        #[arg(long)]
        unet_config: PathBuf,
        /// LoRA rank [default: StoryMaker's, 128].
        #[arg(long)]
        rank: Option<usize>,
        /// Width of the CLIP image encoder's hidden states [default: 1280, ViT-H/14].
        #[arg(long)]
        clip_dim: Option<usize>,
        /// Head width of the PPR resamplers [default: 64].
        #[arg(long)]
        ppr_dim_head: Option<usize>,
        /// Layers of each PPR resampler [default: 4].
        #[arg(long)]
        ppr_depth: Option<usize>,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output `.safetensors`.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The adapter file a run or checkpoint directory (or a file) stands for, warning about
/// skipped incomplete checkpoints.
pub fn adapter_file(source: &Path) -> Result<PathBuf> {
    let mut skipped = Vec::new();
    let file = troupe_train::checkpoint::adapter_file(source, &mut skipped);
    for s in skipped {
        eprintln!("warning: skipping {s}");
    }
    file
}

pub fn export(args: ExportArgs) -> Result<ExitCode> {
    let source = adapter_file(&args.source)?;
    let format = match args.format {
        FormatArg::Safetensors => AdapterFormat::Safetensors,
        FormatArg::StorymakerBin => AdapterFormat::StorymakerBin,
    };
    let dtype = match args.dtype {
        DTypeArg::F32 => ExportDType::F32,
        DTypeArg::F16 => ExportDType::F16,
    };
    // The source's metadata (base model, step, …) travels, with the architecture (inferred for
    // files that lack it) and where it came from. Tensors are streamed one at a time, each
    // checked against the architecture and for finite values.
    let metadata = [("source".to_string(), source.display().to_string())].into();
    let (_, tensors) = export_adapter(&source, &args.out, format, dtype, metadata)?;
    println!("{}: {tensors} tensors", args.out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: AdapterCommand) -> Result<ExitCode> {
    match cmd {
        AdapterCommand::Init {
            unet_config,
            rank,
            clip_dim,
            ppr_dim_head,
            ppr_depth,
            seed,
            out,
        } => {
            let config = UNet2DConditionConfig::from_file(&unet_config)?;
            let mut spec = AdapterSpec::default();
            spec.lora_rank = rank.unwrap_or(spec.lora_rank);
            let p = &mut spec.ppr;
            p.clip_embeddings_dim = clip_dim.unwrap_or(p.clip_embeddings_dim);
            p.resampler_dim_head = ppr_dim_head.unwrap_or(p.resampler_dim_head);
            p.resampler_depth = ppr_depth.unwrap_or(p.resampler_depth);
            let device = burn::prelude::Device::flex();
            let adapter = Adapter::fresh(&config, spec, seed, &device)
                .with_context(|| format!("building an adapter for {}", unet_config.display()))?;
            let meta = adapter.metadata([
                ("base_model".to_string(), unet_config.display().to_string()),
                ("step".to_string(), "0".to_string()),
            ]);
            // Streamed: each tensor is copied out of the model only as it is written.
            adapter.write(&out, AdapterFormat::Safetensors, ExportDType::F32, meta)?;
            let processors = adapter.unet.processors().len();
            println!(
                "{}: {processors} attention processors, LoRA rank {}",
                out.display(),
                adapter.spec.lora_rank
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
