//! `DDIMScheduler` with η = 0 (deterministic DDIM, Song et al. 2021): x̂₀ and ε̂ from the model
//! output, x̂₀ optionally clipped, then x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂.

use burn::prelude::*;

use super::SamplerError;
use super::common::{
    Deterministic, Fields, Grid, Spacing, alphas_cumprod, check_steps, no_thresholding,
    spaced_timesteps,
};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "DDIMScheduler";

/// The DDIM sampler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f32>,
    /// (ᾱ_t, ᾱ_prev) of each step.
    alphas: Vec<(f32, f32)>,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
}

impl Ddim {
    /// Reads the class's fields (defaults: `clip_sample` true, range 1, `set_alpha_to_one`
    /// true, leading spacing, offset 0) and sets the timesteps for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        no_thresholding(&fields)?;
        let clip = match fields.bool("clip_sample", true)? {
            true => Some(fields.f64("clip_sample_range", 1.0)? as f32),
            false => None,
        };
        let alphas = alphas_cumprod(config, false)?;
        let final_alpha = match fields.bool("set_alpha_to_one", true)? {
            true => 1.0,
            false => alphas[0],
        };
        let spacing = Spacing::read(&fields, "leading")?;
        let offset = fields.int("steps_offset", 0)?;
        let timesteps = spaced_timesteps(spacing, Grid::Rounded, alphas.len(), steps, offset);
        if timesteps[0] >= alphas.len() as f64 {
            let why = format!("timestep {} is past num_train_timesteps", timesteps[0]);
            return Err(fields.error("steps_offset", offset, &why));
        }
        // The previous timestep is always t − T/n, whatever the spacing (as diffusers).
        let stride = (alphas.len() / steps) as i64;
        let pairs = timesteps.iter().map(|&t| {
            let (t, prev) = (t as i64, t as i64 - stride);
            (
                alphas[t as usize],
                if prev >= 0 {
                    alphas[prev as usize]
                } else {
                    final_alpha
                },
            )
        });
        Ok(Self {
            alphas: pairs.collect(),
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            prediction: config.prediction_type,
            clip,
        })
    }
}

impl Deterministic for Ddim {
    fn schedule_timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn advance(&mut self, model_output: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let (alpha, alpha_prev) = self.alphas[index];
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (denoised, epsilon) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = sample.sub(model_output.clone().mul_scalar(b)).div_scalar(a);
                (x0, model_output)
            }
            Prediction::VPrediction => {
                let x0 = sample
                    .clone()
                    .mul_scalar(a)
                    .sub(model_output.clone().mul_scalar(b));
                (x0, model_output.mul_scalar(a).add(sample.mul_scalar(b)))
            }
        };
        let denoised = match self.clip {
            Some(range) => denoised.clamp(-range, range),
            None => denoised,
        };
        let direction = epsilon.mul_scalar((1.0 - alpha_prev).sqrt());
        denoised.mul_scalar(alpha_prev.sqrt()).add(direction)
    }
}
