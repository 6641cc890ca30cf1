//! Adapter training for troupe: the StoryMaker objective, optimisation, checkpoints, export.
//!
//! * [`ddpm`]: diffusers' DDPM forward process (noise schedule, targets, SNR weights).
//! * [`optim`]: AdamW keyed by parameter name, global-norm clipping, learning-rate schedules.

pub mod ddpm;
pub mod optim;
