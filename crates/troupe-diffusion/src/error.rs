//! The crate's one error type: a model that does not load, or an input (file and field named)
//! that cannot be used.

use troupe_models::error::{ConfigError, ModelError};
use troupe_models::tokenizer::TokenizerError;
use troupe_models::weights::WeightError;

use crate::samplers::SamplerError;
use crate::schedule::SchedulerError;

/// Anything that stops conditioning or generation.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A model component does not load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tokenizer folder does not load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The scheduler config cannot be read.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A sampler setting cannot be used.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// An input that cannot be used, naming the file (or argument) and field.
    #[error(transparent)]
    Input(#[from] ConfigError),
}

impl DiffusionError {
    /// A problem with `field` of the input `path`.
    pub fn input(path: &str, field: &str, message: impl Into<String>) -> Self {
        Self::Input(ConfigError::new(path, field, message))
    }
}

impl From<WeightError> for DiffusionError {
    fn from(e: WeightError) -> Self {
        Self::Model(e.into())
    }
}
