//! The DeepSeek-V4 decoder on the CPU, in f32 with weights dequantized inside the kernels.

pub mod attention;
pub mod cache;
pub mod compressor;
pub mod hc;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod weights;

use crate::checkpoint::Checkpoint;
use crate::config::{AttnKind, ModelConfig};
use crate::error::{Error, Result};
use crate::numerics::Numerics;
use cache::{CompressorState, LayerCache, RowFormat, RowStore, SeqCache};
use rope::RopeTable;
use weights::ModelWeights;

/// Which rows of logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token (`[l, vocab]`).
    All,
    /// Only the last token's row (`[vocab]`): what generation needs.
    Last,
    /// No logits (prefill of a prefix whose continuation is fed next).
    None,
}

/// A loaded model: config, weights (borrowing the mapped checkpoint) and RoPE tables.
pub struct Model {
    pub config: ModelConfig,
    /// Which arithmetic and cache formats forwards use (set before creating caches).
    pub numerics: Numerics,
    pub weights: ModelWeights,
    rope_main: RopeTable,
    rope_compress: RopeTable,
}

impl Model {
    /// Validates and binds every weight of an opened checkpoint.
    pub fn load(ck: &Checkpoint) -> Result<Self> {
        let weights = ModelWeights::load(ck)?;
        Ok(Self::from_parts(ck.config.clone(), weights))
    }

    pub fn from_parts(config: ModelConfig, weights: ModelWeights) -> Self {
        Model {
            numerics: Numerics::Reference,
            rope_main: RopeTable::new(&config.rope_main, config.rope_dim),
            rope_compress: RopeTable::new(&config.rope_compress, config.rope_dim),
            config,
            weights,
        }
    }

    /// Fresh state for a new sequence.
    pub fn new_cache(&self) -> SeqCache {
        let c = &self.config;
        let official = self.numerics.is_official();
        let kv = if official {
            RowFormat::Fp8Nope { rope: c.rope_dim }
        } else {
            RowFormat::F32
        };
        let idx = if official {
            RowFormat::Fp4
        } else {
            RowFormat::F32
        };
        let layers = c
            .attn_kinds
            .iter()
            .map(|k| LayerCache {
                window: RowStore::new(c.head_dim, kv),
                compressor: k
                    .ratio()
                    .map(|_| CompressorState::new(RowStore::new(c.head_dim, kv))),
                indexer: k
                    .is_csa()
                    .then(|| CompressorState::new(RowStore::new(c.index_head_dim, idx))),
            })
            .collect();
        SeqCache { pos: 0, layers }
    }

    /// Checks token ids before any state changes. (`max_position_embeddings` is the trained
    /// context, not an architectural limit — transformers runs past it; generation sessions
    /// enforce it.)
    pub fn check_input(&self, ids: &[u32]) -> Result<()> {
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range (vocabulary size {})",
                c.vocab_size
            )));
        }
        Ok(())
    }

    /// Feeds `ids` (appended to the sequence in `cache`) and returns the requested logits.
    pub fn forward(&self, cache: &mut SeqCache, ids: &[u32], want: Logits) -> Result<Vec<f32>> {
        self.check_input(ids)?;
        let c = &self.config;
        let (l, d, n) = (ids.len(), c.hidden_size, c.hc_mult);
        if l == 0 {
            return Ok(Vec::new());
        }
        let pos0 = cache.pos;
        // n identical streams of the embedding.
        let mut x = vec![0f32; l * n * d];
        let mut row = vec![0f32; d];
        for (t, &id) in ids.iter().enumerate() {
            self.weights.embed.row_f32(id as usize, &mut row);
            for s in 0..n {
                x[(t * n + s) * d..(t * n + s + 1) * d].copy_from_slice(&row);
            }
        }
        let (iters, reps, heps) = (c.hc_sinkhorn_iters, c.rms_norm_eps, c.hc_eps);
        for (lw, lc) in self.weights.layers.iter().zip(cache.layers.iter_mut()) {
            let rope = match lw.kind {
                AttnKind::Sliding => &self.rope_main,
                AttnKind::Compressed { .. } => &self.rope_compress,
            };
            let (mut h, mix) = hc::pre(&lw.hc_attn, &x, l, n, iters, reps, heps);
            norm::rms_norm(&mut h, &lw.attn_norm, reps);
            let a = attention::forward(c, &lw.attn, lc, &h, l, pos0, rope, self.numerics);
            hc::post(&a, &mut x, &mix, n);

            let (mut h, mix) = hc::pre(&lw.hc_ffn, &x, l, n, iters, reps, heps);
            norm::rms_norm(&mut h, &lw.ffn_norm, reps);
            let f = moe::forward(c, &lw.moe, &h, ids, l, self.numerics);
            hc::post(&f, &mut x, &mix, n);
        }
        cache.pos += l;
        let rows = match want {
            Logits::None => return Ok(Vec::new()),
            Logits::All => 0..l,
            Logits::Last => l - 1..l,
        };
        let xs = &x[rows.start * n * d..rows.end * n * d];
        let m = rows.len();
        let mut y = hc::head(&self.weights.hc_head, xs, m, n, reps, heps);
        norm::rms_norm(&mut y, &self.weights.norm, reps);
        Ok(self.weights.head.apply(&y, m))
    }
}
