//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down plus fresh noise of scale
//! σ_up (Karras et al. 2022's ancestral sampling), so each step draws Gaussian noise.
//!
//! The installed diffusers' class has no Karras option: `use_karras_sigmas` in the config is
//! ignored by it, and so here.

use burn::prelude::*;

use super::common::{
    Fields, FinalSigma, SigmaSchedule, Spacing, check_steps, euler_denoised, euler_init_sigma,
    euler_scale,
};
use super::euler::euler_schedule;
use super::{Sampler, SamplerError};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The Euler ancestral sampler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction: Prediction,
    init_sigma: f64,
}

impl EulerAncestral {
    /// Reads the class's fields (default spacing linspace) and sets the timesteps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        let spacing = Spacing::read(&fields, "linspace")?;
        let offset = fields.int("steps_offset", 0)?;
        let schedule = euler_schedule(config, steps, (spacing, offset), None, FinalSigma::Zero)?;
        Ok(Self {
            init_sigma: euler_init_sigma(&schedule.sigmas, spacing),
            schedule,
            prediction: config.prediction_type,
        })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: Tensor<4>, index: usize) -> Tensor<4> {
        euler_scale(sample, self.schedule.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let (from, to) = (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]);
        let denoised = euler_denoised(self.prediction, model_output, sample.clone(), from);
        // σ_up² + σ_down² = σ_to², with σ_up² = σ_to²(σ_from² − σ_to²)/σ_from².
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = sample.clone().sub(denoised).div_scalar(from);
        let stepped = sample.add(derivative.mul_scalar(down - from));
        stepped.add(noise().mul_scalar(up))
    }
}
