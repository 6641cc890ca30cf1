//! The training config: one TOML file (`configs/*.toml`) plus `--set key=value` overrides.
//! Unknown keys are rejected, every value is validated with a message naming its key, and the
//! fully resolved config is written back into the run directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use troupe_diffusion::control::ControlContext;
use troupe_models::adapter::AdapterSpec;
use troupe_models::weights::Precision;

use crate::objective::ObjectiveConfig;
use crate::optim::{AdamWConfig, LrSchedule};

/// A config problem, naming the file and key.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The config file (or `--set`).
    pub path: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// `[run]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory: resolved config, checkpoints, metrics, exports.
    pub dir: PathBuf,
}

/// `[model]`: where the frozen components and the initial adapter come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// SDXL diffusers folder (`unet/`, `vae/`, `text_encoder{,_2}/`, `tokenizer{,_2}/`,
    /// `scheduler/`).
    pub base: PathBuf,
    /// CLIP image encoder folder (`CLIPVisionModelWithProjection`).
    pub image_encoder: PathBuf,
    /// LoRA rank of every attention processor (128 in StoryMaker).
    #[serde(default = "rank")]
    pub lora_rank: usize,
    /// IP-Adapter-FaceID-PlusV2-SDXL checkpoint (`.bin` or `.safetensors`) to start from.
    #[serde(default)]
    pub pretrained_adapter: Option<PathBuf>,
    /// IP-Adapter-Plus-SDXL-ViT-H checkpoint whose `image_proj` becomes `resample`.
    #[serde(default)]
    pub pretrained_ip_plus: Option<PathBuf>,
    /// PPR resampler depth (4).
    #[serde(default = "depth")]
    pub ppr_depth: usize,
    /// PPR head width (64).
    #[serde(default = "dim_head")]
    pub ppr_dim_head: usize,
    /// Face tokens per character (4).
    #[serde(default = "num_tokens")]
    pub ppr_num_tokens: usize,
    /// Body tokens per character (16).
    #[serde(default = "num_queries")]
    pub ppr_num_queries: usize,
    /// Character slots (3).
    #[serde(default = "max_characters")]
    pub max_characters: usize,
    /// Precision of the frozen UNet and encoders: `f32`, `bf16` or `f16` (weights stored and
    /// computed in it; the VAE stays f32). The adapter, its gradients and AdamW stay f32, and
    /// losses are computed in f32. `bf16` halves the frozen weights' and activations' memory.
    #[serde(default)]
    pub dtype: Precision,
    /// A frozen pose ControlNet (diffusers `controlnet/` folder) fed the rows' pose images;
    /// its residuals go into the UNet. Rows without a pose train without it.
    #[serde(default)]
    pub controlnet: Option<PathBuf>,
    /// Multiplies the ControlNet's residuals.
    #[serde(default = "controlnet_scale")]
    pub controlnet_scale: f64,
    /// What the ControlNet attends to: `image_tokens` (the reference's training script: the
    /// PPR tokens) or `text`.
    #[serde(default)]
    pub controlnet_context: ControlContext,
}

fn controlnet_scale() -> f64 {
    1.0
}

// Adapter defaults are defined once, by the spec of the released StoryMaker adapter.
fn rank() -> usize {
    AdapterSpec::default().lora_rank
}
fn depth() -> usize {
    AdapterSpec::default().ppr.resampler_depth
}
fn dim_head() -> usize {
    AdapterSpec::default().ppr.resampler_dim_head
}
fn num_tokens() -> usize {
    AdapterSpec::default().ppr.num_tokens
}
fn num_queries() -> usize {
    AdapterSpec::default().ppr.resampler_num_queries
}
fn max_characters() -> usize {
    AdapterSpec::default().ppr.max_characters
}

