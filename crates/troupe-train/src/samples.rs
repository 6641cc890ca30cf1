//! Samples during training: fixed prompts × reference sets × seeds rendered with the adapter
//! being trained (the generation pipeline itself), into `RUN_DIR/samples/step-N/` — one PNG per
//! image and `grid.png` (rows: prompt × reference set, columns: seeds) — and as a TensorBoard
//! image. Loss is not a reliable indicator; pictures are. With `[samples.scoring]` every image
//! is also scored as `troupe eval` scores (face similarity, CLIP-T, CLIP-I against the
//! reference set) and the means go to metrics.jsonl and TensorBoard as `eval/*`.

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;
use troupe_diffusion::conditioning::CharacterFeatures;
use troupe_diffusion::gallery::{contact_sheet, png, write_atomic};
use troupe_diffusion::pipeline::{Pipeline, Request, Settings, to_rgb8};
use troupe_diffusion::reference::Reference;
use troupe_diffusion::samplers::SamplerKind;

use troupe_eval::matching::Negative;
use troupe_eval::scorer::{Scorer, ScorerModels, SubjectFeatures, Target};

use crate::config::SamplesConfig;
use crate::records::Records;

/// The prepared sample grid: its settings and the references' CLIP features (frozen, so
/// computed once).
pub struct Samples {
    config: SamplesConfig,
    sampler: SamplerKind,
    size: usize,
    sets: Vec<CharacterFeatures>,
    scoring: Option<Scoring>,
}

/// The scorer and each reference set's subject features.
struct Scoring {
    scorer: Scorer,
    subjects: Vec<Vec<SubjectFeatures>>,
}

impl Scoring {
    /// Loads the scorer models (on `device`) and scores every reference now: a reference whose
    /// face the detector cannot find fails here, not at step N.
    fn prepare(
        config: &SamplesConfig,
        references: &[Vec<Reference>],
        device: &burn::prelude::Device,
    ) -> Result<Option<Self>> {
        let Some(spec) = &config.scoring else {
            return Ok(None);
        };
        let clip = spec
            .clip
            .as_deref()
            .context("`samples.scoring.clip`: a CLIP model folder is required to score samples")?;
        let faces = match (&spec.face_detector, &spec.face_recognizer) {
            (Some(d), Some(r)) => Some((d.as_path(), r.as_path())),
            (None, None) => None,
            _ => anyhow::bail!(
                "`samples.scoring`: give both `face_detector` and `face_recognizer`, or neither"
            ),
        };
        let models = ScorerModels {
            clip,
            faces,
            det_size: spec.det_size,
            threshold: spec.threshold,
            negative: Negative::Clamp,
        };
        let scorer = Scorer::load(&models, device).context("`samples.scoring`")?;
        let subjects = references
            .iter()
            .enumerate()
            .map(|(i, set)| {
                set.iter()
                    .map(|r| scorer.subject(&r.source, &r.image, Path::new(&r.source)))
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("`samples.references[{i}]`"))
            })
            .collect::<Result<_>>()?;
        Ok(Some(Self { scorer, subjects }))
    }

    /// Means over `images` (each with its `(reference set, prompt)`): face similarity and
    /// CLIP-I per (image, subject), no face counted as 0; CLIP-T per image.
    fn score(
        &self,
        what: &[(usize, &str)],
        images: &[RgbImage],
    ) -> Result<Vec<(&'static str, f64)>> {
        let targets: Vec<Target> = what
            .iter()
            .zip(images)
            .map(|((set, prompt), image)| Target {
                image,
                source: Path::new("sample"),
                prompt,
                subjects: self.subjects[*set].iter().collect(),
            })
            .collect();
        let scores = self.scorer.score(&targets)?;
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let pairs = |f: &dyn Fn(&troupe_eval::scorer::ImageScores) -> Vec<f64>| {
            mean(scores.iter().flat_map(f).collect())
        };
        let mut out = vec![
            (
                "eval/clip_t",
                mean(scores.iter().map(|s| s.clip_t).collect()),
            ),
            ("eval/clip_i", pairs(&|s| s.clip_i.clone())),
        ];
        if self.scorer.has_faces() {
            out.push(("eval/face_sim", pairs(&|s| s.face_sim.clone())));
            let found = |s: &troupe_eval::scorer::ImageScores| {
                s.face_matched
                    .iter()
                    .map(|&m| f64::from(u8::from(m)))
                    .collect()
            };
            out.push(("eval/face_detection_rate", pairs(&found)));
        }
        Ok(out)
    }
}

