//! Model components for troupe and the IO that loads their weights.
//!
//! * [`tokenizer`]: the CLIP BPE tokenizer that turns SDXL prompts into the 77 token ids its
//!   two text encoders consume.
//! * [`resampler`]: perceiver resampler building blocks (burn modules).
//! * [`ppr`]: StoryMaker's PPR (`faceid_plus`) image-projection model (burn modules).
//! * [`weights`]: loading PyTorch safetensors state dicts into those modules.

pub mod ppr;
pub mod resampler;
pub mod tokenizer;
pub mod weights;
