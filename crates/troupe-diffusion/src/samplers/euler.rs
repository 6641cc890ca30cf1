//! `EulerDiscreteScheduler`: Euler steps of the probability-flow ODE in σ (Karras et al. 2022,
//! Algorithm 2 without churn), the SDXL base model's default scheduler.

use burn::prelude::*;

use super::common::{
    Fields, FinalSigma, Grid, KarrasRange, SigmaSchedule, Spacing, alphas_cumprod, check_steps,
    euler_denoised, euler_init_sigma, euler_scale, interp, sigma_of, sigma_to_t, spaced_timesteps,
    train_sigmas,
};
use super::{Sampler, SamplerError};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "EulerDiscreteScheduler";

/// The Euler sampler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Euler {
    schedule: SigmaSchedule,
    prediction: Prediction,
    init_sigma: f64,
}

/// The Euler family's σ grid: σ interpolated at the spaced timesteps, or a Karras ramp between
/// the first and last of them (whose timesteps are then fractional). `spacing` comes with
/// `steps_offset`.
pub(crate) fn euler_schedule(
    config: &SchedulerConfig,
    steps: usize,
    spacing: (Spacing, i64),
    karras: Option<KarrasRange>,
    final_sigma: FinalSigma,
) -> Result<SigmaSchedule, SamplerError> {
    let alphas = alphas_cumprod(config, true)?;
    let table = train_sigmas(&alphas);
    let (spacing, offset) = spacing;
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

impl Euler {
    /// Reads the class's fields (defaults: linspace spacing, linear interpolation, no Karras σ,
    /// final σ zero) and sets the timesteps for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        fields.choice("interpolation_type", "linear", &["linear"])?;
        fields.unsupported_if_true("use_exponential_sigmas")?;
        fields.unsupported_if_true("use_beta_sigmas")?;
        let timestep_type =
            fields.choice("timestep_type", "discrete", &["discrete", "continuous"])?;
        // Continuous timesteps (0.25·log σ) only take effect with v-prediction.
        if timestep_type == "continuous" && config.prediction_type == Prediction::VPrediction {
            let why = "not supported with v_prediction by troupe";
            return Err(fields.error("timestep_type", "\"continuous\"", why));
        }
        let spacing = Spacing::read(&fields, "linspace")?;
        let karras = match fields.bool("use_karras_sigmas", false)? {
            true => Some(KarrasRange::read(&fields)?),
            false => None,
        };
        let final_sigma = FinalSigma::read(&fields)?;
        let offset = fields.int("steps_offset", 0)?;
        let schedule = euler_schedule(config, steps, (spacing, offset), karras, final_sigma)?;
        Ok(Self {
            init_sigma: euler_init_sigma(&schedule.sigmas, spacing),
            schedule,
            prediction: config.prediction_type,
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

    fn scale_model_input(&self, sample: Tensor<4>, index: usize) -> Tensor<4> {
        euler_scale(sample, self.schedule.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        _noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let sigma = self.schedule.sigmas[index];
        let denoised = euler_denoised(self.prediction, model_output, sample.clone(), sigma);
        let derivative = sample.clone().sub(denoised).div_scalar(sigma);
        let dt = self.schedule.sigmas[index + 1] - sigma;
        sample.add(derivative.mul_scalar(dt))
    }
}
