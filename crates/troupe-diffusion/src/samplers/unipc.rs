//! `UniPCMultistepScheduler` (Zhao et al. 2023): at each step a UniC corrector refines the
//! previous prediction with the new model output, then a UniP predictor steps on, both with
//! B(h) = e^h − 1 ("bh2") on the data prediction x̂₀ by default. The StoryMaker pipeline's
//! scheduler.

use burn::prelude::*;

use super::SamplerError;
use super::common::{
    Deterministic, Fields, SigmaSchedule, SolverGrid, alpha_sigma, alphas_cumprod, check_steps,
    lambda, no_thresholding, solve, solver_data_prediction, solver_noise_prediction,
};
use crate::schedule::{Prediction, SchedulerConfig};

const CLASS: &str = "UniPCMultistepScheduler";

/// The UniPC sampler after `set_timesteps`, with its history.
#[derive(Debug, Clone)]
pub struct UniPc {
    schedule: SigmaSchedule,
    prediction: Prediction,
    order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<i64>,
    /// Converted model outputs of the latest steps, oldest first (at most `order`).
    history: Vec<Tensor<4>>,
    /// The (corrected) sample the last predictor started from.
    last_sample: Option<Tensor<4>>,
    this_order: usize,
    lower_order_nums: usize,
}

/// Scalars of one UniP/UniC update from σ[s0] to σ[t] (f32, diffusers' order of operations).
struct Coefficients {
    /// σ_t/σ_s0 on x̂₀ (α_t/α_s0 on ε̂).
    ratio: f32,
    /// α_t on x̂₀ (σ_t on ε̂): multiplies h·φ₁ and B(h).
    scale: f32,
    h_phi_1: f32,
    b_h: f32,
    /// r_k = (λ_sk − λ_s0)/h of the earlier points, then 1.
    rks: Vec<f32>,
    b: Vec<f32>,
}

/// Reads the options diffusers maps or rejects; returns whether B(h) is "bh2".
fn solver_type(fields: &Fields) -> Result<bool, SamplerError> {
    // DPM-Solver's and DEIS's names map to bh2 in diffusers.
    let allowed = ["bh2", "bh1", "midpoint", "heun", "logrho"];
    Ok(fields.choice("solver_type", "bh2", &allowed)? != "bh1")
}

/// Fields that change behaviour and troupe does not implement.
fn unsupported(fields: &Fields) -> Result<(), SamplerError> {
    no_thresholding(fields)?;
    fields.unsupported_if_true(&[
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_flow_sigmas",
        "use_dynamic_shifting",
    ])?;
    fields.unsupported_if_set("solver_p")?;
    fields.unsupported_if_set("shift_terminal")
}

