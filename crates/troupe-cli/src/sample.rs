//! `troupe sample`: images from a trained adapter (or the released `mask.bin`) with the
//! StoryMaker pipeline; one job from the flags, or many from `--jobs JOBS.jsonl`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use troupe_diffusion::control::ControlContext;
use troupe_diffusion::gallery::{contact_sheet, png, write_atomic};
use troupe_diffusion::pipeline::{Pipeline, Request, Settings, to_rgb8};
use troupe_diffusion::reference::Reference;
use troupe_diffusion::samplers::SamplerKind;
use troupe_faces::FaceAnalysis;
use troupe_models::adapter_file::AdapterFile;

#[derive(clap::Args)]
pub struct SampleArgs {
    /// SDXL diffusers folder (`unet/`, `vae/`, text encoders, tokenizers, `scheduler/`).
    #[arg(long)]
    model: PathBuf,
    /// CLIP image encoder folder (`CLIPVisionModelWithProjection`).
    #[arg(long)]
    image_encoder: PathBuf,
    /// Adapter: a `.safetensors` or `.bin` file, a checkpoint folder, or a run folder (its
    /// newest complete checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (created): one PNG and one JSON sidecar per image, and `grid.png`.
    #[arg(long)]
    out: PathBuf,
    /// Jobs, one JSON object per line: `prompt`, `references` (list), and optionally any of
    /// `negative_prompt`, `seed`, `steps`, `scheduler`, `guidance`, `ip_scale`, `lora_scale`,
    /// `width`, `height`, `num_images`, `name`, `pose`, `controlnet_scale` (the flags give the
    /// defaults).
    #[arg(long, conflicts_with_all = ["prompt", "reference"])]
    jobs: Option<PathBuf>,
    /// The prompt.
    #[arg(long, required_unless_present = "jobs")]
    prompt: Option<String>,
    /// A character, in slot order (repeat for 2–3): `SHARD.parquet#ROW_ID[:CHARACTER]`,
    /// `image=IMG,mask=MASK,embedding=EMB.npy,keypoints=KPS.json` (mask white = person,
    /// keypoints `[[x, y]] × 5` in image pixels), or `photo=IMG,mask=MASK` (identity and
    /// keypoints from the largest face, found with `--face-detector`/`--face-recognizer`).
    #[arg(long, required_unless_present = "jobs")]
    reference: Vec<String>,
    /// Negative prompt (none: zero negative embeddings, as diffusers' SDXL pipeline).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Sampler: unipc, ddim, euler, euler-a, dpmpp-2m.
    #[arg(long, default_value = "unipc")]
    scheduler: String,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Image-attention scale of the adapter.
    #[arg(long, default_value_t = 0.8)]
    ip_scale: f64,
    /// LoRA scale of the adapter.
    #[arg(long, default_value_t = 0.8)]
    lora_scale: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width in pixels [default: the base model's size].
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels [default: the base model's size].
    #[arg(long)]
    height: Option<usize>,
    /// Images per job.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Initial latents: a safetensors file with one tensor `latents` of shape
    /// (num_images, C, H/8, W/8), as diffusers' `latents=` (before `init_noise_sigma`).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// A pose ControlNet (diffusers `controlnet/` folder, e.g. an SDXL OpenPose ControlNet).
    #[arg(long)]
    controlnet: Option<PathBuf>,
    /// A pose image for every job (needs --controlnet); resized to the output size as
    /// diffusers does (Lanczos) when it has the same shape.
    #[arg(long, requires = "controlnet")]
    pose: Option<PathBuf>,
    /// Multiplies the ControlNet's residuals (`controlnet_conditioning_scale`).
    #[arg(long, default_value_t = 1.0)]
    controlnet_scale: f64,
    /// What the ControlNet attends to: `text` (diffusers' SDXL ControlNet pipeline) or
    /// `image-tokens` (as StoryMaker's training feeds it).
    #[arg(long, default_value = "text", value_parser = parse_context)]
    controlnet_context: ControlContext,
    /// Face models for `photo=` references.
    #[command(flatten)]
    faces: crate::eval::OptionalFaceModels,
    /// Images per UNet batch: consecutive jobs with the same steps, sampler, guidance, scales
    /// and size are generated together up to this many images (a job is never split).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// `cpu`, `cuda[:N]` or `vulkan[:N]`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One line of `--jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    prompt: String,
    references: Vec<String>,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    scheduler: Option<String>,
    guidance: Option<f64>,
    ip_scale: Option<f64>,
    lora_scale: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    num_images: Option<usize>,
    name: Option<String>,
    pose: Option<PathBuf>,
    controlnet_scale: Option<f64>,
}

/// A job ready to run: settings, references, file stem, pose (file and pixels).
struct Job {
    settings: Settings,
    references: Vec<Reference>,
    name: String,
    pose: Option<(PathBuf, Vec<f32>)>,
}

fn parse_context(s: &str) -> Result<ControlContext, String> {
    ControlContext::parse(s).ok_or_else(|| format!("`{s}`: expected text or image-tokens"))
}

/// Reads a job's pose at its output size.
fn pose(path: Option<PathBuf>, s: &Settings) -> Result<Option<(PathBuf, Vec<f32>)>> {
    let Some(path) = path else { return Ok(None) };
    let pixels = troupe_diffusion::control::read_pose(&path, s.width, s.height)?;
    Ok(Some((path, pixels)))
}

fn settings_from_flags(args: &SampleArgs, prompt: &str, size: usize) -> Result<Settings> {
    Ok(Settings {
        prompt: prompt.to_string(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        sampler: SamplerKind::parse(&args.scheduler)?,
        guidance: args.guidance,
        ip_scale: args.ip_scale,
        lora_scale: args.lora_scale,
        width: args.width.unwrap_or(size),
        height: args.height.unwrap_or(size),
        num_images: args.num_images,
        seed: args.seed,
        controlnet_scale: args.controlnet_scale,
    })
}

/// A command-line reference (`photo=` ones through face analysis).
fn reference(arg: &str, base: &Path, faces: Option<&FaceAnalysis>) -> Result<Reference> {
    Ok(troupe_eval::references::resolve(arg, base, faces)?)
}

/// Reads and checks every job (references decoded and validated) before any denoising.
fn jobs(args: &SampleArgs, pipeline: &Pipeline) -> Result<Vec<Job>> {
    // Aligned with the pipeline's `warpAffine` arithmetic.
    let faces = args.faces.load(pipeline.crop_ops.warp)?;
    let size = pipeline.default_size;
    let cwd = Path::new(".");
    let Some(path) = &args.jobs else {
        let settings = settings_from_flags(args, args.prompt.as_deref().unwrap_or(""), size)?;
        let references = args
            .reference
            .iter()
            .map(|r| reference(r, cwd, faces.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let pose = pose(args.pose.clone(), &settings)?;
        return Ok(vec![Job {
            settings,
            references,
            name: "image".into(),
            pose,
        }]);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(cwd);
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{} line {}", path.display(), i + 1);
        let j: JobLine = serde_json::from_str(line).with_context(at)?;
        let mut s = settings_from_flags(args, &j.prompt, size)?;
        s.negative_prompt = j.negative_prompt.or(s.negative_prompt);
        s.seed = j.seed.unwrap_or(s.seed);
        s.steps = j.steps.unwrap_or(s.steps);
        if let Some(name) = &j.scheduler {
            s.sampler = SamplerKind::parse(name).with_context(at)?;
        }
        s.guidance = j.guidance.unwrap_or(s.guidance);
        s.ip_scale = j.ip_scale.unwrap_or(s.ip_scale);
        s.lora_scale = j.lora_scale.unwrap_or(s.lora_scale);
        s.width = j.width.unwrap_or(s.width);
        s.height = j.height.unwrap_or(s.height);
        s.num_images = j.num_images.unwrap_or(s.num_images);
        s.controlnet_scale = j.controlnet_scale.unwrap_or(s.controlnet_scale);
        let pose_file = j.pose.map(|p| base.join(p)).or(args.pose.clone());
        if pose_file.is_some() && args.controlnet.is_none() {
            bail!("{}: `pose` needs --controlnet", at());
        }
        let pose = pose(pose_file, &s).with_context(at)?;
        let references = j
            .references
            .iter()
            .map(|r| reference(r, base, faces.as_ref()))
            .collect::<Result<Vec<_>>>()
            .with_context(at)?;
        let name = j.name.unwrap_or_else(|| format!("job-{:04}", out.len()));
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            bail!("{}: `name` = {name:?} is not a plain file name", at());
        }
        out.push(Job {
            settings: s,
            references,
            name,
            pose,
        });
    }
    if out.is_empty() {
        bail!("{}: no jobs", path.display());
    }
    Ok(out)
}

fn read_latents(path: &Path, device: &burn::prelude::Device) -> Result<burn::prelude::Tensor<4>> {
    let mut sd = troupe_models::weights::StateDict::from_file(path)?;
    match sd.shape("latents") {
        Some(s) if s.len() == 4 => Ok(sd.take_any::<4>("latents", device)?),
        Some(s) => bail!(
            "{}: `latents` has shape {s:?}, expected 4 dimensions",
            path.display()
        ),
        None => bail!("{}: no tensor named `latents`", path.display()),
    }
}

pub fn run(args: SampleArgs) -> Result<ExitCode> {
    let device = troupe_train::device::parse_device_for(&args.device, "--device")
        .map_err(anyhow::Error::msg)?;
    let adapter_path = crate::adapter::adapter_file(&args.adapter)?;
    let adapter = AdapterFile::read(&adapter_path)?;
    let adapter_sha = sha256_file(&adapter_path)?;
    let mut pipeline = Pipeline::load(&args.model, &args.image_encoder, &adapter, &device)
        .with_context(|| {
            format!(
                "loading {} with {}",
                args.model.display(),
                adapter_path.display()
            )
        })?;
    if let Some(dir) = &args.controlnet {
        pipeline = pipeline
            .with_control(dir, args.controlnet_context)
            .with_context(|| format!("loading the ControlNet {}", dir.display()))?;
    }
    // Everything is checked before the first denoising step.
    let jobs = jobs(&args, &pipeline)?;
    let mut prepared = Vec::new();
    for job in &jobs {
        pipeline.check(&job.settings)?;
        prepared.push(pipeline.characters(&job.references)?);
    }
    let latents = match &args.latents {
        Some(p) => Some(read_latents(p, &device)?),
        None => None,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let groups = batches(&jobs, args.batch_size);
    let total_steps: u64 = groups
        .iter()
        .map(|r| jobs[r.start].settings.steps as u64)
        .sum();
    let mut progress = troupe_train::progress::Progress::new(total_steps, "steps");
    let started = Instant::now();
    let (mut done, mut all, mut columns) = (0usize, Vec::new(), 1usize);
    let mut steps_done = 0u64;
    for range in groups {
        let group = &jobs[range.clone()];
        let (steps, images) = (
            group[0].settings.steps,
            group.iter().map(|j| j.settings.num_images).sum::<usize>(),
        );
        let label = match group {
            [one] => one.name.clone(),
            [a, .., b] => format!("{} … {}", a.name, b.name),
            [] => unreachable!("batches are never empty"),
        };
        let mut on_step = |i: usize, _: &burn::prelude::Tensor<4>| {
            let secs = started.elapsed().as_secs_f64();
            let frac = done as f64 + (i + 1) as f64 / steps as f64 * images as f64;
            let rate = frac / secs.max(1e-9);
            progress.set(
                steps_done + i as u64 + 1,
                &format!("{label} | {rate:.3} images/s"),
            );
        };
        let requests = range
            .clone()
            .map(|k| Request {
                settings: &jobs[k].settings,
                characters: &prepared[k],
                latents: latents.clone(),
                pose: jobs[k].pose.as_ref().map(|(_, p)| p.as_slice()),
            })
            .collect();
        let outputs = pipeline.generate_batch(requests, &mut on_step)?;
        steps_done += steps as u64;
        for (job, images) in group.iter().zip(outputs) {
            for (i, img) in to_rgb8(images).into_iter().enumerate() {
                let stem = format!("{}-{i:02}", job.name);
                let file = args.out.join(format!("{stem}.png"));
                write_atomic(&file, &png(&img))
                    .with_context(|| format!("writing {}", file.display()))?;
                let sidecar = sidecar(job, i, &args, &adapter_path, &adapter_sha);
                let path = args.out.join(format!("{stem}.json"));
                write_atomic(&path, serde_json::to_string_pretty(&sidecar)?.as_bytes())?;
                println!("{}", file.display());
                all.push(img);
            }
            columns = columns.max(job.settings.num_images);
        }
        done += images;
    }
    let grid = args.out.join("grid.png");
    write_atomic(&grid, &png(&contact_sheet(&all, columns)))?;
    eprintln!(
        "{} images in {:.1}s; grid: {}",
        all.len(),
        started.elapsed().as_secs_f64(),
        grid.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Consecutive jobs that can share a UNet batch (same [`Settings::batch_key`]), up to
/// `max_images` images per batch (a job is never split).
fn batches(jobs: &[Job], max_images: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut images = 0;
    for (k, job) in jobs.iter().enumerate() {
        let n = job.settings.num_images;
        match out.last_mut() {
            Some(r)
                if jobs[r.start].settings.batch_key() == job.settings.batch_key()
                    && images + n <= max_images =>
            {
                r.end = k + 1;
                images += n;
            }
            _ => {
                out.push(k..k + 1);
                images = n;
            }
        }
    }
    out
}

fn sidecar(
    job: &Job,
    index: usize,
    args: &SampleArgs,
    adapter: &Path,
    sha: &str,
) -> serde_json::Value {
    let s = &job.settings;
    serde_json::json!({
        "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed,
        "image_index": index, "num_images": s.num_images, "steps": s.steps,
        "scheduler": s.sampler.name(), "guidance": s.guidance, "ip_scale": s.ip_scale,
        "lora_scale": s.lora_scale, "width": s.width, "height": s.height,
        "references": job.references.iter().map(|r| r.source.clone()).collect::<Vec<_>>(),
        "adapter": adapter.display().to_string(), "adapter_sha256": sha,
        "base_model": args.model.display().to_string(),
        "image_encoder": args.image_encoder.display().to_string(),
        "latents": args.latents.as_ref().map(|p| p.display().to_string()),
        "pose": job.pose.as_ref().map(|(p, _)| p.display().to_string()),
        "controlnet": job.pose.as_ref().and(args.controlnet.as_ref()).map(|p| p.display().to_string()),
        "controlnet_scale": job.pose.as_ref().map(|_| s.controlnet_scale),
        "controlnet_context": job.pose.as_ref().map(|_| args.controlnet_context.name()),
        "device": args.device, "producer": format!("troupe {}", env!("CARGO_PKG_VERSION")),
    })
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}
