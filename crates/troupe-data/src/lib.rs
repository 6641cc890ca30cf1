//! Troupe's data layer: the Parquet shard format, tools that write and check shards, and the
//! streaming loader that turns shards into training batches with the StoryMaker per-sample recipe.
//!
//! No burn here: batches are plain `Vec<f32>` with shapes, so this crate builds fast and can be
//! used by any trainer.

pub mod bench;
pub mod check;
pub mod error;
pub mod image_io;
pub mod import;
pub mod jpeg;
pub mod loader;
pub mod ops;
pub mod pack;
pub mod plan;
pub mod preview;
pub mod recipe;
pub mod rng;
pub mod schema;
pub mod shard;
pub mod synth;

pub use error::{DataError, Location, Result};
pub use schema::{Character, EncodedImage, Sample};
