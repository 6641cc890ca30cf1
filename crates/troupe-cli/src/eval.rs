//! `troupe eval`: scoring images as the Python stacks score them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use troupe_data::ops::geometry::WarpImpl;
use troupe_data::ops::resize::PassOrder;
use troupe_eval::clip_score::{ClipScorer, read_image, scores};
use troupe_faces::{Face, FaceAnalysis};

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
    /// Detect every face of an image (SCRFD) and embed it (ArcFace): one JSON line per face,
    /// largest first: `{"bbox", "score", "kps", "embedding"}` in image pixels.
    Faces {
        #[command(flatten)]
        models: FaceModels,
        /// The image.
        image: PathBuf,
    },
    /// Cosine similarity of the largest faces of two images (0, with a message on stderr,
    /// when a face is not found).
    FaceSim {
        #[command(flatten)]
        models: FaceModels,
        /// First image.
        image_a: PathBuf,
        /// Second image.
        image_b: PathBuf,
    },
}

/// The face models and their settings.
#[derive(clap::Args)]
pub struct FaceModels {
    /// SCRFD detector ONNX file (`det_10g.onnx`, `det_2.5g.onnx`, `det_500m.onnx`).
    #[arg(long)]
    detector: PathBuf,
    /// ArcFace recogniser ONNX file (`w600k_r50.onnx`, `glintr100.onnx`).
    #[arg(long)]
    recognizer: PathBuf,
    /// Detector input side (insightface's `det_size`).
    #[arg(long, default_value_t = 640)]
    det_size: usize,
    /// Detection score threshold.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Align with OpenCV 5's `warpAffine` arithmetic (default: OpenCV 4's).
    #[arg(long)]
    opencv_5: bool,
}

impl FaceModels {
    fn load(&self) -> Result<FaceAnalysis> {
        let warp = if self.opencv_5 {
            WarpImpl::OpenCv5
        } else {
            WarpImpl::OpenCv4
        };
        let mut fa = FaceAnalysis::load(&self.detector, &self.recognizer, self.det_size, warp)?;
        fa.detector.threshold = self.threshold;
        Ok(fa)
    }
}

/// The faces of `path`, largest box first (ties: the later one, as `sorted(...)[::-1]`).
fn faces_by_size(fa: &FaceAnalysis, path: &Path) -> Result<Vec<Face>> {
    let img = read_image(path)?;
    let mut faces = fa.get(&img)?;
    faces.reverse();
    faces.sort_by(|a, b| b.detection.area().total_cmp(&a.detection.area()));
    Ok(faces)
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
        EvalCommand::Faces { models, image } => {
            let fa = models.load()?;
            for f in faces_by_size(&fa, &image)? {
                let d = &f.detection;
                let line = serde_json::json!({
                    "bbox": d.bbox, "score": d.score, "kps": d.kps, "embedding": f.embedding,
                });
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        EvalCommand::FaceSim {
            models,
            image_a,
            image_b,
        } => {
            let fa = models.load()?;
            let mut embeddings = Vec::new();
            for path in [&image_a, &image_b] {
                match faces_by_size(&fa, path)?.into_iter().next() {
                    Some(f) => embeddings.push(f.normed_embedding()),
                    None => eprintln!("{}: no face found", path.display()),
                }
            }
            let sim = match embeddings.as_slice() {
                [a, b] => a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum::<f64>(),
                _ => 0.0,
            };
            println!("{sim}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
