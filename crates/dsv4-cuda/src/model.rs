//! The DeepSeek-V4 forward on one GPU: the CPU model's layer loop (`dsv4_core::model`) with
//! every op a kernel over device buffers. Host work per call is bookkeeping (positions, window
//! counts), except prefill MoE, which reads the routing back once per layer to group tokens by
//! expert.

use crate::gpu::{DevBuf, Gpu};
use crate::ops::{
    self, AttnArgs, LinIn, LinJob, MoeArgs, Partial, Pos, RopeDev, ATT_HEADS, ATT_KEYS,
    COMBINE_MAX_SPLITS,
};
use crate::state::{CompState, GpuSeq, LayerState, SeqLayerPtrs};
use crate::weights::{Ends, Fmt, GpuCompressor, GpuHc, GpuLayer, GpuRouter, GpuVec, GpuWeights};
use crate::{Error, Result};
use cudarc::driver::CudaGraph;
use dsv4_core::config::AttnKind;
use dsv4_core::model::rope::RopeTable;
use dsv4_core::numerics::{Numerics, ACT_BLOCK, KV_BLOCK};
use dsv4_core::{Engine, EngineState, Logits, Model, ModelConfig};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Tokens per internal forward chunk: bounds the activation scratch (chunked prefill gives the
/// one-call logits, so the split is invisible).
pub(crate) const MAX_CHUNK: usize = 2048;
/// Above this many (token, expert) pairs (and 8 per expert), prefill groups pairs by expert on
/// the host.
const GROUP_PAIRS: usize = 64;
/// Up to this many tokens the hyper-connection boundaries run as one fused launch each (on the
/// H200: batch 1, 2 and 8 steps 2–3% faster, batch 32 3% slower, where one block per token
/// finishing each boundary is the longer path).
const HC_FUSED_TOKENS: usize = 8;
/// From this many items up, a step's logits are copied out of the staging buffer in parallel.
const PAR_COPY_ITEMS: usize = 4;
/// Experts `moe_route` holds in its warp's registers (ROUTE_PL per lane, kernels/moe.cu).
const ROUTE_EXPERTS: usize = 32 * 16;
/// From this many tokens, prefill's FP8 GEMMs (official profile with activation quantization)
/// run on the tensor cores through cuBLASLt.
const TC_MIN_TOKENS: usize = 65;
/// Largest decode batch that runs independent work on the side stream: batch 1 gained 4–9%
/// (H200, 8 layers); batches 2 and 8 showed no gain beyond the ±2% noise, so they keep one stream.
const BRANCH_TOKENS: usize = 4;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// One sequence of a batched forward: its state, the tokens to append, the logits wanted.
pub struct BatchItem<'a> {
    pub seq: &'a mut GpuSeq,
    pub ids: &'a [u32],
    pub want: Logits,
}

impl<'a> BatchItem<'a> {
    /// One item per sequence, `ids[i]` fed to `seqs[i]` (as far as both go), each wanting its
    /// last row's logits.
    pub fn last_rows<T: AsRef<[u32]>>(seqs: &'a mut [GpuSeq], ids: &'a [T]) -> Vec<Self> {
        seqs.iter_mut()
            .zip(ids)
            .map(|(seq, ids)| BatchItem {
                seq,
                ids: ids.as_ref(),
                want: Logits::Last,
            })
            .collect()
    }
}

/// Feeds `ids` through `step` in chunks of at most [`MAX_CHUNK`] tokens (only the last chunk
/// asked for `Logits::Last`), returning the requested logits rows in order.
pub(crate) fn forward_chunks(
    ids: &[u32],
    want: Logits,
    mut step: impl FnMut(&[u32], Logits) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    let chunks: Vec<&[u32]> = ids.chunks(MAX_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let want = match want {
            Logits::Last if i + 1 < chunks.len() => Logits::None,
            w => w,
        };
        out.extend(step(chunk, want)?.into_iter().flatten());
    }
    Ok(out)
}

/// Every token id is below `vocab` (an input error naming the first that is not).
pub(crate) fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(&bad) => Err(dsv4_core::Error::Input(format!(
            "token id {bad} is out of range (vocabulary size {vocab})"
        ))
        .into()),
        None => Ok(()),
    }
}

/// What one pipeline stage hands on ([`CudaModel::forward_part`]).
pub enum PartOut {
    /// Each item's logits (the stage with the head).
    Logits(Vec<Vec<f32>>),
    /// The hidden streams of every token, `[tokens, hc_mult, hidden]`, for the next stage.
    Hidden(Vec<f32>),
}

/// Where a sequence's tokens sit in a batched call.
struct Seg {
    start: usize,
    len: usize,
    pos0: usize,
}

/// How attention finds each sequence's caches: through the host-side items (any call), or,
/// when `None`, through the device table of a decode step.
type PerSeq<'a, 'b> = Option<(&'a mut [BatchItem<'b>], &'a [Seg])>;

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
    /// `h` FP8-rounded per 128 (official profile with activation quantization: the input of
    /// the FP8/FP4 GEMMs, while BF16/f32 consumers read `h` itself).
    hq: DevBuf,
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
    /// The router's logits `[cap, E]` (its scores where the router kernel routes too).
    route_e: DevBuf,
    picks: DevBuf,
    /// Expert picks that are all 0 (the shared expert through the routed-expert kernels).
    zeros_i32: DevBuf,
    rw: DevBuf,
    eh: DevBuf,
    eout: DevBuf,
    sg: DevBuf,
    su: DevBuf,
    tiles: DevBuf,
    partial: DevBuf,
    counters: DevBuf,
    partial_side: DevBuf,
    counters_side: DevBuf,
    scores: DevBuf,
    scores_floats: usize,
    attn_part: DevBuf,
    out_logits: DevBuf,
    /// `hc_boundary`'s partial mix rows of each column slice, and its per-token count of
    /// finished slices (zero between launches).
    hc_part: DevBuf,
    hc_count: DevBuf,
    /// `moe_router_route`'s count of finished blocks (zero between launches).
    route_count: DevBuf,
    /// The grid barrier of `ops::linear_pair` (arrivals, passes).
    pair_bar: DevBuf,
    /// The grid barrier of `moe_ffn_up_bulk` (arrivals, generation).
    ffn_sync: DevBuf,
    /// Decode steps: each layer's per-token cache pointers (`[layers, tokens]`), and the
    /// host copy last uploaded.
    seq_table: DevBuf,
    table_host: Vec<SeqLayerPtrs>,
    /// Captured decode steps by (tokens, with logits). They hold this scratch's addresses, so
    /// they live and die with it.
    graphs: HashMap<(usize, bool), StepGraph>,
    /// Whether the call being queued may use the cuBLASLt GEMMs (not a captured decode step:
    /// cuBLASLt's plan search synchronizes).
    tc_ok: bool,
    /// Whether the call being queued runs independent work on the side stream
    /// ([`Gpu::on_side`]): decode steps, whose kernels are too short to fill the GPU alone.
    branch: bool,
    /// The mix (`base`, `scale` of a `GpuHc`) whose Sinkhorn the last fused boundary left to
    /// `hc_mix` on the side stream, not yet queued (see [`CudaModel::set_hc_defer`]).
    mix_pending: Option<(u64, u64)>,
    fp8: crate::blaslt::Fp8Scratch,
}

/// A captured decode step.
struct StepGraph(CudaGraph);

// SAFETY: the driver's graph handles are not tied to a thread; a graph lives in its model's
// scratch, whose mutex serializes every launch, so moving the model to another thread (the
// server's engine thread) never runs one graph from two threads at once.
unsafe impl Send for StepGraph {}

