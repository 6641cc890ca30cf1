//! Adapter training for troupe: the StoryMaker objective, optimisation, checkpoints, export.
//!
//! * [`config`]: the TOML run config (`--set` overrides, validation naming keys).
//! * [`model`]: frozen SDXL parts, the trainable [`model::Adapter`], the training forward pass.
//! * [`trainer`]: the step loop; [`checkpoint`]: atomic checkpoints with exact resume.
//! * [`export`]: adapter files (safetensors with metadata, the reference `mask.bin`).
//! * [`device`]: `train.device` → a burn device (`cpu`; `cuda`/`vulkan` behind cargo features).
//! * [`ddpm`]: diffusers' DDPM forward process (noise schedule, targets, SNR weights).
//! * [`objective`]: the StoryMaker losses (region-weighted noise MSE, attention-map loss).
//! * [`tensorboard`]: scalar metrics as TensorBoard event files (next to `metrics.jsonl`).
//! * [`optim`]: AdamW keyed by parameter name, global-norm clipping, learning-rate schedules.

pub mod checkpoint;
pub mod config;
pub mod ddpm;
pub mod device;
pub mod export;
pub mod model;
pub mod objective;
pub mod optim;
pub mod tensorboard;
pub mod trainer;
