//! Shared items `cubecl-cuda` names.

pub mod lowered_features;