impl Scratch {
    fn new(
        gpu: &Gpu,
        c: &ModelConfig,
        cap: usize,
        max_ratio: usize,
        layers: usize,
    ) -> Result<Self> {
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
            hq: f(cap * d)?,
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
            route_e: f(cap * c.n_routed_experts)?,
            picks: f(pairs)?,
            zeros_i32: gpu.alloc_zeros(4 * cap.max(1))?,
            rw: f(pairs)?,
            eh: f(pairs * inter)?,
            eout: f(pairs * d)?,
            sg: f(cap * inter)?,
            su: f(cap * inter)?,
            // At most pairs + experts tiles: expert, count and MOE_TILE_PAIRS pairs each.
            tiles: f((2 + ops::MOE_TILE_PAIRS) * (pairs + e_count))?,
            partial: f(1 << 22)?,
            counters: gpu.alloc_zeros(4 << 16)?,
            partial_side: f(1 << 20)?,
            counters_side: gpu.alloc_zeros(4 << 16)?,
            scores: f(1 << 24)?,
            scores_floats: 1 << 24,
            attn_part: f(cap.max(64) * h * (dh + 2))?,
            out_logits: f(cap * c.vocab_size)?,
            hc_part: f(HC_FUSED_TOKENS * d.div_ceil(ops::HC_COLS) * ((2 + n) * n + 1))?,
            hc_count: gpu.alloc_zeros(4 * HC_FUSED_TOKENS)?,
            route_count: gpu.alloc_zeros(4)?,
            pair_bar: gpu.alloc_zeros(8)?,
            ffn_sync: gpu.alloc_zeros(4 * crate::moe_ffn::FFN_SYNC_WORDS)?,
            seq_table: gpu.alloc(layers * cap * std::mem::size_of::<SeqLayerPtrs>())?,
            table_host: Vec::new(),
            graphs: HashMap::new(),
            tc_ok: false,
            branch: false,
            mix_pending: None,
            fp8: Default::default(),
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
    /// Whether decode steps replay captured CUDA graphs (`DSV4_CUDA_GRAPHS=0` turns it off).
    graphs: AtomicBool,
    /// Whether calls of up to `HC_FUSED_TOKENS` tokens run each hyper-connection boundary as one
    /// `hc_boundary` launch (`DSV4_CUDA_HC_FUSED=0` keeps the six launches of the long path).
    hc_fused: AtomicBool,
    /// Whether fused boundaries run as `hc_boundary_cluster` (`DSV4_CUDA_HC_CLUSTER=1`; off by
    /// default: as fast as `hc_boundary` in a decode step, see docs/PERFORMANCE.md stop 24),
    /// and whether the device and the model's shape allow it.
    hc_cluster: AtomicBool,
    hc_cluster_fits: bool,
    /// Whether fused boundaries of branching decode steps leave the Sinkhorn to `hc_mix` on the
    /// side stream (on by default: H100, 8 layers at 1K, 1.74 / 1.73 against 1.78 / 1.79 ms per
    /// step; `DSV4_CUDA_HC_DEFER=0` keeps it inline).
    hc_defer: AtomicBool,
    /// Whether one-token FFN halves run as two launches that find the routing and stream the
    /// shared and routed experts together (`moe_ffn_up_bulk`; on by default: H100, 8 layers at
    /// 1K, 1.69 / 1.69 against 1.73 / 1.73 ms per step, stop 27; `DSV4_CUDA_FFN_FUSED=0` keeps
    /// the router, shared expert and routed experts as separate kernels). Its grid barrier
    /// needs every block resident at once: two of them running at once on one GPU (models
    /// driven from two threads, MPS clients) could wait on each other until `grid_wait` traps.
    ffn_fused: AtomicBool,
    /// How the fused FFN launches: two launches whose first may start beside the boundary
    /// before it (`DSV4_CUDA_FFN_EARLY=0`: only after it), or one (`DSV4_CUDA_FFN_ONE=1`).
    ffn_path: std::sync::atomic::AtomicU8,
    /// Shared-expert stages the fused FFN's blocks request before their router's arrival
    /// (`DSV4_CUDA_FFN_SHARED_PRE`, default [`crate::moe_ffn::SHARED_PRE`]).
    ffn_shared_pre: u32,
    /// Whether the fused FFN's routed gate/up tiles are claimed from a counter as ring slots
    /// free instead of split evenly (H100, 18 layers at 1K: 3.18 / 3.19 against 3.26–3.29 ms
    /// per step, stop 28; `DSV4_CUDA_FFN_DYN=0` splits them evenly).
    ffn_dyn_tiles: bool,
    /// Whether a decode step's attention caps its key splits by the most key chunks a token of
    /// the layer's kind can have (`attend_seqs`; `DSV4_CUDA_ATTN_CAP=0`: splits for the SMs
    /// only, most of them empty in sliding-window and CSA layers).
    attn_split_cap: bool,
    /// Whether a decode step's attention takes no more key splits than one wave of its blocks
    /// holds (`DSV4_CUDA_ATTN_ONE_WAVE=0` lifts the cap): at 154 registers a block has an SM to
    /// itself, so 33 splits × 8 head groups of one token are two waves once a layer's keys fill
    /// more than 16 splits' chunks (CSA and HCA at 64K: 20). Stop 38 (H200, 18 layers): batch 8
    /// at 64K 11.83 → 11.57–11.73 ms, batch 1 unchanged.
    attn_one_wave: bool,
    /// Whether prefill calls with enough tokens for a block per SM run their attention on the
    /// tensor cores (`attention_tc`; `DSV4_CUDA_ATTN_TC=0`: the SIMT kernel; decode steps keep
    /// `attention_partial`). Stop 39
    /// (H100, 8 layers): prefill 1K / 8K / 32K +4% / +14% / +16%, official numerics 8K +20%.
    attn_tc: bool,
    /// Whether a decode step's indexer queries stream on the main stream before `wq_b`, with
    /// the compressors queued on the side stream right after the projections of h
    /// (`DSV4_CUDA_INDEX_FIRST=0`: the queries, compressors and selection all on the side
    /// stream after the norm, where the queries' bulk GEMV waited for `wq_b`'s SMs).
    index_first: bool,
    /// Whether calls of up to [`ops::ROUTER_ROUTE_TOKENS`] tokens compute the router's logits
    /// and the routing in one launch (`moe_router_route`; `DSV4_CUDA_ROUTE_FUSED=0` keeps the
    /// GEMV and `moe_route`).
    route_fused: AtomicBool,
    /// Whether a decode step's `wo_a` and `wo_b` run as one launch (`ops::linear_pair`;
    /// `DSV4_CUDA_BULK_PAIR=1`; off until it has run on a GPU).
    pair_fused: AtomicBool,
    /// Whether a one-token decode step's attention tail (split attention, merge, `wo_a`,
    /// `wo_b`) runs as one launch (`ops::attn_tail`, a first step of a persistent decode kernel;
    /// `DSV4_CUDA_PERSIST=1`; off until it has run on a GPU).
    persist_tail: AtomicBool,
    /// Attention tails launched as one kernel so far (captured ones once).
    tail_launches: std::sync::atomic::AtomicUsize,
    /// The tail's blocks: 0, one per SM (the default), else this many (tests).
    tail_grid: std::sync::atomic::AtomicUsize,
    /// Whether a decode step's projections of h stream through one bulk-copy launch
    /// (`ops::linear_bulk_multi`; `DSV4_CUDA_BULK_MULTI=0` keeps `gemv_multi`).
    bulk_multi: AtomicBool,
    /// Whether one token's query-latent norm runs in its readers' activation loads
    /// (`ops::linear_normed`: `wq_b` and the indexer's `wq_b`) instead of a launch of its own
    /// (`DSV4_CUDA_QNORM_FUSED=1`; off until measured: stop 20's fold of the norm into `wq_b`
    /// was neutral, its weight stream already overlapping the norm).
    qnorm_fused: AtomicBool,
    /// Whether the indexer's release-shape scores run on the tensor cores (`indexer_scores_tc`,
    /// ~f32 products; `DSV4_CUDA_INDEX_TC=0` keeps the SIMT kernel). Stop 38 (H200, 18
    /// layers): decode at 64K 3.19–3.23 → 3.12–3.13 ms (batch 1), 11.8 → 11.2 ms (batch 8);
    /// 32K prefill +2.6%.
    index_tc: bool,
    /// The arithmetic followed (the CPU model's profile).
    numerics: Numerics,
    /// Whether a decode step's projections of one input share a launch (`DSV4_CUDA_MULTI=0`
    /// off, for A/B).
    multi_gemv: bool,
    /// cuBLASLt and the FP8 weights in its layout (by code address), for prefill under the
    /// official profile with activation quantization; `None` otherwise or without cuBLASLt
    /// (`DSV4_CUDA_FP8_TC=0` turns it off).
    tc: Option<FpTc>,
}

struct FpTc {
    on: AtomicBool,
    lt: crate::blaslt::BlasLt,
    weights: Mutex<HashMap<u64, Arc<crate::blaslt::Fp8TcWeight>>>,
}

/// How a compressor's entries are stored (the official profile rounds them).
#[derive(Clone, Copy)]
enum EntryRound {
    None = 0,
    /// FP8 nope channels, blocks of 64 (main entries).
    Fp8Nope = 1,
    /// Hadamard-128 then FP4, blocks of 32 (indexer keys).
    HadamardFp4 = 2,
}

/// The config of layers `layers` of a model (one pipeline stage's share).
pub fn part_config(config: &ModelConfig, layers: std::ops::Range<usize>) -> Result<ModelConfig> {
    if layers.end > config.num_layers || layers.is_empty() {
        return Err(Error::Unsupported(format!(
            "layers {layers:?} of a {}-layer model",
            config.num_layers
        )));
    }
    let mut part = config.clone();
    part.num_layers = layers.len();
    part.attn_kinds = config.attn_kinds[layers.clone()].to_vec();
    part.mlp_kinds = config.mlp_kinds[layers].to_vec();
    Ok(part)
}

impl CudaModel {
    /// Uploads a loaded (validated) model to GPU `ordinal`.
    pub fn from_model(model: &Model, ordinal: usize) -> Result<Self> {
        let src: Vec<usize> = (0..model.config.num_layers).collect();
        Self::from_model_layers(
            model,
            ordinal,
            model.config.clone(),
            &src,
            Ends::BOTH,
            |_, _| {},
        )
    }

    /// Uploads host layers `layers` of a loaded model to GPU `ordinal`, with the embedding
    /// and the head when `ends` says: one stage of a [`crate::Pipeline`].
    pub fn from_model_part(
        model: &Model,
        ordinal: usize,
        layers: std::ops::Range<usize>,
        ends: Ends,
    ) -> Result<Self> {
        let config = part_config(&model.config, layers.clone())?;
        let src: Vec<usize> = layers.collect();
        Self::build(model, ordinal, config, &src, ends, |_, _| {})
    }

    /// Uploads with GPU layer `i` taken from host layer `src[i]` and `config` describing the
    /// result (a synthetic Flash/Pro built from a few distinct host layers), with the embedding
    /// and the head as `ends` says.
    pub fn from_model_layers(
        model: &Model,
        ordinal: usize,
        config: ModelConfig,
        src: &[usize],
        ends: Ends,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        Self::build(model, ordinal, config, src, ends, progress)
    }

    fn build(
        model: &Model,
        ordinal: usize,
        config: ModelConfig,
        src: &[usize],
        ends: Ends,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        if model.numerics.is_official() {
            crate::quant::check_hadamard_width(config.index_head_dim)?;
        }
        if config.hc_mult * config.hc_mult > 32 {
            return Err(Error::Unsupported(format!(
                "hc_mult {} (the hyper-connection kernel holds n·n ≤ 32 weights)",
                config.hc_mult
            )));
        }
        if config.n_routed_experts > ROUTE_EXPERTS || config.num_experts_per_tok > 32 {
            return Err(Error::Unsupported(format!(
                "{} routed experts, {} per token (the router holds at most {ROUTE_EXPERTS}, \
                 picks at most 32)",
                config.n_routed_experts, config.num_experts_per_tok
            )));
        }
        if !config.head_dim.is_multiple_of(4) || config.head_dim > 512 {
            return Err(Error::Unsupported(format!(
                "head_dim {} (the attention kernel takes multiples of 4 up to 512)",
                config.head_dim
            )));
        }
        let gpu = Gpu::open(ordinal)?;
        let weights = GpuWeights::upload(
            &gpu,
            &model.weights,
            &model.config.mlp_kinds,
            src,
            ends,
            progress,
        )?;
        let rope = |spec| -> Result<(GpuVec, f32)> {
            let t = RopeTable::new(spec, config.rope_dim);
            Ok((GpuVec::upload(&gpu, &t.inv_freq)?, t.attention_factor))
        };
        let rope_main = rope(&config.rope_main)?;
        let rope_compress = rope(&config.rope_compress)?;
        let tc = if model.numerics.act_quant()
            && std::env::var("DSV4_CUDA_FP8_TC").map_or(true, |v| v != "0")
        {
            match crate::blaslt::BlasLt::new(gpu.clone()) {
                Ok(lt) => Some(FpTc {
                    on: AtomicBool::new(true),
                    lt,
                    weights: Mutex::new(HashMap::new()),
                }),
                Err(e) => {
                    eprintln!("dsv4: prefill FP8 GEMMs stay off the tensor cores: {e}");
                    None
                }
            }
        } else {
            None
        };
        // A cluster of 16 blocks of up to 1024 threads needs a GPC with 16 free SMs.
        // (An optional kernel: any failure to set it up only leaves it off.)
        let hc_cluster_fits =
            ops::hc_cluster_fits(&gpu, config.hc_mult, config.hidden_size).unwrap_or(false);
        gpu.sync()?;
        Ok(CudaModel {
            rope_main,
            rope_compress,
            weights,
            config,
            scratch: Mutex::new(None),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            graphs: AtomicBool::new(std::env::var("DSV4_CUDA_GRAPHS").map_or(true, |v| v != "0")),
            hc_fused: AtomicBool::new(
                std::env::var("DSV4_CUDA_HC_FUSED").map_or(true, |v| v != "0"),
            ),
            hc_cluster: AtomicBool::new(
                hc_cluster_fits && std::env::var("DSV4_CUDA_HC_CLUSTER").is_ok_and(|v| v == "1"),
            ),
            hc_cluster_fits,
            hc_defer: AtomicBool::new(
                std::env::var("DSV4_CUDA_HC_DEFER").map_or(true, |v| v != "0"),
            ),
            ffn_fused: AtomicBool::new(
                std::env::var("DSV4_CUDA_FFN_FUSED").map_or(true, |v| v != "0"),
            ),
            ffn_path: std::sync::atomic::AtomicU8::new(ffn_path_code(
                if std::env::var("DSV4_CUDA_FFN_ONE").is_ok_and(|v| v == "1") {
                    crate::moe_ffn::FfnPath::One
                } else {
                    crate::moe_ffn::FfnPath::Two {
                        early: std::env::var("DSV4_CUDA_FFN_EARLY").map_or(true, |v| v != "0"),
                    }
                },
            )),
            ffn_shared_pre: crate::gpu::env_num("DSV4_CUDA_FFN_SHARED_PRE", |_: &u32| true)
                .unwrap_or(crate::moe_ffn::SHARED_PRE),
            ffn_dyn_tiles: std::env::var("DSV4_CUDA_FFN_DYN").map_or(true, |v| v != "0"),
            attn_split_cap: std::env::var("DSV4_CUDA_ATTN_CAP").map_or(true, |v| v != "0"),
            attn_one_wave: std::env::var("DSV4_CUDA_ATTN_ONE_WAVE").map_or(true, |v| v != "0"),
            attn_tc: std::env::var("DSV4_CUDA_ATTN_TC").map_or(true, |v| v != "0"),
            index_first: std::env::var("DSV4_CUDA_INDEX_FIRST").map_or(true, |v| v != "0"),
            route_fused: AtomicBool::new(
                std::env::var("DSV4_CUDA_ROUTE_FUSED").map_or(true, |v| v != "0"),
            ),
            pair_fused: AtomicBool::new(
                std::env::var("DSV4_CUDA_BULK_PAIR").is_ok_and(|v| v == "1"),
            ),
            persist_tail: AtomicBool::new(
                std::env::var("DSV4_CUDA_PERSIST").is_ok_and(|v| v == "1"),
            ),
            tail_launches: Default::default(),
            tail_grid: Default::default(),
            bulk_multi: AtomicBool::new(
                std::env::var("DSV4_CUDA_BULK_MULTI").map_or(true, |v| v != "0"),
            ),
            qnorm_fused: AtomicBool::new(
                std::env::var("DSV4_CUDA_QNORM_FUSED").is_ok_and(|v| v == "1"),
            ),
            index_tc: std::env::var("DSV4_CUDA_INDEX_TC").map_or(true, |v| v != "0"),
            numerics: model.numerics,
            multi_gemv: std::env::var("DSV4_CUDA_MULTI").map_or(true, |v| v != "0"),
            tc,
            gpu,
        })
    }

