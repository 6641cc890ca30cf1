//! What the samplers share: reading their fields of `scheduler_config.json` with class
//! defaults, diffusers' timestep spacings and σ grids (reproducing NumPy's float64 rules, since
//! they decide which integer timestep and which σ each step gets), and the σ-space algebra of
//! the Euler family and of the multistep solvers (DPM-Solver++, UniPC).
//!
//! Scalars are computed on the host in the precision diffusers uses for them: f64 where it
//! works in NumPy, f32 where it works on 0-d float32 torch tensors. The latents only see
//! `mul_scalar`/`div_scalar`/`add`/`sub` in diffusers' operation order, so results agree with
//! PyTorch's to a few f32 ulps: not to the bit, because PyTorch's CPU sqrt/exp/log (MKL VML)
//! are not correctly rounded, so a σ or λ may differ in its last bit.

use burn::prelude::*;
use serde_json::{Map, Value};

use super::{Sampler, SamplerError};
use crate::schedule::{NoiseSchedule, Prediction, SchedulerConfig};

/// One diffusers class's view of the config: `from_config` passes it the fields it declares
/// and leaves the rest at the class defaults, which the callers here supply.
pub(crate) struct Fields<'a> {
    raw: &'a Map<String, Value>,
    class: &'static str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(config: &'a SchedulerConfig, class: &'static str) -> Self {
        Self {
            raw: &config.raw,
            class,
        }
    }

    /// A present, non-null value (`null` means "class default" in diffusers' files).
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.raw.get(name).filter(|v| !v.is_null())
    }

    /// An error naming the class, the field and its value.
    pub(crate) fn error(
        &self,
        name: &str,
        value: impl std::fmt::Display,
        why: &str,
    ) -> SamplerError {
        SamplerError(format!("{}: field `{name}` = {value}: {why}", self.class))
    }

    fn typed<T>(
        &self,
        name: &str,
        default: T,
        read: impl Fn(&'a Value) -> Option<T>,
        kind: &str,
    ) -> Result<T, SamplerError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => read(v).ok_or_else(|| self.error(name, v, &format!("expected {kind}"))),
        }
    }

    pub(crate) fn bool(&self, name: &str, default: bool) -> Result<bool, SamplerError> {
        self.typed(name, default, Value::as_bool, "true or false")
    }

    pub(crate) fn f64(&self, name: &str, default: f64) -> Result<f64, SamplerError> {
        self.typed(name, default, Value::as_f64, "a number")
    }

    pub(crate) fn opt_f64(&self, name: &str) -> Result<Option<f64>, SamplerError> {
        self.typed(name, None, |v| v.as_f64().map(Some), "a number")
    }

    pub(crate) fn int(&self, name: &str, default: i64) -> Result<i64, SamplerError> {
        self.typed(name, default, Value::as_i64, "an integer")
    }

    pub(crate) fn str(&self, name: &str, default: &'a str) -> Result<&'a str, SamplerError> {
        self.typed(name, default, Value::as_str, "a string")
    }

    /// A list of integers (`disable_corrector`).
    pub(crate) fn ints(&self, name: &str) -> Result<Vec<i64>, SamplerError> {
        let read = |v: &Value| v.as_array()?.iter().map(Value::as_i64).collect();
        self.typed(name, Vec::new(), read, "a list of integers")
    }

    /// Switches troupe does not implement: only their default `false` is accepted.
    pub(crate) fn unsupported_if_true(&self, names: &[&str]) -> Result<(), SamplerError> {
        for &name in names {
            if self.bool(name, false)? {
                return Err(self.error(name, true, "not supported by troupe"));
            }
        }
        Ok(())
    }

    /// A field troupe does not implement: only `null` / absent is accepted.
    pub(crate) fn unsupported_if_set(&self, name: &str) -> Result<(), SamplerError> {
        match self.get(name) {
            None => Ok(()),
            Some(v) => Err(self.error(name, v, "not supported by troupe")),
        }
    }

    /// A string field restricted to `allowed` (the first is listed as the default).
    pub(crate) fn choice(
        &self,
        name: &str,
        default: &'a str,
        allowed: &[&str],
    ) -> Result<&'a str, SamplerError> {
        let value = self.str(name, default)?;
        if allowed.contains(&value) {
            Ok(value)
        } else {
            let why = format!("not supported (troupe implements: {})", allowed.join(", "));
            Err(self.error(name, format!("\"{value}\""), &why))
        }
    }
}

