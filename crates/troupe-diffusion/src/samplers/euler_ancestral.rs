//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down plus fresh noise of scale
//! σ_up (Karras et al. 2022's ancestral sampling), so each step draws Gaussian noise. Its state
//! is [`Euler`]'s; only the step differs.
//!
//! The installed diffusers' class has no Karras option: `use_karras_sigmas` in the config is
//! ignored by it, and so here.

use burn::prelude::*;

use super::SamplerError;
use super::common::{Fields, FinalSigma, Spacing, check_steps};
use super::euler::{Euler, euler_schedule, init_sigma};
use crate::schedule::SchedulerConfig;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The Euler ancestral sampler: [`Euler`]'s state with the ancestral step.
pub type EulerAncestral = Euler;

/// Reads the class's fields (default spacing linspace, offset 0) and sets the timesteps.
pub fn new(config: &SchedulerConfig, steps: usize) -> Result<EulerAncestral, SamplerError> {
    check_steps(config, steps)?;
    let fields = Fields::new(config, CLASS);
    let spacing = Spacing::read(&fields, "linspace")?;
    let offset = fields.int("steps_offset", 0)?;
    let schedule = euler_schedule(config, steps, (spacing, offset), None, FinalSigma::Zero)?;
    Ok(Euler {
        init_sigma: init_sigma(&schedule.sigmas, spacing),
        schedule,
        prediction: config.prediction_type,
        ancestral: true,
    })
}

/// From σ_from to σ_to: an Euler step along `derivative` to σ_down, then noise × σ_up, where
/// σ_up² = σ_to²(σ_from² − σ_to²)/σ_from² and σ_down² = σ_to² − σ_up².
pub(crate) fn ancestral_step(
    sample: Tensor<4>,
    derivative: Tensor<4>,
    (from, to): (f32, f32),
    noise: &mut dyn FnMut() -> Tensor<4>,
) -> Tensor<4> {
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let stepped = sample.add(derivative.mul_scalar(down - from));
    stepped.add(noise().mul_scalar(up))
}
