//! Validation loss: the objective on a fixed set of held-out batches, at fixed timesteps and
//! fixed noise, without dropout — the same inputs every time, so the curve moves only when the
//! adapter does (`val/loss`).

use anyhow::{Result, bail};
use burn::prelude::*;
use troupe_data::loader::{Batch, Loader};
use troupe_data::rng::{KeyedRng, Purpose};
use troupe_data::shard::find_shards;
use troupe_diffusion::conditioning::Encoders;
use troupe_diffusion::pipeline::Pipeline;

use crate::config::TrainConfig;
use crate::objective::{StepNoise, forward};

/// The held-out batches and timesteps.
pub struct Validation {
    every_steps: u64,
    seed: u64,
    batches: Vec<Batch>,
    timesteps: Vec<usize>,
}

impl Validation {
    /// Decodes the held-out batches once; `None` when validation is off.
    pub fn prepare(config: &TrainConfig, encoders: &Encoders) -> Result<Option<Self>> {
        let v = &config.validation;
        if v.every_steps == 0 {
            return Ok(None);
        }
        let steps = encoders.schedule.steps();
        if let Some(t) = v.timesteps.iter().find(|&&t| t >= steps) {
            bail!("`validation.timesteps`: {t} is not below the schedule's {steps} timesteps");
        }
        let mut lcfg = crate::trainer::loader_config(config, encoders);
        lcfg.recipe.dropout = troupe_data::recipe::Dropout {
            image: 0.0,
            text: 0.0,
            both: 0.0,
        };
        let mut loader = Loader::new(&find_shards(&v.shards)?, lcfg)?;
        let batches = (0..v.batches)
            .map(|_| loader.next_batch())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            every_steps: v.every_steps,
            seed: config.train.seed,
            batches,
            timesteps: v.timesteps.clone(),
        }))
    }

    /// Whether validation is due after `step`.
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.every_steps)
    }

    /// Mean total loss over every batch × timestep, with the pipeline's ControlNet if any.
    pub fn loss(&self, config: &TrainConfig, pipeline: &Pipeline, device: &Device) -> Result<f64> {
        let (encoders, adapter) = (&pipeline.encoders, &pipeline.adapter);
        let control = pipeline
            .control
            .as_ref()
            .map(|c| (c, config.model.controlnet_scale));
        let mut sum = 0f64;
        let f = encoders.vae.downscale_factor();
        for (i, batch) in self.batches.iter().enumerate() {
            let latent = [
                encoders.vae.latent_channels(),
                batch.height as usize / f,
                batch.width as usize / f,
            ];
            for (j, &t) in self.timesteps.iter().enumerate() {
                let mut rng = KeyedRng::new(self.seed, Purpose::Validation, i as u64, j as u64);
                let ts = vec![t; batch.len()];
                let rnd = StepNoise::at_timesteps(&mut rng, &config.objective, ts, latent, false);
                let losses = forward(
                    encoders,
                    adapter,
                    control,
                    batch,
                    &rnd,
                    &config.objective,
                    device,
                )?;
                let l: f32 = losses.total.into_scalar();
                sum += l as f64;
            }
        }
        Ok(sum / (self.batches.len() * self.timesteps.len()) as f64)
    }
}
