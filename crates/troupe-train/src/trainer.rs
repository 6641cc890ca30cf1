//! The step-based training loop: read [`run`] top to bottom.
//!
//! set up (load models, fresh or resumed state) → for each optimizer step: `grad_accum`
//! micro-batches (forward, backward, accumulate) → skip the step if the loss or the gradient
//! norm is not finite → global-norm clip → AdamW with per-group learning rates → records →
//! checkpoint every N steps, at the end, and when SIGINT/SIGTERM arrives → final export.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use troupe_data::loader::{BadRowPolicy, Loader, LoaderConfig};
use troupe_data::plan::SizeRule;
use troupe_data::recipe::RecipeConfig;
use troupe_data::rng::{KeyedRng, Purpose};
use troupe_data::shard::find_shards;
use troupe_diffusion::conditioning::Encoders;
use troupe_diffusion::control::PoseControl;
use troupe_diffusion::pipeline::Pipeline;
use troupe_models::adapter::Adapter;
use troupe_models::adapter_file::{AdapterFormat, ExportDType};
use troupe_models::unet::UNet2DConditionModel;

use crate::checkpoint::{self, TrainState};
use crate::config::TrainConfig;
use crate::lock::RunLock;
use crate::objective::{StepNoise, forward};
use crate::optim::{AdamW, LearningRates, ParamNames, clip_grad_norm};
use crate::pretrained::init_from_pretrained;
use crate::records::{Records, StepStats};
use crate::samples::Samples;
use crate::validation::Validation;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Optimizer steps completed.
    pub step: u64,
    /// Whether it stopped early on a signal.
    pub interrupted: bool,
    /// Last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Total loss of each finite step of this invocation, in order.
    pub losses: Vec<f64>,
}