impl ModelConfig {
    /// The adapter these settings describe, for an image encoder of width `clip_dim` (the
    /// UNet's processor count and cross-attention width are filled in by
    /// [`AdapterSpec::for_unet`]).
    pub fn adapter_spec(&self, clip_dim: usize) -> AdapterSpec {
        let mut spec = AdapterSpec {
            lora_rank: self.lora_rank,
            ..AdapterSpec::default()
        };
        let p = &mut spec.ppr;
        p.clip_embeddings_dim = clip_dim;
        p.num_tokens = self.ppr_num_tokens;
        p.resampler_depth = self.ppr_depth;
        p.resampler_dim_head = self.ppr_dim_head;
        p.resampler_num_queries = self.ppr_num_queries;
        p.max_characters = self.max_characters;
        spec
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Shard files or folders.
    pub shards: Vec<PathBuf>,
    /// Decoding threads (0 = all cores).
    #[serde(default)]
    pub workers: usize,
    /// Shuffle window in rows.
    #[serde(default = "window")]
    pub shuffle_window: usize,
    /// `None`: the reference size rule (long ≤ 1286, short ≤ 960, ×64). `Some(side)`: aspect
    /// buckets of about `side²` pixels with sides multiple of 64 (or of `side/4` when smaller).
    #[serde(default)]
    pub resolution: Option<u32>,
    /// `fail` (default) or `skip` rows that do not decode.
    #[serde(default = "fail")]
    pub on_bad_row: String,
    /// Oversampling by character count: entry `i` is how many times a row with `i + 1`
    /// characters appears per epoch. The reference trains on `list1 + 2 × list2 + 5 × list3`,
    /// i.e. `[1, 2, 5]`; empty (default) is once each. Copies are spread over the epoch and
    /// get their own augmentations.
    #[serde(default)]
    pub repeat_by_characters: Vec<u32>,
    /// Refuse rows without a pose image (with `model.controlnet`); by default they train
    /// without the ControlNet.
    #[serde(default)]
    pub require_pose: bool,
    /// The SDXL micro-conditioning's target size `[height, width]` in every sample's time ids
    /// (`[orig_h, orig_w, 0, 0, height, width]`). Default `[1286, 960]`, the value
    /// `train_storymaker.py` builds (`int(960 · 1.34)`). Its bf16 launch casts the time ids to
    /// bf16, so the released weights actually saw `[1288, 960]`: set that for exact parity
    /// with how they were trained.
    #[serde(default = "target_size")]
    pub target_size: [u32; 2],
}

fn target_size() -> [u32; 2] {
    let (h, w) = troupe_data::recipe::RecipeConfig::default()
        .fixed_target_size
        .expect("the reference recipe has a fixed target size");
    [h, w]
}

fn window() -> usize {
    256
}
fn fail() -> String {
    "fail".into()
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub max_steps: u64,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Seed of every random choice (data order, noise, dropout, initialisation).
    pub seed: u64,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Base learning rate of the PPR (`image_proj_model`).
    #[serde(default = "lr")]
    pub lr: f64,
    /// Base learning rate of the processors (LoRA, `to_k_ip`/`to_v_ip`).
    #[serde(default = "lr")]
    pub lr_adapter: f64,
    /// Learning-rate schedule.
    #[serde(default = "constant")]
    pub schedule: LrSchedule,
    /// AdamW settings.
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Global gradient-norm limit, or `"off"` (`None`): no clipping, which is what the
    /// reference's call amounts to (its parameter iterator is already exhausted).
    #[serde(
        default = "clip",
        deserialize_with = "grad_norm::deserialize",
        serialize_with = "grad_norm::serialize"
    )]
    pub max_grad_norm: Option<f64>,
    /// Consecutive non-finite steps after which the run stops.
    #[serde(default = "nonfinite")]
    pub max_nonfinite_steps: u64,
    /// `cpu`, `cuda[:N]` or `vulkan[:N]` (GPU backends need the matching cargo feature).
    #[serde(default = "cpu")]
    pub device: String,
    /// Log a metrics line every N steps.
    #[serde(default = "one_u64")]
    pub log_every: u64,
}

fn cpu() -> String {
    "cpu".into()
}
fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn lr() -> f64 {
    1e-4
}
fn constant() -> LrSchedule {
    LrSchedule::Constant
}
/// `train.max_grad_norm`: a number, or `"off"` for `None` (TOML has no null).
mod grad_norm {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Word(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Some(n)),
            Raw::Word(w) if w == "off" => Ok(None),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "`{w}`: expected a number, or \"off\" to disable clipping"
            ))),
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_f64(*n),
            None => s.serialize_str("off"),
        }
    }
}

fn clip() -> Option<f64> {
    Some(1.0)
}
fn nonfinite() -> u64 {
    5
}

/// `[checkpoint]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N optimizer steps (and at the end, and on SIGINT/SIGTERM).
    pub every_steps: u64,
    /// Complete checkpoints kept (older ones are deleted).
    pub keep_last: usize,
}

