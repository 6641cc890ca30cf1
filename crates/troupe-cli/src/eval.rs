//! `troupe eval`: scoring images as the Python stacks score them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use troupe_data::ops::resize::PassOrder;
use troupe_eval::clip_score::{ClipScorer, read_image, scores};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Print 100 × the cosine (not clamped) of an image's CLIP features with a caption's
    /// (CLIP-T) or with another image's (CLIP-I), from a transformers `CLIPModel` folder.
    Clip {
        /// `CLIPModel` folder (config.json, model.safetensors, preprocessor_config.json,
        /// tokenizer files), e.g. openai/clip-vit-large-patch14.
        #[arg(long)]
        model: PathBuf,
        /// The image to score.
        #[arg(long)]
        image: PathBuf,
        /// Caption (CLIP-T).
        #[arg(
            long,
            conflicts_with = "ref_image",
            required_unless_present = "ref_image"
        )]
        text: Option<String>,
        /// Reference image (CLIP-I).
        #[arg(long)]
        ref_image: Option<PathBuf>,
        /// Resize as Pillow ≤ 12 does (default: Pillow 13's pass order, today's stacks).
        #[arg(long)]
        pillow_12: bool,
    },
}

pub fn run(cmd: EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Clip {
            model,
            image,
            text,
            ref_image,
            pillow_12,
        } => {
            let order = if pillow_12 {
                PassOrder::HorizontalFirst
            } else {
                PassOrder::Pillow13
            };
            let device = burn::prelude::Device::flex();
            let scorer = ClipScorer::load(&model, order, &device)
                .with_context(|| format!("loading {}", model.display()))?;
            let img = read_image(&image)?;
            let a = scorer.image_features(&[(&img, &image)])?;
            let b = match (&text, &ref_image) {
                (Some(t), _) => scorer.text_features(std::slice::from_ref(t))?,
                (None, Some(path)) => {
                    let r = read_image(path)?;
                    scorer.image_features(&[(&r, path)])?
                }
                (None, None) => unreachable!("clap requires --text or --ref-image"),
            };
            println!("{}", scores(a, b)[0][0]);
            Ok(ExitCode::SUCCESS)
        }
    }
}
