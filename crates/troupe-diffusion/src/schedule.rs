//! The noise schedule shared by the forward process (training: `add_noise`, targets, SNR
//! weights) and the reverse samplers (`crate::samplers`), read from the base model's
//! `scheduler/scheduler_config.json` as diffusers' schedulers read it.
//!
//! The schedule is computed on the host in f32 with PyTorch's operation order (`linspace`,
//! `cumprod`), so `alphas_cumprod` equals diffusers' bit for bit (checked by a test against
//! values exported from diffusers).

use std::path::Path;

use serde::Deserialize;

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise ε (SDXL base).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
}

/// The `scheduler_config.json` fields of the noise schedule (defaults: diffusers'
/// `DDPMScheduler`). The whole file is kept in [`SchedulerConfig::raw`]: each sampler reads its
/// own fields from it with its own class defaults, as diffusers' `from_config` does.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// Diffusion steps (1000).
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    /// First β (0.00085 for SDXL).
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    /// Last β (0.012 for SDXL).
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    /// `linear` or `scaled_linear`.
    #[serde(default = "linear")]
    pub beta_schedule: String,
    /// Training target.
    #[serde(default = "epsilon")]
    pub prediction_type: Prediction,
    /// Rescale β to zero terminal SNR (arXiv 2305.08891, Algorithm 1).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Explicit β values (overrides the schedule).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Every field of the file, for the samplers' own settings.
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn epsilon() -> Prediction {
    Prediction::Epsilon
}

/// A scheduler config that cannot be used, with the file and field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchedulerError {
    /// The config file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let err = |message: String| SchedulerError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Self::from_map(raw).map_err(err)
    }

    /// Parses the fields of a `scheduler_config.json` object (keeping all of them in `raw`).
    pub fn from_map(raw: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        // `null` means "class default" in diffusers configs (e.g. `trained_betas: null`).
        let set: serde_json::Map<String, serde_json::Value> = raw
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut config: Self =
            serde_json::from_value(serde_json::Value::Object(set)).map_err(|e| e.to_string())?;
        config.raw = raw;
        Ok(config)
    }

    /// SDXL base's values (scaled_linear 0.00085 → 0.012, 1000 steps, epsilon).
    pub fn sdxl() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: Prediction::Epsilon,
            rescale_betas_zero_snr: false,
            trained_betas: None,
            raw: serde_json::Map::new(),
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: PyTorch fills the first half from `start`
/// and the second half from `end`, with a fused multiply-add in f32 (its vectorised kernel).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (a, b) = (start as f32, end as f32);
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, a)
            } else {
                (-step).mul_add((n - 1 - i) as f32, b)
            }
        })
        .collect()
}

/// `torch.cumprod` on f32 CPU tensors: the running product is kept in f64 (ATen's
/// `acc_type<float>`), each output rounded to f32.
fn cumprod(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// The noise schedule ᾱ_t and what the model predicts: the forward (noising) process of
/// training and the basis of every sampler.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// ᾱ_t for t = 0 … T−1.
    pub alphas_cumprod: Vec<f32>,
    /// Training target.
    pub prediction: Prediction,
}

impl NoiseSchedule {
    /// Builds the schedule; unknown schedule names are an error naming the field.
    pub fn new(config: &SchedulerConfig) -> Result<Self, String> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err("field `num_train_timesteps` must be > 0".into());
        }
        let betas: Vec<f32> = if let Some(b) = &config.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start, config.beta_end, n),
                "scaled_linear" => {
                    linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                other => {
                    return Err(format!(
                        "field `beta_schedule`: `{other}` is not supported (linear, scaled_linear)"
                    ));
                }
            }
        };
        let betas = if config.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(Self {
            alphas_cumprod: cumprod(&alphas),
            prediction: config.prediction_type,
        })
    }

    /// Number of timesteps T.
    pub fn steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) as diffusers computes them in f32.
    pub fn coefficients(&self, t: usize) -> (f32, f32) {
        let a = self.alphas_cumprod[t];
        (a.powf(0.5), (1.0 - a).powf(0.5))
    }

    /// Signal-to-noise ratio ᾱ/(1−ᾱ) at `t`.
    pub fn snr(&self, t: usize) -> f32 {
        let (s, n) = self.coefficients(t);
        (s / n) * (s / n)
    }

    /// Per-sample loss weight of min-SNR-γ (Hang et al. 2023) as diffusers' training scripts
    /// compute it: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v.
    pub fn min_snr_weight(&self, t: usize, gamma: f32) -> f32 {
        let snr = self.snr(t);
        let w = snr.min(gamma);
        match self.prediction {
            Prediction::Epsilon => w / snr,
            Prediction::VPrediction => w / (snr + 1.0),
        }
    }
}

fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], *sqrt.last().expect("non-empty"));
    for s in &mut sqrt {
        *s -= last;
        *s *= first / (first - last);
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}
