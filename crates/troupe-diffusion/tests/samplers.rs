//! Every sampler replays diffusers' trajectories step for step: timesteps, `init_noise_sigma`,
//! `scale_model_input` and each `step` from diffusers' own input sample (so errors do not
//! compound), then once free-running from the initial noise.
//! Fixtures: `scripts/make_sampler_fixtures.py` (samplers.json + samplers.safetensors).

use std::collections::HashMap;

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use troupe_diffusion::samplers::{self, Sampler, SamplerKind};
use troupe_diffusion::schedule::SchedulerConfig;

const SHAPE: [usize; 4] = [1, 4, 4, 6];
/// Per step, against diffusers' `prev_sample` (and `scale_model_input`), for unit-scale
/// inputs; see [`tolerance`].
const STEP_TOL: f32 = 1e-5;
/// After a free-running replay.
const FINAL_TOL: f32 = 1e-4;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// All fixture tensors by name, as f32 vectors of shape [`SHAPE`].
fn load_tensors() -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(fixture("samplers.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            assert_eq!(view.shape(), SHAPE, "{name}");
            let data = view.data().chunks_exact(4);
            let values = data.map(|b| f32::from_le_bytes(b.try_into().unwrap()));
            (name, values.collect())
        })
        .collect()
}

fn cases() -> Vec<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(fixture("samplers.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = meta["cases"].as_object().unwrap();
    cases.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// max |got − want|; panics on a shape mismatch or any non-finite value on either side.
fn max_abs_diff(got: Tensor<4>, want: &[f32], what: &str) -> f32 {
    assert_eq!(got.dims(), SHAPE, "{what}: shape");
    let got = got.into_data().try_to_vec::<f32>().unwrap();
    troupe_pt::parity::max_abs_diff(&got, want, what) as f32
}

/// `base`, or 4 f32 ulps of the largest input value when that is larger: diffusers itself
/// rounds at that scale (Euler's zero-SNR start has σ = 4096, and its scalars come from MKL's
/// exp/log/sqrt, which are within an ulp but not correctly rounded).
fn tolerance(base: f32, input: &[f32]) -> f32 {
    let largest = input
        .iter()
        .fold(0.0f32, |m, x| if x.abs() > m { x.abs() } else { m });
    base.max(4.0 * f32::EPSILON * largest)
}

/// A case's recorded data.
struct Case<'a> {
    name: &'a str,
    meta: &'a serde_json::Value,
    tensors: &'a HashMap<String, Vec<f32>>,
    device: Device,
}

impl Case<'_> {
    fn data(&self, key: &str) -> &[f32] {
        let name = format!("{}.{key}", self.name);
        self.tensors
            .get(&name)
            .unwrap_or_else(|| panic!("missing {name}"))
    }

    fn tensor(&self, key: &str) -> Tensor<4> {
        let data = TensorData::new(self.data(key).to_vec(), SHAPE);
        Tensor::from_data(data, &self.device)
    }

    fn flag(&self, key: &str) -> bool {
        self.meta[key].as_bool().unwrap()
    }

    fn build(&self) -> Box<dyn Sampler> {
        let kind = SamplerKind::parse(self.meta["sampler"].as_str().unwrap()).unwrap();
        assert_eq!(kind.diffusers_class(), self.meta["class"].as_str().unwrap());
        let raw = self.meta["config"].as_object().unwrap().clone();
        let config = SchedulerConfig::from_map(raw).unwrap();
        let steps = self.meta["steps"].as_u64().unwrap() as usize;
        samplers::build(kind, &config, steps).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Timesteps (exact when integer) and `init_noise_sigma` (1e-6 relative).
    fn check_schedule(&self, sampler: &dyn Sampler) {
        let want: Vec<f32> = serde_json::from_value(self.meta["timesteps"].clone()).unwrap();
        let got = sampler.timesteps();
        assert_eq!(
            got.len(),
            want.len(),
            "{}: timesteps {got:?} vs {want:?}",
            self.name
        );
        let tol = if self.flag("timesteps_integer") {
            0.0
        } else {
            1e-4
        };
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= tol,
                "{}: timesteps {got:?} vs {want:?}",
                self.name
            );
        }
        let (g, w) = (
            sampler.init_noise_sigma(),
            self.meta["init_noise_sigma"].as_f64().unwrap(),
        );
        assert!(
            (g - w).abs() <= 1e-6 * w.abs(),
            "{}: init_noise_sigma {g} vs {w}",
            self.name
        );
    }

    /// The noise source of step `i`: diffusers' draw, only for samplers that draw.
    fn noise(&self, i: usize, calls: &mut usize) -> Tensor<4> {
        *calls += 1;
        assert!(self.flag("has_noise"), "{}: step {i} drew noise", self.name);
        self.tensor(&format!("{i}.noise"))
    }

    /// One step from `sample`: (scale error, sample after the step).
    fn step(&self, sampler: &mut dyn Sampler, i: usize, sample: Tensor<4>) -> (f32, Tensor<4>) {
        let scaled = sampler.scale_model_input(sample.clone(), i);
        let scale_err = match self.flag("has_scaled") {
            true => max_abs_diff(scaled, self.data(&format!("{i}.scaled")), "scaled"),
            false => max_abs_diff(
                scaled,
                &sample.to_data().try_to_vec::<f32>().unwrap(),
                "scaled",
            ),
        };
        let mut calls = 0;
        let output = self.tensor(&format!("{i}.model_output"));
        let next = sampler.step(output, i, sample, &mut || self.noise(i, &mut calls));
        assert_eq!(
            calls,
            usize::from(self.flag("has_noise")),
            "{}: noise calls at {i}",
            self.name
        );
        (scale_err, next)
    }

    /// Replays each step from diffusers' input; returns the largest step error, its largest
    /// ratio to the tolerance, and the largest `scale_model_input` error.
    fn replay_steps(&self) -> [f32; 3] {
        let mut sampler = self.build();
        self.check_schedule(sampler.as_ref());
        let mut worst = [0.0f32; 3];
        for i in 0..sampler.timesteps().len() {
            let key = match i {
                0 => "init".to_string(),
                _ => format!("{}.prev_sample", i - 1),
            };
            let tol = tolerance(STEP_TOL, self.data(&key));
            let (scale_err, next) = self.step(sampler.as_mut(), i, self.tensor(&key));
            let what = format!("{} step {i}", self.name);
            let err = max_abs_diff(next, self.data(&format!("{i}.prev_sample")), &what);
            assert!(
                err <= tol && scale_err <= STEP_TOL,
                "{what}: {err:e} > {tol:e} (scale {scale_err:e})"
            );
            // All finite here (max_abs_diff checks), so f32::max drops nothing.
            for (w, e) in worst.iter_mut().zip([err, err / tol, scale_err]) {
                *w = w.max(e);
            }
        }
        worst
    }

    /// Runs from the initial noise on its own samples; returns the final error.
    fn replay_free(&self) -> f32 {
        let mut sampler = self.build();
        let n = sampler.timesteps().len();
        let mut sample = self.tensor("init");
        for i in 0..n {
            sample = self.step(sampler.as_mut(), i, sample).1;
        }
        let what = format!("{} free-running", self.name);
        let err = max_abs_diff(sample, self.data(&format!("{}.prev_sample", n - 1)), &what);
        assert!(err <= FINAL_TOL, "{what}: {err:e}");
        err
    }
}

