//! Reverse-process samplers matching diffusers' schedulers step for step, driven by the base
//! model's `scheduler/scheduler_config.json` exactly as `Scheduler.from_config(config)` reads it
//! (each sampler takes the fields it knows, with its own class defaults for the missing ones).
//!
//! | name | diffusers class |
//! |---|---|
//! | `unipc` | `UniPCMultistepScheduler` (the StoryMaker pipeline's choice) |
//! | `ddim` | `DDIMScheduler` |
//! | `euler` | `EulerDiscreteScheduler` |
//! | `euler-a` | `EulerAncestralDiscreteScheduler` |
//! | `dpmpp-2m` | `DPMSolverMultistepScheduler` (`dpmsolver++`, order 2) |
//!
//! A sampler is built for a number of inference steps and then driven by the denoising loop:
//! `for (i, t) in timesteps: x = step(unet(scale_model_input(x, i), t), i, x)`.

use burn::prelude::*;

use crate::schedule::SchedulerConfig;

mod common;
pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod unipc;

/// A sampler setting that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SamplerError(pub String);

/// The samplers troupe implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// UniPC multistep (bh2, order 2 by default).
    UniPc,
    /// DDIM (η = 0).
    Ddim,
    /// Euler.
    Euler,
    /// Euler ancestral (stochastic).
    EulerAncestral,
    /// DPM-Solver++ 2M.
    DpmPp2M,
}

impl SamplerKind {
    /// Every sampler, in the order the command line lists them.
    pub const ALL: [Self; 5] = [
        Self::UniPc,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2M,
    ];

    /// The command-line name (`unipc`, `ddim`, `euler`, `euler-a`, `dpmpp-2m`).
    pub fn name(self) -> &'static str {
        match self {
            Self::UniPc => "unipc",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2M => "dpmpp-2m",
        }
    }

    /// The diffusers scheduler class it reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2M => "DPMSolverMultistepScheduler",
        }
    }

    /// Parses a command-line name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self, SamplerError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                SamplerError(format!(
                    "unknown scheduler `{name}` (expected one of: {})",
                    names.join(", ")
                ))
            })
    }
}

/// The state of one denoising run (diffusers' scheduler after `set_timesteps`).
pub trait Sampler {
    /// Timesteps given to the UNet, in order (diffusers' `scheduler.timesteps`; fractional for
    /// the Euler family with Karras sigmas).
    fn timesteps(&self) -> &[f32];

    /// Multiplier of the initial Gaussian noise (diffusers' `init_noise_sigma`; 1 unless the
    /// sampler works in σ rather than in variance-preserving space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// diffusers' `scale_model_input` at step `index` (identity for most samplers).
    fn scale_model_input(&self, sample: Tensor<4>, index: usize) -> Tensor<4> {
        let _ = index;
        sample
    }

    /// diffusers' `step` at step `index`: the model output at the current sample → the
    /// sample of the next step. `noise` is called for fresh standard Gaussian noise of the
    /// sample's shape when the sampler is stochastic (never otherwise).
    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4>;
}

/// Builds `kind` for `steps` inference steps from the base model's scheduler config. Fields
/// that would change the class's behaviour but are not implemented (e.g. `thresholding`,
/// exponential or beta σ) are errors naming the field and value.
pub fn build(
    kind: SamplerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Sampler>, SamplerError> {
    Ok(match kind {
        SamplerKind::UniPc => Box::new(unipc::UniPc::new(config, steps)?),
        SamplerKind::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(config, steps)?),
        SamplerKind::EulerAncestral => Box::new(euler_ancestral::new(config, steps)?),
        SamplerKind::DpmPp2M => Box::new(dpmpp_2m::DpmPp2M::new(config, steps)?),
    })
}