/// `[samples]`: images rendered during training from fixed prompts × reference sets × seeds
/// (`RUN_DIR/samples/step-N/`, grid also in TensorBoard). Off unless `every_steps` > 0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Render every N optimizer steps (0: never).
    #[serde(default)]
    pub every_steps: u64,
    /// Prompts (grid rows, with each reference set).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Reference sets, each 1–3 characters: `SHARD#ROW_ID[:CHARACTER]` or
    /// `image=…,mask=…,embedding=…,keypoints=…` (relative paths from the working directory).
    #[serde(default)]
    pub references: Vec<Vec<String>>,
    /// Seeds (grid columns).
    #[serde(default = "zero_seed")]
    pub seeds: Vec<u64>,
    /// Denoising steps.
    #[serde(default = "sample_steps")]
    pub steps: usize,
    /// Sampler (`unipc`, `ddim`, `euler`, `euler-a`, `dpmpp-2m`).
    #[serde(default = "unipc")]
    pub scheduler: String,
    /// Guidance scale.
    #[serde(default = "guidance")]
    pub guidance: f64,
    /// Image side in pixels (default: `data.resolution`, else the base model's size).
    #[serde(default)]
    pub size: Option<usize>,
    /// `[samples.scoring]`: score every sample image as `troupe eval` does (`clip`,
    /// `face_detector`, `face_recognizer`, `det_size`, `threshold`) and log `eval/face_sim`,
    /// `eval/face_detection_rate`, `eval/clip_t`, `eval/clip_i`. Unset: not scored.
    #[serde(default)]
    pub scoring: Option<troupe_eval::protocol::ScorerSpec>,
}

fn zero_seed() -> Vec<u64> {
    vec![0]
}
fn sample_steps() -> usize {
    25
}
fn unipc() -> String {
    "unipc".into()
}
fn guidance() -> f64 {
    7.5
}

impl Default for SamplesConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            prompts: Vec::new(),
            references: Vec::new(),
            seeds: zero_seed(),
            steps: sample_steps(),
            scheduler: unipc(),
            guidance: guidance(),
            size: None,
            scoring: None,
        }
    }
}

/// `[validation]`: the loss on held-out shards at fixed timesteps and fixed noise (`val/loss`),
/// a smooth curve where the training loss is dominated by timestep noise. Off unless
/// `every_steps` > 0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Evaluate every N optimizer steps (0: never).
    #[serde(default)]
    pub every_steps: u64,
    /// Held-out shard files or folders.
    #[serde(default)]
    pub shards: Vec<PathBuf>,
    /// Batches (of `train.batch_size`) taken from them, the same every time.
    #[serde(default = "val_batches")]
    pub batches: usize,
    /// Timesteps every batch is evaluated at.
    #[serde(default = "val_timesteps")]
    pub timesteps: Vec<usize>,
}

fn val_batches() -> usize {
    4
}
fn val_timesteps() -> Vec<usize> {
    vec![100, 300, 500, 700, 900]
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            shards: Vec::new(),
            batches: val_batches(),
            timesteps: val_timesteps(),
        }
    }
}

