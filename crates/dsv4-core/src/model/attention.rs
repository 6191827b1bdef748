//! The attention block of every layer type: low-rank queries with per-head RMS norm, one shared
//! K=V head over a sliding window, plus compressed entries (all visible ones for HCA, the lightning
//! indexer's top-k for CSA), per-head sinks, de-rotation of the output, and the grouped low-rank
//! output projection.

use super::cache::{CompressorState, LayerCache};
use super::compressor;
use super::norm::{rms_norm, rms_norm_unweighted};
use super::rope::{rotate, RopeTable};
use super::weights::{AttentionWeights, IndexerWeights};
use crate::config::ModelConfig;
use crate::cpu::kernels;
use crate::cpu::linear::forward_one_many;
use crate::numerics::{self, gemm_input, hadamard, Numerics};
use rayon::prelude::*;

/// One sequence's slice of a batched attention call: its layer cache and where its new tokens
/// start.
pub struct Segment<'a> {
    pub cache: &'a mut LayerCache,
    /// Position of the segment's first new token.
    pub pos0: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// Runs attention for a ragged batch: `x` is the normed input `[L, D]` of every segment's new
/// tokens back to back (`L` = the sum of their lengths). The projections run once over all `L`
/// rows (one read of each weight for the whole batch); window, compressors, indexer and the
/// attention itself run per segment against its own cache. Returns `[L, D]`.
pub fn forward(
    c: &ModelConfig,
    w: &AttentionWeights,
    segs: &mut [Segment],
    x: &[f32],
    rope: &RopeTable,
    nm: Numerics,
) -> Vec<f32> {
    let (h, dh) = (c.num_heads, c.head_dim);
    let aq = nm.act_quant();
    let d = c.hidden_size;
    let eps = c.rms_norm_eps;
    let l: usize = segs.iter().map(|s| s.len).sum();
    let trig: Vec<(Vec<f32>, Vec<f32>)> = segs
        .iter()
        .flat_map(|s| (s.pos0..s.pos0 + s.len).map(|p| rope.cos_sin(p)))
        .collect();

    // The query latents and the shared K=V row of each new token (one token: one parallel
    // region for both).
    let hin = gemm_input(x, d, aq);
    let (mut qr, mut kv) = if l == 1 {
        let (mut qr, mut kv) = (vec![0f32; w.wq_a.out], vec![0f32; w.wkv.out]);
        forward_one_many(vec![
            (&w.wq_a, 0, &hin[..], &mut qr[..]),
            (&w.wkv, 0, &hin[..], &mut kv[..]),
        ]);
        (qr, kv)
    } else {
        (w.wq_a.apply(&hin, l), w.wkv.apply(&hin, l))
    };

    // Queries: low-rank, normed per head, rotated.
    rms_norm(&mut qr, &w.q_norm, eps);
    let qr_in = gemm_input(&qr, c.q_lora_rank, aq);
    let mut q = w.wq_b.apply(&qr_in, l);
    rms_norm_unweighted(&mut q, dh, eps);
    for (t, qt) in q.chunks_mut(h * dh).enumerate() {
        for head in qt.chunks_mut(dh) {
            rotate(head, &trig[t].0, &trig[t].1, false);
        }
    }

    // The K=V rows: normed, rotated.
    rms_norm(&mut kv, &w.kv_norm, eps);
    for (t, row) in kv.chunks_mut(dh).enumerate() {
        rotate(row, &trig[t].0, &trig[t].1, false);
    }

    let mut o = vec![0f32; l * h * dh];
    let mut off = 0;
    for seg in segs.iter_mut() {
        let r = off..off + seg.len;
        off += seg.len;
        attend(
            c,
            w,
            seg,
            &x[r.start * d..r.end * d],
            &qr_in[r.start * c.q_lora_rank..r.end * c.q_lora_rank],
            &q[r.start * h * dh..r.end * h * dh],
            &mut kv[r.start * dh..r.end * dh],
            &trig[r.clone()],
            &mut o[r.start * h * dh..r.end * h * dh],
            rope,
            nm,
        );
    }

    // Grouped low-rank output: group g's heads go through rows g·R.. of wo_a.
    let (g, rk) = (c.o_groups, c.o_lora_rank);
    let gw = h / g * dh;
    let mut z = vec![0f32; l * g * rk];
    if l == 1 {
        // One token: every group's rows in one parallel region.
        let jobs = z
            .chunks_mut(rk)
            .enumerate()
            .map(|(gi, zg)| (&w.wo_a, gi * rk, &o[gi * gw..(gi + 1) * gw], zg))
            .collect();
        forward_one_many(jobs);
    } else {
        let mut xin = vec![0f32; l * gw];
        let mut zg = vec![0f32; l * rk];
        for gi in 0..g {
            for t in 0..l {
                xin[t * gw..(t + 1) * gw]
                    .copy_from_slice(&o[t * h * dh + gi * gw..t * h * dh + (gi + 1) * gw]);
            }
            w.wo_a.forward_rows(&xin, l, gi * rk, rk, &mut zg);
            for t in 0..l {
                z[t * g * rk + gi * rk..t * g * rk + (gi + 1) * rk]
                    .copy_from_slice(&zg[t * rk..(t + 1) * rk]);
            }
        }
    }
    w.wo_b.apply(&gemm_input(&z, g * rk, aq), l)
}

