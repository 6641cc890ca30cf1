//! `troupe export` and `troupe adapter init`: adapter files in the reference layouts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use troupe_models::ppr::FaceIdPlusConfig;
use troupe_models::unet::UNet2DConditionConfig;
use troupe_train::export::{ExportDType, Format, read_adapter, write_adapter};
use troupe_train::model::{export_metadata, fresh_adapter};

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
        /// LoRA rank.
        #[arg(long, default_value_t = 128)]
        rank: usize,
        /// Width of the CLIP image encoder's hidden states (1280 for ViT-H/14).
        #[arg(long, default_value_t = 1280)]
        clip_dim: usize,
        /// Head width of the PPR resamplers.
        #[arg(long, default_value_t = 64)]
        ppr_dim_head: usize,
        /// Layers of each PPR resampler.
        #[arg(long, default_value_t = 4)]
        ppr_depth: usize,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output `.safetensors`.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The adapter file a run or checkpoint directory stands for.
fn adapter_file(source: &Path) -> Result<PathBuf> {
    if source.is_file() {
        return Ok(source.to_path_buf());
    }
    if source.join("adapter.safetensors").is_file() && source.join("COMPLETE").is_file() {
        troupe_train::checkpoint::verify(source)?;
        return Ok(source.join("adapter.safetensors"));
    }
    if source.is_dir() {
        for (_, dir) in troupe_train::checkpoint::list(source)?.into_iter().rev() {
            match troupe_train::checkpoint::verify(&dir) {
                Ok(()) => return Ok(dir.join("adapter.safetensors")),
                Err(e) => eprintln!("warning: skipping {e:#}"),
            }
        }
        bail!("{}: no complete checkpoint", source.display());
    }
    bail!("{}: no such file or directory", source.display())
}

pub fn export(args: ExportArgs) -> Result<ExitCode> {
    let file = adapter_file(&args.source)?;
    let tensors = read_adapter(&file)?;
    let format = match args.format {
        FormatArg::Safetensors => Format::Safetensors,
        FormatArg::StorymakerBin => Format::StorymakerBin,
    };
    let dtype = match args.dtype {
        DTypeArg::F32 => ExportDType::F32,
        DTypeArg::F16 => ExportDType::F16,
    };
    // Keep the source's metadata (base model, rank, step, …) when it has any.
    let mut metadata = std::collections::HashMap::new();
    if file.extension().is_some_and(|e| e == "safetensors") {
        let sd = troupe_models::weights::StateDict::from_file(&file)?;
        metadata.extend(sd.metadata().iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    metadata.insert("source".into(), file.display().to_string());
    write_adapter(&args.out, &tensors, format, dtype, metadata)?;
    println!("{}: {} tensors", args.out.display(), tensors.len());
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
            let cross = config
                .down_blocks(&unet_config.display().to_string())?
                .first()
                .map(|b| b.cross_attention_dim)
                .context("the UNet config has no blocks")?;
            let ppr = FaceIdPlusConfig::new()
                .with_cross_attention_dim(cross)
                .with_clip_embeddings_dim(clip_dim)
                .with_resampler_dim_head(ppr_dim_head)
                .with_resampler_depth(ppr_depth);
            let device = burn::prelude::Device::flex();
            let adapter = fresh_adapter(&config, rank, &ppr, seed, &device)?;
            let tensors = adapter.tensors();
            let meta = export_metadata(
                &adapter,
                &unet_config.display().to_string(),
                0,
                "",
                ppr_dim_head,
            );
            write_adapter(&out, &tensors, Format::Safetensors, ExportDType::F32, meta)?;
            let processors = adapter.unet.processors().len();
            println!(
                "{}: {} tensors, {processors} attention processors, LoRA rank {rank}",
                out.display(),
                tensors.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
