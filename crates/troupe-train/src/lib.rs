//! Adapter training for troupe: the StoryMaker objective, optimisation, checkpoints.
//!
//! * [`config`]: the TOML run config (`--set` overrides, validation naming keys).
//! * [`trainer`]: the step loop, read top to bottom; [`records`]: metrics lines, TensorBoard
//!   events and the progress bar.
//! * [`objective`]: one micro-batch — conditioning (shared with generation, in
//!   `troupe-diffusion`), noising, the UNet with the adapter, loss assembly; [`losses`]: the
//!   StoryMaker losses (region-weighted noise MSE, attention-map loss).
//! * [`optim`]: AdamW keyed by parameter name (saves and restores itself), global-norm
//!   clipping, learning-rate schedules.
//! * [`samples`]: images rendered during training; [`validation`]: the held-out loss.
//! * [`checkpoint`]: atomic checkpoints with exact resume.
//! * [`pretrained`]: initialisation from the public IP-Adapter checkpoints.
//! * [`device`]: `train.device` → a burn device (`cpu`; `cuda`/`vulkan` behind cargo features).
//! * [`tensorboard`]: scalar metrics as TensorBoard event files (next to `metrics.jsonl`).
//!
//! The adapter module and its files live in `troupe-models` (`adapter`, `adapter_file`).

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
mod faults;
pub mod lock;
pub mod losses;
pub mod objective;
pub mod optim;
pub mod pretrained;
pub mod progress;
pub mod records;
pub mod samples;
pub mod tensorboard;
pub mod trainer;
pub mod validation;
