//! The StoryMaker diffusion pipeline, shared by training and generation.
//!
//! * [`schedule`]: the noise schedule (diffusers' `alphas_cumprod`) and the forward process.
//! * [`samplers`]: UniPC, DDIM, Euler, Euler ancestral and DPM++ 2M, step for step as diffusers.
//! * [`conditioning`]: frozen SDXL encoders + the adapter's PPR → UNet inputs.
//! * [`control`]: pose conditioning through a frozen ControlNet.
//! * [`reference`]: a character reference (image, mask, identity) → CLIP inputs, as the
//!   reference pipeline crops them.
//! * [`pipeline`]: StoryMaker generation (CFG, sampler loop, VAE decode).
//! * [`gallery`]: atomic PNG/JSON writing and contact sheets.
//! * [`error`]: the crate's error type.

pub mod conditioning;
pub mod control;
pub mod error;
pub mod gallery;
pub mod pipeline;
pub mod reference;
pub mod samplers;
pub mod schedule;

pub use error::DiffusionError;
