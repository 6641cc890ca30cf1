//! Errors shared by the model loaders: a bad config value (file and field named) or a weight
//! file that does not match the model.

use crate::weights::WeightError;

/// A config file value this crate cannot build, with the file and field it came from.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {}{message}", if .field.is_empty() { String::new() } else { format!("field `{}` ", .field) })]
pub struct ConfigError {
    /// The config file.
    pub path: String,
    /// The field (empty when the file as a whole is unreadable).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// A problem with `field` of the config at `path`.
    pub fn new(path: &str, field: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Any failure to build or load a model component.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The config is unreadable or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights are unreadable or do not match.
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// Reads a JSON config file into `T`; errors name the file and the field (its path in the
/// JSON, via `serde_path_to_error`), with serde's line and column.
pub fn read_json_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, ModelError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WeightError::Io {
        path: shown.clone(),
        cause: source,
    })?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    Ok(serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        ConfigError::new(&shown, &field, e.into_inner().to_string())
    })?)
}
