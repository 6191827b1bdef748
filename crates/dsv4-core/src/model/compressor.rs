//! The KV compressor: every `ratio` tokens, softmax-pool the projected rows of one window (per
//! channel, gate logits + slot bias `ape`) into one entry, RMS-normalize it and rotate it at the
//! window's first position. CSA (ratio 4) pools 2·ratio slots: the previous window's first halves
//! and this window's second halves. The same code serves the main and the indexer compressor.

use super::cache::{CompressorState, RowFormat};
use super::norm::rms_norm;
use super::rope::{rotate, RopeTable};
use super::weights::CompressorWeights;
use crate::numerics::hadamard;

/// Feeds `l` new tokens (`x` `[l, D]`, normed hidden states) and emits every window completed by
/// them into `st.entries`. Returns the number of new entries.
pub fn update(
    w: &CompressorWeights,
    st: &mut CompressorState,
    x: &[f32],
    l: usize,
    rope: &RopeTable,
    eps: f32,
) -> usize {
    let width = w.wkv.out;
    st.buf_kv.extend_from_slice(&w.wkv.apply(x, l));
    st.buf_gate.extend_from_slice(&w.wgate.apply(x, l));
    let m = w.ratio;
    let d = w.dim;
    let mut emitted = 0;
    while st.buf_kv.len() >= m * width {
        let kv: Vec<f32> = st.buf_kv.drain(..m * width).collect();
        let mut gate: Vec<f32> = st.buf_gate.drain(..m * width).collect();
        for (s, g) in gate.chunks_mut(width).enumerate() {
            g.iter_mut()
                .zip(&w.ape[s * width..(s + 1) * width])
                .for_each(|(g, a)| *g += a);
        }
        // Slots (kv, gate) per channel: [previous A-halves] ++ [this window's (B-)halves].
        let half = if w.overlap { d } else { 0 };
        let mut entry = vec![0f32; d];
        let mut logits = Vec::with_capacity(2 * m);
        let mut vals = Vec::with_capacity(2 * m);
        for (c, e) in entry.iter_mut().enumerate() {
            logits.clear();
            vals.clear();
            if let (true, Some((okv, og))) = (w.overlap, &st.overlap) {
                for s in 0..m {
                    logits.push(og[s * d + c]);
                    vals.push(okv[s * d + c]);
                }
            }
            for s in 0..m {
                logits.push(gate[s * width + half + c]);
                vals.push(kv[s * width + half + c]);
            }
            let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut den = 0f32;
            let mut num = 0f32;
            for (g, v) in logits.iter().zip(&vals) {
                let p = (g - mx).exp();
                den += p;
                num += p * v;
            }
            *e = num / den;
        }
        if w.overlap {
            let take = |buf: &[f32]| -> Vec<f32> {
                (0..m)
                    .flat_map(|s| buf[s * width..s * width + d].to_vec())
                    .collect()
            };
            st.overlap = Some((take(&kv), take(&gate)));
        }
        rms_norm(&mut entry, &w.norm, eps);
        let (cos, sin) = rope.cos_sin(st.entries.len() * m);
        rotate(&mut entry, &cos, &sin, false);
        // Official profile: indexer keys are kept Hadamard-rotated in FP4, main entries with
        // FP8 nope channels (the store's format says which).
        if st.entries.format == RowFormat::Fp4 {
            hadamard(&mut entry);
        }
        st.entries.round(&mut entry);
        st.entries.push(&entry);
        emitted += 1;
    }
    emitted
}
