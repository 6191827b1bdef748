//! Errors at the library boundary. Every message names what is wrong (file, tensor, field).

use std::path::PathBuf;

/// Result alias used throughout dsv4-core.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("input: {0}")]
    Input(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn tensor(name: &str, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}
