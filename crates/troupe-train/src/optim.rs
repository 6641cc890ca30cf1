//! Optimisation: AdamW with parameter groups keyed by the adapter's PyTorch names (so its state
//! is saved by name and resumes exactly), global-norm gradient clipping that really clips
//! (the reference's call is a no-op, storymaker.md §5.1), and learning-rate schedules.
//!
//! Why not burn's `ModuleOptimizer`: its state is keyed by random `ParamId`s, so a resumed run
//! (fresh modules, fresh ids) could not find its moments; and its clipping is per tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use troupe_models::weights::{StateDict, WeightError, to_host, write_safetensors};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β₁.
    #[serde(default = "beta1")]
    pub beta1: f64,
    /// β₂.
    #[serde(default = "beta2")]
    pub beta2: f64,
    /// ε, added to √v̂ (outside the square root, as PyTorch).
    #[serde(default = "eps")]
    pub eps: f64,
    /// Decoupled weight decay (0.01 in StoryMaker).
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}
fn weight_decay() -> f64 {
    0.01
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: beta1(),
            beta2: beta2(),
            eps: eps(),
            weight_decay: weight_decay(),
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments {
    /// `exp_avg`.
    pub m: Tensor<1>,
    /// `exp_avg_sq`.
    pub v: Tensor<1>,
}

/// Trainable parameters: PyTorch key and learning-rate group (by name) of each id.
#[derive(Debug, Clone, Default)]
pub struct ParamNames {
    /// id → (key, group name).
    pub by_id: HashMap<ParamId, (String, String)>,
}

/// Learning rate of each parameter group, by group name.
pub type LearningRates = BTreeMap<String, f64>;

impl ParamNames {
    /// Adds `(key, id)` pairs (from `StateDict::namer`) to the group named `group`.
    pub fn add(&mut self, names: Vec<(String, ParamId)>, group: &str) {
        for (key, id) in names {
            self.by_id.insert(id, (key, group.to_string()));
        }
    }

    /// Number of named parameters.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no parameter is named.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Metadata key of the saved step count.
const STEP_METADATA: &str = "step";

/// AdamW whose state is keyed by parameter name.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Updates applied so far (PyTorch's per-parameter `step`; all parameters step together).
    pub step: u64,
    /// Moments by parameter key.
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Saves the step count and the moments by parameter key (`exp_avg.<key>`,
    /// `exp_avg_sq.<key>`, flattened) as a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), WeightError> {
        let mut tensors = Vec::with_capacity(2 * self.state.len());
        for (key, Moments { m, v }) in &self.state {
            tensors.push((format!("exp_avg.{key}"), to_host(m.clone())));
            tensors.push((format!("exp_avg_sq.{key}"), to_host(v.clone())));
        }
        let meta = HashMap::from([(STEP_METADATA.to_string(), self.step.to_string())]);
        write_safetensors(path, &tensors, Some(meta))
    }

    /// Restores what [`Self::save`] wrote, onto `device` (the inner, non-autodiff device).
    pub fn load(config: AdamWConfig, path: &Path, device: &Device) -> Result<Self, WeightError> {
        let mut sd = StateDict::from_file(path)?;
        let step = sd
            .metadata()
            .get(STEP_METADATA)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| WeightError::Format {
                path: path.display().to_string(),
                message: format!("no `{STEP_METADATA}` in the metadata"),
            })?;
        let mut state = BTreeMap::new();
        for key in sd.keys() {
            if let Some(name) = key.strip_prefix("exp_avg.") {
                let m = sd.take_any::<1>(&key, device)?;
                let v = sd.take_any::<1>(&format!("exp_avg_sq.{name}"), device)?;
                state.insert(name.to_string(), Moments { m, v });
            }
        }
        Ok(Self {
            config,
            step,
            state,
        })
    }

    /// Applies one update to every named parameter of `module` that has a gradient, with the
    /// learning rate of its group (`lrs[group name]`).
    pub fn step<M: Module>(
        &mut self,
        module: M,
        names: &ParamNames,
        grads: &mut GradientsParams,
        lrs: &LearningRates,
    ) -> M {
        self.step += 1;
        let mut mapper = AdamWMapper {
            opt: self,
            names,
            grads,
            lrs,
        };
        module.map(&mut mapper)
    }
}

struct AdamWMapper<'a> {
    opt: &'a mut AdamW,
    names: &'a ParamNames,
    grads: &'a mut GradientsParams,
    lrs: &'a LearningRates,
}

