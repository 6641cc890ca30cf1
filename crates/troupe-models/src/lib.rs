//! Model components for troupe and the IO that loads their weights.
//!
//! For now this holds the CLIP BPE tokenizer that turns SDXL prompts into the 77 token ids its
//! two text encoders consume ([`tokenizer`]); the network modules and weight loading follow.

pub mod tokenizer;
