//! The DeepSeek-V4 forward on one GPU: the CPU model's layer loop (`dsv4_core::model`) with
//! every op a kernel over device buffers. Host work per call is bookkeeping (positions, window
//! counts), except prefill MoE, which reads the routing back once per layer to group tokens by
//! expert.

use crate::gpu::{DevBuf, Gpu};
use crate::ops::{self, AttnArgs, LinIn, MoeArgs, Partial, Pos, RopeDev};
use crate::state::{CompState, GpuSeq, LayerState};
use crate::weights::{GpuCompressor, GpuHc, GpuLayer, GpuRouter, GpuVec, GpuWeights};
use crate::{Error, Result};
use dsv4_core::config::AttnKind;
use dsv4_core::model::rope::RopeTable;
use dsv4_core::{Engine, EngineState, Logits, Model, ModelConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Tokens per internal forward chunk: bounds the activation scratch (chunked prefill gives the
/// one-call logits, so the split is invisible).
const MAX_CHUNK: usize = 2048;
/// Above this many (token, expert) pairs (and 8 per expert), prefill groups pairs by expert on
/// the host.
const GROUP_PAIRS: usize = 64;
/// Keys per staged chunk and heads per block of `attention_partial` (kernels/attention.cu).
const ATT_KEYS: usize = 32;
const ATT_HEADS: usize = 8;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// One sequence of a batched forward: its state, the tokens to append, the logits wanted.
pub struct BatchItem<'a> {
    pub seq: &'a mut GpuSeq,
    pub ids: &'a [u32],
    pub want: Logits,
}

/// Where a sequence's tokens sit in a batched call.
struct Seg {
    start: usize,
    len: usize,
    pos0: usize,
}

/// Activation buffers for up to `cap` tokens of one call.
struct Scratch {
    cap: usize,
    ids: DevBuf,
    positions: DevBuf,
    x: DevBuf,
    xg: DevBuf,
    cproj_kv: DevBuf,
    cproj_gate: DevBuf,
    iproj_kv: DevBuf,
    iproj_gate: DevBuf,
    h: DevBuf,
    f: DevBuf,
    mu: DevBuf,
    rinv: DevBuf,
    pre: DevBuf,
    post: DevBuf,
    comb: DevBuf,
    qr: DevBuf,
    q: DevBuf,
    kv: DevBuf,
    o: DevBuf,
    z: DevBuf,
    ext_kv: DevBuf,
    ext_gate: DevBuf,
    qi: DevBuf,
    hw: DevBuf,
    sel: DevBuf,
    nsel: DevBuf,
    logits_e: DevBuf,
    picks: DevBuf,
    rw: DevBuf,
    eh: DevBuf,
    eout: DevBuf,
    sg: DevBuf,
    su: DevBuf,
    tiles: DevBuf,
    partial: DevBuf,
    counters: DevBuf,
    scores: DevBuf,
    scores_floats: usize,
    attn_part: DevBuf,
    out_logits: DevBuf,
}

impl Scratch {
    fn new(gpu: &Gpu, c: &ModelConfig, cap: usize, max_ratio: usize) -> Result<Self> {
        let f = |n: usize| gpu.alloc(n * 4);
        let (d, n, h, dh) = (c.hidden_size, c.hc_mult, c.num_heads, c.head_dim);
        let k = c.num_experts_per_tok;
        let inter = c.moe_intermediate_size;
        let width = 2 * dh.max(c.index_head_dim);
        let ext_rows = 2 * max_ratio + cap;
        let pairs = cap * k;
        let e_count = c.n_routed_experts;
        Ok(Scratch {
            cap,
            ids: f(cap)?,
            positions: f(cap)?,
            x: f(cap * n * d)?,
            xg: f(cap * n * d)?,
            cproj_kv: f(cap * 2 * dh)?,
            cproj_gate: f(cap * 2 * dh)?,
            iproj_kv: f(cap * 2 * c.index_head_dim)?,
            iproj_gate: f(cap * 2 * c.index_head_dim)?,
            h: f(cap * d)?,
            f: f(cap * d)?,
            mu: f(cap * (2 + n) * n)?,
            rinv: f(cap)?,
            pre: f(cap * n)?,
            post: f(cap * n)?,
            comb: f(cap * n * n)?,
            qr: f(cap * c.q_lora_rank)?,
            q: f(cap * h * dh)?,
            kv: f(cap * dh)?,
            o: f(cap * h * dh)?,
            z: f(cap * c.o_groups * c.o_lora_rank)?,
            ext_kv: f(ext_rows * width)?,
            ext_gate: f(ext_rows * width)?,
            qi: f(cap * c.index_n_heads * c.index_head_dim)?,
            hw: f(cap * c.index_n_heads)?,
            sel: f(cap * c.index_topk.max(1))?,
            nsel: f(cap)?,
            logits_e: f(cap * c.n_routed_experts)?,
            picks: f(pairs)?,
            rw: f(pairs)?,
            eh: f(pairs * inter)?,
            eout: f(pairs * d)?,
            sg: f(cap * inter)?,
            su: f(cap * inter)?,
            tiles: f(2 * (pairs + e_count) + 64 * (pairs + e_count))?,
            partial: f(1 << 22)?,
            counters: gpu.alloc_zeros(4 << 16)?,
            scores: f(1 << 24)?,
            scores_floats: 1 << 24,
            attn_part: f(cap.max(64) * h * (dh + 2))?,
            out_logits: f(cap * c.vocab_size)?,
        })
    }
}

/// A model whose weights live on one GPU.
pub struct CudaModel {
    pub gpu: Arc<Gpu>,
    pub config: ModelConfig,
    pub weights: GpuWeights,
    rope_main: (GpuVec, f32),
    rope_compress: (GpuVec, f32),
    scratch: Mutex<Option<Scratch>>,
    id: usize,
}

impl CudaModel {
    /// Uploads a loaded (validated) model to GPU `ordinal`.
    pub fn from_model(model: &Model, ordinal: usize) -> Result<Self> {
        let src: Vec<usize> = (0..model.config.num_layers).collect();
        Self::from_model_layers(model, ordinal, model.config.clone(), &src, |_, _| {})
    }

    /// Uploads with GPU layer `i` taken from host layer `src[i]` and `config` describing the
    /// result (a synthetic Flash/Pro built from a few distinct host layers).
    pub fn from_model_layers(
        model: &Model,
        ordinal: usize,
        config: ModelConfig,
        src: &[usize],
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        if model.numerics.is_official() {
            return Err(Error::Unsupported(
                "the official numerics profile (FP8 K/V cache, FP4 indexer) runs on the CPU only \
                 for now; use --numerics reference"
                    .into(),
            ));
        }
        if config.hc_mult * config.hc_mult > 32 {
            return Err(Error::Unsupported(format!(
                "hc_mult {} (the hyper-connection kernel holds n·n ≤ 32 weights)",
                config.hc_mult
            )));
        }
        if !config.head_dim.is_multiple_of(4) || config.head_dim > 512 {
            return Err(Error::Unsupported(format!(
                "head_dim {} (the attention kernel takes multiples of 4 up to 512)",
                config.head_dim
            )));
        }
        let gpu = Gpu::open(ordinal)?;
        let weights =
            GpuWeights::upload(&gpu, &model.weights, &model.config.mlp_kinds, src, progress)?;
        let rope = |spec| -> Result<(GpuVec, f32)> {
            let t = RopeTable::new(spec, config.rope_dim);
            Ok((GpuVec::upload(&gpu, &t.inv_freq)?, t.attention_factor))
        };
        let rope_main = rope(&config.rope_main)?;
        let rope_compress = rope(&config.rope_compress)?;
        gpu.sync()?;
        Ok(CudaModel {
            rope_main,
            rope_compress,
            weights,
            config,
            scratch: Mutex::new(None),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            gpu,
        })
    }

    pub fn new_seq(&self) -> Result<GpuSeq> {
        GpuSeq::new(
            &self.gpu,
            &self.weights,
            self.config.sliding_window,
            self.config.head_dim,
            self.id,
        )
    }

    fn max_ratio(&self) -> usize {
        self.config
            .attn_kinds
            .iter()
            .filter_map(|k| k.ratio())
            .max()
            .unwrap_or(1)
    }

    /// Feeds `ids` after the tokens in `seq`; returns the requested logits (`[rows, vocab]`).
    /// Long inputs run in chunks of at most `MAX_CHUNK` tokens.
    pub fn forward(&self, seq: &mut GpuSeq, ids: &[u32], want: Logits) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = ids.chunks(MAX_CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let want = match want {
                Logits::Last if i + 1 < chunks.len() => Logits::None,
                w => w,
            };
            let mut items = [BatchItem {
                seq: &mut *seq,
                ids: chunk,
                want,
            }];
            out.extend(self.forward_batch(&mut items)?.into_iter().flatten());
        }
        Ok(out)
    }

    /// Feeds several sequences in one pass: every weight is read once for all their tokens;
    /// attention, compressors and the indexer run per sequence against its own state. Returns
    /// each item's logits (`[rows, vocab]`, empty for `Logits::None`). Inputs are checked before
    /// any state changes.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.config.vocab_size;
        for it in items.iter() {
            if it.seq.owner != self.id {
                return Err(Error::Unsupported(
                    "a sequence state created by another model".into(),
                ));
            }
            if let Some(&bad) = it.ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(dsv4_core::Error::Input(format!(
                    "token id {bad} is out of range (vocabulary size {vocab})"
                ))
                .into());
            }
        }
        let total: usize = items.iter().map(|it| it.ids.len()).sum();
        if total > MAX_CHUNK {
            return items
                .iter_mut()
                .map(|it| self.forward(it.seq, it.ids, it.want))
                .collect();
        }
        if total == 0 {
            return Ok(vec![Vec::new(); items.len()]);
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|s| s.cap < total) {
            *guard = None; // free the old buffers first
            let cap = total.next_power_of_two().max(8);
            *guard = Some(Scratch::new(
                &self.gpu,
                &self.config,
                cap,
                self.max_ratio(),
            )?);
        }
        let s = guard.as_mut().expect("allocated above");
        self.run_batch(s, items, total)
    }

    fn part(s: &Scratch) -> Partial {
        Partial {
            ptr: s.partial.ptr,
            floats: s.partial.bytes / 4,
            counters: s.counters.ptr,
            n_counters: s.counters.bytes / 4,
        }
    }

    fn run_batch(
        &self,
        s: &mut Scratch,
        items: &mut [BatchItem<'_>],
        t: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let g = &*self.gpu;
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let mut segs = Vec::with_capacity(items.len());
        let (mut ids, mut positions) = (Vec::with_capacity(t), Vec::with_capacity(t));
        for it in items.iter() {
            let pos0 = it.seq.pos;
            segs.push(Seg {
                start: ids.len(),
                len: it.ids.len(),
                pos0,
            });
            ids.extend_from_slice(it.ids);
            positions.extend((pos0..pos0 + it.ids.len()).map(|p| p as i32));
        }
        g.htod(s.ids.ptr, &ids)?;
        g.htod(s.positions.ptr, &positions)?;
        let nn = n as i32;
        g.launch(
            "embed",
            (t as u32, 1, 1),
            (256, 1, 1),
            0,
            &[&self.weights.embed.desc, &s.ids.ptr, &s.x.ptr, &nn],
        )?;
        for (li, lw) in self.weights.layers.iter().enumerate() {
            self.hc_pre(s, &lw.hc_attn, t)?;
            ops::rms_norm(g, s.h.ptr, lw.attn_norm.ptr(), d, t, c.rms_norm_eps)?;
            self.attention(s, lw, li, items, &segs, t)?;
            self.hc_post(s, t)?;
            self.hc_pre(s, &lw.hc_ffn, t)?;
            ops::rms_norm(g, s.h.ptr, lw.ffn_norm.ptr(), d, t, c.rms_norm_eps)?;
            self.moe(s, lw, t)?;
            self.hc_post(s, t)?;
        }
        for (it, seg) in items.iter_mut().zip(&segs) {
            it.seq.pos += seg.len;
        }
        // The wanted rows, gathered so the head runs once for all of them.
        let mut rows = Vec::new();
        for (it, seg) in items.iter().zip(&segs) {
            match it.want {
                Logits::All => rows.extend(seg.start..seg.start + seg.len),
                Logits::Last if seg.len > 0 => rows.push(seg.start + seg.len - 1),
                _ => {}
            }
        }
        if rows.is_empty() {
            g.sync()?;
            return Ok(vec![Vec::new(); items.len()]);
        }
        let m = rows.len();
        let row_floats = n * d;
        let xs = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
            s.x.at::<f32>(rows[0] * row_floats)
        } else {
            for (i, &r) in rows.iter().enumerate() {
                g.dtod(
                    s.xg.at::<f32>(i * row_floats),
                    s.x.at::<f32>(r * row_floats),
                    row_floats * 4,
                )?;
            }
            s.xg.ptr
        };
        let logits = self.head(s, xs, m)?;
        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(items.len());
        let mut next = 0;
        for (it, seg) in items.iter().zip(&segs) {
            let k = match it.want {
                Logits::All => seg.len,
                Logits::Last if seg.len > 0 => 1,
                _ => 0,
            };
            out.push(logits[next * vocab..(next + k) * vocab].to_vec());
            next += k;
        }
        Ok(out)
    }

    /// Hyper-head, final norm and the vocabulary projection of `m` stream rows at `xs`.
    fn head(&self, s: &Scratch, xs: u64, m: usize) -> Result<Vec<f32>> {
        let g = &*self.gpu;
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let hh = &self.weights.hc_head;
        ops::inv_rms(g, xs, s.rinv.ptr, n * d, m, c.rms_norm_eps)?;
        ops::linear(
            g,
            &hh.fn_,
            &LinIn::rows(xs, n * d, m),
            s.mu.ptr,
            n,
            &Self::part(s),
        )?;
        let (ni, di, ti, eps) = (n as i32, d as i32, m as i32, c.hc_eps);
        ops::elementwise(
            g,
            "hc_head",
            m * d,
            &[
                &xs,
                &s.mu.ptr,
                &s.rinv.ptr,
                &hh.base.ptr(),
                &hh.scale.ptr(),
                &s.h.ptr,
                &ni,
                &di,
                &eps,
                &ti,
            ],
        )?;
        ops::rms_norm(g, s.h.ptr, self.weights.norm.ptr(), d, m, c.rms_norm_eps)?;
        let vocab = c.vocab_size;
        ops::linear(
            g,
            &self.weights.head,
            &LinIn::rows(s.h.ptr, d, m),
            s.out_logits.ptr,
            vocab,
            &Self::part(s),
        )?;
        let mut out = vec![0f32; m * vocab];
        g.dtoh(s.out_logits.ptr, &mut out)?;
        Ok(out)
    }

    /// Collapses the streams in `s.x` into `s.h`; the mix goes to `s.pre/post/comb`.
    fn hc_pre(&self, s: &Scratch, hc: &GpuHc, t: usize) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        ops::inv_rms(g, s.x.ptr, s.rinv.ptr, n * d, t, c.rms_norm_eps)?;
        let rows = (2 + n) * n;
        ops::linear(
            g,
            &hc.fn_,
            &LinIn::rows(s.x.ptr, n * d, t),
            s.mu.ptr,
            rows,
            &Self::part(s),
        )?;
        let (ni, it, eps, ti, di) = (
            n as i32,
            c.hc_sinkhorn_iters as i32,
            c.hc_eps,
            t as i32,
            d as i32,
        );
        g.launch(
            "hc_mix",
            (t as u32, 1, 1),
            (32, 1, 1),
            0,
            &[
                &s.mu.ptr,
                &s.rinv.ptr,
                &hc.base.ptr(),
                &hc.scale.ptr(),
                &s.pre.ptr,
                &s.post.ptr,
                &s.comb.ptr,
                &ni,
                &it,
                &eps,
                &ti,
            ],
        )?;
        ops::elementwise(
            g,
            "hc_collapse",
            t * d,
            &[&s.x.ptr, &s.pre.ptr, &s.h.ptr, &ni, &di, &ti],
        )
    }

    /// Mixes the block output `s.f` back into the streams `s.x`.
    fn hc_post(&self, s: &Scratch, t: usize) -> Result<()> {
        let c = &self.config;
        let (ni, di, ti) = (c.hc_mult as i32, c.hidden_size as i32, t as i32);
        ops::elementwise(
            &self.gpu,
            "hc_post",
            t * c.hidden_size,
            &[&s.f.ptr, &s.x.ptr, &s.post.ptr, &s.comb.ptr, &ni, &di, &ti],
        )
    }

    fn rope_dev(&self, kind: AttnKind) -> RopeDev {
        let (v, factor) = match kind {
            AttnKind::Sliding => &self.rope_main,
            AttnKind::Compressed { .. } => &self.rope_compress,
        };
        RopeDev {
            inv_freq: v.ptr(),
            half: self.config.rope_dim / 2,
            factor: *factor,
        }
    }

    /// Attention of the batch's tokens: reads `s.h`, writes `s.f`. Projections, norms and RoPE
    /// run over all tokens; compressors, indexer, attention and the window ring per sequence.
    fn attention(
        &self,
        s: &mut Scratch,
        lw: &GpuLayer,
        li: usize,
        items: &mut [BatchItem<'_>],
        segs: &[Seg],
        t: usize,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let a = &lw.attn;
        let (d, h, dh) = (c.hidden_size, c.num_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        let rope = self.rope_dev(lw.kind);
        let part = Self::part(s);
        let hin = LinIn::rows(s.h.ptr, d, t);
        let pos = Pos::Table(s.positions.ptr);

        ops::linear(g, &a.wq_a, &hin, s.qr.ptr, c.q_lora_rank, &part)?;
        ops::rms_norm(g, s.qr.ptr, a.q_norm.ptr(), c.q_lora_rank, t, eps)?;
        let qrin = LinIn::rows(s.qr.ptr, c.q_lora_rank, t);
        ops::linear(g, &a.wq_b, &qrin, s.q.ptr, h * dh, &part)?;
        ops::rms_norm(g, s.q.ptr, 0, dh, t * h, eps)?;
        ops::rope(g, s.q.ptr, t * h, dh, h, &rope, pos, false)?;

        ops::linear(g, &a.wkv, &hin, s.kv.ptr, dh, &part)?;
        ops::rms_norm(g, s.kv.ptr, a.kv_norm.ptr(), dh, t, eps)?;
        ops::rope(g, s.kv.ptr, t, dh, 1, &rope, pos, false)?;

        // Compressor and indexer projections for every token at once.
        if let Some(cw) = &a.compressor {
            ops::linear(g, &cw.wkv, &hin, s.cproj_kv.ptr, cw.wkv.out, &part)?;
            ops::linear(g, &cw.wgate, &hin, s.cproj_gate.ptr, cw.wgate.out, &part)?;
        }
        if let Some(ix) = &a.indexer {
            let (hi, di) = (c.index_n_heads, c.index_head_dim);
            let ic = &ix.compressor;
            ops::linear(g, &ic.wkv, &hin, s.iproj_kv.ptr, ic.wkv.out, &part)?;
            ops::linear(g, &ic.wgate, &hin, s.iproj_gate.ptr, ic.wgate.out, &part)?;
            ops::linear(g, &ix.wq_b, &qrin, s.qi.ptr, hi * di, &part)?;
            ops::rope(g, s.qi.ptr, t * hi, di, hi, &rope, pos, false)?;
            ops::linear(g, &ix.weights_proj, &hin, s.hw.ptr, hi, &part)?;
        }

        for (it, seg) in items.iter_mut().zip(segs) {
            if seg.len == 0 {
                continue;
            }
            let ls = &mut it.seq.layers[li];
            self.attend(s, lw, ls, seg, &rope)?;
        }

        ops::rope(g, s.o.ptr, t * h, dh, h, &rope, pos, true)?;
        let (gr, rk) = (c.o_groups, c.o_lora_rank);
        let gw = h / gr * dh;
        if !rk.is_multiple_of(2) {
            return Err(Error::Unsupported(format!("o_lora_rank {rk} is odd")));
        }
        let oin = LinIn {
            x: s.o.ptr,
            ldx: h * dh,
            m: t,
            group: Some((rk, gw)),
        };
        ops::linear(g, &a.wo_a, &oin, s.z.ptr, gr * rk, &part)?;
        ops::linear(
            g,
            &a.wo_b,
            &LinIn::rows(s.z.ptr, gr * rk, t),
            s.f.ptr,
            d,
            &part,
        )
    }

    /// One sequence's share of the attention: compressors, indexer selection, attention over
    /// its window and entries, and the window ring update.
    fn attend(
        &self,
        s: &mut Scratch,
        lw: &GpuLayer,
        ls: &mut LayerState,
        seg: &Seg,
        rope: &RopeDev,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let a = &lw.attn;
        let (h, dh) = (c.num_heads, c.head_dim);
        let (t, pos0, st) = (seg.len, seg.pos0, seg.start);
        let mut args = AttnArgs {
            q: s.q.at::<f32>(st * h * dh),
            kv_new: s.kv.at::<f32>(st * dh),
            ring: ls.ring.ptr,
            entries: 0,
            sel: 0,
            nsel: 0,
            sinks: a.sinks.ptr(),
            out: s.o.at::<f32>(st * h * dh),
            t: t as i32,
            h: h as i32,
            dh: dh as i32,
            win: c.sliding_window as i32,
            pos0: pos0 as i32,
            ratio: 0,
            n_entries: 0,
            sel_cap: c.index_topk as i32,
            scale: 1.0 / (dh as f32).sqrt(),
        };
        let mut max_comp = 0;
        if let Some(cw) = &a.compressor {
            let cs = ls
                .comp
                .as_mut()
                .expect("compressed layers have compressor state");
            let proj = (s.cproj_kv.ptr, s.cproj_gate.ptr);
            self.compress(s, cw, cs, seg, proj, rope)?;
            args.entries = cs.entries.ptr;
            args.ratio = cw.ratio as i32;
            args.n_entries = cs.n as i32;
            max_comp = cs.n;
            if let Some(ix) = &a.indexer {
                let is = ls.index.as_mut().expect("CSA layers have indexer state");
                let proj = (s.iproj_kv.ptr, s.iproj_gate.ptr);
                self.compress(s, &ix.compressor, is, seg, proj, rope)?;
                self.indexer_select(s, ix, is, seg)?;
                args.sel = s.sel.at::<i32>(st * c.index_topk);
                args.nsel = s.nsel.at::<i32>(st);
                max_comp = c.index_topk.min(is.n);
            }
        }
        // Split the keys over blocks when few tokens would leave the GPU idle (decode).
        let chunks = (c.sliding_window.min(pos0 + t) + max_comp).div_ceil(ATT_KEYS);
        let groups = h.div_ceil(ATT_HEADS);
        let nsplit = if t * groups >= g.sm_count {
            1
        } else {
            chunks
                .min((2 * g.sm_count).div_ceil(t * groups))
                .min(s.attn_part.bytes / 4 / (t * h * (dh + 2)))
                .max(1)
        };
        let smem = (ATT_KEYS * dh * 4) as u32;
        let ns = nsplit as i32;
        g.launch(
            "attention_partial",
            (t as u32, nsplit as u32, groups as u32),
            (256, 1, 1),
            smem,
            &[&args, &s.attn_part.ptr, &ns],
        )?;
        let (hi, dhi) = (h as i32, dh as i32);
        g.launch(
            "attn_combine",
            (t as u32, h as u32, 1),
            (128, 1, 1),
            0,
            &[&s.attn_part.ptr, &a.sinks.ptr(), &args.out, &hi, &dhi, &ns],
        )?;
        let (wi, p0, ti) = (c.sliding_window as i32, pos0 as i32, t as i32);
        g.launch(
            "ring_store",
            (t as u32, 1, 1),
            (128, 1, 1),
            0,
            &[&args.kv_new, &ls.ring.ptr, &dhi, &wi, &p0, &ti],
        )
    }

    /// Appends a sequence's projected rows (`proj` = kv, gate of the whole batch) to its
    /// compressor and emits every window they complete.
    fn compress(
        &self,
        s: &mut Scratch,
        cw: &GpuCompressor,
        cs: &mut CompState,
        seg: &Seg,
        proj: (u64, u64),
        rope: &RopeDev,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (m, width, dim) = (cw.ratio, cw.wkv.out, cw.dim);
        let (t, pos0) = (seg.len, seg.pos0);
        let r = cs.tail_len;
        let ext_start = cs.tail_start;
        let row = width * 4;
        g.dtod(s.ext_kv.ptr, cs.tail_kv.ptr, r * row)?;
        g.dtod(s.ext_gate.ptr, cs.tail_gate.ptr, r * row)?;
        let src = seg.start as u64 * row as u64;
        g.dtod(s.ext_kv.at::<f32>(r * width), proj.0 + src, t * row)?;
        g.dtod(s.ext_gate.at::<f32>(r * width), proj.1 + src, t * row)?;
        let pos1 = pos0 + t;
        let (w0, w1) = (pos0 / m, pos1 / m);
        if w1 > w0 {
            debug_assert_eq!(cs.n, w0);
            cs.reserve(g, w1)?;
            let nw = w1 - w0;
            let out = cs.entries.at::<f32>(w0 * dim);
            let a = (
                width as i32,
                dim as i32,
                m as i32,
                cw.overlap as i32,
                ext_start as i32,
                w0 as i32,
            );
            g.launch(
                "comp_pool",
                (nw as u32, dim.div_ceil(128) as u32, 1),
                (128, 1, 1),
                0,
                &[
                    &s.ext_kv.ptr,
                    &s.ext_gate.ptr,
                    &cw.ape.ptr(),
                    &a.0,
                    &a.1,
                    &a.2,
                    &a.3,
                    &a.4,
                    &a.5,
                    &out,
                ],
            )?;
            ops::rms_norm(g, out, cw.norm.ptr(), dim, nw, c.rms_norm_eps)?;
            let pos = Pos::Step {
                pos0: w0 * m,
                step: m,
            };
            ops::rope(g, out, nw, dim, 1, rope, pos, false)?;
            cs.n = w1;
        }
        let keep_from = if cw.overlap {
            w1.saturating_sub(1) * m
        } else {
            w1 * m
        };
        let off = keep_from - ext_start;
        let keep = pos1 - keep_from;
        g.dtod(cs.tail_kv.ptr, s.ext_kv.at::<f32>(off * width), keep * row)?;
        g.dtod(
            cs.tail_gate.ptr,
            s.ext_gate.at::<f32>(off * width),
            keep * row,
        )?;
        cs.tail_start = keep_from;
        cs.tail_len = keep;
        Ok(())
    }

    /// The lightning indexer for one sequence: scores its visible entries for each of its
    /// queries (`s.qi`, `s.hw` rows of the batch) and selects the top-k into `s.sel`/`s.nsel`.
    fn indexer_select(
        &self,
        s: &mut Scratch,
        ix: &crate::weights::GpuIndexer,
        is: &CompState,
        seg: &Seg,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let (t, pos0) = (seg.len, seg.pos0);
        let n = is.n;
        let m = ix.compressor.ratio;
        let (wscale, dscale) = (1.0 / (hi as f32).sqrt(), 1.0 / (di as f32).sqrt());
        let smem = (hi * (di + 1) * 4) as u32;
        // Tokens per pass so the score matrix fits its buffer.
        let per = (s.scores_floats / n.max(1)).clamp(1, t);
        for t0 in (0..t).step_by(per) {
            let tc = per.min(t - t0);
            let row = seg.start + t0;
            let qi = s.qi.at::<f32>(row * hi * di);
            let hw = s.hw.at::<f32>(row * hi);
            let p0 = (pos0 + t0) as i32;
            let a = (hi as i32, di as i32, m as i32, n as i32, n as i32);
            if n > 0 {
                g.launch(
                    "indexer_scores",
                    (n.div_ceil(8) as u32, tc as u32, 1),
                    (256, 1, 1),
                    smem,
                    &[
                        &qi,
                        &hw,
                        &is.entries.ptr,
                        &a.0,
                        &a.1,
                        &p0,
                        &a.2,
                        &a.3,
                        &wscale,
                        &dscale,
                        &s.scores.ptr,
                        &a.4,
                    ],
                )?;
            }
            let (k, cap) = (c.index_topk as i32, c.index_topk as i32);
            let sel = s.sel.at::<i32>(row * c.index_topk);
            let nsel = s.nsel.at::<i32>(row);
            g.launch(
                "topk_select",
                (tc as u32, 1, 1),
                (1024, 1, 1),
                0,
                &[&s.scores.ptr, &a.4, &p0, &a.2, &a.3, &k, &sel, &cap, &nsel],
            )?;
        }
        Ok(())
    }

    /// The MoE block: reads `s.h` and token ids `s.ids`, writes `s.f`.
    fn moe(&self, s: &mut Scratch, lw: &GpuLayer, t: usize) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let mw = &lw.moe;
        let (d, e, k, inter) = (
            c.hidden_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
        );
        let part = Self::part(s);
        let hin = LinIn::rows(s.h.ptr, d, t);
        ops::linear(g, &mw.gate, &hin, s.logits_e.ptr, e, &part)?;
        let (bias, tid2eid) = match &mw.router {
            GpuRouter::TopK { bias } => (bias.ptr(), 0u64),
            GpuRouter::Hash { tid2eid } => (0u64, tid2eid.ptr),
        };
        let (ei, ki, scale) = (e as i32, k as i32, c.routed_scaling_factor);
        g.launch(
            "moe_route",
            (t as u32, 1, 1),
            (32, 1, 1),
            (2 * e * 4) as u32,
            &[
                &s.logits_e.ptr,
                &ei,
                &ki,
                &bias,
                &tid2eid,
                &s.ids.ptr,
                &scale,
                &s.picks.ptr,
                &s.rw.ptr,
            ],
        )?;
        let lim = c.swiglu_limit.unwrap_or(f32::NAN);
        // The shared expert into s.f (zeros without one).
        match &mw.shared {
            Some(sh) => {
                ops::linear(g, &sh.w1, &hin, s.sg.ptr, inter, &part)?;
                ops::linear(g, &sh.w3, &hin, s.su.ptr, inter, &part)?;
                let total = t * sh.w1.out;
                let (wd, tot, null) = (sh.w1.out as i32, total, 0u64);
                ops::elementwise(
                    g,
                    "swiglu",
                    total,
                    &[&s.sg.ptr, &s.su.ptr, &wd, &tot, &lim, &null],
                )?;
                ops::linear(
                    g,
                    &sh.w2,
                    &LinIn::rows(s.sg.ptr, sh.w1.out, t),
                    s.f.ptr,
                    d,
                    &part,
                )?;
            }
            None => g.memset(s.f.ptr, 0, t * d * 4)?,
        }
        let pairs = t * k;
        let a = MoeArgs {
            w1: mw.w1_table.ptr,
            w3: mw.w3_table.ptr,
            w2: mw.w2_table.ptr,
            picks: s.picks.ptr,
            rw: s.rw.ptr,
            x: s.h.ptr,
            h: s.eh.ptr,
            out: s.eout.ptr,
            k: k as i32,
            d: d as i32,
            i: inter as i32,
            vec: mw.vec as i32,
            rw_inside: 0,
            lim,
        };
        // Few pairs per expert (decode batches): each pair streams its expert on its own; many
        // (prefill): group them by expert into tiles.
        if pairs <= GROUP_PAIRS.max(8 * e) {
            ops::moe_experts(g, mw.fmt, &a, pairs)?;
        } else {
            // Group pairs by expert (tiles of up to 64) so each expert's weights are decoded
            // once per tile and reused by all of its tokens.
            let mut picks = vec![0i32; pairs];
            g.dtoh(s.picks.ptr, &mut picks)?;
            let mut by_expert: Vec<Vec<i32>> = vec![Vec::new(); e];
            for (p, &ex) in picks.iter().enumerate() {
                let ex = usize::try_from(ex)
                    .ok()
                    .filter(|&x| x < e)
                    .ok_or_else(|| Error::Driver(format!("router picked expert {ex}")))?;
                by_expert[ex].push(p as i32);
            }
            let tp_w = ops::GEMM_TILE;
            let (mut te, mut tp, mut tn) = (Vec::new(), Vec::new(), Vec::new());
            for (ex, list) in by_expert.iter().enumerate() {
                for chunk in list.chunks(tp_w) {
                    te.push(ex as i32);
                    tn.push(chunk.len() as i32);
                    tp.extend(chunk.iter().copied());
                    tp.extend(std::iter::repeat_n(chunk[0], tp_w - chunk.len()));
                }
            }
            let ntile = te.len();
            g.htod(s.tiles.ptr, &te)?;
            g.htod(s.tiles.at::<i32>(ntile), &tn)?;
            g.htod(s.tiles.at::<i32>(2 * ntile), &tp)?;
            let ga = ops::MoeGemmArgs {
                w1: a.w1,
                w3: a.w3,
                w2: a.w2,
                tile_expert: s.tiles.ptr,
                tile_n: s.tiles.at::<i32>(ntile),
                tile_pairs: s.tiles.at::<i32>(2 * ntile),
                x: a.x,
                h: a.h,
                out: a.out,
                k: a.k,
                d: a.d,
                i: a.i,
                vec: a.vec,
                lim: a.lim,
            };
            ops::moe_experts_gemm(g, mw.fmt, &ga, ntile)?;
        }
        let (ki, di, ti, inside) = (k as i32, d as i32, t as i32, 0i32);
        ops::elementwise(
            g,
            "moe_combine",
            t * d,
            &[&s.f.ptr, &s.eout.ptr, &s.rw.ptr, &ki, &di, &ti, &inside],
        )
    }
}

impl Engine for CudaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        format!("cuda:{} {}", self.gpu.ordinal, self.gpu.name)
    }

    fn new_state(&self) -> dsv4_core::Result<EngineState> {
        Ok(Box::new(self.new_seq()?))
    }

    fn forward(
        &self,
        state: &mut EngineState,
        ids: &[u32],
        want: Logits,
    ) -> dsv4_core::Result<Vec<f32>> {
        let seq = state
            .downcast_mut::<GpuSeq>()
            .ok_or_else(|| dsv4_core::Error::Input("sequence state of another backend".into()))?;
        Ok(CudaModel::forward(self, seq, ids, want)?)
    }
}
