//! `troupe eval`: scoring images as the Python stacks score them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use std::collections::BTreeMap;
use troupe_data::ops::geometry::WarpImpl;
use troupe_data::ops::resize::PassOrder;

use anyhow::bail;
use troupe_diffusion::control::ControlContext;
use troupe_diffusion::pipeline::Pipeline;
use troupe_eval::clip_score::{ClipScorer, read_image, scores};
use troupe_eval::protocol::Protocol;
use troupe_eval::report::RunData;
use troupe_eval::run::subject_references;
use troupe_eval::scorer::{Scorer, ScorerModels};
use troupe_faces::{Face, FaceAnalysis};
use troupe_models::adapter_file::AdapterFile;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Generate a protocol's images with an adapter and score them: `OUT/images/`,
    /// `scores.jsonl`, `summary.json`, `report.html`. A rerun into the same OUT continues.
    Run {
        #[command(flatten)]
        protocol: ProtocolArgs,
        /// Adapter: a `.safetensors` or `.bin` file, a checkpoint folder, or a run folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// SDXL diffusers folder [default: the protocol's `generation.model`].
        #[arg(long)]
        model: Option<PathBuf>,
        /// CLIP image encoder folder [default: the protocol's `generation.image_encoder`].
        #[arg(long)]
        image_encoder: Option<PathBuf>,
        /// Generation calls per UNet batch.
        #[arg(long, default_value_t = 2)]
        batch_size: usize,
        /// `cpu`, `cuda[:N]` or `vulkan[:N]` (generation and CLIP).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Score images made elsewhere, laid out as the protocol names them
    /// (`IMAGES/SUBJECT/pPPP-sSEED-iII.png`, or `.jpg`): `scores.jsonl`, `summary.json`,
    /// `report.html` in OUT.
    Score {
        #[command(flatten)]
        protocol: ProtocolArgs,
        /// The images folder.
        #[arg(long)]
        images: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// `cpu`, `cuda[:N]` or `vulkan[:N]` (CLIP).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// One report of several evaluated runs side by side (output folders of `run`/`score`).
    Report {
        /// Output folders, in column order.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The HTML file to write.
        #[arg(long)]
        out: PathBuf,
        /// Column labels, comma-separated [default: the folder names].
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
    },
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

/// A protocol and where its scorer models are.
#[derive(clap::Args)]
pub struct ProtocolArgs {
    /// Protocol TOML (`configs/eval/`).
    #[arg(long)]
    protocol: PathBuf,
    /// Subjects TOML (`[[subjects]]` name, class, reference), added to the protocol's.
    #[arg(long)]
    subjects: Option<PathBuf>,
    /// CLIP model folder [default: the protocol's `scorers.clip`].
    #[arg(long)]
    clip: Option<PathBuf>,
    /// SCRFD detector ONNX [default: the protocol's `scorers.face_detector`].
    #[arg(long)]
    face_detector: Option<PathBuf>,
    /// ArcFace recogniser ONNX [default: the protocol's `scorers.face_recognizer`].
    #[arg(long)]
    face_recognizer: Option<PathBuf>,
}

impl ProtocolArgs {
    /// The protocol with the command line's scorer paths over its own.
    fn load(&self) -> Result<Protocol> {
        let mut p = Protocol::load(&self.protocol, self.subjects.as_deref())?;
        let s = &mut p.scorers;
        s.clip = self.clip.clone().or(s.clip.take());
        s.face_detector = self.face_detector.clone().or(s.face_detector.take());
        s.face_recognizer = self.face_recognizer.clone().or(s.face_recognizer.take());
        Ok(p)
    }
}

/// The protocol's scorer, and its description for `summary.json`.
fn scorer(
    p: &Protocol,
    device: &burn::prelude::Device,
) -> Result<(Scorer, BTreeMap<String, String>)> {
    let s = &p.scorers;
    let clip = s.clip.as_deref().with_context(|| {
        format!(
            "{}: no CLIP model: set `scorers.clip` or pass --clip",
            p.path.display()
        )
    })?;
    let faces = match (&s.face_detector, &s.face_recognizer) {
        (Some(d), Some(r)) => Some((d.as_path(), r.as_path())),
        (None, None) => {
            eprintln!(
                "no face models (`scorers.face_detector`/`face_recognizer`): face similarity is not computed"
            );
            None
        }
        _ => bail!(
            "{}: give both face models or neither (`scorers.face_detector`, `scorers.face_recognizer`)",
            p.path.display()
        ),
    };
    let negative = p.negative().map_err(anyhow::Error::msg)?;
    let models = ScorerModels {
        clip,
        faces,
        det_size: s.det_size,
        threshold: s.threshold,
        negative,
    };
    let scorer = Scorer::load(&models, device)?;
    let mut described = BTreeMap::new();
    described.insert("clip".to_string(), clip.display().to_string());
    if let Some((d, r)) = faces {
        described.insert("face_detector".into(), d.display().to_string());
        described.insert("face_recognizer".into(), r.display().to_string());
        described.insert("det_size".into(), s.det_size.to_string());
        described.insert("det_threshold".into(), s.threshold.to_string());
    }
    Ok((scorer, described))
}

/// Optional face models (`--face-detector`, `--face-recognizer`, `--det-size`): identities and
/// keypoints from the largest face, for `data pack` and `photo=` references.
#[derive(clap::Args)]
pub struct OptionalFaceModels {
    /// SCRFD face detector ONNX file (insightface `det_10g.onnx`).
    #[arg(long, requires = "face_recognizer")]
    face_detector: Option<PathBuf>,
    /// ArcFace recogniser ONNX file (insightface `w600k_r50.onnx`), with `--face-detector`.
    #[arg(long, requires = "face_detector")]
    face_recognizer: Option<PathBuf>,
    /// Detector input side (the reference pipeline uses 640).
    #[arg(long, default_value_t = 640)]
    det_size: usize,
}

impl OptionalFaceModels {
    /// The models, aligning with `warp`'s `warpAffine` arithmetic; `None` when not given.
    pub fn load(&self, warp: WarpImpl) -> Result<Option<FaceAnalysis>> {
        let (Some(det), Some(rec)) = (&self.face_detector, &self.face_recognizer) else {
            return Ok(None);
        };
        Ok(Some(FaceAnalysis::load(det, rec, self.det_size, warp)?))
    }
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
        EvalCommand::Run {
            protocol,
            adapter,
            out,
            model,
            image_encoder,
            batch_size,
            device,
        } => run_protocol(
            &protocol,
            &adapter,
            &out,
            model,
            image_encoder,
            batch_size,
            &device,
        ),
        EvalCommand::Score {
            protocol,
            images,
            out,
            device,
        } => {
            let device = parse_device(&device)?;
            let p = protocol.load()?;
            let (scorer, described) = scorer(&p, &device)?;
            let faces = reference_faces(&p, WarpImpl::OpenCv5)?;
            let refs = subject_references(&p, faces.as_ref())?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let summary = troupe_eval::run::score(
                &p,
                &scorer,
                &refs,
                &images,
                &out,
                (described, BTreeMap::new()),
                &mut crate::progress("images scored"),
            )?;
            print_summary(&summary, &out);
            Ok(ExitCode::SUCCESS)
        }
        EvalCommand::Report { dirs, out, labels } => {
            if !labels.is_empty() && labels.len() != dirs.len() {
                bail!(
                    "--labels: {} labels for {} folders",
                    labels.len(),
                    dirs.len()
                );
            }
            let runs = dirs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let label = labels.get(i).cloned().unwrap_or_else(|| {
                        d.file_name().map_or(d.display().to_string(), |n| {
                            n.to_string_lossy().into_owned()
                        })
                    });
                    RunData::load(d, label).map_err(anyhow::Error::from)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let html = troupe_eval::report::render(&runs)?;
            troupe_diffusion::gallery::write_atomic(&out, html.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
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

fn parse_device(spec: &str) -> Result<burn::prelude::Device> {
    troupe_train::device::parse_device_for(spec, "--device").map_err(anyhow::Error::msg)
}

/// Face models for `photo=` subject references (aligning with `warp`), when the protocol has them.
fn reference_faces(p: &Protocol, warp: WarpImpl) -> Result<Option<FaceAnalysis>> {
    let s = &p.scorers;
    match (&s.face_detector, &s.face_recognizer) {
        (Some(d), Some(r)) => Ok(Some(FaceAnalysis::load(d, r, s.det_size, warp)?)),
        _ => Ok(None),
    }
}

/// `troupe eval run`: generate (what is not there yet), then score.
fn run_protocol(
    args: &ProtocolArgs,
    adapter: &Path,
    out: &Path,
    model: Option<PathBuf>,
    image_encoder: Option<PathBuf>,
    batch_size: usize,
    device: &str,
) -> Result<ExitCode> {
    let device = parse_device(device)?;
    let p = args.load()?;
    let at = || p.path.display().to_string();
    let model = model.or(p.generation.model.clone()).with_context(|| {
        format!(
            "{}: no base model: set `generation.model` or pass --model",
            at()
        )
    })?;
    let encoder = image_encoder
        .or(p.generation.image_encoder.clone())
        .with_context(|| {
            format!(
                "{}: no image encoder: set `generation.image_encoder` or pass --image-encoder",
                at()
            )
        })?;
    let adapter_path = crate::adapter::adapter_file(adapter)?;
    let file = AdapterFile::read(&adapter_path)?;
    let mut pipeline = Pipeline::load(&model, &encoder, &file, &device).with_context(|| {
        format!(
            "loading {} with {}",
            model.display(),
            adapter_path.display()
        )
    })?;
    if let Some(dir) = &p.generation.controlnet {
        let context = p
            .generation
            .controlnet_context
            .unwrap_or(ControlContext::Text);
        pipeline = pipeline
            .with_control(dir, context)
            .with_context(|| format!("{}: loading the ControlNet {}", at(), dir.display()))?;
    }
    let (scorer, described) = scorer(&p, &device)?;
    let faces = reference_faces(&p, pipeline.crop_ops.warp)?;
    let refs = subject_references(&p, faces.as_ref())?;
    // An output folder holds one adapter's images of one protocol: a rerun continues it.
    let sha = crate::sample::sha256_file(&adapter_path)?;
    let protocol_sha = crate::sample::sha256_file(&p.path)?;
    let stamp = serde_json::json!({"adapter": adapter_path.display().to_string(), "adapter_sha256": sha, "protocol": p.path.display().to_string(), "protocol_sha256": protocol_sha});
    let stamp_path = out.join("run.json");
    if let Ok(old) = std::fs::read_to_string(&stamp_path) {
        let old: serde_json::Value = serde_json::from_str(&old)
            .with_context(|| format!("reading {}", stamp_path.display()))?;
        if old["adapter_sha256"] != stamp["adapter_sha256"]
            || old["protocol_sha256"] != stamp["protocol_sha256"]
        {
            bail!(
                "{}: this folder holds images of another adapter or protocol ({}); use a new --out",
                stamp_path.display(),
                old["adapter"]
            );
        }
    }
    let images = out.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    troupe_diffusion::gallery::write_atomic(
        &stamp_path,
        serde_json::to_string_pretty(&stamp)?.as_bytes(),
    )?;
    let mut shown = crate::progress("images generated");
    troupe_eval::run::generate(&p, &pipeline, &refs, &images, batch_size, &mut shown)?;
    let first = &p.items()[0];
    let s = troupe_eval::run::settings(&p, first, pipeline.default_size)?;
    let generation: BTreeMap<String, String> = [
        ("adapter", adapter_path.display().to_string()),
        ("adapter_sha256", sha),
        ("model", model.display().to_string()),
        ("image_encoder", encoder.display().to_string()),
        ("steps", s.steps.to_string()),
        ("scheduler", s.sampler.name().to_string()),
        ("guidance", s.guidance.to_string()),
        ("ip_scale", s.ip_scale.to_string()),
        ("lora_scale", s.lora_scale.to_string()),
        ("size", format!("{}x{}", s.width, s.height)),
        (
            "negative_prompt",
            s.negative_prompt.clone().unwrap_or_default(),
        ),
        ("images_per_prompt", p.images_per_prompt.to_string()),
        ("seeds", format!("{:?}", p.seeds)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let summary = troupe_eval::run::score(
        &p,
        &scorer,
        &refs,
        &images,
        out,
        (described, generation),
        &mut crate::progress("images scored"),
    )?;
    print_summary(&summary, out);
    Ok(ExitCode::SUCCESS)
}

/// The overall numbers on stdout, and where the files are.
fn print_summary(s: &troupe_eval::summary::Summary, out: &Path) {
    let m = &s.overall;
    let f = |st: Option<&troupe_eval::summary::Stat>| {
        st.and_then(|x| x.mean)
            .map_or("-".into(), |v| format!("{v:.2}"))
    };
    println!(
        "{}: {} images | face_sim {} (detected {}) | CLIP-T {} | CLIP-I {}",
        s.protocol,
        m.images,
        f(m.face_sim.as_ref()),
        m.face_detection_rate
            .map_or("-".into(), |r| format!("{:.1}%", 100.0 * r)),
        f(Some(&m.clip_t)),
        f(Some(&m.clip_i)),
    );
    println!("{}", out.join("report.html").display());
}
