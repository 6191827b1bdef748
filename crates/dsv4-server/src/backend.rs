//! What the scheduler needs from a model: per-sequence state it can copy (the prefix cache
//! keeps snapshots) and one batched forward over a ragged set of sequences. The CPU model is the
//! implementation here; the CUDA one (`dsv4 serve --device cuda`) lives in the CLI, which
//! links both crates.

use dsv4_core::{Logits, Model, SeqCache, SeqInput};

/// One sequence of a batched forward: its state, the tokens to append, and whether the logits
/// after the last of them are wanted.
pub struct BatchItem<'a, S> {
    pub state: &'a mut S,
    pub tokens: &'a [u32],
    pub want_logits: bool,
}

/// A model the scheduler can drive.
pub trait Backend: Send + 'static {
    /// A sequence's state (KV and compressor caches); copied for prefix-cache snapshots.
    type State: Send + 'static;

    /// Fresh state for an empty sequence (fails when its memory cannot be had).
    fn new_state(&self) -> dsv4_core::Result<Self::State>;
    /// An independent copy of `state` (a prefix-cache snapshot, or a sequence resumed from
    /// one).
    fn copy_state(&self, state: &Self::State) -> dsv4_core::Result<Self::State>;
    /// Memory held by a state (the prefix cache's budget counts this).
    fn state_bytes(&self, state: &Self::State) -> usize;
    /// Feeds every item in one pass. Returns, per item, the last token's logits when wanted
    /// (an empty vector otherwise). Must not change any state when it fails, and must give each
    /// item the same result whatever else is in the batch.
    fn forward(&self, batch: &mut [BatchItem<'_, Self::State>])
        -> dsv4_core::Result<Vec<Vec<f32>>>;
    /// Number of token ids the model accepts.
    fn vocab_size(&self) -> usize;
    /// Longest sequence (prompt + completion) served.
    fn max_context(&self) -> usize;
}

/// The CPU model.
pub struct CpuBackend {
    model: Model,
}

impl CpuBackend {
    /// Takes the model and makes its per-token arithmetic independent of the batch, so a
    /// request's output does not depend on what else is running.
    pub fn new(model: Model) -> Self {
        Self::with_invariance(model, true)
    }

    /// As [`new`](Self::new), or, with `batch_invariant` false, keeping the faster fused
    /// one-token path (a lone decode step then rounds differently from a batched one).
    pub fn with_invariance(mut model: Model, batch_invariant: bool) -> Self {
        model.batch_invariant = batch_invariant;
        CpuBackend { model }
    }
}

impl Backend for CpuBackend {
    type State = SeqCache;

    fn new_state(&self) -> dsv4_core::Result<SeqCache> {
        Ok(self.model.new_cache())
    }

    fn copy_state(&self, state: &SeqCache) -> dsv4_core::Result<SeqCache> {
        Ok(state.clone())
    }

    fn state_bytes(&self, state: &SeqCache) -> usize {
        state.bytes()
    }

    fn forward(&self, batch: &mut [BatchItem<'_, SeqCache>]) -> dsv4_core::Result<Vec<Vec<f32>>> {
        let mut seqs: Vec<SeqInput> = batch
            .iter_mut()
            .map(|b| SeqInput {
                cache: &mut *b.state,
                ids: b.tokens,
                want: if b.want_logits {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        self.model.forward_batch(&mut seqs)
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.model.config.max_position_embeddings
    }
}
