//! Adapter training for troupe: the StoryMaker objective, optimisation, checkpoints, export.
//!
//! * [`ddpm`]: diffusers' DDPM forward process (noise schedule, targets, SNR weights).

pub mod ddpm;
