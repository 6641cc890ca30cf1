//! `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (Lu et al. 2022): a multistep solver in
//! λ = log(α/σ) on the data prediction x̂₀, second order from the second step on, first order
//! on the last step when the final σ is zero (diffusers' defaults).

use burn::prelude::*;

use super::SamplerError;
use super::common::{
    Deterministic, Fields, FinalSigma, SigmaSchedule, SolverGrid, alpha_sigma, alphas_cumprod,
    check_steps, lambda, no_thresholding, solver_data_prediction,
};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// The DPM-Solver++ multistep sampler after `set_timesteps`, with its history.
#[derive(Debug, Clone)]
pub struct DpmPp2M {
    schedule: SigmaSchedule,
    prediction: Prediction,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma: FinalSigma,
    /// x̂₀ of the previous step.
    previous: Option<Tensor<4>>,
    lower_order_nums: usize,
}

/// Reads the options diffusers maps or rejects: `algorithm_type` (DEIS maps to dpmsolver++)
/// and `solver_type` (UniPC's and DEIS's names map to midpoint); returns whether it is Heun.
fn solver_type(fields: &Fields) -> Result<bool, SamplerError> {
    fields.choice("algorithm_type", "dpmsolver++", &["dpmsolver++", "deis"])?;
    let allowed = ["midpoint", "heun", "logrho", "bh1", "bh2"];
    Ok(fields.choice("solver_type", "midpoint", &allowed)? == "heun")
}

/// The last timestep that `lambda_min_clipped` keeps (λ below it is never visited); λ is
/// computed as the class's `lambda_t` table.
fn last_timestep(alphas: &[f32], lambda_min: f64) -> usize {
    let lambda = |a: f32| a.sqrt().ln() - (1.0 - a).sqrt().ln();
    let below = alphas
        .iter()
        .filter(|&&a| (lambda(a) as f64) < lambda_min)
        .count();
    alphas.len() - below
}

/// `variance_type`: the class drops learned-variance channels, which troupe does not; other
/// values (a DDPM config's `fixed_small`) do nothing in this class.
fn no_learned_variance(fields: &Fields) -> Result<(), SamplerError> {
    match fields.str("variance_type", "")? {
        v @ ("learned" | "learned_range") => Err(fields.error(
            "variance_type",
            format!("\"{v}\""),
            "not supported by troupe",
        )),
        _ => Ok(()),
    }
}

impl DpmPp2M {
    /// Reads the class's fields (defaults: order 2, midpoint, lower-order final, linspace
    /// spacing, final σ zero) and sets the timesteps for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        no_thresholding(&fields)?;
        fields.unsupported_if_true(&[
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ])?;
        no_learned_variance(&fields)?;
        let heun = solver_type(&fields)?;
        let order = fields.int("solver_order", 2)?;
        if !(1..=2).contains(&order) {
            return Err(fields.error("solver_order", order, "troupe implements orders 1 and 2"));
        }
        let alphas = alphas_cumprod(config, true)?;
        let lambda_min = fields.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
        let grid = SolverGrid::read(&fields, last_timestep(&alphas, lambda_min), false)?;
        Ok(Self {
            schedule: grid.build(&alphas, steps),
            prediction: config.prediction_type,
            order: order as usize,
            heun,
            lower_order_final: fields.bool("lower_order_final", true)?,
            euler_at_final: fields.bool("euler_at_final", false)?,
            final_sigma: grid.final_sigma,
            previous: None,
            lower_order_nums: 0,
        })
    }

    /// Whether step `index` falls back to first order (the last step, under diffusers' rules).
    fn first_order_at(&self, index: usize) -> bool {
        let n = self.schedule.timesteps.len();
        let final_step = index == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigma == FinalSigma::Zero);
        self.order == 1 || self.lower_order_nums < 1 || final_step
    }

    /// DPM-Solver++ update from σ_s0 = σ[index] to σ_t = σ[index + 1] with x̂₀ `d0` and,
    /// for second order, the difference term `d1` (coefficients in f32 as diffusers).
    fn update(
        &self,
        index: usize,
        sample: Tensor<4>,
        d0: Tensor<4>,
        d1: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let sigmas = &self.schedule.sigmas;
        let ((alpha_t, sigma_t), (_, sigma_s0)) =
            (alpha_sigma(sigmas[index + 1]), alpha_sigma(sigmas[index]));
        let h = lambda(sigmas[index + 1]) - lambda(sigmas[index]);
        let exp_m1 = (-h).exp() - 1.0;
        let phi = alpha_t * exp_m1;
        let x = sample
            .mul_scalar(sigma_t / sigma_s0)
            .sub(d0.mul_scalar(phi));
        match d1 {
            None => x,
            Some(d1) if self.heun => x.add(d1.mul_scalar(alpha_t * (exp_m1 / h + 1.0))),
            Some(d1) => x.sub(d1.mul_scalar(0.5 * phi)),
        }
    }

    /// D1 = (m0 − m1)/r0 with r0 = h_0/h, from the two latest x̂₀.
    fn difference(&self, index: usize, m0: Tensor<4>, m1: Tensor<4>) -> Tensor<4> {
        let sigmas = &self.schedule.sigmas;
        let (t, s0, s1) = (
            lambda(sigmas[index + 1]),
            lambda(sigmas[index]),
            lambda(sigmas[index - 1]),
        );
        let r0 = (s0 - s1) / (t - s0);
        m0.sub(m1).mul_scalar(1.0 / r0)
    }
}

impl Deterministic for DpmPp2M {
    fn schedule_timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn advance(&mut self, model_output: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let sigma = self.schedule.sigmas[index];
        let m0 = solver_data_prediction(self.prediction, model_output, sample.clone(), sigma);
        let previous = self.previous.replace(m0.clone());
        let out = match previous {
            Some(m1) if !self.first_order_at(index) => {
                let d1 = self.difference(index, m0.clone(), m1);
                self.update(index, sample, m0, Some(d1))
            }
            _ => self.update(index, sample, m0, None),
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        out
    }
}
