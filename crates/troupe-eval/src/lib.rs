//! Evaluation for troupe: scoring generated images the way the Python stacks score them, so
//! numbers are comparable with papers and reproducible on the machine that trained.
//!
//! * [`clip_score`]: CLIP-T (image ↔ caption) and CLIP-I (image ↔ reference image) with a
//!   transformers `CLIPModel` folder, preprocessing as its `CLIPImageProcessor`.
//! * [`matching`]: generated faces ↔ subjects (greedy on similarity) and the no-face / negative
//!   score conventions.

pub mod clip_score;
pub mod matching;
