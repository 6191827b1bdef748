//! dsv4-core: DeepSeek-V4 inference — config, checkpoint reading, weight formats, the model,
//! per-sequence caches, and the CPU backend.

#![recursion_limit = "256"]

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod numerics;
pub mod quant;
pub mod sampling;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
pub use engine::{Engine, EngineState};
pub use error::{Error, Result};
pub use model::{cache::SeqCache, Logits, Model, SeqInput};

/// Sets the number of CPU worker threads (call once, before any model work).
pub fn init_threads(n: usize) -> std::result::Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| e.to_string())
}