/// The per-sequence part of attention for one segment: stores its K=V rows in the window,
/// updates the compressors, selects compressed entries, and writes the per-head outputs
/// (de-rotated) into `o` `[len, H·dh]`.
#[allow(clippy::too_many_arguments)] // the segment's slices of the batch; a struct would only rename them
fn attend(
    c: &ModelConfig,
    w: &AttentionWeights,
    seg: &mut Segment,
    x: &[f32],
    qr_in: &[f32],
    q: &[f32],
    kv: &mut [f32],
    trig: &[(Vec<f32>, Vec<f32>)],
    o: &mut [f32],
    rope: &RopeTable,
    nm: Numerics,
) {
    let (h, dh) = (c.num_heads, c.head_dim);
    let eps = c.rms_norm_eps;
    let (l, pos0) = (seg.len, seg.pos0);
    let cache = &mut *seg.cache;
    // The row is key and value as stored (official profile: FP8 nope channels).
    for row in kv.chunks_mut(dh) {
        cache.window.round(row);
    }

    // Local keys: cached window rows (positions k0..pos0) followed by the new rows.
    let win = c.sliding_window;
    let k0 = pos0.saturating_sub(win - 1);
    cache.window.reserve_rows(win);
    let mut local = cache.window.gather((k0..pos0).map(|p| p % win));
    local.extend_from_slice(kv);
    for t in l.saturating_sub(win)..l {
        cache
            .window
            .set((pos0 + t) % win, &kv[t * dh..(t + 1) * dh]);
    }

    // Compressed entries and, per query, which of them it attends to.
    let mut entries: &[f32] = &[];
    let decoded;
    let mut selected: Vec<Vec<usize>> = vec![Vec::new(); l];
    if let Some(cw) = &w.compressor {
        let st = cache
            .compressor
            .as_mut()
            .expect("compressed layers have compressor state");
        compressor::update(cw, st, x, l, rope, eps);
        let m = cw.ratio;
        if let Some(ix) = &w.indexer {
            let ist = cache
                .indexer
                .as_mut()
                .expect("CSA layers have indexer state");
            compressor::update(&ix.compressor, ist, x, l, rope, eps);
            selected = indexer_topk(c, ix, ist, x, qr_in, l, pos0, trig, nm);
        } else {
            for (t, sel) in selected.iter_mut().enumerate() {
                *sel = (0..(pos0 + t + 1) / m).collect();
            }
        }
        let store = &cache.compressor.as_ref().expect("compressor state").entries;
        entries = match store.as_f32() {
            Some(e) => e,
            None => {
                decoded = store.gather(0..store.len());
                &decoded
            }
        };
    }

    // Attention per (token, head), in parallel.
    let scale = 1.0 / (dh as f32).sqrt();
    o.par_chunks_mut(dh).enumerate().for_each(|(i, out)| {
        let (t, hd) = (i / h, i % h);
        let p = pos0 + t;
        let qv = &q[(t * h + hd) * dh..(t * h + hd + 1) * dh];
        let lo = p.saturating_sub(win - 1).max(k0) - k0;
        let hi = p - k0; // inclusive
        let keys = (lo..=hi)
            .map(|j| &local[j * dh..(j + 1) * dh])
            .chain(selected[t].iter().map(|&e| &entries[e * dh..(e + 1) * dh]));
        let logits: Vec<f32> = keys
            .clone()
            .map(|k| kernels::dot_f32(qv, k) * scale)
            .collect();
        let sink = w.sinks[hd];
        let mx = logits.iter().cloned().fold(sink, f32::max);
        let mut den = (sink - mx).exp();
        for (s, k) in logits.iter().zip(keys) {
            let pr = (s - mx).exp();
            den += pr;
            kernels::axpy(pr, k, out);
        }
        let inv = 1.0 / den;
        out.iter_mut().for_each(|v| *v *= inv);
        rotate(out, &trig[t].0, &trig[t].1, true);
    });
}

