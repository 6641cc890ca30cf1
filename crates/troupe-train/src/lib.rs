//! Adapter training for troupe: the StoryMaker objective, optimisation, checkpoints, export.
//!
//! * [`ddpm`]: diffusers' DDPM forward process (noise schedule, targets, SNR weights).
//! * [`objective`]: the StoryMaker losses (region-weighted noise MSE, attention-map loss).
//! * [`optim`]: AdamW keyed by parameter name, global-norm clipping, learning-rate schedules.

pub mod ddpm;
pub mod objective;
pub mod optim;