impl Outcome {
    /// Mean loss over the first and the last fifth of this invocation's steps (at most 50
    /// each): single steps are too noisy to show a trend.
    pub fn loss_trend(&self) -> Option<(f64, f64)> {
        let n = self.losses.len();
        let k = (n / 5).clamp(1, 50);
        if n < 2 {
            return None;
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Some((mean(&self.losses[..k]), mean(&self.losses[n - k..])))
    }
}

/// Name of the resolved config inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Starts a run from `config`; if `run.dir` already holds this very run (same resolved config),
/// continues it instead.
pub fn train(config: TrainConfig, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let dir = config.run.dir.clone();
    let lock = RunLock::acquire(&dir)?;
    if !checkpoint::list(&dir)?.is_empty() {
        // Same config as the run on disk: continue it (a finished run returns at once).
        let saved = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap_or_default();
        if saved == config.to_toml() {
            eprintln!("{} already holds this run: continuing it", dir.display());
            return run(config, true, stop, lock);
        }
        bail!(
            "{} holds checkpoints of a run with a different config: continue it with `troupe train --resume {}`, or choose another `run.dir`",
            dir.display(),
            dir.display()
        );
    }
    let path = dir.join(CONFIG_FILE);
    crate::checkpoint::write_atomic(&path, config.to_toml().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    run(config, false, stop, lock)
}

/// Continues the run in `run_dir` (wherever its config says it was) from its newest complete
/// checkpoint, or from step 0 when it stopped before its first. `overrides` may change the
/// keys in [`crate::config::RESUMABLE_KEYS`]; each change is printed and kept in the run's
/// config and in `config-changes.log`.
pub fn resume(run_dir: &Path, overrides: &[String], stop: Arc<AtomicBool>) -> Result<Outcome> {
    let path = run_dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let lock = RunLock::acquire(run_dir)?;
    let shown = path.display().to_string();
    let (config, changes) = TrainConfig::for_resume(&text, &shown, run_dir, overrides)?;
    if !changes.is_empty() {
        let mut log = String::new();
        for c in &changes {
            eprintln!("changed on resume: {c}");
            log.push_str(&format!("resume: {c}\n"));
        }
        let log_path = run_dir.join("config-changes.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        std::io::Write::write_all(&mut f, log.as_bytes())
            .with_context(|| format!("writing {}", log_path.display()))?;
    }
    let resolved = config.to_toml();
    if resolved != text {
        crate::checkpoint::write_atomic(&path, resolved.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    run(config, true, stop, lock)
}

/// The loader settings of a run (also used for its validation batches).
pub(crate) fn loader_config(config: &TrainConfig, encoders: &Encoders) -> LoaderConfig {
    let d = &config.data;
    let size_rule = match d.resolution {
        None => SizeRule::reference(),
        Some(side) => SizeRule::buckets(side * side, (side / 4).min(64), 2.0),
    };
    let o = &config.objective;
    let recipe = RecipeConfig {
        crop_size: encoders.image_size as u32,
        latent_downsample: encoders.vae.downscale_factor() as u32,
        dropout: troupe_data::recipe::Dropout {
            image: o.drop_image,
            text: o.drop_text,
            both: o.drop_both,
        },
        ..RecipeConfig::default()
    };
    LoaderConfig {
        batch_size: config.train.batch_size,
        seed: config.train.seed,
        shuffle_window: d.shuffle_window,
        workers: if d.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            d.workers
        },
        size_rule,
        on_bad_row: if d.on_bad_row == "skip" {
            BadRowPolicy::Skip
        } else {
            BadRowPolicy::Fail
        },
        recipe: RecipeConfig {
            require_pose: d.require_pose,
            fixed_target_size: Some((d.target_size[0], d.target_size[1])),
            ..recipe
        },
        repeats: d.repeat_by_characters.clone(),
        ..LoaderConfig::default()
    }
}

/// Everything a run holds between steps.
struct Run {
    config: TrainConfig,
    device: Device,
    /// The frozen encoders and the adapter being trained: the generation pipeline itself, so
    /// samples render from exactly what trains.
    pipeline: Pipeline,
    samples: Option<Samples>,
    validation: Option<Validation>,
    names: ParamNames,
    opt: AdamW,
    loader: Loader,
    state: TrainState,
    records: Records,
    outcome: Outcome,
}

fn require_dir(path: &Path, key: &str) -> Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        bail!("`{key}` = {}: no such folder", path.display())
    }
}

/// Loads the frozen components and builds the adapter (fresh initialisation, seeded).
fn load_models(config: &TrainConfig, device: &Device) -> Result<(Encoders, Adapter)> {
    let m = &config.model;
    let unet_dir = m.base.join("unet");
    let (unet, _) = UNet2DConditionModel::from_dir(&unet_dir, device, Some(m.dtype.dtype()))
        .with_context(|| format!("loading the UNet from {}", unet_dir.display()))?;
    let encoders = Encoders::load(&m.base, &m.image_encoder, m.dtype, device)?;
    let clip_dim = encoders.image_encoder.hidden_size();
    let unet = unet.no_grad();
    let spec = m.adapter_spec(clip_dim).for_unet(&unet)?;
    device.seed(config.train.seed);
    let adapter = Adapter::attach(unet, spec, device)?;
    Ok((encoders, adapter))
}

impl Run {
    /// Loads the models and either starts fresh (with the pretrained initialisation, if any)
    /// or restores the newest complete checkpoint.
    fn set_up(config: TrainConfig, resuming: bool) -> Result<Self> {
        require_dir(&config.model.base, "model.base")?;
        require_dir(&config.model.image_encoder, "model.image_encoder")?;
        let device = crate::device::parse_device(&config.train.device)
            .map_err(anyhow::Error::msg)?
            .autodiff();
        let (encoders, mut adapter) = load_models(&config, &device)?;
        let m = &config.model;
        let control = match &m.controlnet {
            Some(dir) => {
                require_dir(dir, "model.controlnet")?;
                let c =
                    PoseControl::load(dir, &adapter.unet, m.dtype, m.controlnet_context, &device)
                        .with_context(|| format!("loading the ControlNet from {}", dir.display()))?;
                Some(c)
            }
            None => None,
        };
        let shards = find_shards(&config.data.shards)?;
        let lcfg = loader_config(&config, &encoders);
        let dir = config.run.dir.clone();
        let loaded = if resuming {
            let (loaded, rejected) =
                checkpoint::load_latest(&dir, config.train.adamw, &device.clone().inner())?;
            for r in &rejected {
                eprintln!("warning: skipping checkpoint: {r}");
            }
            if loaded.is_none() {
                // Damaged checkpoints are a run's progress: never start over silently past them.
                if !rejected.is_empty() {
                    bail!(
                        "{}: no complete checkpoint to resume from (see above); move the damaged ones away to start the run over",
                        dir.display()
                    );
                }
                eprintln!(
                    "{}: no checkpoint yet: starting the run from step 0",
                    dir.display()
                );
            }
            loaded.map(|l| (l, rejected))
        } else {
            None
        };
        let (opt, loader, state) = if let Some((l, rejected)) = loaded {
            if !rejected.is_empty() {
                eprintln!(
                    "resuming from the previous complete checkpoint {}",
                    l.dir.display()
                );
            }
            adapter.load_tensors(l.adapter.state_dict()?)?;
            eprintln!("resumed {} at step {}", dir.display(), l.state.step);
            let loader = Loader::resume(&shards, lcfg, l.state.loader.clone())?;
            (l.optimizer, loader, l.state)
        } else {
            let m = &config.model;
            if m.pretrained_adapter.is_some() || m.pretrained_ip_plus.is_some() {
                let summary = init_from_pretrained(
                    &mut adapter,
                    m.pretrained_adapter.as_deref(),
                    m.pretrained_ip_plus.as_deref(),
                )?;
                eprintln!("{summary}");
            }
            let loader = Loader::new(&shards, lcfg)?;
            let state = TrainState {
                step: 0,
                loader: loader.state().clone(),
                skipped_nonfinite: 0,
                consecutive_nonfinite: 0,
                seed: config.train.seed,
            };
            (AdamW::new(config.train.adamw), loader, state)
        };
        let (most, at) = loader.most_characters();
        if most > config.model.max_characters {
            bail!(
                "{at}: {most} characters, but `model.max_characters` = {}: raise it (the adapter gets a slot per character) or leave such rows out",
                config.model.max_characters
            );
        }
        // After loading: parameters are replaced in place, under the same ids.
        let mut names = ParamNames::default();
        for (group, params) in adapter.param_groups() {
            names.add(params, group);
        }
        let mut pipeline = Pipeline::from_parts(&config.model.base, encoders, adapter, &device)?;
        pipeline.control = control;
        let size = config
            .samples
            .size
            .or(config.data.resolution.map(|r| r as usize));
        let samples = Samples::prepare(
            &config.samples,
            &pipeline,
            size.unwrap_or(pipeline.default_size),
        )?;
        let validation = Validation::prepare(&config, &pipeline.encoders)?;
        let records = Records::open(&dir, state.step, config.train.max_steps)?;
        let outcome = Outcome {
            step: state.step,
            interrupted: false,
            checkpoint: None,
            losses: Vec::new(),
        };
        Ok(Self {
            config,
            device,
            pipeline,
            samples,
            validation,
            names,
            opt,
            loader,
            state,
            records,
            outcome,
        })
    }

    /// Learning rates of the parameter groups at the current optimizer step.
    fn learning_rates(&self) -> LearningRates {
        let t = &self.config.train;
        let factor = t.schedule.factor(self.opt.step);
        [
            (troupe_models::adapter::GROUP_PPR.to_string(), t.lr * factor),
            (
                troupe_models::adapter::GROUP_PROCESSORS.to_string(),
                t.lr_adapter * factor,
            ),
        ]
        .into()
    }

    /// One optimizer step: micro-batches, clipping, and the update (or a counted skip when the
    /// loss or gradient is not finite).
    fn optimizer_step(&mut self) -> Result<StepStats> {
        let t = &self.config.train;
        let step = self.state.step;
        let started = Instant::now();
        let mut s = StepStats {
            finite: true,
            ..StepStats::default()
        };
        let mut acc = GradientsAccumulator::<Adapter>::new();
        let scale = 1.0 / t.grad_accum as f64;
        for micro in 0..t.grad_accum as u64 {
            let waited = Instant::now();
            let batch = self.loader.next_batch()?;
            s.data_wait_s += waited.elapsed().as_secs_f64();
            for e in self.loader.take_skipped() {
                eprintln!("warning: skipped a bad row: {e}");
            }
            s.samples += batch.len();
            let f = self.pipeline.encoders.vae.downscale_factor();
            let latent = [
                self.pipeline.encoders.vae.latent_channels(),
                batch.height as usize / f,
                batch.width as usize / f,
            ];
            let mut rng = KeyedRng::new(t.seed, Purpose::Train, step, micro);
            let steps = self.pipeline.encoders.schedule.steps();
            let rnd = StepNoise::draw(&mut rng, &self.config.objective, steps, batch.len(), latent);
            let o = &self.config.objective;
            let control = self.pipeline.control.as_ref();
            let losses = forward(
                &self.pipeline.encoders,
                &self.pipeline.adapter,
                control.map(|c| (c, self.config.model.controlnet_scale)),
                &batch,
                &rnd,
                o,
                &self.device,
            )?;
            let (l, n, a): (f32, f32, f32) = (
                losses.total.clone().into_scalar(),
                losses.noise.clone().into_scalar(),
                losses.attention.clone().into_scalar(),
            );
            s.finite &= l.is_finite();
            s.loss += l as f64 * scale;
            s.noise_loss += n as f64 * scale;
            s.attn_loss += a as f64 * scale;
            let grads = losses.total.mul_scalar(scale).backward();
            acc.accumulate(
                &self.pipeline.adapter,
                GradientsParams::from_grads(grads, &self.pipeline.adapter),
            );
        }
        let mut grads = acc.grads();
        s.grad_norm = clip_grad_norm(
            &self.pipeline.adapter,
            &self.names,
            &mut grads,
            t.max_grad_norm,
        );
        s.finite &= s.grad_norm.is_finite();
        let lrs = self.learning_rates();
        s.lr = lrs[troupe_models::adapter::GROUP_PPR];
        s.lr_adapter = lrs[troupe_models::adapter::GROUP_PROCESSORS];
        if s.finite {
            let adapter = self.pipeline.adapter.clone();
            self.pipeline.adapter = self.opt.step(adapter, &self.names, &mut grads, &lrs);
            self.state.consecutive_nonfinite = 0;
            self.outcome.losses.push(s.loss);
        } else {
            self.skip_nonfinite(&s)?;
        }
        s.step_s = started.elapsed().as_secs_f64() - s.data_wait_s;
        self.state.step += 1;
        self.state.loader = self.loader.state().clone();
        self.outcome.step = self.state.step;
        Ok(s)
    }

    /// Counts a non-finite step; stops the run after `train.max_nonfinite_steps` in a row.
    fn skip_nonfinite(&mut self, s: &StepStats) -> Result<()> {
        let limit = self.config.train.max_nonfinite_steps;
        self.state.skipped_nonfinite += 1;
        self.state.consecutive_nonfinite += 1;
        eprintln!(
            "warning: step {}: non-finite loss or gradient (loss {}, grad norm {}); step skipped",
            self.state.step, s.loss, s.grad_norm
        );
        if self.state.consecutive_nonfinite >= limit {
            bail!(
                "{} consecutive non-finite steps (limit `train.max_nonfinite_steps` = {limit}); stopping. The last good checkpoint is {}",
                self.state.consecutive_nonfinite,
                self.outcome
                    .checkpoint
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string())
            );
        }
        Ok(())
    }

    /// Validation loss and samples when due after this step.
    fn evaluate_if_due(&mut self) -> Result<()> {
        let step = self.state.step;
        if let Some(v) = self.validation.as_ref().filter(|v| v.due(step)) {
            let p = &self.pipeline;
            let loss = v.loss(&self.config, p, &self.device)?;
            self.records.scalars(step, &[("val/loss", loss)])?;
        }
        if let Some(s) = self.samples.as_ref().filter(|s| s.due(step)) {
            s.render(
                &self.pipeline,
                &self.config.run.dir,
                step,
                &mut self.records,
            )?;
        }
        Ok(())
    }

    /// Metadata of the adapter files this run writes: the architecture, base model and step;
    /// the final export also names the config's hash (checkpoints leave it out, so a run's
    /// checkpoints do not depend on where the run lives).
    fn adapter_metadata(&self, with_config: bool) -> std::collections::HashMap<String, String> {
        use sha2::Digest;
        let mut extra = vec![
            (
                "base_model".to_string(),
                self.config.model.base.display().to_string(),
            ),
            ("step".to_string(), self.state.step.to_string()),
        ];
        if with_config {
            let hash = sha2::Sha256::digest(self.config.to_toml().as_bytes());
            extra.push(("config_sha256".to_string(), format!("{hash:x}")));
        }
        self.pipeline.adapter.metadata(extra)
    }

    /// Checkpoints every `checkpoint.every_steps`, at the last step, and when interrupted.
    fn checkpoint_if_due(&mut self, interrupted: bool) -> Result<()> {
        let c = &self.config.checkpoint;
        let step = self.state.step;
        if step.is_multiple_of(c.every_steps) || step == self.config.train.max_steps || interrupted
        {
            let path = checkpoint::save(
                &self.config.run.dir,
                &self.pipeline.adapter,
                self.adapter_metadata(false),
                &self.opt,
                &self.state,
                c.keep_last,
            )?;
            self.outcome.checkpoint = Some(path);
        }
        Ok(())
    }

    /// The finished adapter, ready for the reference pipeline (see `troupe export`).
    fn export_final(&self) -> Result<()> {
        let path = self.config.run.dir.join("adapter.safetensors");
        self.pipeline.adapter.write(
            &path,
            AdapterFormat::Safetensors,
            ExportDType::F32,
            self.adapter_metadata(true),
        )?;
        eprintln!("adapter: {}", path.display());
        Ok(())
    }
}

/// Trains `config` to its end while holding the run directory's `lock`.
fn run(
    config: TrainConfig,
    resuming: bool,
    stop: Arc<AtomicBool>,
    _lock: RunLock,
) -> Result<Outcome> {
    let mut run = Run::set_up(config, resuming)?;
    let max_steps = run.config.train.max_steps;
    while run.state.step < max_steps {
        if stop.load(Ordering::SeqCst) {
            run.outcome.interrupted = true;
            break;
        }
        let what = format!(
            "training step {} (batch {})",
            run.state.step + 1,
            run.config.train.batch_size
        );
        let stats = crate::device::catch_out_of_memory(&what, || run.optimizer_step())
            .map_err(anyhow::Error::msg)??;
        let step = run.state.step;
        let log = step % run.config.train.log_every == 0 || step == max_steps;
        let skipped = run.state.skipped_nonfinite;
        run.records.step(&stats, step, skipped, log)?;
        run.evaluate_if_due()?;
        let interrupted = stop.load(Ordering::SeqCst);
        run.checkpoint_if_due(interrupted)?;
        crate::faults::step_point(step);
        if interrupted {
            run.outcome.interrupted = true;
            break;
        }
    }
    run.records.sync()?;
    if !run.outcome.interrupted {
        run.export_final()?;
    }
    Ok(run.outcome)
}

#[cfg(test)]
mod target_size_tests {
    use super::*;

    #[test]
    fn the_target_size_time_id_comes_from_the_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let set = "data.target_size=[1288, 960]".to_string();
        let mut config = TrainConfig::load(&root.join("configs/tiny.toml"), &[set]).unwrap();
        config.model.base = root.join(&config.model.base);
        config.model.image_encoder = root.join(&config.model.image_encoder);
        let m = &config.model;
        let device = Device::flex();
        let encoders = Encoders::load(&m.base, &m.image_encoder, m.dtype, &device).unwrap();
        let lcfg = loader_config(&config, &encoders);
        assert_eq!(lcfg.recipe.fixed_target_size, Some((1288, 960)));
        // The default is the value the reference's script builds.
        assert_eq!(
            TrainConfig::load(&root.join("configs/tiny.toml"), &[])
                .unwrap()
                .data
                .target_size,
            [1286, 960]
        );
    }
}