/// Lightning indexer: scores every visible compressed entry for each query and keeps the
/// `index_topk` best (ties → lower index). Returns the selected entry indices per query.
#[allow(clippy::too_many_arguments)]
fn indexer_topk(
    c: &ModelConfig,
    ix: &IndexerWeights,
    st: &CompressorState,
    x: &[f32],
    qr: &[f32],
    l: usize,
    pos0: usize,
    trig: &[(Vec<f32>, Vec<f32>)],
    nm: Numerics,
) -> Vec<Vec<usize>> {
    let (hi, di) = (c.index_n_heads, c.index_head_dim);
    let m = ix.compressor.ratio;
    let mut qi = ix.wq_b.apply(qr, l);
    for (t, qt) in qi.chunks_mut(hi * di).enumerate() {
        for head in qt.chunks_mut(di) {
            rotate(head, &trig[t].0, &trig[t].1, false);
            // Official profile: queries rotated and rounded like the stored keys.
            if nm.is_official() {
                hadamard(head);
                numerics::fp4_round_trip(head, numerics::FP4_BLOCK);
            }
        }
    }
    let keys_buf;
    let keys: &[f32] = match st.entries.as_f32() {
        Some(k) => k,
        None => {
            keys_buf = st.entries.gather(0..st.entries.len());
            &keys_buf
        }
    };
    let hw = ix.weights_proj.apply(x, l);
    let (wscale, dscale) = (1.0 / (hi as f32).sqrt(), 1.0 / (di as f32).sqrt());
    (0..l)
        .into_par_iter()
        .map(|t| {
            let valid = ((pos0 + t + 1) / m).min(st.entries.len());
            if valid <= c.index_topk {
                return (0..valid).collect();
            }
            let mut scored: Vec<(f32, usize)> = (0..valid)
                .map(|e| {
                    let ev = &keys[e * di..(e + 1) * di];
                    let s: f32 = (0..hi)
                        .map(|hh| {
                            let dotp = kernels::dot_f32(
                                &qi[(t * hi + hh) * di..(t * hi + hh + 1) * di],
                                ev,
                            );
                            hw[t * hi + hh] * wscale * dotp.max(0.0) * dscale
                        })
                        .sum();
                    (s, e)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut sel: Vec<usize> = scored[..c.index_topk].iter().map(|&(_, e)| e).collect();
            sel.sort_unstable();
            sel
        })
        .collect()
}
