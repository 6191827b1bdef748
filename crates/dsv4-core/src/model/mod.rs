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
    /// Make every token's arithmetic independent of the other tokens in a call (the linear
    /// layers always take the tiled path, even for one token), so a sequence's output is the
    /// same alone or batched with others. Costs some single-token (decode) speed.
    pub batch_invariant: bool,
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
            batch_invariant: false,
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

    /// Feeds `ids` (appended to the sequence in `cache`) and returns the requested logits: the
    /// one-sequence case of [`forward_batch`](Self::forward_batch).
    pub fn forward(&self, cache: &mut SeqCache, ids: &[u32], want: Logits) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [SeqInput { cache, ids, want }])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Feeds a ragged batch of sequences — each its own cache, new tokens and wanted logits — in
    /// one pass: every weight is read once for all tokens of all sequences (the rows are
    /// concatenated for the linear layers, hyper-connections, norms and MoE), while attention,
    /// compressors and indexer run per sequence against its own cache. Returns each sequence's
    /// logits, in order. Every id is checked before any cache changes.
    ///
    /// With [`batch_invariant`](Self::batch_invariant) set, a token's result does not depend on
    /// which other tokens share the call (bitwise).
    pub fn forward_batch(&self, seqs: &mut [SeqInput]) -> Result<Vec<Vec<f32>>> {
        for s in seqs.iter() {
            self.check_input(s.ids)?;
        }
        let _guard = self
            .batch_invariant
            .then(crate::cpu::linear::BatchInvariant::enter);
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let l = ids.len();
        if l == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
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
        for (li, lw) in self.weights.layers.iter().enumerate() {
            let rope = match lw.kind {
                AttnKind::Sliding => &self.rope_main,
                AttnKind::Compressed { .. } => &self.rope_compress,
            };
            let (mut h, mix) = hc::pre(&lw.hc_attn, &x, l, n, iters, reps, heps);
            norm::rms_norm(&mut h, &lw.attn_norm, reps);
            let mut segs: Vec<attention::Segment> = seqs
                .iter_mut()
                .map(|s| attention::Segment {
                    pos0: s.cache.pos,
                    len: s.ids.len(),
                    cache: &mut s.cache.layers[li],
                })
                .collect();
            let a = attention::forward(c, &lw.attn, &mut segs, &h, rope, self.numerics);
            hc::post(&a, &mut x, &mix, n);

            let (mut h, mix) = hc::pre(&lw.hc_ffn, &x, l, n, iters, reps, heps);
            norm::rms_norm(&mut h, &lw.ffn_norm, reps);
            let f = moe::forward(c, &lw.moe, &h, &ids, l, self.numerics);
            hc::post(&f, &mut x, &mix, n);
        }
        // The rows whose logits are wanted, and which sequence each belongs to.
        let mut rows = Vec::new();
        let mut per_seq = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for s in seqs.iter_mut() {
            let len = s.ids.len();
            s.cache.pos += len;
            let r = match s.want {
                Logits::None => off..off,
                _ if len == 0 => off..off,
                Logits::All => off..off + len,
                Logits::Last => off + len - 1..off + len,
            };
            per_seq.push(r.len());
            rows.extend(r);
            off += len;
        }
        let m = rows.len();
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(seqs.len());
        if m == 0 {
            out.resize(seqs.len(), Vec::new());
            return Ok(out);
        }
        let xs: Vec<f32> = rows
            .iter()
            .flat_map(|&t| x[t * n * d..(t + 1) * n * d].iter().copied())
            .collect();
        let mut y = hc::head(&self.weights.hc_head, &xs, m, n, reps, heps);
        norm::rms_norm(&mut y, &self.weights.norm, reps);
        let logits = self.weights.head.apply(&y, m);
        let vocab = self.weights.head.out;
        let mut start = 0;
        for k in per_seq {
            out.push(logits[start * vocab..(start + k) * vocab].to_vec());
            start += k;
        }
        Ok(out)
    }
}

/// One sequence of a [`Model::forward_batch`] call.
pub struct SeqInput<'a> {
    pub cache: &'a mut SeqCache,
    /// New tokens, appended at `cache.pos`.
    pub ids: &'a [u32],
    pub want: Logits,
}
