//! Samples during training: fixed prompts × reference sets × seeds rendered with the adapter
//! being trained (the generation pipeline itself), into `RUN_DIR/samples/step-N/` — one PNG per
//! image and `grid.png` (rows: prompt × reference set, columns: seeds) — and as a TensorBoard
//! image. Loss is not a reliable indicator; pictures are.

use std::path::Path;

use anyhow::{Context, Result};
use troupe_diffusion::conditioning::CharacterFeatures;
use troupe_diffusion::gallery::{contact_sheet, png, write_atomic};
use troupe_diffusion::pipeline::{Pipeline, Request, Settings, to_rgb8};
use troupe_diffusion::reference::Reference;
use troupe_diffusion::samplers::SamplerKind;

use crate::config::SamplesConfig;
use crate::records::Records;

/// The prepared sample grid: its settings and the references' CLIP features (frozen, so
/// computed once).
pub struct Samples {
    config: SamplesConfig,
    sampler: SamplerKind,
    size: usize,
    sets: Vec<CharacterFeatures>,
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
        let mut sets = Vec::new();
        for (i, set) in config.references.iter().enumerate() {
            let refs = set
                .iter()
                .map(|r| Reference::parse(r, cwd))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("`samples.references[{i}]`"))?;
            sets.push(pipeline.characters(&refs)?);
        }
        let samples = Self {
            sampler: SamplerKind::parse(&config.scheduler)?,
            config: config.clone(),
            size,
            sets,
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
        let mut images = Vec::new();
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
                    images.push(img);
                }
            }
        }
        let grid = contact_sheet(&images, self.config.seeds.len());
        let bytes = png(&grid);
        write_atomic(&dir.join("grid.png"), &bytes)?;
        records.image(step, "samples", &bytes, grid.width(), grid.height())
    }
}
