//! The seam between generation/serving and a compute backend: anything that can create
//! per-sequence state and run a forward over it. The CPU [`Model`] is one; the CUDA backend
//! (crate `dsv4-cuda`) is another.

use crate::error::{Error, Result};
use crate::{Logits, Model, ModelConfig, SeqCache};
use std::any::Any;

/// One sequence's state in whatever form its backend keeps it.
pub type EngineState = Box<dyn Any + Send>;

/// A model ready to run forwards.
pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// Where the forwards run, for messages ("cpu (8 threads)", "cuda:0 NVIDIA H100").
    fn device(&self) -> String;
    /// Fresh state for a new sequence.
    fn new_state(&self) -> Result<EngineState>;
    /// Feeds `ids` after the tokens already in `state`; returns the requested logits.
    fn forward(&self, state: &mut EngineState, ids: &[u32], want: Logits) -> Result<Vec<f32>>;
}

impl Engine for Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn new_state(&self) -> Result<EngineState> {
        Ok(Box::new(self.new_cache()))
    }

    fn forward(&self, state: &mut EngineState, ids: &[u32], want: Logits) -> Result<Vec<f32>> {
        let cache = state
            .downcast_mut::<SeqCache>()
            .ok_or_else(|| Error::Input("sequence state of another backend".into()))?;
        Model::forward(self, cache, ids, want)
    }
}
