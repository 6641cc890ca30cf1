//! `EulerDiscreteScheduler`: Euler steps of the probability-flow ODE in σ (Karras et al. 2022,
//! Algorithm 2 without churn), the SDXL base model's default scheduler. The σ grid and the
//! state are shared with Euler ancestral, which differs only in its step.

use burn::prelude::*;

use super::common::{
    Fields, FinalSigma, Grid, KarrasRange, SigmaSchedule, Spacing, alphas_cumprod, check_steps,
    euler_denoised, interp, sigma_of, sigma_to_t, spaced_timesteps, train_sigmas,
};
use super::euler_ancestral::ancestral_step;
use super::{Sampler, SamplerError};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "EulerDiscreteScheduler";

/// The Euler or Euler ancestral sampler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Euler {
    pub(crate) schedule: SigmaSchedule,
    pub(crate) prediction: Prediction,
    pub(crate) init_sigma: f64,
    /// Euler ancestral's step (with fresh noise) instead of Euler's.
    pub(crate) ancestral: bool,
}

/// The Euler family's σ grid for a spacing with its `steps_offset`: σ interpolated at the
/// spaced timesteps, or a Karras ramp between the first and last of them (whose timesteps are
/// then fractional).
pub(crate) fn euler_schedule(
    config: &SchedulerConfig,
    steps: usize,
    (spacing, offset): (Spacing, i64),
    karras: Option<KarrasRange>,
    final_sigma: FinalSigma,
) -> Result<SigmaSchedule, SamplerError> {
    let alphas = alphas_cumprod(config, true)?;
    let table = train_sigmas(&alphas);
    let mut timesteps = spaced_timesteps(spacing, Grid::Fractional, table.len(), steps, offset);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
    if let Some(range) = karras {
        let log: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let (lowest, highest) = (*sigmas.last().expect("steps > 0"), sigmas[0]);
        sigmas = range.sigmas(lowest, highest, steps);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log)).collect();
    }
    let last = match final_sigma {
        FinalSigma::Zero => 0.0,
        FinalSigma::SigmaMin => sigma_of(alphas[0]) as f64,
    };
    Ok(SigmaSchedule::new(&timesteps, &sigmas, last))
}

/// The Euler family's `init_noise_sigma`: max σ, or √(max σ² + 1) for leading spacing.
pub(crate) fn init_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Leading => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// Fields of the class that change behaviour and troupe does not implement.
fn unsupported(fields: &Fields, prediction: Prediction) -> Result<(), SamplerError> {
    fields.choice("interpolation_type", "linear", &["linear"])?;
    fields.unsupported_if_true(&["use_exponential_sigmas", "use_beta_sigmas"])?;
    let timestep_type = fields.choice("timestep_type", "discrete", &["discrete", "continuous"])?;
    // Continuous timesteps (0.25·log σ) only take effect with v-prediction.
    if timestep_type == "continuous" && prediction == Prediction::VPrediction {
        let why = "not supported with v_prediction by troupe";
        return Err(fields.error("timestep_type", "\"continuous\"", why));
    }
    Ok(())
}

impl Euler {
    /// Reads the class's fields (defaults: linspace spacing, linear interpolation, no Karras σ,
    /// final σ zero) and sets the timesteps for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        unsupported(&fields, config.prediction_type)?;
        let spacing = Spacing::read(&fields, "linspace")?;
        let offset = fields.int("steps_offset", 0)?;
        let (karras, final_sigma) = (KarrasRange::read(&fields)?, FinalSigma::read(&fields)?);
        let schedule = euler_schedule(config, steps, (spacing, offset), karras, final_sigma)?;
        Ok(Self {
            init_sigma: init_sigma(&schedule.sigmas, spacing),
            schedule,
            prediction: config.prediction_type,
            ancestral: false,
        })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    /// x / √(σ² + 1): the UNet sees the variance-preserving sample.
    fn scale_model_input(&self, sample: Tensor<4>, index: usize) -> Tensor<4> {
        let sigma = self.schedule.sigmas[index];
        sample.div_scalar((sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let (sigma, next) = (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]);
        let denoised = euler_denoised(self.prediction, model_output, sample.clone(), sigma);
        let derivative = sample.clone().sub(denoised).div_scalar(sigma);
        match self.ancestral {
            true => ancestral_step(sample, derivative, (sigma, next), noise),
            false => sample.add(derivative.mul_scalar(next - sigma)),
        }
    }
}