    /// Turns the replay of captured decode steps on or off (tests compare both).
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// Whether prefill's FP8 GEMMs may run on the tensor cores (official profile with activation
    /// quantization; tests compare both). Returns whether they can at all.
    pub fn set_fp8_tensor_cores(&self, on: bool) -> bool {
        self.tc
            .as_ref()
            .inspect(|tc| tc.on.store(on, Ordering::Relaxed))
            .is_some()
    }

    /// Turns decode's projections of h in one bulk-copy launch on or off (tests compare both).
    pub fn set_bulk_multi(&self, on: bool) {
        self.bulk_multi.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Turns one token's query-latent norm in its readers' loads on or off (tests compare both).
    pub fn set_qnorm_fused(&self, on: bool) {
        self.qnorm_fused.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Turns decode's `wo_a` + `wo_b` in one launch on or off (tests compare both).
    pub fn set_pair_fused(&self, on: bool) {
        self.pair_fused.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Turns the one-launch attention tail of one-token decode steps on or off (tests).
    pub fn set_persist_tail(&self, on: bool) {
        self.persist_tail.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Runs the attention tail on `blocks` blocks instead of one per SM (tests: a block then
    /// takes several of the attention's and the merge's blocks); 0 restores the default.
    pub fn set_tail_grid(&self, blocks: usize) {
        self.tail_grid.store(blocks, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// How many attention tails have been launched as one kernel (a captured step's once).
    pub fn tail_launches(&self) -> usize {
        self.tail_launches.load(Ordering::Relaxed)
    }

    /// Turns the one-launch router of few-token calls on or off (tests compare both).
    pub fn set_route_fused(&self, on: bool) {
        self.route_fused.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Turns the fused hyper-connection boundaries on or off.
    pub fn set_hc_fused(&self, on: bool) {
        self.hc_fused.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Whether fused boundaries of decode steps that branch ([`CudaModel::set_branches`]) leave
    /// the Sinkhorn (`post` and `comb`, needed only at the next boundary) to an `hc_mix` launch
    /// on the side stream, off the critical path, instead of running it before the collapse.
    pub fn set_hc_defer(&self, on: bool) {
        self.hc_defer.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Whether one token's FFN half (router, shared expert and routed experts) runs as the two
    /// launches of `kernels/moe_ffn.cu` where the model's formats allow, instead of five.
    pub fn set_ffn_fused(&self, on: bool) {
        self.ffn_fused.store(on, Ordering::Relaxed);
        self.drop_graphs();
    }

    /// How fused FFN halves launch ([`CudaModel::set_ffn_fused`]).
    pub fn set_ffn_path(&self, path: crate::moe_ffn::FfnPath) {
        self.ffn_path.store(ffn_path_code(path), Ordering::Relaxed);
        self.drop_graphs();
    }

    /// Whether every layer's FFN half of one token can take the fused path
    /// ([`CudaModel::set_ffn_fused`]), whether or not it is on.
    pub fn ffn_fused_fits(&self) -> bool {
        let c = &self.config;
        self.weights.layers.iter().all(|lw| {
            let mw = &lw.moe;
            let a = MoeArgs {
                w1: 0,
                w3: 0,
                w2: 0,
                picks: 0,
                rw: 0,
                x: 0,
                h: 0,
                out: 0,
                k: c.num_experts_per_tok as i32,
                d: c.hidden_size as i32,
                i: c.moe_intermediate_size as i32,
                vec: mw.vec as i32,
                rw_inside: 0,
                lim: 0.0,
            };
            self.ffn_fused_layout(mw, &a, 1, false).is_some()
        })
    }

    /// Chooses, for the fused boundaries, a thread-block cluster per token (`hc_boundary_cluster`)
    /// or a last block per token (`hc_boundary`). Returns whether clusters can run here at all.
    pub fn set_hc_cluster(&self, on: bool) -> bool {
        self.hc_cluster
            .store(on && self.hc_cluster_fits, Ordering::Relaxed);
        self.drop_graphs();
        self.hc_cluster_fits
    }

    /// Decode steps run independent work on a side stream ([`Gpu::on_side`]); off, everything
    /// queues on one stream (same results, bit for bit).
    pub fn set_branches(&self, on: bool) {
        self.gpu.set_branches(on);
        self.drop_graphs();
    }

    /// Forgets the captured decode steps (recorded with settings that just changed).
    fn drop_graphs(&self) {
        if let Some(s) = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            s.graphs.clear();
        }
    }

    /// An independent copy of `seq` (which this model created), continuing exactly as it would.
    pub fn copy_seq(&self, seq: &GpuSeq) -> Result<GpuSeq> {
        if !self.owns(seq) {
            return Err(Error::Unsupported(
                "a sequence state of another GPU model".into(),
            ));
        }
        seq.copy(&self.gpu)
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
        forward_chunks(ids, want, |ids, want| {
            let mut items = [BatchItem {
                seq: &mut *seq,
                ids,
                want,
            }];
            self.forward_batch(&mut items)
        })
    }

    /// Feeds several sequences in one pass: every weight is read once for all their tokens;
    /// attention, compressors and the indexer run per sequence against its own state. Returns
    /// each item's logits (`[rows, vocab]`, empty for `Logits::None`). Inputs are checked before
    /// any state changes.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>> {
        self.check_items(items)?;
        let total: usize = items.iter().map(|it| it.ids.len()).sum();
        if total > MAX_CHUNK {
            return items
                .iter_mut()
                .map(|it| self.forward(it.seq, it.ids, it.want))
                .collect();
        }
        match self.run_part(items, None)? {
            PartOut::Logits(l) => Ok(l),
            PartOut::Hidden(_) => Err(Error::Unsupported(
                "this GPU holds a pipeline stage without the head; run the whole pipeline".into(),
            )),
        }
    }

    /// One stage of a pipeline on a call of at most [`MAX_CHUNK`] tokens: `x_in` holds the
    /// hidden streams of every token from the previous stage (`[tokens, hc_mult, hidden]`;
    /// `None` on the stage with the embedding). Returns the items' logits on the stage with
    /// the head, the hidden streams for the next stage otherwise.
    pub fn forward_part(
        &self,
        items: &mut [BatchItem<'_>],
        x_in: Option<&[f32]>,
    ) -> Result<PartOut> {
        self.check_items(items)?;
        self.run_part(items, x_in)
    }

    /// [`Self::forward_part`] on items already checked.
    pub(crate) fn run_part(
        &self,
        items: &mut [BatchItem<'_>],
        x_in: Option<&[f32]>,
    ) -> Result<PartOut> {
        let total: usize = items.iter().map(|it| it.ids.len()).sum();
        if total > MAX_CHUNK {
            return Err(Error::Unsupported(format!(
                "{total} tokens in one pipeline step (at most {MAX_CHUNK})"
            )));
        }
        let rows = total * self.config.hc_mult * self.config.hidden_size;
        match (&self.weights.embed, x_in) {
            (Some(_), None) => {}
            (None, Some(x)) if x.len() == rows => {}
            (Some(_), Some(_)) => {
                return Err(Error::Unsupported(
                    "hidden streams given to the stage with the embedding".into(),
                ))
            }
            (None, x) => {
                return Err(Error::Unsupported(format!(
                    "a later pipeline stage needs {rows} hidden values, got {}",
                    x.map_or(0, |x| x.len())
                )))
            }
        }
        if total == 0 {
            return Ok(match self.weights.head {
                Some(_) => PartOut::Logits(vec![Vec::new(); items.len()]),
                None => PartOut::Hidden(Vec::new()),
            });
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
                self.weights.layers.len(),
            )?);
        }
        let s = guard.as_mut().expect("allocated above");
        self.run_batch(s, items, total, x_in)
    }

    /// Whether this model created `seq`.
    pub(crate) fn owns(&self, seq: &GpuSeq) -> bool {
        seq.owner == self.id
    }

    /// Every item's state is this model's and its tokens are in the vocabulary.
    fn check_items(&self, items: &[BatchItem<'_>]) -> Result<()> {
        let vocab = self.config.vocab_size;
        for it in items.iter() {
            if !self.owns(it.seq) {
                return Err(Error::Unsupported(
                    "a sequence state created by another model".into(),
                ));
            }
            check_ids(it.ids, vocab)?;
        }
        Ok(())
    }

    /// The split-K scratch of products queued now: the side stream's own, so products on the
    /// two streams never share it.
    fn part(&self, s: &Scratch) -> Partial {
        let (p, c) = if self.gpu.is_on_side() {
            (&s.partial_side, &s.counters_side)
        } else {
            (&s.partial, &s.counters)
        };
        Partial {
            ptr: p.ptr,
            floats: p.bytes / 4,
            counters: c.ptr,
            n_counters: c.bytes / 4,
        }
    }

    fn run_batch(
        &self,
        s: &mut Scratch,
        items: &mut [BatchItem<'_>],
        t: usize,
        x_in: Option<&[f32]>,
    ) -> Result<PartOut> {
        let g = &*self.gpu;
        let c = &self.config;
        let last = self.weights.head.is_some();
        let timer = StepTimer::start();
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
        // A decode step (one new token per sequence) runs from per-token cache tables, with no
        // host work between kernels, so it can be captured once and replayed.
        let decode = items.iter().all(|it| it.ids.len() == 1);
        g.htod(s.ids.ptr, &ids)?;
        g.htod(s.positions.ptr, &positions)?;
        if let Some(x) = x_in {
            // A later pipeline stage starts from the previous stage's streams.
            g.htod(s.x.ptr, x)?;
        }
        if decode {
            self.prepare_decode(s, items)?;
        }
        // The rows whose logits are computed: a decode step computes all of them (one graph
        // per batch size), other calls only the wanted ones.
        // Each item's wanted rows of the batch (a contiguous range).
        let wanted: Vec<std::ops::Range<usize>> = items
            .iter()
            .zip(&segs)
            .map(|(it, seg)| match it.want {
                Logits::All => seg.start..seg.start + seg.len,
                Logits::Last if seg.len > 0 => seg.start + seg.len - 1..seg.start + seg.len,
                _ => 0..0,
            })
            .collect();
        // (A stage without the head computes no logits.)
        let any_wanted = last && wanted.iter().any(|r| !r.is_empty());
        let all_rows = decode && any_wanted;
        let head_rows: Vec<usize> = if all_rows {
            (0..t).collect()
        } else if last {
            wanted.iter().flat_map(|r| r.clone()).collect()
        } else {
            Vec::new()
        };
        let replay = decode && self.moe_per_pair(t) && self.graphs.load(Ordering::Relaxed);
        let timer = timer.mark();
        if replay {
            let key = (t, !head_rows.is_empty());
            if !s.graphs.contains_key(&key) {
                g.begin_capture()?;
                let res = self.enqueue(s, None, t, &head_rows);
                let graph = g.end_capture();
                res?;
                s.graphs.insert(key, StepGraph(graph?));
            }
            s.graphs[&key]
                .0
                .launch()
                .map_err(|e| Error::Driver(format!("replaying a decode step: {e}")))?;
        } else {
            let per_seq = if decode {
                None
            } else {
                Some((&mut *items, &segs[..]))
            };
            self.enqueue(s, per_seq, t, &head_rows)?;
        }
        let timer = timer.mark();
        for (it, seg) in items.iter_mut().zip(&segs) {
            it.seq.pos += seg.len;
            if decode {
                // The compressors' entries were appended on the device.
                for ls in it.seq.layers.iter_mut() {
                    for cs in [ls.comp.as_mut(), ls.index.as_mut()].into_iter().flatten() {
                        cs.n = it.seq.pos / cs.ratio;
                    }
                }
            }
        }
        if !last {
            let rows = t * c.hc_mult * c.hidden_size;
            return g.dtoh_with(s.x.ptr, rows, |x| PartOut::Hidden(x.to_vec()));
        }
        if !any_wanted {
            g.sync()?;
            return Ok(PartOut::Logits(vec![Vec::new(); items.len()]));
        }
        let vocab = c.vocab_size;
        // Logits row of each wanted row: itself when every row was computed, else the rows
        // follow one another in item order.
        let mut next = 0;
        let spans: Vec<std::ops::Range<usize>> = wanted
            .into_iter()
            .map(|r| {
                let at = if all_rows { r.start } else { next };
                next += r.len();
                at * vocab..(at + r.len()) * vocab
            })
            .collect();
        let out = g.dtoh_with(s.out_logits.ptr, head_rows.len() * vocab, |logits| {
            // Several items' rows (0.5 MB each for Flash's vocabulary) are copied out by
            // several threads.
            PartOut::Logits(if spans.len() >= PAR_COPY_ITEMS {
                spans.into_par_iter().map(|r| logits[r].to_vec()).collect()
            } else {
                spans.into_iter().map(|r| logits[r].to_vec()).collect()
            })
        });
        timer.report(t, items.first().map_or(0, |it| it.seq.pos));
        out
    }

    /// Whether `t` tokens take the per-pair MoE kernels (no host round trip).
    fn moe_per_pair(&self, t: usize) -> bool {
        let c = &self.config;
        t * c.num_experts_per_tok <= GROUP_PAIRS.max(8 * c.n_routed_experts)
    }

    /// Before a decode step: room for the entry each compressor may emit, and the per-token
    /// cache table (uploaded only when a pointer moved).
    fn prepare_decode(&self, s: &mut Scratch, items: &mut [BatchItem<'_>]) -> Result<()> {
        let g = &*self.gpu;
        let t = items.len();
        let ld = s.scores_floats / t;
        for it in items.iter_mut() {
            let after = it.seq.pos + 1;
            for ls in it.seq.layers.iter_mut() {
                for cs in [ls.comp.as_mut(), ls.index.as_mut()].into_iter().flatten() {
                    cs.reserve(g, after / cs.ratio)?;
                }
                if let Some(is) = &ls.index {
                    if after / is.ratio > ld {
                        return Err(Error::Unsupported(format!(
                            "{} indexer entries exceed the score buffer ({ld} per token)",
                            after / is.ratio
                        )));
                    }
                }
            }
        }
        let layers = self.weights.layers.len();
        let mut table = Vec::with_capacity(layers * t);
        for li in 0..layers {
            table.extend(items.iter().map(|it| it.seq.layers[li].ptrs()));
        }
        if table != s.table_host {
            g.htod(s.seq_table.ptr, &table)?;
            s.table_host = table;
        }
        Ok(())
    }

    /// Queues the whole forward of a call: embedding, layers and, for `head_rows`, the logits
    /// into `s.out_logits`. Without `per_seq` (a decode step), attention runs from the per-token
    /// cache table and nothing here waits on the device or reads host state that changes
    /// between steps.
    fn enqueue(
        &self,
        s: &mut Scratch,
        mut per_seq: PerSeq<'_, '_>,
        t: usize,
        head_rows: &[usize],
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let nn = n as i32;
        s.tc_ok = per_seq.is_some();
        // (Not while profiling: the profile times launches one at a time.)
        s.branch = per_seq.is_none() && t <= BRANCH_TOKENS && g.branches() && !g.profiling();
        // (A call that failed midway may have left a deferred Sinkhorn behind.)
        s.mix_pending = None;
        // A later pipeline stage finds the previous stage's streams in s.x instead.
        if let Some(embed) = &self.weights.embed {
            g.launch(
                "embed",
                (t as u32, 1, 1),
                (256, 1, 1),
                0,
                &[&embed.desc, &s.ids.ptr, &s.x.ptr, &nn],
            )?;
        }
        // Few tokens: each boundary between blocks (the post-mix of the block that ran, the
        // pre-mix and norm of the next) is one launch; the last post-mix runs on its own.
        let fused = t <= HC_FUSED_TOKENS
            && self.hc_fused.load(Ordering::Relaxed)
            && n <= 4
            && d % 4 == 0
            && self
                .weights
                .layers
                .iter()
                .all(|l| l.hc_attn.fn_.fmt == Fmt::F32 && l.hc_ffn.fn_.fmt == Fmt::F32);
        let layers = self.weights.layers.len();
        for (li, lw) in self.weights.layers.iter().enumerate() {
            if fused {
                // (The previous layer's experts are combined into its output here.)
                self.hc_fused(s, li > 0, true, &lw.hc_attn, lw.attn_norm.ptr(), t)?;
                // Its Sinkhorn at once: the side stream is idle here (joined at the last
                // layer's experts) and rejoins before the attention.
                self.fork_mix(s, t)?;
            } else {
                self.hc_pre(s, &lw.hc_attn, t)?;
                ops::rms_norm(g, s.h.ptr, lw.attn_norm.ptr(), d, t, c.rms_norm_eps)?;
            }
            self.attention(s, lw, li, &mut per_seq, t)?;
            if fused {
                self.hc_fused(s, true, false, &lw.hc_ffn, lw.ffn_norm.ptr(), t)?;
            } else {
                self.hc_post(s, t)?;
                self.hc_pre(s, &lw.hc_ffn, t)?;
                ops::rms_norm(g, s.h.ptr, lw.ffn_norm.ptr(), d, t, c.rms_norm_eps)?;
            }
            let boundary_combines = fused && li + 1 < layers;
            self.moe(s, lw, t, !boundary_combines)?;
            if !boundary_combines {
                self.hc_post(s, t)?;
            }
        }
        g.join_side()?;
        if head_rows.is_empty() {
            return Ok(());
        }
        let row_floats = n * d;
        let xs = if head_rows.windows(2).all(|w| w[1] == w[0] + 1) {
            s.x.at::<f32>(head_rows[0] * row_floats)
        } else {
            for (i, &r) in head_rows.iter().enumerate() {
                g.dtod(
                    s.xg.at::<f32>(i * row_floats),
                    s.x.at::<f32>(r * row_floats),
                    row_floats * 4,
                )?;
            }
            s.xg.ptr
        };
        self.head(s, xs, head_rows.len())
    }

    /// Hyper-head, final norm and the vocabulary projection of `m` stream rows at `xs` into
    /// `s.out_logits`.
    fn head(&self, s: &Scratch, xs: u64, m: usize) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let Some(wh) = &self.weights.head else {
            return Err(Error::Unsupported(
                "a pipeline stage without the head".into(),
            ));
        };
        let hh = &wh.hc_head;
        ops::inv_rms(g, xs, s.rinv.ptr, n * d, m, c.rms_norm_eps)?;
        ops::linear(
            g,
            &hh.fn_,
            &LinIn::rows(xs, n * d, m),
            s.mu.ptr,
            n,
            &self.part(s),
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
        ops::rms_norm(g, s.h.ptr, wh.norm.ptr(), d, m, c.rms_norm_eps)?;
        let vocab = c.vocab_size;
        ops::linear(
            g,
            &wh.head,
            &LinIn::rows(s.h.ptr, d, m),
            s.out_logits.ptr,
            vocab,
            &self.part(s),
        )
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
            &self.part(s),
        )?;
        ops::hc_mix(
            g,
            s.mu.ptr,
            s.rinv.ptr,
            hc.base.ptr(),
            hc.scale.ptr(),
            (s.pre.ptr, s.post.ptr, s.comb.ptr),
            n,
            c.hc_sinkhorn_iters,
            c.hc_eps,
            t,
        )?;
        let (ni, ti, di) = (n as i32, t as i32, d as i32);
        ops::elementwise(
            g,
            "hc_collapse",
            t * d,
            &[&s.x.ptr, &s.pre.ptr, &s.h.ptr, &ni, &di, &ti],
        )
    }

    /// A block boundary for `t <= HC_FUSED_TOKENS` tokens in one launch: with `post`, the block
    /// output `s.f` (plus the routed experts' outputs when `combine`, which `moe` then leaves
    /// out) mixed into the streams (as `hc_post`); then `hc_pre` of `hc` and the RMS norm
    /// (weight `norm`) into `s.h`.
    fn hc_fused(
        &self,
        s: &mut Scratch,
        post: bool,
        combine: bool,
        hc: &GpuHc,
        norm: u64,
        t: usize,
    ) -> Result<()> {
        let c = &self.config;
        let (d, n) = (c.hidden_size, c.hc_mult);
        let defer = s.branch && self.hc_defer.load(Ordering::Relaxed);
        // Always assigned: a call that failed between a deferring boundary and its fork must not
        // leave a stale mix for the next call to queue.
        s.mix_pending = defer.then(|| (hc.base.ptr(), hc.scale.ptr()));
        let (mu, rinv) = if defer {
            (s.mu.ptr, s.rinv.ptr)
        } else {
            (0, 0)
        };
        let a = ops::HcArgs {
            x: s.x.ptr,
            f: if post { s.f.ptr } else { 0 },
            eout: if post && combine { s.eout.ptr } else { 0 },
            rw: s.rw.ptr,
            fn_: hc.fn_.desc.w,
            base: hc.base.ptr(),
            scale: hc.scale.ptr(),
            norm_w: norm,
            partial: s.hc_part.ptr,
            pre: s.pre.ptr,
            post: s.post.ptr,
            comb: s.comb.ptr,
            h: s.h.ptr,
            count: s.hc_count.ptr,
            mu,
            rinv,
            n: n as i32,
            d: d as i32,
            iters: c.hc_sinkhorn_iters as i32,
            s: 0,
            k: c.num_experts_per_tok as i32,
            rw_inside: self.numerics.act_quant() as i32,
            hc_eps: c.hc_eps,
            norm_eps: c.rms_norm_eps,
        };
        ops::hc_boundary(&self.gpu, &a, t, self.hc_cluster.load(Ordering::Relaxed))
    }

    /// Queues on the side stream the Sinkhorn that the last fused boundary left (if it did):
    /// `pre`, `post` and `comb` from the mix rows in `s.mu`, `s.rinv`. Every later boundary
    /// (and the last post-mix) comes after a join of the side stream.
    fn fork_mix(&self, s: &mut Scratch, t: usize) -> Result<()> {
        let Some((base, scale)) = s.mix_pending.take() else {
            return Ok(());
        };
        let c = &self.config;
        let g = &*self.gpu;
        g.on_side(|| {
            ops::hc_mix(
                g,
                s.mu.ptr,
                s.rinv.ptr,
                base,
                scale,
                (s.pre.ptr, s.post.ptr, s.comb.ptr),
                c.hc_mult,
                c.hc_sinkhorn_iters,
                c.hc_eps,
                t,
            )
        })
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

    /// The input of the FP8/FP4 GEMMs that read `s.h` (`t` rows): `s.h`, or with activation
    /// quantization its FP8-rounded copy in `s.hq`.
    fn gemm_h(&self, s: &Scratch, t: usize) -> Result<LinIn> {
        let d = self.config.hidden_size;
        if !self.numerics.act_quant() {
            return Ok(LinIn::rows(s.h.ptr, d, t));
        }
        crate::quant::fp8_round_copy(&self.gpu, (s.h.ptr, d), s.hq.ptr, d, t, d)?;
        Ok(self.gemm_input(LinIn::rows(s.hq.ptr, d, t)))
    }

    /// An input that holds FP8-rounded values under activation quantization: one bf16 part
    /// carries it exactly through the tensor-core kernels (f32 inputs need three).
    fn gemm_input(&self, inp: LinIn) -> LinIn {
        LinIn {
            terms: if self.numerics.act_quant() {
                1
            } else {
                inp.terms
            },
            ..inp
        }
    }

    /// `y = W x` for a GEMM whose input is FP8-quantized in the official profile: on the tensor
    /// cores (cuBLASLt, DeepSeek's `fp8_gemm`) for FP8 weights when prefill has enough tokens,
    /// else `ops::linear` (exact f32 over the same rounded input).
    fn dense(
        &self,
        s: &mut Scratch,
        w: &crate::weights::GpuLinear,
        inp: &LinIn,
        y: u64,
        ldy: usize,
    ) -> Result<()> {
        if let Some(tc) = &self.tc {
            if s.tc_ok
                && tc.on.load(Ordering::Relaxed)
                && w.fmt == Fmt::Fp8
                && inp.m >= TC_MIN_TOKENS
                && inp.group.is_none()
            {
                let tw = {
                    let mut map = tc.weights.lock().unwrap_or_else(|p| p.into_inner());
                    match map.get(&w.desc.w) {
                        Some(tw) => Some(tw.clone()),
                        // Shapes cuBLASLt cannot take stay on the exact path.
                        None => crate::blaslt::Fp8TcWeight::new(&self.gpu, w)
                            .ok()
                            .map(|tw| map.entry(w.desc.w).or_insert(Arc::new(tw)).clone()),
                    }
                };
                if let Some(tw) = tw {
                    return ops::linear_fp8_tc(&tc.lt, &tw, inp, y, ldy, &mut s.fp8);
                }
            }
        }
        ops::linear(&self.gpu, w, inp, y, ldy, &self.part(s))
    }

    /// [`Self::dense`] of the query latent, whose norm (weights, epsilon) is still to apply
    /// when `norm` is given: then in the product's loads (`ops::linear_normed`).
    fn dense_q(
        &self,
        s: &mut Scratch,
        w: &crate::weights::GpuLinear,
        inp: &LinIn,
        norm: Option<(u64, f32)>,
        y: u64,
        ldy: usize,
    ) -> Result<()> {
        match norm {
            Some((nw, eps)) => {
                ops::linear_normed(&self.gpu, w, inp, nw, eps, y, ldy, &self.part(s))
            }
            None => self.dense(s, w, inp, y, ldy),
        }
    }

    /// Several products of one input batch: one launch for a one-token step's GEMVs
    /// (`ops::linear_multi`), else each on its own (`dense`: the tensor cores where they apply).
    fn project(&self, s: &mut Scratch, jobs: &[LinJob<'_>]) -> Result<()> {
        let m = jobs.first().map_or(0, |j| j.inp.m);
        if self.multi_gemv
            && self.bulk_multi.load(Ordering::Relaxed)
            && ops::bulk_multi_ok(&self.gpu, jobs)
        {
            return ops::linear_bulk_multi(&self.gpu, jobs, &self.part(s));
        }
        // One token only: with more, the several-format kernel's registers (the most any
        // format needs) cost more than the launches it saves (A/B on an H200, batch 8 and 32).
        if m == 1 && self.multi_gemv {
            return ops::linear_multi(&self.gpu, jobs, &self.part(s));
        }
        for j in jobs {
            self.dense(s, j.w, &j.inp, j.y, j.w.out)?;
        }
        Ok(())
    }

    /// The input of the next FP8/FP4 GEMM, `rows` rows of `width` at `x`: with activation
    /// quantization FP8-rounded in place first (nothing else reads them unrounded).
    fn round_in_place(&self, x: u64, width: usize, rows: usize) -> Result<LinIn> {
        if self.numerics.act_quant() {
            crate::quant::fp8_round_trip(&self.gpu, x, width, rows, width, ACT_BLOCK)?;
        }
        Ok(self.gemm_input(LinIn::rows(x, width, rows)))
    }

    /// How this layer's compressor entries are stored (`indexer`: the indexer's keys).
    fn entry_round(&self, indexer: bool) -> EntryRound {
        match (self.numerics.is_official(), indexer) {
            (false, _) => EntryRound::None,
            (true, false) => EntryRound::Fp8Nope,
            (true, true) => EntryRound::HadamardFp4,
        }
    }

    /// `rows` stored rows of `d` values at `x` rounded as `mode` says.
    fn round_entries(&self, x: u64, d: usize, rows: usize, mode: EntryRound) -> Result<()> {
        match mode {
            EntryRound::None => Ok(()),
            EntryRound::Fp8Nope => {
                let nope = d - self.config.rope_dim;
                crate::quant::fp8_round_trip(&self.gpu, x, d, rows, nope, KV_BLOCK)
            }
            EntryRound::HadamardFp4 => {
                crate::quant::hadamard_fp4_round_trip(&self.gpu, x, d, rows, d)
            }
        }
    }

    /// Attention of the batch's tokens: reads `s.h`, writes `s.f`. Projections, norms and RoPE
    /// run over all tokens; compressors, indexer, attention and the window ring per sequence.
    fn attention(
        &self,
        s: &mut Scratch,
        lw: &GpuLayer,
        li: usize,
        per_seq: &mut PerSeq<'_, '_>,
        t: usize,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let a = &lw.attn;
        let (d, h, dh) = (c.hidden_size, c.num_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        let rope = self.rope_dev(lw.kind);
        let part = self.part(s);
        let hin = LinIn::rows(s.h.ptr, d, t);
        let hq = self.gemm_h(s, t)?;
        let pos = Pos::Table(s.positions.ptr);

        // Every projection of h at once: one launch in a decode step.
        let mut jobs = vec![
            LinJob {
                w: &a.wq_a,
                inp: hq,
                y: s.qr.ptr,
            },
            LinJob {
                w: &a.wkv,
                inp: hq,
                y: s.kv.ptr,
            },
        ];
        if let Some(cw) = &a.compressor {
            jobs.push(LinJob {
                w: &cw.wkv,
                inp: hin,
                y: s.cproj_kv.ptr,
            });
            jobs.push(LinJob {
                w: &cw.wgate,
                inp: hin,
                y: s.cproj_gate.ptr,
            });
        }
        if let Some(ix) = &a.indexer {
            let ic = &ix.compressor;
            for (w, y) in [
                (&ic.wkv, s.iproj_kv.ptr),
                (&ic.wgate, s.iproj_gate.ptr),
                (&ix.weights_proj, s.hw.ptr),
            ] {
                jobs.push(LinJob { w, inp: hin, y });
            }
        }
        self.project(s, &jobs)?;
        let qlr = c.q_lora_rank;
        // A decode step queues the compressors, the indexer's query rotation and its selection
        // on the side stream, beside the queries and keys below.
        let branch = per_seq.is_none() && s.branch;
        let early = branch && self.index_first;
        if early && a.compressor.is_some() {
            // The compressors need only the projections of h: beside the norm and wq_b.
            g.on_side(|| self.decode_compress(s, lw, li, t, &rope))?;
        }
        // One token: the norm of qr in its readers' loads where both take the normed bulk
        // kernel (the indexer's wq_b reads qr only here when it runs early), else its own
        // launch. (Nothing to round between them without activation quantization.)
        let qin = self.gemm_input(LinIn::rows(s.qr.ptr, qlr, t));
        let qnorm = (self.qnorm_fused.load(Ordering::Relaxed)
            && per_seq.is_none()
            && !self.numerics.act_quant()
            && (early || a.indexer.is_none())
            && ops::normed_applies(g, &a.wq_b, &qin)
            && a.indexer
                .as_ref()
                .is_none_or(|ix| ops::normed_applies(g, &ix.wq_b, &qin)))
        .then(|| (a.q_norm.ptr(), eps));
        if qnorm.is_none() {
            ops::rms_norm(g, s.qr.ptr, a.q_norm.ptr(), qlr, t, eps)?;
        }
        // Both readers of qr (wq_b, the indexer's wq_b) are FP8 GEMMs.
        let qrin = self.round_in_place(s.qr.ptr, qlr, t)?;
        let prep = if early {
            // The indexer's wq_b on the main stream before wq_b: as a bulk GEMV on the side
            // stream it found no SM free until wq_b's blocks left, and the selection chain
            // after it held the attention ~14 µs past wq_b in CSA layers; now ~8 (H100, stop
            // 30: 18 layers 3.18–3.19 → 3.16 ms; both query products in one bulk launch: 3.18).
            if let Some(ix) = &a.indexer {
                let (hi, di) = (c.index_n_heads, c.index_head_dim);
                self.dense_q(s, &ix.wq_b, &qrin, qnorm, s.qi.ptr, hi * di)?;
            }
            Some(g.on_side(|| {
                self.indexer_rotate(s, a, &rope, pos, t)?;
                self.decode_select(s, lw, li, t)
            })?)
        } else if branch {
            Some(g.on_side(|| self.decode_prep(s, lw, li, t, &rope, &qrin, pos))?)
        } else {
            None
        };
        self.dense_q(s, &a.wq_b, &qrin, qnorm, s.q.ptr, h * dh)?;
        // The query heads (no weight) and the key row: one launch.
        let heads = ops::NormRows {
            x: s.q.ptr,
            w: 0,
            rows: t * h,
            rows_per_token: h,
        };
        let keys = ops::NormRows {
            x: s.kv.ptr,
            w: a.kv_norm.ptr(),
            rows: t,
            rows_per_token: 1,
        };
        ops::rms_norm_rope(g, heads, Some(keys), dh, eps, &rope, pos)?;
        // The row is key and value as stored: the official profile's FP8 nope channels.
        self.round_entries(s.kv.ptr, dh, t, self.entry_round(false))?;

        match (per_seq, prep) {
            (None, Some(args)) => {
                g.join_side()?;
                if self.attn_tail(s, lw, t, &args, &rope)? {
                    return Ok(());
                }
                self.attend_seqs(s, t, &args, &rope)?;
            }
            (None, None) => {
                let args = self.decode_prep(s, lw, li, t, &rope, &qrin, pos)?;
                self.attend_seqs(s, t, &args, &rope)?;
            }
            (Some((items, segs)), _) => {
                self.indexer_queries(s, a, &qrin, &rope, pos, t)?;
                for (it, seg) in items.iter_mut().zip(segs.iter()) {
                    if seg.len == 0 {
                        continue;
                    }
                    let ls = &mut it.seq.layers[li];
                    self.attend(s, lw, ls, seg, &rope)?;
                }
            }
        }

        // (attn_combine applied the inverse RoPE to the outputs.)
        let (gr, rk) = (c.o_groups, c.o_lora_rank);
        let oin = self.o_input(s, t)?;
        if t <= 2 && !self.numerics.act_quant() && self.pair_fused.load(Ordering::Relaxed) {
            // One or two tokens (decode): wo_b streams in wo_a's launch (nothing to round
            // between them).
            let (ja, jb) = self.wo_jobs(s, lw, oin, t);
            ops::linear_pair(g, &ja, &jb, &part, s.pair_bar.ptr)
        } else {
            ops::linear(g, &a.wo_a, &oin, s.z.ptr, gr * rk, &part)?;
            let zin = self.round_in_place(s.z.ptr, gr * rk, t)?;
            self.dense(s, &a.wo_b, &zin, s.f.ptr, d)
        }
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
            seqs: 0,
            positions: 0,
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
            self.compress(s, cw, cs, seg, proj, rope, self.entry_round(false))?;
            args.entries = cs.entries.ptr;
            args.ratio = cw.ratio as i32;
            args.n_entries = cs.n as i32;
            max_comp = cs.n;
            if let Some(ix) = &a.indexer {
                let is = ls.index.as_mut().expect("CSA layers have indexer state");
                let proj = (s.iproj_kv.ptr, s.iproj_gate.ptr);
                let round = self.entry_round(true);
                self.compress(s, &ix.compressor, is, seg, proj, rope, round)?;
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
                .clamp(1, COMBINE_MAX_SPLITS)
        };
        self.attend_splits(s, &args, nsplit, rope, s.positions.at::<i32>(st))?;
        let dhi = dh as i32;
        let (wi, p0, ti) = (c.sliding_window as i32, pos0 as i32, t as i32);
        g.launch(
            "ring_store",
            (t as u32, 1, 1),
            (128, 1, 1),
            0,
            &[&args.kv_new, &ls.ring.ptr, &dhi, &wi, &p0, &ti],
        )
    }

    /// The per-sequence part of attention for a decode step before the attention itself, every
    /// token its own sequence with its caches in layer `li`'s row of the table: the indexer's
    /// queries, the compressors and the indexer's selection, one launch each for the whole
    /// batch and with grids fixed by `t` alone. Returns the attention's arguments.
    #[allow(clippy::too_many_arguments)]
    fn decode_prep(
        &self,
        s: &mut Scratch,
        lw: &GpuLayer,
        li: usize,
        t: usize,
        rope: &RopeDev,
        qrin: &LinIn,
        pos: Pos,
    ) -> Result<AttnArgs> {
        self.indexer_queries(s, &lw.attn, qrin, rope, pos, t)?;
        self.decode_compress(s, lw, li, t, rope)?;
        self.decode_select(s, lw, li, t)
    }

    /// The indexer's queries of the `t` rows (`s.qi`) from the normed query latents `qrin`.
    fn indexer_queries(
        &self,
        s: &mut Scratch,
        a: &crate::weights::GpuAttention,
        qrin: &LinIn,
        rope: &RopeDev,
        pos: Pos,
        t: usize,
    ) -> Result<()> {
        let Some(ix) = &a.indexer else {
            return Ok(());
        };
        let c = &self.config;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        self.dense(s, &ix.wq_b, qrin, s.qi.ptr, hi * di)?;
        self.indexer_rotate(s, a, rope, pos, t)
    }

    /// The indexer's queries in `s.qi` rotated (and, official, rounded like the stored keys).
    fn indexer_rotate(
        &self,
        s: &Scratch,
        a: &crate::weights::GpuAttention,
        rope: &RopeDev,
        pos: Pos,
        t: usize,
    ) -> Result<()> {
        if a.indexer.is_none() {
            return Ok(());
        }
        let (hi, di) = (self.config.index_n_heads, self.config.index_head_dim);
        ops::rope(&self.gpu, s.qi.ptr, t * hi, di, hi, rope, pos, false)?;
        self.round_entries(s.qi.ptr, di, t * hi, self.entry_round(true))
    }

    /// A decode step's compressor updates (each token's caches through the per-token table):
    /// the windows the step completes, pooled into entries.
    fn decode_compress(
        &self,
        s: &Scratch,
        lw: &GpuLayer,
        li: usize,
        t: usize,
        rope: &RopeDev,
    ) -> Result<()> {
        let g = &*self.gpu;
        let a = &lw.attn;
        let seqs = s.seq_table.at::<SeqLayerPtrs>(li * t);
        let positions = s.positions.ptr;
        let eps = self.config.rms_norm_eps;
        let comp = |cw: &GpuCompressor, which: i32, kv: u64, gate: u64| -> Result<()> {
            let (width, dim) = (cw.wkv.out as i32, cw.dim as i32);
            let (m, overlap, half) = (cw.ratio as i32, cw.overlap as i32, rope.half as i32);
            let round = self.entry_round(which == 1) as i32;
            let inv_sqrt = crate::quant::hadamard_factor(cw.dim);
            g.launch(
                "comp_decode",
                (t as u32, 1, 1),
                (256, 1, 1),
                (cw.dim * 4) as u32,
                &[
                    &kv,
                    &gate,
                    &cw.ape.ptr(),
                    &cw.norm.ptr(),
                    &seqs,
                    &which,
                    &positions,
                    &width,
                    &dim,
                    &m,
                    &overlap,
                    &eps,
                    &rope.inv_freq,
                    &half,
                    &rope.factor,
                    &round,
                    &inv_sqrt,
                ],
            )
        };
        if let Some(cw) = &a.compressor {
            comp(cw, 0, s.cproj_kv.ptr, s.cproj_gate.ptr)?;
            if let Some(ix) = &a.indexer {
                comp(&ix.compressor, 1, s.iproj_kv.ptr, s.iproj_gate.ptr)?;
            }
        }
        Ok(())
    }

    /// A decode step's indexer selection (after [`Self::decode_compress`] and the indexer's
    /// queries), and the attention arguments of the step's layer `li`.
    fn decode_select(&self, s: &Scratch, lw: &GpuLayer, li: usize, t: usize) -> Result<AttnArgs> {
        let g = &*self.gpu;
        let c = &self.config;
        let a = &lw.attn;
        let (h, dh) = (c.num_heads, c.head_dim);
        let seqs = s.seq_table.at::<SeqLayerPtrs>(li * t);
        let positions = s.positions.ptr;
        let mut args = AttnArgs {
            q: s.q.ptr,
            kv_new: s.kv.ptr,
            ring: 0,
            entries: 0,
            sel: 0,
            nsel: 0,
            sinks: a.sinks.ptr(),
            out: s.o.ptr,
            seqs,
            positions,
            t: t as i32,
            h: h as i32,
            dh: dh as i32,
            win: c.sliding_window as i32,
            pos0: 0,
            ratio: 0,
            n_entries: i32::MAX,
            sel_cap: c.index_topk as i32,
            scale: 1.0 / (dh as f32).sqrt(),
        };
        if let Some(cw) = &a.compressor {
            args.ratio = cw.ratio as i32;
            if let Some(ix) = &a.indexer {
                let ic = &ix.compressor;
                let (hi, di) = (c.index_n_heads, c.index_head_dim);
                let ld = s.scores_floats / t;
                let scores = ops::IndexerScores {
                    q: s.qi.ptr,
                    hw: s.hw.ptr,
                    keys: 0,
                    heads: hi,
                    dim: di,
                    pos0: 0,
                    ratio: ic.ratio,
                    n: 0,
                    scores: s.scores.ptr,
                    ld,
                    seqs,
                    positions,
                    tensor_cores: self.index_tc,
                };
                ops::indexer_scores(g, t, &scores)?;
                let topk = ops::TopK {
                    scores: s.scores.ptr,
                    ld,
                    pos0: 0,
                    ratio: ic.ratio,
                    n: 0,
                    positions,
                    k: c.index_topk,
                    sel: s.sel.ptr,
                    sel_cap: c.index_topk,
                    nsel: s.nsel.ptr,
                };
                ops::topk_select(g, t, &topk)?;
                args.sel = s.sel.ptr;
                args.nsel = s.nsel.ptr;
            }
        }
        Ok(args)
    }

    /// A decode step's attention (after [`Self::decode_select`]) and the window ring update.
    fn attend_seqs(
        &self,
        s: &mut Scratch,
        t: usize,
        args: &AttnArgs,
        rope: &RopeDev,
    ) -> Result<()> {
        let nsplit = self.decode_splits(s, t, args);
        self.attend_splits(s, args, nsplit, rope, s.positions.ptr)?;
        self.ring_store_seqs(s, t, args)
    }

    /// Key splits of a decode step's attention for `t` tokens. The graph is captured once per
    /// batch size, so the count is static: it is capped by the most key chunks a token of this
    /// layer kind can have (the window, plus the indexer's selection in CSA layers; HCA's
    /// entries grow with the context), so no block is launched only to write an empty partial
    /// for `attn_combine` to merge.
    fn decode_splits(&self, s: &Scratch, t: usize, args: &AttnArgs) -> usize {
        let c = &self.config;
        let (h, dh) = (c.num_heads, c.head_dim);
        let groups = h.div_ceil(ATT_HEADS);
        let max_keys = match (args.ratio, args.sel) {
            _ if !self.attn_split_cap => usize::MAX,
            (0, _) => c.sliding_window,
            (_, sel) if sel != 0 => c.sliding_window + c.index_topk,
            _ => usize::MAX,
        };
        let sms = self.gpu.sm_count;
        let blocks = if self.attn_one_wave {
            sms / (t * groups)
        } else {
            (2 * sms).div_ceil(t * groups)
        };
        blocks
            .min(max_keys.div_ceil(ATT_KEYS))
            .min(s.attn_part.bytes / 4 / (t * h * (dh + 2)))
            .clamp(1, COMBINE_MAX_SPLITS)
    }

    /// Stores a decode step's new key rows into their sequences' window rings.
    fn ring_store_seqs(&self, s: &Scratch, t: usize, args: &AttnArgs) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (dhi, wi) = (c.head_dim as i32, c.sliding_window as i32);
        // Nothing in this step reads the ring slot written (the attention took the new row
        // from s.kv), so a decode step stores it on the side stream beside `wo_a`; the branch
        // rejoins at the end of the layer's experts, before s.kv is written again.
        let store = || {
            g.launch(
                "ring_store_seqs",
                (t as u32, 1, 1),
                (128, 1, 1),
                0,
                &[&s.kv.ptr, &args.seqs, &args.positions, &dhi, &wi],
            )
        };
        if s.branch {
            g.on_side(store)
        } else {
            store()
        }
    }

    /// The input of `wo_a`: the attention's outputs, `o_groups` slices of them.
    fn o_input(&self, s: &Scratch, t: usize) -> Result<LinIn> {
        let c = &self.config;
        let (h, dh, gr, rk) = (c.num_heads, c.head_dim, c.o_groups, c.o_lora_rank);
        if !rk.is_multiple_of(2) {
            return Err(Error::Unsupported(format!("o_lora_rank {rk} is odd")));
        }
        Ok(LinIn {
            x: s.o.ptr,
            ldx: h * dh,
            m: t,
            group: Some((rk, h / gr * dh)),
            terms: 3,
        })
    }

    /// A decode step's `wo_a` (of `oin`, [`Self::o_input`]) then `wo_b`, as one-launch jobs.
    fn wo_jobs<'w>(
        &self,
        s: &Scratch,
        lw: &'w GpuLayer,
        oin: LinIn,
        t: usize,
    ) -> (ops::PairJob<'w>, ops::PairJob<'w>) {
        let c = &self.config;
        let (z, d) = (c.o_groups * c.o_lora_rank, c.hidden_size);
        let zin = self.gemm_input(LinIn::rows(s.z.ptr, z, t));
        let a = &lw.attn;
        (
            ops::PairJob {
                w: &a.wo_a,
                inp: oin,
                y: s.z.ptr,
                ldy: z,
            },
            ops::PairJob {
                w: &a.wo_b,
                inp: zin,
                y: s.f.ptr,
                ldy: d,
            },
        )
    }

    /// A one-token decode step's split attention, merge, `wo_a` and `wo_b` in one launch
    /// (`ops::attn_tail`, `DSV4_CUDA_PERSIST=1`: the launch path's results bit for bit), then
    /// the ring store. False, with nothing queued, where it does not apply.
    fn attn_tail(
        &self,
        s: &Scratch,
        lw: &GpuLayer,
        t: usize,
        args: &AttnArgs,
        rope: &RopeDev,
    ) -> Result<bool> {
        if t != 1 || self.numerics.act_quant() || !self.persist_tail.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let nsplit = self.decode_splits(s, t, args);
        let cb = ops::CombineArgs::new(rope, s.positions.ptr);
        let (ja, jb) = self.wo_jobs(s, lw, self.o_input(s, t)?, t);
        let grid = match self.tail_grid.load(Ordering::Relaxed) {
            0 => self.gpu.sm_count,
            n => n,
        };
        let launched = ops::attn_tail(
            &self.gpu,
            grid,
            args,
            s.attn_part.ptr,
            nsplit,
            &cb,
            &ja,
            &jb,
            &self.part(s),
            s.pair_bar.ptr,
        )?;
        if launched {
            self.tail_launches.fetch_add(1, Ordering::Relaxed);
            self.ring_store_seqs(s, t, args)?;
        }
        Ok(launched)
    }

    /// Attention over `nsplit` key splits per (token, head group), then the merge with the
    /// sinks into `args.out` and the outputs' inverse RoPE (`positions`: the tokens' own).
    fn attend_splits(
        &self,
        s: &Scratch,
        args: &AttnArgs,
        nsplit: usize,
        rope: &RopeDev,
        positions: u64,
    ) -> Result<()> {
        let g = &*self.gpu;
        let (t, h, dh) = (args.t as u32, args.h as usize, args.dh as usize);
        let ns = nsplit as i32;
        let cb = ops::CombineArgs::new(rope, positions);
        let tc = self.attn_tc
            && args.seqs == 0
            && nsplit == 1
            && ops::attention_tc_fits(h, dh)
            && t as usize * (h / ops::ATT_TC_HEADS) >= g.sm_count;
        ops::attention_partials(g, args, s.attn_part.ptr, nsplit, tc)?;
        g.launch(
            "attn_combine",
            (t, h as u32, dh.div_ceil(128) as u32),
            (128, 1, 1),
            0,
            &[
                &s.attn_part.ptr,
                &args.sinks,
                &args.out,
                &args.h,
                &args.dh,
                &ns,
                &cb.inv_freq,
                &cb.half,
                &cb.factor,
                &cb.positions,
            ],
        )
    }

    /// Appends a sequence's projected rows (`proj` = kv, gate of the whole batch) to its
    /// compressor and emits every window they complete, stored rounded as `round` says.
    #[allow(clippy::too_many_arguments)] // the state, the batch's rows and how to store
    fn compress(
        &self,
        s: &mut Scratch,
        cw: &GpuCompressor,
        cs: &mut CompState,
        seg: &Seg,
        proj: (u64, u64),
        rope: &RopeDev,
        round: EntryRound,
    ) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let (m, width, dim) = (cw.ratio, cw.wkv.out, cw.dim);
        let (t, pos0) = (seg.len, seg.pos0);
        let ext_start = cs.tail_from(pos0);
        let r = pos0 - ext_start;
        let row = width * 4;
        // ext = the tail's rows (from the ring), then this call's rows.
        ring_copy(g, cs, ext_start, r, (s.ext_kv.ptr, s.ext_gate.ptr), false)?;
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
            self.round_entries(out, dim, nw, round)?;
            cs.n = w1;
        }
        // The rows later windows need go back into the ring.
        let keep_from = cs.tail_from(pos1);
        let off = (keep_from - ext_start) as u64 * row as u64;
        let ext = (s.ext_kv.ptr + off, s.ext_gate.ptr + off);
        ring_copy(g, cs, keep_from, pos1 - keep_from, ext, true)
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
        // Tokens per pass so the score matrix fits its buffer.
        let per = (s.scores_floats / n.max(1)).clamp(1, t);
        for t0 in (0..t).step_by(per) {
            let tc = per.min(t - t0);
            let row = seg.start + t0;
            let qi = s.qi.at::<f32>(row * hi * di);
            let hw = s.hw.at::<f32>(row * hi);
            let scores = ops::IndexerScores {
                q: qi,
                hw,
                keys: is.entries.ptr,
                heads: hi,
                dim: di,
                pos0: pos0 + t0,
                ratio: m,
                n,
                scores: s.scores.ptr,
                ld: n,
                seqs: 0,
                positions: 0,
                tensor_cores: self.index_tc,
            };
            ops::indexer_scores(g, tc, &scores)?;
            let topk = ops::TopK {
                scores: s.scores.ptr,
                ld: n,
                pos0: pos0 + t0,
                ratio: m,
                n,
                positions: 0,
                k: c.index_topk,
                sel: s.sel.at::<i32>(row * c.index_topk),
                sel_cap: c.index_topk,
                nsel: s.nsel.at::<i32>(row),
            };
            ops::topk_select(g, tc, &topk)?;
        }
        Ok(())
    }

    /// The MoE block: reads `s.h` and token ids `s.ids`, writes `s.f`.
    /// The FFN block into `s.f`; without `combine`, the routed experts' weighted outputs stay in
    /// `s.eout` for the next block boundary to add.
    fn moe(&self, s: &mut Scratch, lw: &GpuLayer, t: usize, combine: bool) -> Result<()> {
        let g = &*self.gpu;
        let c = &self.config;
        let mw = &lw.moe;
        let (d, e, k, inter) = (
            c.hidden_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
        );
        let part = self.part(s);
        let hin = LinIn::rows(s.h.ptr, d, t);
        // The router reads h as is (f32 in the official code too); the experts' GEMMs read
        // it FP8-rounded under activation quantization.
        let hq = self.gemm_h(s, t)?;
        let aq = self.numerics.act_quant();
        let round = |rw: Option<u64>| aq.then_some(ops::HiddenRound { rw });
        let lim = c.swiglu_limit.unwrap_or(f32::NAN);
        let routed = MoeArgs {
            w1: mw.w1_table.ptr,
            w3: mw.w3_table.ptr,
            w2: mw.w2_table.ptr,
            picks: s.picks.ptr,
            rw: s.rw.ptr,
            x: hq.x,
            h: s.eh.ptr,
            out: s.eout.ptr,
            k: k as i32,
            d: d as i32,
            i: inter as i32,
            vec: mw.vec as i32,
            rw_inside: 0,
            lim,
        };
        // The router's keys: the top-k bias, or the hash table.
        let (bias, tid2eid) = match &mw.router {
            GpuRouter::TopK { bias } => (bias.ptr(), 0u64),
            GpuRouter::Hash { tid2eid } => (0u64, tid2eid.ptr),
        };
        let fused = self.ffn_fused.load(Ordering::Relaxed);
        if let Some((l, sh)) = fused
            .then(|| self.ffn_fused_layout(mw, &routed, t, aq))
            .flatten()
        {
            self.fork_mix(s, t)?;
            let f = crate::moe_ffn::FfnArgs {
                gate: mw.gate.desc,
                sg: sh.w1.desc,
                su: sh.w3.desc,
                sd: sh.w2.desc,
                hr: s.h.ptr,
                scores: s.route_e.ptr,
                sync: s.ffn_sync.ptr,
                bias,
                tid2eid,
                ids: s.ids.ptr,
                route_scale: c.routed_scaling_factor,
                shared_pre: self.ffn_shared_pre,
                dyn_tiles: self.ffn_dyn_tiles as u32,
                pad: 0,
                picks: s.picks.ptr,
                rw: s.rw.ptr,
                sh: s.sg.ptr,
                sout: s.f.ptr,
            };
            let path = ffn_path_of(self.ffn_path.load(Ordering::Relaxed));
            crate::moe_ffn::ffn_bulk(g, &l, &routed, &f, path)?;
            return self.moe_combine(s, t, combine, aq);
        }
        // One token's shared expert into s.f through the routed-expert kernels (one pass for
        // gate, up and SwiGLU, one for down), in a decode step on the side stream beside the
        // routing and the routed experts; otherwise its gate/up products go with the router's.
        let shared_one = t == 1 && mw.shared_table.is_some();
        if let (Some(sh), Some(table), true) = (&mw.shared, &mw.shared_table, shared_one) {
            let desc = std::mem::size_of::<crate::weights::LinearDesc>() as u64;
            let a = MoeArgs {
                w1: table.ptr,
                w3: table.ptr + desc,
                w2: table.ptr + 2 * desc,
                picks: s.zeros_i32.ptr,
                rw: 0,
                x: hq.x,
                h: s.sg.ptr,
                out: s.f.ptr,
                k: 1,
                d: d as i32,
                i: sh.w1.out as i32,
                vec: (sh.w1.vec && sh.w3.vec && sh.w2.vec) as i32,
                rw_inside: 0,
                lim,
            };
            let run = || ops::moe_experts(g, sh.w1.fmt, false, false, &a, t, round(None));
            if s.branch {
                g.on_side(run)?;
            } else {
                run()?;
            }
        }
        // The FFN boundary's Sinkhorn, if it left it, behind the shared expert on the side
        // stream (which rejoins below, after the routed experts).
        self.fork_mix(s, t)?;
        let (ei, ki, scale) = (e as i32, k as i32, c.routed_scaling_factor);
        let gate_with_shared = mw.shared.is_some() && !shared_one;
        if !gate_with_shared
            && self.route_fused.load(Ordering::Relaxed)
            && ops::router_route_ok(&mw.gate, t)
        {
            ops::router_route(
                g,
                &mw.gate,
                &ops::RouteArgs {
                    x: s.h.ptr,
                    t,
                    scores: s.route_e.ptr,
                    count: s.route_count.ptr,
                    k,
                    bias,
                    tid2eid,
                    ids: s.ids.ptr,
                    scale,
                    picks: s.picks.ptr,
                    rw: s.rw.ptr,
                },
            )?;
        } else {
            match &mw.shared {
                Some(sh) if gate_with_shared => self.project(
                    s,
                    &[
                        LinJob {
                            w: &mw.gate,
                            inp: hin,
                            y: s.route_e.ptr,
                        },
                        LinJob {
                            w: &sh.w1,
                            inp: hq,
                            y: s.sg.ptr,
                        },
                        LinJob {
                            w: &sh.w3,
                            inp: hq,
                            y: s.su.ptr,
                        },
                    ],
                )?,
                _ => ops::linear(g, &mw.gate, &hin, s.route_e.ptr, e, &part)?,
            }
            g.launch(
                "moe_route",
                (t as u32, 1, 1),
                (32, 1, 1),
                0,
                &[
                    &s.route_e.ptr,
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
        }
        // The shared expert of more tokens into s.f (zeros without one): GEMVs that read each
        // weight once for all tokens.
        match &mw.shared {
            Some(_) if shared_one => {} // queued above
            Some(sh) => {
                let total = t * sh.w1.out;
                let (wd, tot, null) = (sh.w1.out as i32, total, 0u64);
                ops::elementwise(
                    g,
                    "swiglu",
                    total,
                    &[&s.sg.ptr, &s.su.ptr, &wd, &tot, &lim, &null],
                )?;
                let sgin = self.round_in_place(s.sg.ptr, sh.w1.out, t)?;
                self.dense(s, &sh.w2, &sgin, s.f.ptr, d)?;
            }
            None => g.memset(s.f.ptr, 0, t * d * 4)?,
        }
        let pairs = t * k;
        let a = routed;
        // Few pairs per expert (decode batches): each pair streams its expert on its own; many
        // (prefill): group them by expert into tiles.
        if self.moe_per_pair(t) {
            ops::moe_experts(g, mw.fmt, mw.tc, mw.bulk, &a, pairs, round(Some(s.rw.ptr)))?;
        } else {
            // Group pairs by expert (tiles of up to MOE_TILE_PAIRS) so each expert's weights are decoded
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
            let tiles = ops::MoeTiles::new(&by_expert);
            let ntile = tiles.expert.len();
            g.htod(s.tiles.ptr, &tiles.expert)?;
            g.htod(s.tiles.at::<i32>(ntile), &tiles.count)?;
            g.htod(s.tiles.at::<i32>(2 * ntile), &tiles.pairs)?;
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
                rw: a.rw,
                rw_inside: a.rw_inside,
                terms: 3,
            };
            // Both products read rows as rounded as x (the hidden rows after `round`).
            ops::moe_experts_gemm(
                g,
                mw.fmt,
                mw.tc,
                hq.terms,
                &ga,
                ntile,
                pairs,
                round(Some(s.rw.ptr)),
            )?;
        }
        self.moe_combine(s, t, combine, aq)
    }

    /// The end of the FFN half: the side stream rejoins, and with `combine` the routed
    /// experts' rows are weighted into the shared expert's `s.f` (under activation quantization
    /// the routing weights were applied before `w2`).
    fn moe_combine(&self, s: &Scratch, t: usize, combine: bool, aq: bool) -> Result<()> {
        let g = &*self.gpu;
        g.join_side()?;
        if !combine {
            return Ok(());
        }
        let c = &self.config;
        let (ki, di, ti, inside) = (
            c.num_experts_per_tok as i32,
            c.hidden_size as i32,
            t as i32,
            aq as i32,
        );
        ops::elementwise(
            g,
            "moe_combine",
            t * c.hidden_size,
            &[&s.f.ptr, &s.eout.ptr, &s.rw.ptr, &ki, &di, &ti, &inside],
        )
    }

    /// The launch layout of one token's FFN half through `kernels/moe_ffn.cu`, and the shared
    /// expert it streams, where the model allows it (whether or not the path is on): one token
    /// without activation quantization, a shared expert, routed experts the bulk kernels take.
    fn ffn_fused_layout<'m>(
        &self,
        mw: &'m crate::weights::GpuMoe,
        a: &MoeArgs,
        t: usize,
        aq: bool,
    ) -> Option<(crate::moe_ffn::FfnLaunch, &'m crate::weights::GpuExpert)> {
        let g = &*self.gpu;
        let k = a.k as usize;
        if t != 1 || aq || !mw.bulk {
            return None;
        }
        let sh = mw.shared.as_ref()?;
        if !self.moe_per_pair(t) || !ops::moe_bulk_ok(g, mw.fmt, mw.tc, a, k) {
            return None;
        }
        let l = crate::moe_ffn::ffn_launch(
            g.sm_count,
            &mw.gate,
            [&sh.w1, &sh.w3, &sh.w2],
            k,
            a.d as usize,
            a.i as usize,
        )?;
        Some((l, sh))
    }
}

/// `CudaModel::ffn_path`'s encoding of a path, and back ([`ffn_path_of`]).
fn ffn_path_code(p: crate::moe_ffn::FfnPath) -> u8 {
    match p {
        crate::moe_ffn::FfnPath::Two { early } => early as u8,
        crate::moe_ffn::FfnPath::One => 2,
    }
}
fn ffn_path_of(code: u8) -> crate::moe_ffn::FfnPath {
    match code {
        0 | 1 => crate::moe_ffn::FfnPath::Two { early: code == 1 },
        _ => crate::moe_ffn::FfnPath::One,
    }
}

/// Copies the projected rows of positions `from..from + len` between a compressor's tail ring
/// and the linear buffers `lin` (kv, gate): into the ring when `to_ring`, else out of it.
fn ring_copy(
    g: &Gpu,
    cs: &CompState,
    from: usize,
    len: usize,
    lin: (u64, u64),
    to_ring: bool,
) -> Result<()> {
    let ring = 2 * cs.ratio;
    debug_assert!(len <= ring);
    let row = (cs.tail_kv.bytes / ring) as u64;
    let mut done = 0;
    while done < len {
        let slot = (from + done) % ring;
        let n = (len - done).min(ring - slot);
        let (r, l) = (slot as u64 * row, done as u64 * row);
        for (ring_buf, lin_buf) in [(cs.tail_kv.ptr, lin.0), (cs.tail_gate.ptr, lin.1)] {
            let (dst, src) = if to_ring {
                (ring_buf + r, lin_buf + l)
            } else {
                (lin_buf + l, ring_buf + r)
            };
            g.dtod(dst, src, n * row as usize)?;
        }
        done += n;
    }
    Ok(())
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

/// Diagnostics (`DSV4_CUDA_STEP_TIMES=1`): where a call's host time goes, printed per call:
/// preparation (uploads, tables), queueing or replaying the launches, then waiting for the
/// device and reading the results back.
struct StepTimer(Option<(std::time::Instant, Vec<std::time::Duration>)>);

impl StepTimer {
    fn start() -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("DSV4_CUDA_STEP_TIMES").is_ok_and(|v| v == "1"));
        StepTimer(on.then(|| (std::time::Instant::now(), Vec::new())))
    }

    fn mark(mut self) -> Self {
        if let Some((t0, marks)) = &mut self.0 {
            marks.push(t0.elapsed());
        }
        self
    }

    fn report(self, tokens: usize, pos: usize) {
        if let Some((t0, marks)) = self.0 {
            let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
            let (a, b) = (
                marks.first().copied().unwrap_or_default(),
                marks.get(1).copied().unwrap_or_default(),
            );
            let end = t0.elapsed();
            eprintln!(
                "step times ({tokens} tokens, position {pos}): prepare {:.0} us, launch {:.0} us, wait + read back {:.0} us",
                us(a),
                us(b - a),
                us(end - b)
            );
        }
    }
}