/// The whole config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[run]`.
    pub run: RunConfig,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[data]`.
    pub data: DataConfig,
    /// `[train]`.
    pub train: TrainSection,
    /// `[objective]`.
    #[serde(default)]
    pub objective: ObjectiveConfig,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointConfig,
    /// `[samples]`.
    #[serde(default)]
    pub samples: SamplesConfig,
    /// `[validation]`.
    #[serde(default)]
    pub validation: ValidationConfig,
}

impl TrainConfig {
    /// Reads `path`, applies `key=value` overrides (values parsed as TOML, else as strings),
    /// resolves relative paths against the current directory, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let err = |message: String| ConfigError {
            path: shown.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        for o in overrides {
            set(&mut value, o).map_err(|message| ConfigError {
                path: "--set".into(),
                message,
            })?;
        }
        let config: Self = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// The resolved config of a run (`text`, read from `path`) for resuming it in `run_dir`:
    /// `run.dir` becomes `run_dir` (a copied or moved run continues where it is), and the
    /// `overrides` may change only [`RESUMABLE_KEYS`], which leave the steps already taken
    /// valid. Returns the config and a line per changed value.
    pub fn for_resume(
        text: &str,
        path: &str,
        run_dir: &Path,
        overrides: &[String],
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let err = |message: String| ConfigError {
            path: path.into(),
            message,
        };
        let before = Self::from_toml(text, path)?;
        let mut value: toml::Table = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for o in overrides {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
            if !RESUMABLE_KEYS
                .iter()
                .any(|k| key == *k || key.starts_with(&format!("{k}.")))
            {
                return Err(ConfigError {
                    path: "--set".into(),
                    message: format!(
                        "`{key}` cannot change when resuming (the steps already taken depend on it); keys that can: {}",
                        RESUMABLE_KEYS.join(", ")
                    ),
                });
            }
            set(&mut value, o).map_err(|message| ConfigError {
                path: "--set".into(),
                message,
            })?;
        }
        let mut config: Self = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        config.run.dir = run_dir.to_path_buf();
        config.validate().map_err(err)?;
        let (old, new) = (toml_lines(&before.to_toml()), toml_lines(&config.to_toml()));
        let changes = new
            .iter()
            .filter(|(k, v)| old.iter().any(|(ok, ov)| ok == k && ov != v))
            .map(|(k, v)| {
                let was = &old.iter().find(|(ok, _)| ok == k).expect("present").1;
                format!("{k}: {was} → {v}")
            })
            .collect();
        Ok((config, changes))
    }

    /// Parses a resolved config (as written into a run directory).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError {
            path: path.into(),
            message,
        })?;
        Ok(config)
    }

    /// The config as TOML, every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// Checks every value; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        let check = |ok: bool, key: &str, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("`{key}` {what}"))
            }
        };
        check(
            !self.run.dir.as_os_str().is_empty(),
            "run.dir",
            "must name a folder (it is empty)",
        )?;
        check(t.max_steps > 0, "train.max_steps", "must be > 0")?;
        check(t.batch_size > 0, "train.batch_size", "must be > 0")?;
        check(t.grad_accum > 0, "train.grad_accum", "must be > 0")?;
        check(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr",
            "must be a positive number",
        )?;
        check(
            t.lr_adapter >= 0.0 && t.lr_adapter.is_finite(),
            "train.lr_adapter",
            "must be ≥ 0",
        )?;
        check(t.log_every > 0, "train.log_every", "must be > 0")?;
        check(
            self.model.controlnet_scale.is_finite(),
            "model.controlnet_scale",
            "must be a finite number",
        )?;
        crate::device::parse_device(&t.device)?;
        check(
            t.max_nonfinite_steps > 0,
            "train.max_nonfinite_steps",
            "must be > 0",
        )?;
        if let Some(n) = t.max_grad_norm {
            check(
                n > 0.0 && n.is_finite(),
                "train.max_grad_norm",
                "must be a positive number, or \"off\" to disable clipping",
            )?;
        }
        let a = &t.adamw;
        check(
            (0.0..1.0).contains(&a.beta1),
            "train.adamw.beta1",
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&a.beta2),
            "train.adamw.beta2",
            "must be in [0, 1)",
        )?;
        check(
            a.eps > 0.0 && a.eps.is_finite(),
            "train.adamw.eps",
            "must be a positive number",
        )?;
        check(
            a.weight_decay >= 0.0 && a.weight_decay.is_finite(),
            "train.adamw.weight_decay",
            "must be ≥ 0",
        )?;
        t.schedule
            .validate()
            .map_err(|e| format!("`train.schedule`: {e}"))?;
        let c = &self.checkpoint;
        check(c.every_steps > 0, "checkpoint.every_steps", "must be > 0")?;
        check(c.keep_last > 0, "checkpoint.keep_last", "must be > 0")?;
        let m = &self.model;
        check(m.lora_rank > 0, "model.lora_rank", "must be > 0")?;
        check(
            (1..=3).contains(&m.max_characters),
            "model.max_characters",
            "must be 1, 2 or 3",
        )?;
        for (key, v) in [
            ("model.ppr_dim_head", m.ppr_dim_head),
            ("model.ppr_depth", m.ppr_depth),
            ("model.ppr_num_tokens", m.ppr_num_tokens),
            ("model.ppr_num_queries", m.ppr_num_queries),
        ] {
            check(v > 0, key, "must be > 0")?;
        }
        // Sizes the PPR is built from are checked with the encoder widths at load time
        // (`AdapterSpec::validate`); these bounds keep allocations sane before that.
        check(m.ppr_depth <= 64, "model.ppr_depth", "must be ≤ 64")?;
        check(
            m.ppr_num_tokens <= 1024 && m.ppr_num_queries <= 1024,
            "model.ppr_num_tokens / ppr_num_queries",
            "must be ≤ 1024",
        )?;
        let d = &self.data;
        check(
            !d.shards.is_empty(),
            "data.shards",
            "must name at least one shard or folder",
        )?;
        check(d.shuffle_window > 0, "data.shuffle_window", "must be > 0")?;
        check(
            d.shuffle_window <= 1 << 24,
            "data.shuffle_window",
            "must be ≤ 16777216 rows",
        )?;
        check(
            d.workers <= MAX_WORKERS,
            "data.workers",
            &format!("must be ≤ {MAX_WORKERS} (0 = one per core)"),
        )?;
        check(
            d.repeat_by_characters.len() <= 3
                && d.repeat_by_characters.iter().all(|r| (1..=100).contains(r)),
            "data.repeat_by_characters",
            "must list at most 3 counts (1, 2, 3 characters), each from 1 to 100",
        )?;
        check(
            matches!(d.on_bad_row.as_str(), "fail" | "skip"),
            "data.on_bad_row",
            "must be \"fail\" or \"skip\"",
        )?;
        if let Some(r) = d.resolution {
            check(
                r >= 16 && r % 16 == 0,
                "data.resolution",
                "must be a multiple of 16, ≥ 16",
            )?;
            // 4096² RGB f32 is 200 MB per sample before the model sees it; SDXL trains at ~1024.
            check(
                r <= MAX_RESOLUTION,
                "data.resolution",
                &format!("must be ≤ {MAX_RESOLUTION}"),
            )?;
        }
        let o = &self.objective;
        check(
            o.noise_offset >= 0.0,
            "objective.noise_offset",
            "must be ≥ 0",
        )?;
        check(
            o.mask_loss_weight >= 0.0,
            "objective.mask_loss_weight",
            "must be ≥ 0",
        )?;
        check(
            o.attn_loss_weight >= 0.0,
            "objective.attn_loss_weight",
            "must be ≥ 0",
        )?;
        check(
            o.attn_latent_downscale.is_power_of_two(),
            "objective.attn_latent_downscale",
            "must be a power of two",
        )?;
        check(
            o.drop_image + o.drop_text + o.drop_both <= 1.0,
            "objective.drop_image + drop_text + drop_both",
            "must be ≤ 1",
        )?;
        for (key, p) in [
            ("objective.drop_image", o.drop_image),
            ("objective.drop_text", o.drop_text),
            ("objective.drop_both", o.drop_both),
            ("objective.drop_face_tokens", o.drop_face_tokens),
            ("objective.drop_body_tokens", o.drop_body_tokens),
        ] {
            check(
                (0.0..=1.0).contains(&p),
                key,
                "must be a probability in [0, 1]",
            )?;
        }
        if let Some(g) = o.snr_gamma {
            check(g > 0.0, "objective.snr_gamma", "must be > 0")?;
        }
        let sm = &self.samples;
        if sm.every_steps > 0 {
            check(
                !sm.prompts.is_empty(),
                "samples.prompts",
                "must name at least one prompt",
            )?;
            check(
                !sm.references.is_empty()
                    && sm.references.iter().all(|r| (1..=3).contains(&r.len())),
                "samples.references",
                "must hold reference sets of 1 to 3 characters",
            )?;
            check(
                !sm.seeds.is_empty(),
                "samples.seeds",
                "must name at least one seed",
            )?;
            check(sm.steps > 0, "samples.steps", "must be > 0")?;
            troupe_diffusion::samplers::SamplerKind::parse(&sm.scheduler)
                .map_err(|e| format!("`samples.scheduler`: {e}"))?;
        }
        let v = &self.validation;
        if v.every_steps > 0 {
            check(
                !v.shards.is_empty(),
                "validation.shards",
                "must name at least one shard or folder",
            )?;
            check(v.batches > 0, "validation.batches", "must be > 0")?;
            check(
                !v.timesteps.is_empty(),
                "validation.timesteps",
                "must name at least one timestep",
            )?;
        }
        Ok(())
    }
}

/// Applies one `a.b.c=value` override to a TOML table.
/// Largest `data.workers` (decoding threads).
pub const MAX_WORKERS: usize = 1024;

/// Largest `data.resolution` (pixels a side).
pub const MAX_RESOLUTION: u32 = 4096;

/// Config keys (and tables) a resume may change: how long to go on, how often to log, check
/// and sample, and the learning-rate schedule's shape ahead.
pub const RESUMABLE_KEYS: &[&str] = &[
    "train.max_steps",
    "train.log_every",
    "train.schedule",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "samples.every_steps",
    "validation.every_steps",
];

/// `(dotted key, value)` for every leaf of a TOML document, for describing changes.
fn toml_lines(text: &str) -> Vec<(String, String)> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => out.push((key, other.to_string())),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(t) = toml::from_str::<toml::Table>(text) {
        walk("", &t, &mut out);
    }
    out
}

fn set(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| format!("`{assignment}` is not key=value"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{key}` is not a dotted key"));
    }
    // A TOML value (`3`, `1e-4`, `true`, `"x"`, `[..]`, `{..}`), else the raw text as a string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{key}`: `{p}` is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
