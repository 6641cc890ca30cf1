//! The step-based training loop: read it top to bottom.
//!
//! for each optimizer step: `grad_accum` micro-batches (forward, backward, accumulate) →
//! skip the step if the loss or the gradient norm is not finite → global-norm clip → AdamW with
//! per-group learning rates → metrics line → checkpoint every N steps, at the end, and when
//! SIGINT/SIGTERM arrives.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::optim::{GradientsAccumulator, GradientsParams};
use troupe_data::loader::{BadRowPolicy, Loader, LoaderConfig};
use troupe_data::plan::SizeRule;
use troupe_data::recipe::RecipeConfig;
use troupe_data::rng::{KeyedRng, Purpose};
use troupe_data::shard::find_shards;

use crate::checkpoint::{self, TrainState};
use crate::config::TrainConfig;
use crate::model::{
    Adapter, Frozen, StepNoise, forward, init_from_pretrained, load_models, require_dir,
};
use crate::optim::{AdamW, clip_grad_norm};

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
    if !checkpoint::list(&dir)?.is_empty() {
        // Same config as the run on disk: continue it (a finished run returns at once).
        let saved = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap_or_default();
        if saved == config.to_toml() {
            eprintln!("{} already holds this run: continuing it", dir.display());
            return run(config, true, stop);
        }
        bail!(
            "{} holds checkpoints of a run with a different config: continue it with `troupe train --resume {}`, or choose another `run.dir`",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(CONFIG_FILE), config.to_toml())?;
    run(config, false, stop)
}

/// Continues the run in `run_dir` from its newest complete checkpoint.
pub fn resume(run_dir: &Path, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let path = run_dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = TrainConfig::from_toml(&text, &path.display().to_string())?;
    run(config, true, stop)
}

fn loader_config(config: &TrainConfig, frozen: &Frozen) -> LoaderConfig {
    let d = &config.data;
    let size_rule = match d.resolution {
        None => SizeRule::reference(),
        Some(side) => SizeRule::buckets(side * side, (side / 4).min(64), 2.0),
    };
    let mut recipe = RecipeConfig::default();
    recipe.crop_size = frozen.image_size as u32;
    recipe.latent_downsample = frozen.vae.downscale_factor() as u32;
    let o = &config.objective;
    recipe.dropout = troupe_data::recipe::Dropout {
        image: o.drop_image,
        text: o.drop_text,
        both: o.drop_both,
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
        recipe,
        ..LoaderConfig::default()
    }
}

/// `[========>         ]` for `done` of `total`.
fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: usize = 20;
    let filled = ((done as f64 / total.max(1) as f64) * WIDTH as f64).round() as usize;
    let filled = filled.min(WIDTH);
    let head = if filled < WIDTH && filled > 0 {
        ">"
    } else {
        ""
    };
    let bar = "=".repeat(filled.saturating_sub(head.len())) + head;
    format!("[{bar:<WIDTH$}]")
}

