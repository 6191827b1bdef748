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
    /// A compute backend (e.g. the GPU) failed.
    #[error("{0}")]
    Backend(String),
    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat conversation that cannot be rendered into a DeepSeek-V4 prompt.
    #[error("chat messages: {0}")]
    Chat(String),
    /// Model output that does not follow the DeepSeek-V4 completion format.
    #[error("completion format: {0}")]
    CompletionFormat(String),
    /// Sampling parameters out of range.
    #[error("sampling parameters: {0}")]
    Sampling(String),
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
