//! Model components for troupe and the IO that loads their weights.
//!
//! * [`adapter`]: the StoryMaker adapter (PPR + processors on a frozen UNet) and its
//!   architecture; [`adapter_file`]: its file formats (safetensors, the reference `mask.bin`).
//! * [`tokenizer`]: the CLIP BPE tokenizer that turns SDXL prompts into the 77 token ids its
//!   two text encoders consume.
//! * [`resampler`]: perceiver resampler building blocks (burn modules).
//! * [`ppr`]: StoryMaker's PPR (`faceid_plus`) image-projection model (burn modules).
//! * [`unet`]: diffusers `UNet2DConditionModel` from its `config.json` (SD 1.x/2.x/SDXL layouts),
//!   built from [`resnet`], [`transformer`] and [`attention`] blocks; [`attention`] also holds
//!   StoryMaker's LoRA + decoupled image cross-attention processors; [`efficient_attention`]
//!   is the attention op whose backward recomputes the probabilities instead of storing them.
//! * [`vae`]: diffusers `AutoencoderKL` (encoder to a latent Gaussian, decoder) from its config.
//! * [`clip`]: transformers' CLIP text encoders (+ SDXL prompt encoding) and vision encoder.
//! * [`component`]: detect, inspect and run any component on named tensors (CLI tools).
//! * [`flops`]: FLOPs of a UNet forward pass from its config (for MFU).
//! * [`weights`]: loading PyTorch safetensors state dicts (single, sharded, f32/f16/bf16) into
//!   those modules; [`error`]: config and weight errors.

pub mod adapter;
pub mod adapter_file;
pub mod attention;
pub mod clip;
pub mod component;
pub mod controlnet;
pub mod efficient_attention;
pub mod error;
pub mod flops;
pub mod ppr;
pub mod resampler;
pub mod resnet;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod weights;