#[test]
fn samplers_match_diffusers_step_for_step() {
    let tensors = load_tensors();
    let cases = cases();
    let mut seen = std::collections::BTreeSet::new();
    for (name, meta) in &cases {
        let case = Case {
            name,
            meta,
            tensors: &tensors,
            device: Device::flex(),
        };
        let [step, ratio, scale] = case.replay_steps();
        let free = case.replay_free();
        println!(
            "{name:<32} step {step:.2e} ({ratio:.2} of tol)  scale {scale:.2e}  free {free:.2e}"
        );
        seen.insert(meta["sampler"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen.len(),
        SamplerKind::ALL.len(),
        "every sampler has fixtures"
    );
}

#[test]
fn unknown_sampler_lists_the_valid_ones() {
    let err = SamplerKind::parse("foo").unwrap_err().to_string();
    assert!(err.contains("foo"), "{err}");
    for kind in SamplerKind::ALL {
        assert!(err.contains(kind.name()), "{err}");
        assert_eq!(SamplerKind::parse(kind.name()).unwrap(), kind);
    }
}

fn config_with(field: &str, value: serde_json::Value) -> SchedulerConfig {
    let mut raw = serde_json::Map::new();
    raw.insert("beta_schedule".into(), "scaled_linear".into());
    raw.insert(field.into(), value);
    SchedulerConfig::from_map(raw).unwrap()
}

#[test]
fn unsupported_fields_are_errors_naming_them() {
    use SamplerKind::*;
    use serde_json::json;
    let cases = [
        (vec![UniPc, Ddim, DpmPp2M], "thresholding", json!(true)),
        (
            vec![Euler, UniPc, DpmPp2M],
            "use_exponential_sigmas",
            json!(true),
        ),
        (vec![Euler, UniPc, DpmPp2M], "use_beta_sigmas", json!(true)),
        (vec![DpmPp2M], "use_lu_lambdas", json!(true)),
        (vec![DpmPp2M], "algorithm_type", json!("sde-dpmsolver++")),
        (vec![DpmPp2M], "solver_order", json!(3)),
        (vec![DpmPp2M], "variance_type", json!("learned_range")),
        (vec![UniPc], "use_flow_sigmas", json!(true)),
        (vec![UniPc], "use_dynamic_shifting", json!(true)),
        (vec![UniPc], "shift_terminal", json!(0.1)),
        (vec![UniPc], "solver_order", json!(0)),
        (vec![UniPc], "solver_type", json!("bh3")),
        (
            vec![Euler, UniPc, DpmPp2M],
            "final_sigmas_type",
            json!("sigma_max"),
        ),
        (vec![Euler], "interpolation_type", json!("log_linear")),
        (
            vec![Ddim, Euler, EulerAncestral, UniPc, DpmPp2M],
            "timestep_spacing",
            json!("spread"),
        ),
        (vec![Ddim], "clip_sample", json!("yes")),
    ];
    for (kinds, field, value) in cases {
        for kind in kinds {
            let config = config_with(field, value.clone());
            let err = samplers::build(kind, &config, 10)
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_else(|| panic!("{kind:?}: {field} = {value} accepted"));
            assert!(
                err.contains(field) && err.contains(kind.diffusers_class()),
                "{err}"
            );
            let shown = value.as_str().map_or(value.to_string(), str::to_string);
            assert!(err.contains(&shown), "{err}");
        }
    }
    // Fields a class does not declare are ignored, as `from_config` does (a DDPM config's
    // `clip_sample` means nothing to Euler; this diffusers' Euler ancestral has no Karras σ).
    assert!(samplers::build(Euler, &config_with("clip_sample", json!(true)), 10).is_ok());
    assert!(
        samplers::build(
            EulerAncestral,
            &config_with("use_karras_sigmas", json!(true)),
            10
        )
        .is_ok()
    );
    assert!(samplers::build(Ddim, &config_with("steps_offset", json!(1)), 0).is_err());
    let past_the_end = samplers::build(Ddim, &config_with("steps_offset", json!(1)), 1000);
    assert!(
        past_the_end
            .err()
            .unwrap()
            .to_string()
            .contains("steps_offset")
    );
}