impl Samples {
    /// Reads and checks every reference now (a typo fails at start, not at step N); `None`
    /// when samples are off.
    pub fn prepare(
        config: &SamplesConfig,
        pipeline: &Pipeline,
        size: usize,
    ) -> Result<Option<Self>> {
        if config.every_steps == 0 {
            return Ok(None);
        }
        let cwd = Path::new(".");
        let (mut sets, mut references) = (Vec::new(), Vec::new());
        for (i, set) in config.references.iter().enumerate() {
            let refs = set
                .iter()
                .map(|r| Reference::parse(r, cwd))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("`samples.references[{i}]`"))?;
            sets.push(pipeline.characters(&refs)?);
            references.push(refs);
        }
        let scoring = Scoring::prepare(config, &references, &pipeline.device.clone().inner())?;
        let samples = Self {
            sampler: SamplerKind::parse(&config.scheduler)?,
            config: config.clone(),
            size,
            sets,
            scoring,
        };
        pipeline
            .check(&samples.settings("", 0))
            .context("`[samples]`")?;
        Ok(Some(samples))
    }

    /// Whether samples are due after `step`.
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.config.every_steps)
    }

    fn settings(&self, prompt: &str, seed: u64) -> Settings {
        let mut s = Settings::new(prompt, self.size, self.size);
        s.steps = self.config.steps;
        s.sampler = self.sampler;
        s.guidance = self.config.guidance;
        s.seed = seed;
        s
    }

    /// Renders the grid at `step` into `run_dir/samples/step-N/` and the event file.
    pub fn render(
        &self,
        pipeline: &Pipeline,
        run_dir: &Path,
        step: u64,
        records: &mut Records,
    ) -> Result<()> {
        let dir = run_dir.join("samples").join(format!("step-{step:08}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (mut images, mut scored) = (Vec::new(), Vec::new());
        for (p, prompt) in self.config.prompts.iter().enumerate() {
            for (r, set) in self.sets.iter().enumerate() {
                // All seeds of one prompt and reference set in one UNet batch.
                let settings: Vec<Settings> = self
                    .config
                    .seeds
                    .iter()
                    .map(|&seed| self.settings(prompt, seed))
                    .collect();
                let requests = settings
                    .iter()
                    .map(|s| Request {
                        pose: None,
                        settings: s,
                        characters: set,
                        latents: None,
                    })
                    .collect();
                let outputs = pipeline.generate_batch(requests, &mut |_, _| {})?;
                for (s, out) in settings.iter().zip(outputs) {
                    let img = to_rgb8(out).remove(0);
                    let file = dir.join(format!("p{p}-r{r}-s{}.png", s.seed));
                    write_atomic(&file, &png(&img))
                        .with_context(|| format!("writing {}", file.display()))?;
                    scored.push((r, prompt.as_str()));
                    images.push(img);
                }
            }
        }
        let grid = contact_sheet(&images, self.config.seeds.len());
        let bytes = png(&grid);
        write_atomic(&dir.join("grid.png"), &bytes)?;
        records.image(step, "samples", &bytes, grid.width(), grid.height())?;
        if let Some(scoring) = &self.scoring {
            let scores = scoring
                .score(&scored, &images)
                .context("scoring the samples")?;
            records.scalars(step, &scores)?;
        }
        Ok(())
    }
}