/// `1h02m`, `3m05s`, `42s`.
fn format_eta(secs: f64) -> String {
    let s = if secs.is_finite() {
        secs.max(0.0).round() as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Standard normal samples (Box–Muller) from the keyed generator.
fn normals(rng: &mut KeyedRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = rng.uniform().max(f64::MIN_POSITIVE);
        let u2 = rng.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn step_noise(
    config: &TrainConfig,
    frozen: &Frozen,
    step: u64,
    micro: u64,
    b: usize,
    latent: [usize; 3],
) -> StepNoise {
    let mut rng = KeyedRng::new(config.train.seed, Purpose::Train, step, micro);
    let [c, h, w] = latent;
    let o = &config.objective;
    let timesteps = (0..b)
        .map(|_| rng.below(frozen.ddpm.steps() as u64) as usize)
        .collect();
    let mut noise = normals(&mut rng, b * c * h * w);
    let offset = normals(&mut rng, b * c);
    for (i, n) in noise.iter_mut().enumerate() {
        *n += (o.noise_offset as f32) * offset[i / (h * w)];
    }
    let vae_noise = normals(&mut rng, b * c * h * w);
    let token_drop = (0..b)
        .map(|_| {
            (
                rng.uniform() < o.drop_face_tokens,
                rng.uniform() < o.drop_body_tokens,
            )
        })
        .collect();
    StepNoise {
        timesteps,
        noise,
        vae_noise,
        token_drop,
    }
}

fn run(config: TrainConfig, resuming: bool, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let dir = config.run.dir.clone();
    require_dir(&config.model.base, "model.base")?;
    require_dir(&config.model.image_encoder, "model.image_encoder")?;
    let device = crate::device::parse_device(&config.train.device)
        .map_err(anyhow::Error::msg)?
        .autodiff();
    let t = &config.train;
    let (frozen, mut adapter) = load_models(&config.model, t.seed, &device)?;
    if !resuming
        && (config.model.pretrained_adapter.is_some() || config.model.pretrained_ip_plus.is_some())
    {
        let summary = init_from_pretrained(
            &mut adapter,
            config.model.pretrained_adapter.as_deref(),
            config.model.pretrained_ip_plus.as_deref(),
        )?;
        eprintln!("{summary}");
    }
    let mut opt = AdamW::new(t.adamw);
    let shards = find_shards(&config.data.shards)?;
    let lcfg = loader_config(&config, &frozen);

    let mut state: TrainState;
    let mut loader = if resuming {
        let (loaded, rejected) = checkpoint::load_latest(&dir, &device)?;
        for r in &rejected {
            eprintln!("warning: skipping checkpoint: {r}");
        }
        let Some(l) = loaded else {
            bail!("{}: no complete checkpoint to resume from", dir.display());
        };
        if !rejected.is_empty() {
            eprintln!(
                "resuming from the previous complete checkpoint {}",
                l.dir.display()
            );
        }
        adapter.load_tensors(l.adapter)?;
        opt.state = l.moments;
        opt.step = l.state.optimizer_steps;
        state = l.state;
        eprintln!("resumed {} at step {}", dir.display(), state.step);
        Loader::resume(&shards, lcfg, state.loader.clone())?
    } else {
        let loader = Loader::new(&shards, lcfg)?;
        state = TrainState {
            step: 0,
            optimizer_steps: 0,
            loader: loader.state().clone(),
            skipped_nonfinite: 0,
            consecutive_nonfinite: 0,
            seed: t.seed,
        };
        loader
    };
    // After loading: parameters are replaced in place, under the same ids.
    let names = adapter.names();

    let metrics_path = dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let mut events = crate::tensorboard::EventWriter::create(&dir)
        .with_context(|| format!("creating a TensorBoard event file in {}", dir.display()))?;
    let mut outcome = Outcome {
        step: state.step,
        interrupted: false,
        checkpoint: None,
        losses: Vec::new(),
    };
    let crash_after: Option<u64> = std::env::var("TROUPE_CRASH_AFTER_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let start_step = state.step;
    let mut samples = 0usize;
    while state.step < t.max_steps {
        if stop.load(Ordering::SeqCst) {
            outcome.interrupted = true;
            break;
        }
        let step = state.step;
        let step_started = Instant::now();
        let mut data_wait = 0.0f64;
        let mut acc = GradientsAccumulator::<Adapter>::new();
        let (mut total, mut noise_l, mut attn_l) = (0.0f64, 0.0f64, 0.0f64);
        let mut finite = true;
        for micro in 0..t.grad_accum as u64 {
            let waited = Instant::now();
            let batch = loader.next_batch()?;
            data_wait += waited.elapsed().as_secs_f64();
            for e in loader.take_skipped() {
                eprintln!("warning: skipped a bad row: {e}");
            }
            let b = batch.len();
            samples += b;
            let f = frozen.vae.downscale_factor();
            let latent = [4, batch.height as usize / f, batch.width as usize / f];
            let rnd = step_noise(&config, &frozen, step, micro, b, latent);
            let losses = forward(&frozen, &adapter, &batch, &rnd, &config.objective, &device)?;
            let scale = 1.0 / t.grad_accum as f64;
            let (l, n, a): (f32, f32, f32) = (
                losses.total.clone().into_scalar(),
                losses.noise.clone().into_scalar(),
                losses.attention.clone().into_scalar(),
            );
            finite &= l.is_finite();
            total += l as f64 * scale;
            noise_l += n as f64 * scale;
            attn_l += a as f64 * scale;
            let grads = losses.total.mul_scalar(scale).backward();
            acc.accumulate(&adapter, GradientsParams::from_grads(grads, &adapter));
        }
        let mut grads = acc.grads();
        let grad_norm = clip_grad_norm(&adapter, &names, &mut grads, t.max_grad_norm);
        finite &= grad_norm.is_finite();
        let factor = t.schedule.factor(state.optimizer_steps);
        let lrs = [t.lr * factor, t.lr_adapter * factor];
        if finite {
            adapter = opt.step(adapter, &names, &mut grads, &lrs);
            state.optimizer_steps = opt.step;
            state.consecutive_nonfinite = 0;
        } else {
            state.skipped_nonfinite += 1;
            state.consecutive_nonfinite += 1;
            eprintln!(
                "warning: step {step}: non-finite loss or gradient (loss {total}, grad norm {grad_norm}); step skipped"
            );
            if state.consecutive_nonfinite >= t.max_nonfinite_steps {
                bail!(
                    "{} consecutive non-finite steps (limit `train.max_nonfinite_steps` = {}); stopping. The last good checkpoint is {}",
                    state.consecutive_nonfinite,
                    t.max_nonfinite_steps,
                    outcome
                        .checkpoint
                        .as_ref()
                        .map_or("none".into(), |p| p.display().to_string())
                );
            }
        }
        // Compute time of the step (forward, backward, update), without waiting for data.
        let step_s = step_started.elapsed().as_secs_f64() - data_wait;
        state.step += 1;
        state.loader = loader.state().clone();
        if finite {
            outcome.losses.push(total);
        }

        if state.step % t.log_every == 0 || state.step == t.max_steps {
            let secs = started.elapsed().as_secs_f64();
            let done = state.step - start_step;
            let rate = samples as f64 / secs.max(1e-9);
            let eta = secs / done as f64 * (t.max_steps - state.step) as f64;
            let line = serde_json::json!({
                "step": state.step, "loss": total, "noise_loss": noise_l, "attn_loss": attn_l,
                "lr": lrs[0], "lr_adapter": lrs[1], "grad_norm": grad_norm,
                "samples_per_s": rate, "skipped_nonfinite": state.skipped_nonfinite, "elapsed_s": secs,
                "step_s": step_s, "data_wait_s": data_wait,
            });
            writeln!(metrics, "{line}")?;
            events.scalars(
                state.step,
                &[
                    ("loss/total", total),
                    ("loss/noise", noise_l),
                    ("loss/attention", attn_l),
                    ("lr/ppr", lrs[0]),
                    ("lr/processors", lrs[1]),
                    ("grad_norm", grad_norm),
                    ("samples_per_s", rate),
                ],
            )?;
            let line = format!(
                "{} step {:>6}/{} | loss {total:.4} (noise {noise_l:.4}, attn {attn_l:.4}) | lr {:.2e} | {rate:.2} samples/s | ETA {}",
                progress_bar(state.step, t.max_steps),
                state.step,
                t.max_steps,
                lrs[0],
                format_eta(eta)
            );
            // On a terminal the bar redraws in place; in logs every update is its own line.
            if interactive {
                let end = if state.step == t.max_steps { "\n" } else { "" };
                eprint!("\r{line}\x1b[K{end}");
            } else {
                eprintln!("{line}");
            }
        }
        let interrupted = stop.load(Ordering::SeqCst);
        if state.step % config.checkpoint.every_steps == 0
            || state.step == t.max_steps
            || interrupted
        {
            let path = checkpoint::save(
                &dir,
                adapter.tensors(),
                &opt,
                &state,
                config.checkpoint.keep_last,
            )?;
            outcome.checkpoint = Some(path);
        }
        outcome.step = state.step;
        // Fault injection for the resume tests: die like `kill -9` (no unwinding, no cleanup).
        if crash_after == Some(state.step) {
            std::process::abort();
        }
        if interrupted {
            outcome.interrupted = true;
            break;
        }
    }
    metrics.sync_all()?;
    if !outcome.interrupted {
        // The finished adapter, ready for the reference pipeline (see `troupe export`).
        use sha2::Digest;
        let hash = format!("{:x}", sha2::Sha256::digest(config.to_toml().as_bytes()));
        let meta = crate::model::export_metadata(
            &adapter,
            &config.model.base.display().to_string(),
            state.step,
            &hash,
            config.model.ppr_dim_head,
        );
        let path = dir.join("adapter.safetensors");
        crate::export::write_adapter(
            &path,
            &adapter.tensors(),
            crate::export::Format::Safetensors,
            crate::export::ExportDType::F32,
            meta,
        )?;
        eprintln!("adapter: {}", path.display());
    }
    Ok(outcome)
}