/// `thresholding` (dynamic thresholding of x̂₀) is not implemented by any troupe sampler.
pub(crate) fn no_thresholding(fields: &Fields) -> Result<(), SamplerError> {
    fields.unsupported_if_true(&["thresholding"])
}

/// ᾱ_t from the shared schedule. The σ-based classes (all but DDIM) replace a zero terminal ᾱ
/// (zero-SNR rescaling) by 2⁻²⁴ so that σ_T stays finite, as diffusers does.
pub(crate) fn alphas_cumprod(
    config: &SchedulerConfig,
    floor_terminal: bool,
) -> Result<Vec<f32>, SamplerError> {
    let mut alphas = NoiseSchedule::new(config)
        .map_err(SamplerError)?
        .alphas_cumprod;
    if floor_terminal && config.rescale_betas_zero_snr {
        *alphas.last_mut().expect("num_train_timesteps > 0") = 2f32.powi(-24);
    }
    Ok(alphas)
}

/// `steps` must be usable for `num_train_timesteps` (DDIM's check, applied to all).
pub(crate) fn check_steps(config: &SchedulerConfig, steps: usize) -> Result<(), SamplerError> {
    if steps == 0 || steps > config.num_train_timesteps {
        return Err(SamplerError(format!(
            "{steps} inference steps: expected 1 ..= num_train_timesteps ({})",
            config.num_train_timesteps
        )));
    }
    Ok(())
}

/// √((1−ᾱ)/ᾱ) in f32, diffusers' σ of every training timestep.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
}

/// σ of one ᾱ (also the `final_sigmas_type = "sigma_min"` value, from ᾱ₀).
pub(crate) fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// `timestep_spacing` (arXiv 2305.08891, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    /// Reads the field with the class's default.
    pub(crate) fn read(fields: &Fields, default: &'static str) -> Result<Self, SamplerError> {
        Ok(
            match fields.choice(
                "timestep_spacing",
                default,
                &["linspace", "leading", "trailing"],
            )? {
                "linspace" => Self::Linspace,
                "leading" => Self::Leading,
                _ => Self::Trailing,
            },
        )
    }
}

/// Which of diffusers' timestep grids a class uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Grid {
    /// DDIM: `steps` points, linspace rounded.
    Rounded,
    /// Euler family: `steps` points, linspace left fractional (then f32).
    Fractional,
    /// Multistep solvers: `steps + 1` points with the last (t = 0) dropped, up to `last`
    /// (`num_train_timesteps` unless DPM's `lambda_min_clipped` clips it).
    Solver { last: usize },
}

/// diffusers' timesteps, largest first, as f64 (integers except the Euler linspace grid).
pub(crate) fn spaced_timesteps(
    spacing: Spacing,
    grid: Grid,
    train: usize,
    steps: usize,
    offset: i64,
) -> Vec<f64> {
    let end = match grid {
        Grid::Solver { last } => last,
        _ => train,
    };
    let extra = usize::from(matches!(grid, Grid::Solver { .. }));
    let mut ascending: Vec<f64> = match spacing {
        Spacing::Linspace => linspace(0.0, end as f64 - 1.0, steps + extra)
            .into_iter()
            .map(|t| match grid {
                Grid::Fractional => t as f32 as f64,
                _ => t.round_ties_even(),
            })
            .collect(),
        Spacing::Leading => {
            let ratio = end / (steps + extra);
            (0..steps + extra)
                .map(|i| (i * ratio) as f64 + offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let descending = arange_down(end as f64, train as f64 / steps as f64);
            return descending
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect();
        }
    };
    ascending.drain(..extra);
    ascending.reverse();
    ascending
}

/// `np.linspace(start, stop, n)` in f64: `i·step + start`, the last point exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut out: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    out[n - 1] = stop;
    out
}