impl UniPc {
    /// Reads the class's fields (defaults: order 2, bh2, predict x̂₀, lower-order final, no
    /// disabled corrector, linspace spacing, final σ zero) and sets the timesteps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SamplerError> {
        check_steps(config, steps)?;
        let fields = Fields::new(config, CLASS);
        unsupported(&fields)?;
        let order = fields.int("solver_order", 2)?;
        if order < 1 {
            return Err(fields.error("solver_order", order, "expected at least 1"));
        }
        let alphas = alphas_cumprod(config, true)?;
        let grid = SolverGrid::read(&fields, alphas.len(), true)?;
        Ok(Self {
            schedule: grid.build(&alphas, steps),
            prediction: config.prediction_type,
            order: order as usize,
            bh2: solver_type(&fields)?,
            predict_x0: fields.bool("predict_x0", true)?,
            lower_order_final: fields.bool("lower_order_final", true)?,
            disable_corrector: fields.ints("disable_corrector")?,
            history: Vec::new(),
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// `multistep_uni_*_bh_update`'s scalars from σ[s0] to σ[t] with earlier points `earlier`.
    fn coefficients(&self, t: usize, s0: usize, earlier: &[usize]) -> Coefficients {
        let sigmas = &self.schedule.sigmas;
        let ((alpha_t, sigma_t), (alpha_s0, sigma_s0)) =
            (alpha_sigma(sigmas[t]), alpha_sigma(sigmas[s0]));
        let (lambda_s0, h) = (lambda(sigmas[s0]), lambda(sigmas[t]) - lambda(sigmas[s0]));
        let mut rks: Vec<f32> = earlier
            .iter()
            .map(|&si| (lambda(sigmas[si]) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { h_phi_1 } else { hh };
        let (mut h_phi_k, mut factorial, mut b) = (h_phi_1 / hh - 1.0, 1u64, Vec::new());
        for i in 1..=rks.len() as u64 {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        let (ratio, scale) = match self.predict_x0 {
            true => (sigma_t / sigma_s0, alpha_t),
            false => (alpha_t / alpha_s0, sigma_t),
        };
        Coefficients {
            ratio,
            scale,
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// The model output in the solver's variable (x̂₀, or ε̂ without `predict_x0`).
    fn convert(&self, model_output: Tensor<4>, sample: Tensor<4>, index: usize) -> Tensor<4> {
        let sigma = self.schedule.sigmas[index];
        match self.predict_x0 {
            true => solver_data_prediction(self.prediction, model_output, sample, sigma),
            false => solver_noise_prediction(self.prediction, model_output, sample, sigma),
        }
    }

    /// Σ_k ρ_k·(m_k − m0)/r_k over the earlier outputs (the `einsum` of diffusers).
    fn weighted_differences(
        &self,
        m0: &Tensor<4>,
        c: &Coefficients,
        rhos: &[f32],
    ) -> Option<Tensor<4>> {
        let n = self.history.len();
        let terms = c.rks[..c.rks.len() - 1].iter().zip(rhos).enumerate();
        terms
            .map(|(k, (&rk, &rho))| {
                let mi = self.history[n - 2 - k].clone();
                mi.sub(m0.clone()).div_scalar(rk).mul_scalar(rho)
            })
            .reduce(Tensor::add)
    }

    /// UniP: the prediction of the next sample from `sample` at σ[index].
    fn predict(&self, index: usize, sample: Tensor<4>, order: usize) -> Tensor<4> {
        let earlier: Vec<usize> = (1..order).map(|k| index - k).collect();
        let c = self.coefficients(index + 1, index, &earlier);
        let m0 = self
            .history
            .last()
            .expect("pushed before predicting")
            .clone();
        let base = sample
            .mul_scalar(c.ratio)
            .sub(m0.clone().mul_scalar(c.scale * c.h_phi_1));
        let rhos = match order {
            1 => return base,
            2 => vec![0.5],
            _ => {
                let r: Vec<Vec<f32>> = (0..order - 1)
                    .map(|p| power_row(&c.rks[..order - 1], p))
                    .collect();
                solve(r, c.b[..order - 1].to_vec())
            }
        };
        let res = self
            .weighted_differences(&m0, &c, &rhos)
            .expect("order > 1");
        base.sub(res.mul_scalar(c.scale * c.b_h))
    }

    /// UniC: corrects `last_sample`'s prediction with the new converted output `model_t`.
    fn correct(
        &self,
        index: usize,
        model_t: Tensor<4>,
        last_sample: Tensor<4>,
        order: usize,
    ) -> Tensor<4> {
        let earlier: Vec<usize> = (1..order).map(|k| index - (k + 1)).collect();
        let c = self.coefficients(index, index - 1, &earlier);
        let m0 = self.history.last().expect("a previous step").clone();
        let base = last_sample
            .mul_scalar(c.ratio)
            .sub(m0.clone().mul_scalar(c.scale * c.h_phi_1));
        let rhos = match order {
            1 => vec![0.5],
            _ => solve(
                (0..order).map(|p| power_row(&c.rks, p)).collect(),
                c.b.clone(),
            ),
        };
        let rho_t = *rhos.last().expect("non-empty");
        let own = model_t.sub(m0.clone()).mul_scalar(rho_t);
        let total = match self.weighted_differences(&m0, &c, &rhos[..order - 1]) {
            Some(res) => res.add(own),
            None => own,
        };
        base.sub(total.mul_scalar(c.scale * c.b_h))
    }
}

/// Row `p` of UniPC's matrix R: r_k^p.
fn power_row(rks: &[f32], p: usize) -> Vec<f32> {
    rks.iter().map(|r| r.powi(p as i32)).collect()
}

impl Deterministic for UniPc {
    fn schedule_timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn advance(&mut self, model_output: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let converted = self.convert(model_output, sample.clone(), index);
        let sample = match self.last_sample.take() {
            Some(last) if index > 0 && !self.disable_corrector.contains(&(index as i64 - 1)) => {
                self.correct(index, converted.clone(), last, self.this_order)
            }
            _ => sample,
        };
        self.history.push(converted);
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let remaining = self.schedule.timesteps.len() - index;
        let order = if self.lower_order_final {
            self.order.min(remaining)
        } else {
            self.order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(index, sample, self.this_order);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        prev
    }
}