impl ModuleMapper for AdamWMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((key, group)) = self.names.by_id.get(&param.id) else {
            return param;
        };
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let shape = tensor.dims();
        let p = tensor.inner().flatten::<1>(0, D - 1); // [N]
        let g = grad.flatten::<1>(0, D - 1); // [N]
        let c = self.opt.config;
        let lr = *self
            .lrs
            .get(group)
            .unwrap_or_else(|| panic!("no learning rate for parameter group `{group}`"));
        let t = self.opt.step as i32;
        let (m, v) = match self.opt.state.remove(key) {
            Some(s) => (
                s.m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1),
                s.v.mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2),
            ),
            None => (
                g.clone().mul_scalar(1.0 - c.beta1),
                g.square().mul_scalar(1.0 - c.beta2),
            ),
        };
        // torch.optim.AdamW (non-fused): decay, then p -= lr/bc1 · m / (√v/√bc2 + ε).
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let p = p.mul_scalar(1.0 - lr * c.weight_decay);
        let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(c.eps);
        let p = p - m.clone().div(denom).mul_scalar(lr / bc1);
        self.opt.state.insert(key.clone(), Moments { m, v });
        let mut updated = Tensor::from_inner(p.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Scales every gradient so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, applied only when < 1). Returns the
/// norm before clipping; a non-finite norm is returned as is and nothing is scaled.
pub fn clip_grad_norm<M: Module>(
    module: &M,
    names: &ParamNames,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> f64 {
    let mut sq = GradSquares {
        names,
        grads,
        total: 0.0,
    };
    module.visit(&mut sq);
    let norm = sq.total.sqrt();
    if let Some(max) = max_norm
        && norm.is_finite()
    {
        let factor = max / (norm + 1e-6);
        if factor < 1.0 {
            let mut scale = GradScale {
                names,
                grads,
                factor,
            };
            module.visit(&mut scale);
        }
    }
    norm
}

struct GradSquares<'a> {
    names: &'a ParamNames,
    grads: &'a GradientsParams,
    total: f64,
}

impl burn::module::ModuleVisitor for GradSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.names.by_id.contains_key(&param.id) {
            return;
        }
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s: f32 = g.square().sum().into_scalar();
            self.total += s as f64;
        }
    }
}

struct GradScale<'a> {
    names: &'a ParamNames,
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl burn::module::ModuleVisitor for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.names.by_id.contains_key(&param.id) {
            return;
        }
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Learning-rate schedules, as a function of the optimizer step (0-based).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate throughout (StoryMaker).
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then constant.
    LinearWarmup {
        /// Warm-up length in optimizer steps.
        warmup_steps: u64,
    },
    /// Linear warm-up, then cosine decay to `min_ratio × base` at `total_steps`.
    Cosine {
        /// Warm-up length.
        #[serde(default)]
        warmup_steps: u64,
        /// Step where the decay ends (usually `train.max_steps`).
        total_steps: u64,
        /// Final rate as a fraction of the base.
        #[serde(default)]
        min_ratio: f64,
    },
    /// Multiply the base by `factors[i]` from `boundaries[i]` on (the paper: 1e-4 for 4k
    /// steps, then 5e-5 → boundaries [4000], factors [0.5]).
    Piecewise {
        /// Steps where the factor changes, increasing.
        boundaries: Vec<u64>,
        /// Factor in force from each boundary.
        factors: Vec<f64>,
    },
}

impl LrSchedule {
    /// The multiplier of the base rate at optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        match self {
            Self::Constant => 1.0,
            Self::LinearWarmup { warmup_steps } => warmup(step, *warmup_steps),
            Self::Cosine {
                warmup_steps,
                total_steps,
                min_ratio,
            } => {
                if step < *warmup_steps {
                    return warmup(step, *warmup_steps);
                }
                let span = total_steps.saturating_sub(*warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                min_ratio
                    + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Self::Piecewise {
                boundaries,
                factors,
            } => boundaries
                .iter()
                .zip(factors)
                .take_while(|(b, _)| step >= **b)
                .last()
                .map_or(1.0, |(_, f)| *f),
        }
    }

    /// Checks the values; the error names the problem.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Piecewise {
                boundaries,
                factors,
            } => {
                if boundaries.len() != factors.len() {
                    return Err(format!(
                        "piecewise: {} boundaries but {} factors",
                        boundaries.len(),
                        factors.len()
                    ));
                }
                if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("piecewise: boundaries must increase".into());
                }
                Ok(())
            }
            Self::Cosine {
                min_ratio,
                total_steps,
                ..
            } => {
                if !(0.0..=1.0).contains(min_ratio) || *total_steps == 0 {
                    return Err("cosine: min_ratio must be in [0, 1] and total_steps > 0".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn warmup(step: u64, warmup_steps: u64) -> f64 {
    if warmup_steps == 0 {
        1.0
    } else {
        ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    }
}