/// `np.arange(start, 0, -step)`: the length is ⌈start/step⌉ and, as NumPy's fill does, the
/// values are `start + i·δ` with δ = (start − step) − start.
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let second = start + -step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(t, arange(len), sigmas)` in f64, as NumPy computes it.
pub(crate) fn interp(t: f64, sigmas: &[f32]) -> f64 {
    let last = sigmas.len() - 1;
    if t.is_nan() {
        return t;
    }
    if t <= 0.0 {
        return sigmas[0] as f64;
    }
    if t >= last as f64 {
        return sigmas[last] as f64;
    }
    let j = t.floor() as usize;
    let (y0, y1) = (sigmas[j] as f64, sigmas[j + 1] as f64);
    if j as f64 == t {
        return y0;
    }
    let slope = (y1 - y0) / ((j + 1) as f64 - j as f64);
    slope * (t - j as f64) + y0
}

/// Karras et al. (2022) σ ramp with ρ = 7 between `max` and `min`, in f64 as diffusers.
pub(crate) fn karras(min: f64, max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of σ by linear interpolation of
/// log σ (the difference of the two table values is taken in f32, as NumPy does).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `sigma_min` / `sigma_max` bounds of the Karras ramp (from the config when set).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KarrasRange {
    pub(crate) min: Option<f64>,
    pub(crate) max: Option<f64>,
}

impl KarrasRange {
    /// The range when `use_karras_sigmas` is on. `sigma_min`/`sigma_max` are read even for
    /// DPM-Solver, which does not declare them: diffusers keeps every other field of the file
    /// as a hidden config entry, and its Karras code reads them.
    pub(crate) fn read(fields: &Fields) -> Result<Option<Self>, SamplerError> {
        if !fields.bool("use_karras_sigmas", false)? {
            return Ok(None);
        }
        Ok(Some(Self {
            min: fields.opt_f64("sigma_min")?,
            max: fields.opt_f64("sigma_max")?,
        }))
    }

    /// The ramp for `steps` steps, bounded by the config or else by `lowest`/`highest`.
    pub(crate) fn sigmas(self, lowest: f64, highest: f64, steps: usize) -> Vec<f64> {
        karras(
            self.min.unwrap_or(lowest),
            self.max.unwrap_or(highest),
            steps,
        )
    }
}

/// `final_sigmas_type`: σ after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    /// 0: the last step lands on the data (x̂₀).
    Zero,
    /// σ of training timestep 0.
    SigmaMin,
}

impl FinalSigma {
    pub(crate) fn read(fields: &Fields) -> Result<Self, SamplerError> {
        Ok(
            match fields.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? {
                "zero" => Self::Zero,
                _ => Self::SigmaMin,
            },
        )
    }
}

/// Timesteps and σ of one run (`sigmas` has one more entry: σ after the last step).
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub(crate) timesteps: Vec<f32>,
    pub(crate) sigmas: Vec<f32>,
}

impl SigmaSchedule {
    /// Joins f64 timesteps and σ (as NumPy does before its final cast to f32).
    pub(crate) fn new(timesteps: &[f64], sigmas: &[f64], last: f64) -> Self {
        Self {
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: sigmas.iter().chain([&last]).map(|&s| s as f32).collect(),
        }
    }
}

/// x̂₀ of the σ-parameterised (Euler) samplers, where x = x₀ + σ·ε.
pub(crate) fn euler_denoised(
    prediction: Prediction,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f32,
) -> Tensor<4> {
    match prediction {
        Prediction::Epsilon => sample.sub(model_output.mul_scalar(sigma)),
        Prediction::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            model_output
                .mul_scalar(c_out)
                .add(sample.div_scalar(sigma * sigma + 1.0))
        }
    }
}

/// The multistep solvers' (α_t, σ_t) of a σ: α = 1/√(σ² + 1), σ_t = σ·α (f32, as diffusers).
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ of a σ (+∞ at σ = 0).
pub(crate) fn lambda(sigma: f32) -> f32 {
    let (alpha, sigma) = alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

/// x̂₀ from the model output at σ (the multistep solvers' `convert_model_output`).
pub(crate) fn solver_data_prediction(
    prediction: Prediction,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f32,
) -> Tensor<4> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => sample
            .sub(model_output.mul_scalar(sigma_t))
            .div_scalar(alpha_t),
        Prediction::VPrediction => sample
            .mul_scalar(alpha_t)
            .sub(model_output.mul_scalar(sigma_t)),
    }
}

/// ε̂ from the model output at σ (UniPC with `predict_x0 = false`).
pub(crate) fn solver_noise_prediction(
    prediction: Prediction,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f32,
) -> Tensor<4> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => model_output,
        Prediction::VPrediction => model_output
            .mul_scalar(alpha_t)
            .add(sample.mul_scalar(sigma_t)),
    }
}

/// The multistep solvers' σ schedule (`set_timesteps` of DPM-Solver and UniPC).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SolverGrid {
    pub(crate) spacing: Spacing,
    pub(crate) offset: i64,
    /// The largest timestep + 1 (below `num_train_timesteps` if DPM's λ clipping cuts it).
    pub(crate) last: usize,
    pub(crate) karras: Option<KarrasRange>,
    pub(crate) final_sigma: FinalSigma,
    /// UniPC ends a Karras ramp on its own last σ for `sigma_min`; DPM uses σ of t = 0.
    pub(crate) karras_final_is_ramp_end: bool,
}

impl SolverGrid {
    /// Reads the spacing (default linspace), offset, Karras and final-σ fields.
    pub(crate) fn read(
        fields: &Fields,
        last: usize,
        karras_final_is_ramp_end: bool,
    ) -> Result<Self, SamplerError> {
        Ok(Self {
            spacing: Spacing::read(fields, "linspace")?,
            offset: fields.int("steps_offset", 0)?,
            last,
            karras: KarrasRange::read(fields)?,
            final_sigma: FinalSigma::read(fields)?,
            karras_final_is_ramp_end,
        })
    }

    /// Integer timesteps (Karras ones rounded half to even) and σ.
    pub(crate) fn build(&self, alphas_cumprod: &[f32], steps: usize) -> SigmaSchedule {
        let table = train_sigmas(alphas_cumprod);
        let sigma_min = sigma_of(alphas_cumprod[0]) as f64;
        let grid = Grid::Solver { last: self.last };
        let spaced = spaced_timesteps(self.spacing, grid, table.len(), steps, self.offset);
        let Some(range) = self.karras else {
            let sigmas: Vec<f64> = spaced.iter().map(|&t| interp(t, &table)).collect();
            return SigmaSchedule::new(&spaced, &sigmas, self.final_value(sigma_min, sigma_min));
        };
        let log: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let highest = *table.last().expect("non-empty") as f64;
        let sigmas = range.sigmas(table[0] as f64, highest, steps);
        let timesteps: Vec<f64> = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log).round_ties_even())
            .collect();
        let ramp_end = *sigmas.last().expect("steps > 0");
        SigmaSchedule::new(&timesteps, &sigmas, self.final_value(ramp_end, sigma_min))
    }

    /// σ after the last step; `ramp_end` is the last σ of the Karras ramp or of the grid.
    fn final_value(&self, ramp_end: f64, sigma_min: f64) -> f64 {
        match self.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin if self.karras_final_is_ramp_end && self.karras.is_some() => {
                ramp_end
            }
            FinalSigma::SigmaMin => sigma_min,
        }
    }
}

/// Solves the small system `a·x = b` in f32 by LU with partial pivoting (LAPACK `sgesv`'s
/// order of operations, as `torch.linalg.solve` does for UniPC's coefficients).
pub(crate) fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for k in 0..n {
        let p = (k..n).fold(k, |p, i| if a[i][k].abs() > a[p][k].abs() { i } else { p });
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        for i in k + 1..n {
            a[i][k] *= inv;
            for j in k + 1..n {
                a[i][j] -= a[i][k] * a[k][j];
            }
            b[i] -= a[i][k] * b[k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    b
}

/// DDIM and the multistep solvers draw no noise and give the UNet the sample unscaled; they
/// implement [`Sampler`] through this trait (public only inside this private module).
pub trait Deterministic {
    /// [`Sampler::timesteps`].
    fn schedule_timesteps(&self) -> &[f32];

    /// [`Sampler::step`] without a noise source.
    fn advance(&mut self, model_output: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4>;
}

impl<T: Deterministic> Sampler for T {
    fn timesteps(&self) -> &[f32] {
        self.schedule_timesteps()
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        _noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        self.advance(model_output, index, sample)
    }
}
