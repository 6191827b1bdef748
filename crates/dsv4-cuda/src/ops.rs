//! Typed launches of the kernels in `kernels/`: argument structs mirrored from the CUDA side
//! and the grid shapes each kernel expects.

use crate::gpu::Gpu;
use crate::weights::{Fmt, GpuLinear};
use crate::Result;
use cudarc::driver::DeviceRepr;

/// `GemvArgs` of `kernels/linear.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemvArgs {
    x: u64,
    y: u64,
    partial: u64,
    counters: u64,
    row0: i32,
    nrows: i32,
    ldx: i32,
    ldy: i32,
    m: i32,
    s: i32,
    xg_rows: i32,
    xg_stride: i32,
    vec: i32,
    pad: i32,
    /// One token's RMS-norm weights, fused into `gemv_bulk_norm_*`'s activation loads (0: none).
    xnorm: u64,
    xnorm_eps: f32,
    pad2: i32,
}
unsafe impl DeviceRepr for GemvArgs {}
const _: () = assert!(std::mem::size_of::<GemvArgs>() == 88);

impl GemvArgs {
    /// All `nrows` rows of a matrix for the tokens of `inp`, K split `s` ways.
    fn new(
        inp: &LinIn,
        y: u64,
        ldy: usize,
        nrows: usize,
        s: usize,
        vec: bool,
        part: &Partial,
    ) -> Self {
        let (gs, gstride) = inp.group.unwrap_or((0, 0));
        GemvArgs {
            x: inp.x,
            y,
            partial: part.ptr,
            counters: part.counters,
            row0: 0,
            nrows: nrows as i32,
            ldx: inp.ldx as i32,
            ldy: ldy as i32,
            m: inp.m as i32,
            s: s as i32,
            xg_rows: gs as i32,
            xg_stride: gstride as i32,
            vec: vec as i32,
            pad: 0,
            xnorm: 0,
            xnorm_eps: 0.0,
            pad2: 0,
        }
    }
}

/// `GemmArgs` of `kernels/gemm.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemmArgs {
    x: u64,
    y: u64,
    ldx: i32,
    ldy: i32,
    m: i32,
    xg_rows: i32,
    xg_stride: i32,
    vec: i32,
    terms: i32,
}
unsafe impl DeviceRepr for GemmArgs {}

impl GemmArgs {
    fn new(inp: &LinIn, y: u64, ldy: usize, vec: bool, terms: u8) -> Self {
        let (gs, gstride) = inp.group.unwrap_or((0, 0));
        GemmArgs {
            x: inp.x,
            y,
            ldx: inp.ldx as i32,
            ldy: ldy as i32,
            m: inp.m as i32,
            xg_rows: gs as i32,
            xg_stride: gstride as i32,
            vec: vec as i32,
            terms: terms as i32,
        }
    }
}

/// Tile of the multi-token kernels: 64 rows × 64 tokens.
pub const GEMM_TILE: usize = 64;
/// Pairs per tile of the MoE tile kernels (SIMT and tensor-core alike): the host groups each
/// expert's (token, slot) pairs into tiles of this many.
pub const MOE_TILE_PAIRS: usize = 64;
/// Rows of W per block of the tensor-core kernels (`kernels/gemm_tc.cu`; the gated MoE tile
/// takes half of them from w1, half from w3).
pub const TC_ROWS: usize = 128;

/// Dynamic shared memory of a tensor-core kernel stepping `bk` inputs (64 or 32): two stages
/// of the bf16 weight tile and the `terms` bf16 parts of `tokens` activations, in shared rows
/// of `bk + 8` bf16.
fn tc_smem(tokens: usize, terms: u8, bk: usize) -> u32 {
    (2 * (TC_ROWS + terms as usize * tokens) * (bk + 8) * 2) as u32
}

/// [`tc_smem`] of the `_xs` kernels (pre-split activations): two weight stages and three
/// activation stages (the activations are copied two steps ahead).
fn tc_xs_smem(tokens: usize, terms: u8, bk: usize) -> u32 {
    ((2 * TC_ROWS + 3 * terms as usize * tokens) * (bk + 8) * 2) as u32
}

/// Kernel-name suffix of the tensor-core kernels with `tokens` per block (dense: 128 or 64)
/// stepping `bk` inputs (64 or 32).
fn tc_suffix(tokens: usize, bk: usize) -> &'static str {
    match (tokens, bk) {
        (64, 32) => "_n64_k32",
        (64, _) => "_n64",
        (_, 32) => "_k32",
        _ => "",
    }
}
/// Up to this many tokens the GEMV (weights streamed once per 8 tokens) beats a mostly empty
/// GEMM tile (decode batches).
pub const GEMM_MIN_TOKENS: usize = 64;
/// The fewest blocks a many-token product takes the tensor cores with ([`linear`], under
/// `DSV4_CUDA_NARROW=1` or `tc`): about a quarter of an H100's 132 SMs, where a 128-row × 64-token tile
/// should still beat the SIMT tiles' and the GEMV's larger grids several times over.
const TC_MIN_BLOCKS: usize = 32;
/// From this many tokens a decode batch takes the tensor-core tile for tall matrices.
const DECODE_TC_TOKENS: usize = 16;

/// Rows per block of the GEMV kernels (8 warps × 4 rows).
const GEMV_ROWS: usize = 32;

/// Input of a linear layer: `m` rows of `x` with leading dimension `ldx`; with grouping, output
/// row r reads its input at offset `(r / rows) · stride` (the grouped `wo_a`).
#[derive(Clone, Copy)]
pub struct LinIn {
    pub x: u64,
    pub ldx: usize,
    pub m: usize,
    pub group: Option<(usize, usize)>,
    /// bf16 parts of each activation in the tensor-core GEMMs (1..=3): 3 carries f32's whole
    /// significand; 1 is exact when x holds bf16 values (FP8-rounded GEMM inputs).
    pub terms: u8,
}

impl LinIn {
    pub fn rows(x: u64, ldx: usize, m: usize) -> Self {
        LinIn {
            x,
            ldx,
            m,
            group: None,
            terms: 3,
        }
    }
}

/// Split-K workspace for narrow matrices: partial sums, and zeroed per-block counters that
/// tell the last block of each row block to reduce.
pub struct Partial {
    pub ptr: u64,
    pub floats: usize,
    pub counters: u64,
    pub n_counters: usize,
}

impl Partial {
    /// The K splits a launch may take, from `want` (see [`fit_splits`]).
    fn fit_splits(&self, want: usize, per_split: usize, counters: usize) -> usize {
        fit_splits(self.floats, self.n_counters, want, per_split, counters)
    }

    /// The workspace past its first `po` partial floats and `co` counters (one job's share of
    /// a several-product launch).
    fn past(&self, po: usize, co: usize) -> Partial {
        Partial {
            ptr: self.ptr + 4 * po as u64,
            floats: self.floats - po.min(self.floats),
            counters: self.counters + 4 * co as u64,
            n_counters: self.n_counters - co.min(self.n_counters),
        }
    }
}

/// The K splits a launch may take in a workspace of `floats` partial floats and `n_counters`
/// counters, from `want`: halved until `want × per_split` floats fit, and none (1) when it
/// needs more counters than there are.
fn fit_splits(
    floats: usize,
    n_counters: usize,
    want: usize,
    per_split: usize,
    counters: usize,
) -> usize {
    let mut s = want;
    while s > 1 && s * per_split > floats {
        s /= 2;
    }
    if counters > n_counters {
        s = 1;
    }
    s
}

/// `y[t, :] = W · x[t, :]` for all rows of `w`; `y` has leading dimension `ldy`.
pub fn linear(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    part: &Partial,
) -> Result<()> {
    let (m, nrows) = (inp.m, w.out);
    if m == 0 || nrows == 0 {
        return Ok(());
    }
    if bulk_tc_applies(gpu, w, inp) {
        return gemv_bulk_tc(gpu, w, inp, y, ldy, part);
    }
    let mt = gemv_tokens(m);
    let gs = inp.group.map_or(0, |(rows, _)| rows);
    // Decode batches of 16+ tokens through tall matrices (the vocabulary head, wq_b): the
    // GEMV would stream the weights once per 8 tokens; a 64-token tensor-core tile reads them
    // once, with a block per SM at least.
    if (DECODE_TC_TOKENS..=GEMM_MIN_TOKENS).contains(&m)
        && tc_applies(gpu, w, inp)
        && nrows.div_ceil(TC_ROWS) >= gpu.sm_count
    {
        return gemm_tc_shape(gpu, w, inp, y, ldy, 64, gpu.tc_bk);
    }
    // Many tokens on the tensor cores where they compute this matrix exactly, from a grid of
    // TC_MIN_BLOCKS of the tiles `gemm_tc` launches. (Counted at 128 tokens per tile and half a
    // block per SM before stop 39, which left prefill's narrow BF16 products — the HCA
    // compressor's 512 rows, the CSA indexer's 256 and its 64 head weights — on the SIMT tiles
    // and the GEMV at ~0.5–4.5 TFLOP/s: 11% of an 8K prefill on an H100.)
    let tc_grid = if gpu.narrow_tc() {
        nrows.div_ceil(TC_ROWS) * m.div_ceil(gemm_tc_tokens(gpu, m)) >= TC_MIN_BLOCKS
    } else {
        2 * nrows.div_ceil(TC_ROWS) * m.div_ceil(gpu.tc_tokens) >= gpu.sm_count
    };
    if m > GEMM_MIN_TOKENS && tc_applies(gpu, w, inp) && tc_grid {
        return gemm_tc(gpu, w, inp, y, ldy);
    }
    // Many tokens through a few f32 rows (the hyper-connection `fn` rows): the activations
    // read once, every row held by the blocks of a K slice.
    if narrow_f32_applies(gpu, w, inp, part) {
        return gemm_f32_narrow(gpu, w, inp, y, ldy, part);
    }
    // Many tokens: the tiled kernel reuses each decoded weight tile for 64 tokens.
    let tiles = nrows.div_ceil(GEMM_TILE) * m.div_ceil(GEMM_TILE);
    if m > GEMM_MIN_TOKENS && gs.is_multiple_of(GEMM_TILE) && 2 * tiles >= gpu.sm_count {
        return gemm_simt(gpu, w, inp, y, ldy);
    }
    let blocks = nrows.div_ceil(GEMV_ROWS);
    let vec = gemv_vec(w, inp);
    if bulk_applies(gpu, w, inp) {
        return gemv_bulk(gpu, w, inp, y, ldy, part, None);
    }
    // Short rows (≤ 2 KB: wq_b, the indexer's wq_b) leave the block-per-32-rows kernel's
    // blocks too short-lived to keep loads in flight; long rows stream better through it.
    let row_bytes = w.stored_bytes / w.out.max(1);
    if m == 1 && vec && gpu.stream_gemv && gs.is_multiple_of(4) && row_bytes <= 2048 {
        return gemv_stream(gpu, w, inp, y, part);
    }
    // Narrow matrices (few row blocks) below the GEMM's token count: split K so the whole GPU
    // streams the weight.
    let mut s = 1;
    if m <= GEMM_MIN_TOKENS && vec {
        let chunks = w.inp / w.fmt.chunk();
        let want = (2 * gpu.sm_count).div_ceil(blocks * m.div_ceil(mt));
        s = part.fit_splits(
            want.min(chunks / 32).clamp(1, 64),
            m * nrows,
            blocks * m.div_ceil(mt),
        );
    }
    let args = GemvArgs::new(inp, y, ldy, nrows, s, vec, part);
    let name = format!("gemv_{}_{mt}", w.fmt.name());
    gpu.tag(|| {
        (
            format!("gemv {} {}x{} m{m} s{s}", w.fmt.name(), nrows, w.inp),
            w.stored_bytes,
        )
    });
    let grid = (blocks as u32, s as u32, m.div_ceil(mt) as u32);
    gpu.launch(&name, grid, (256, 1, 1), 0, &[&w.desc, &args])
}

/// Tokens per pass of the GEMV kernels (`gemv_*_{1,2,4,8}`) for `m` tokens.
fn gemv_tokens(m: usize) -> usize {
    match m {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// Whether the GEMV may take its 16-byte path: the matrix allows it and the input rows (and
/// groups) are 16-byte aligned.
fn gemv_vec(w: &GpuLinear, inp: &LinIn) -> bool {
    let gstride = inp.group.map_or(0, |(_, s)| s);
    w.vec && inp.ldx.is_multiple_of(4) && inp.x.is_multiple_of(16) && gstride.is_multiple_of(4)
}

/// One product of [`linear_multi`]: `y[t, :] = W · inp[t, :]`, `y` with leading dimension
/// `W.out`.
pub struct LinJob<'a> {
    pub w: &'a GpuLinear,
    pub inp: LinIn,
    pub y: u64,
}

/// `GemvJob` / `GemvMulti` of `kernels/linear.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemvJob {
    w: crate::weights::LinearDesc,
    a: GemvArgs,
    end: i32,
    gx: i32,
}
const GEMV_MULTI_MAX: usize = 8;
#[repr(C)]
#[derive(Clone, Copy)]
struct GemvMulti {
    n: i32,
    pad: i32,
    j: [GemvJob; GEMV_MULTI_MAX],
}
unsafe impl DeviceRepr for GemvMulti {}
const _: () = assert!(std::mem::size_of::<GemvJob>() == 160);

/// Several products of the same token count (≤ the GEMV range) in one launch: decode's
/// matrices that read the same activations, a few MB each, stream better as one launch than as
/// several short ones that each ramp up and drain. Other shapes run one [`linear`] each.
pub fn linear_multi(gpu: &Gpu, jobs: &[LinJob<'_>], part: &Partial) -> Result<()> {
    let m = jobs.first().map_or(0, |j| j.inp.m);
    let fits = |j: &LinJob<'_>| {
        j.inp.m == m
            && j.inp.group.is_none()
            && j.w.out > 0
            && matches!(
                j.w.fmt,
                Fmt::F32 | Fmt::Bf16 | Fmt::F16 | Fmt::Fp8 | Fmt::Fp4
            )
    };
    // Batches the bulk tensor-core kernels take stream better one matrix per launch through
    // them than together through the SIMT kernel.
    if jobs.len() < 2
        || jobs.len() > GEMV_MULTI_MAX
        || jobs.iter().all(|j| bulk_tc_applies(gpu, j.w, &j.inp))
        || m == 0
        || m > GEMM_MIN_TOKENS
        || !jobs.iter().all(fits)
    {
        for j in jobs {
            linear(gpu, j.w, &j.inp, j.y, j.w.out, part)?;
        }
        return Ok(());
    }
    let mt = gemv_tokens(m);
    let z = m.div_ceil(mt);
    let vecs: Vec<bool> = jobs.iter().map(|j| gemv_vec(j.w, &j.inp)).collect();
    let shapes: Vec<(usize, usize, bool)> = jobs
        .iter()
        .zip(&vecs)
        .map(|(j, &v)| (j.w.out, j.w.inp / j.w.fmt.chunk(), v))
        .collect();
    let plan = plan_multi(&shapes, m, z, gpu.sm_count, part.floats, part.n_counters);
    let blank = GemvJob {
        w: jobs[0].w.desc,
        a: GemvArgs::new(&jobs[0].inp, 0, 0, 0, 1, false, part),
        end: 0,
        gx: 1,
    };
    let mut g = GemvMulti {
        n: jobs.len() as i32,
        pad: 0,
        j: [blank; GEMV_MULTI_MAX],
    };
    let mut bytes = 0;
    for (((slot, j), p), &vec) in g.j.iter_mut().zip(jobs).zip(&plan).zip(&vecs) {
        let w = j.w;
        let jp = part.past(p.po, p.co);
        *slot = GemvJob {
            w: w.desc,
            a: GemvArgs::new(&j.inp, j.y, w.out, w.out, p.s, vec, &jp),
            end: p.end as i32,
            gx: p.gx as i32,
        };
        bytes += w.stored_bytes;
    }
    let end = plan.last().map_or(0, |p| p.end);
    gpu.tag(|| (format!("gemv_multi x{} m{m}", jobs.len()), bytes));
    let name = format!("gemv_multi_{mt}");
    gpu.launch(&name, (end as u32, 1, 1), (256, 1, 1), 0, &[&g])
}

/// `y[t, :] = W · x[t, :]` through the SIMT tile kernel `gemm_*` (64 rows × 64 tokens per
/// block, f32 arithmetic), any format; a grouped input must keep 64-row tiles in one group.
pub fn gemm_simt(gpu: &Gpu, w: &GpuLinear, inp: &LinIn, y: u64, ldy: usize) -> Result<()> {
    let (m, nrows) = (inp.m, w.out);
    if m == 0 || nrows == 0 {
        return Ok(());
    }
    let args = GemmArgs::new(inp, y, ldy, w.vec, inp.terms);
    let grid = (
        nrows.div_ceil(GEMM_TILE) as u32,
        m.div_ceil(GEMM_TILE) as u32,
        1,
    );
    let name = format!("gemm_{}", w.fmt.name());
    gpu.launch(&name, grid, (256, 1, 1), 0, &[&w.desc, &args])
}

/// The most rows `gemm_f32_narrow` takes, the inputs of its K slices, its threads and the
/// tokens of each round its warps meet (kernels/gemm.cu: GN_ROWS, GN_KS, GN_THREADS, GN_TPR).
const NARROW_ROWS: usize = 24;
const NARROW_K: usize = 1024;
const NARROW_THREADS: u32 = 256;
const NARROW_ROUND: usize = 4;

/// Whether [`linear`] takes `w` with this input through `gemm_f32_narrow`: the path is on
/// (`DSV4_CUDA_NARROW`), many tokens, at most [`NARROW_ROWS`] f32 rows, and the slices' partial
/// sums fit `part`.
pub fn narrow_f32_applies(gpu: &Gpu, w: &GpuLinear, inp: &LinIn, part: &Partial) -> bool {
    gpu.narrow_f32()
        && inp.m > GEMM_MIN_TOKENS
        && w.fmt == Fmt::F32
        && w.out <= NARROW_ROWS
        && inp.group.is_none()
        && w.inp.div_ceil(NARROW_K) * inp.m * w.out <= part.floats
}

/// `y = W x` of many tokens through at most [`NARROW_ROWS`] f32 rows: `gemm_f32_narrow` (a
/// block per K slice and token group, the groups filling the SMs in one wave) into `part`,
/// then `gemm_f32_narrow_sum`.
fn gemm_f32_narrow(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    part: &Partial,
) -> Result<()> {
    let m = inp.m;
    let slices = w.inp.div_ceil(NARROW_K);
    let groups = (gpu.sm_count / slices).clamp(1, m.div_ceil(NARROW_ROUND));
    let per_block = m.div_ceil(groups).next_multiple_of(NARROW_ROUND);
    let args = GemmArgs::new(inp, y, ldy, w.vec, inp.terms);
    gpu.launch(
        "gemm_f32_narrow",
        (slices as u32, m.div_ceil(per_block) as u32, 1),
        (NARROW_THREADS, 1, 1),
        0,
        &[&w.desc, &args, &part.ptr, &(per_block as i32)],
    )?;
    let n = m * w.out;
    gpu.launch(
        "gemm_f32_narrow_sum",
        (n.div_ceil(256) as u32, 1, 1),
        (256, 1, 1),
        0,
        &[&part.ptr, &args, &(w.out as i32), &(slices as i32)],
    )
}

/// Whether [`gemm_tc`] takes `w` with this input: its weights decode exactly to bf16
/// ([`GpuLinear::tc`]), a grouped input keeps each 128-row tile inside one group, and the
/// tensor-core kernels are on (`DSV4_CUDA_TC`).
pub fn tc_applies(gpu: &Gpu, w: &GpuLinear, inp: &LinIn) -> bool {
    gpu.tc
        && w.tc
        && matches!(w.fmt, Fmt::Bf16 | Fmt::Fp8 | Fmt::Fp4)
        && inp
            .group
            .is_none_or(|(gs, _)| gs > 0 && gs.is_multiple_of(TC_ROWS))
}

/// `y[t, :] = W · x[t, :]` on the tensor cores (`gemm_tc_*`: 128 rows × [`gemm_tc_tokens`]
/// tokens per block, x split into `inp.terms` bf16 parts), whatever the shape; an error where
/// [`tc_applies`] says no.
pub fn gemm_tc(gpu: &Gpu, w: &GpuLinear, inp: &LinIn, y: u64, ldy: usize) -> Result<()> {
    let tokens = gemm_tc_tokens(gpu, inp.m);
    let bk = if tokens == 64 && gpu.tc_shape_default {
        32
    } else {
        gpu.tc_bk
    };
    gemm_tc_shape(gpu, w, inp, y, ldy, tokens, bk)
}

/// Tokens per block of [`gemm_tc`] for `m` tokens. On pre-split activations (m > 64) 64
/// tokens × 32 inputs per block is the best shape: two blocks per SM (H200, 8192 tokens, FP8:
/// 134–138 TFLOP/s at 1 part and 86–88 at 3, against 117–121 and 77–79 at 128 × 64; `bench
/// --gemm`).
fn gemm_tc_tokens(gpu: &Gpu, m: usize) -> usize {
    if gpu.tc_shape_default && gpu.tc_xs() && m > GEMM_MIN_TOKENS {
        64
    } else {
        gpu.tc_tokens
    }
}

/// [`gemm_tc`] with `tokens` per block (128, or 64: the `_n64` kernels) stepping `bk` inputs
/// (64, or 32: `_k32`).
pub fn gemm_tc_shape(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    tokens: usize,
    bk: usize,
) -> Result<()> {
    let tokens = if tokens == 64 { 64 } else { 128 };
    if !tc_applies(gpu, w, inp) {
        return Err(crate::Error::Unsupported(format!(
            "the tensor-core GEMM does not take this {} matrix",
            w.fmt.name()
        )));
    }
    let (m, nrows) = (inp.m, w.out);
    if m == 0 || nrows == 0 {
        return Ok(());
    }
    let terms = inp.terms.clamp(1, 3);
    let args = GemmArgs::new(inp, y, ldy, true, terms);
    let (gs, gstride) = inp.group.unwrap_or((0, 0));
    gpu.tag(|| {
        (
            format!("gemm_tc {} {}x{} m{m} t{terms}", w.fmt.name(), nrows, w.inp),
            w.stored_bytes,
        )
    });
    let grid = (nrows.div_ceil(TC_ROWS) as u32, m.div_ceil(tokens) as u32, 1);
    let name = format!("gemm_tc_{}{}", w.fmt.name(), tc_suffix(tokens, bk));
    // Prefill sizes (never captured in a graph) split x into bf16 parts once, in whole
    // 16-byte pieces: the input columns the row blocks read, [0, cols).
    let cols = w.inp + (nrows - 1) / gs.max(1) * gstride;
    if m > GEMM_MIN_TOKENS && w.inp.is_multiple_of(8) && gstride.is_multiple_of(8) {
        if let Some(xs) = split_x(gpu, inp.x, inp.ldx, m, cols, terms)? {
            let args = GemmArgs {
                x: xs,
                ldx: cols as i32,
                ..args
            };
            return gpu.launch(
                &format!("{name}_xs"),
                grid,
                (256, 1, 1),
                tc_xs_smem(tokens, terms, bk),
                &[&w.desc, &args],
            );
        }
    }
    gpu.launch(
        &name,
        grid,
        (256, 1, 1),
        tc_smem(tokens, terms, bk),
        &[&w.desc, &args],
    )
}

/// `rows × cols` f32 activations (row stride `ldx`; `cols % 8 == 0`) as `terms` bf16 parts
/// in the GPU's scratch (`tc_split_x`: row r's part j at element `(r·terms + j)·cols`), for the
/// `_xs` tensor-core kernels; `None` when those are off or the scratch cannot be had.
fn split_x(
    gpu: &Gpu,
    x: u64,
    ldx: usize,
    rows: usize,
    cols: usize,
    terms: u8,
) -> Result<Option<u64>> {
    if !gpu.tc_xs() || rows == 0 || cols == 0 || !cols.is_multiple_of(8) {
        return Ok(None);
    }
    let Some(xs) = gpu.tc_scratch(rows * cols * terms as usize * 2) else {
        return Ok(None);
    };
    let pieces = rows * cols / 8;
    let blocks = pieces.div_ceil(256).min(gpu.sm_count * 16) as u32;
    gpu.tag(|| {
        (
            format!("tc_split_x {rows}x{cols} t{terms}"),
            rows * cols * 4,
        )
    });
    gpu.launch(
        "tc_split_x",
        (blocks, 1, 1),
        (256, 1, 1),
        0,
        &[
            &x,
            &(ldx as i32),
            &(rows as i32),
            &(cols as i32),
            &(terms as i32),
            &xs,
        ],
    )?;
    Ok(Some(xs))
}

/// One job's share of a [`linear_multi`] launch: its K split `s`, where its partials (`po`
/// floats) and counters (`co`) start in the workspace, its row blocks `gx`, and one past its
/// last block of the launch grid.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MultiSlot {
    s: usize,
    po: usize,
    co: usize,
    gx: usize,
    end: usize,
}

/// Plans a [`linear_multi`] launch of jobs `(rows, 16-byte chunks per row, 16-byte path)` for
/// `m` tokens in `z` token chunks: one K split for all, so the grid covers the GPU twice, each
/// job's partials and counters in its own part of the workspace (`floats`, `n_counters`), no
/// split where it would not fit.
fn plan_multi(
    shapes: &[(usize, usize, bool)],
    m: usize,
    z: usize,
    sm_count: usize,
    floats: usize,
    n_counters: usize,
) -> Vec<MultiSlot> {
    let base: usize = shapes
        .iter()
        .map(|&(rows, ..)| rows.div_ceil(GEMV_ROWS) * z)
        .sum();
    let want = (2 * sm_count).div_ceil(base.max(1));
    let (mut po, mut co, mut end) = (0usize, 0usize, 0usize);
    shapes
        .iter()
        .map(|&(rows, chunks, vec)| {
            let gx = rows.div_ceil(GEMV_ROWS);
            let want = if vec {
                want.min(chunks / 32).clamp(1, 64)
            } else {
                1
            };
            let s = fit_splits(floats - po, n_counters - co, want, m * rows, gx * z);
            let slot = MultiSlot {
                s,
                po,
                co,
                gx,
                end: end + gx * s * z,
            };
            if s > 1 {
                po += s * m * rows;
                co += gx * z;
            }
            end = slot.end;
            slot
        })
        .collect()
}

/// Stored bytes of a `rows × inp` matrix in `fmt` (weights and scales; profiler labels).
fn gpu_bytes(fmt: Fmt, rows: usize, inp: usize) -> usize {
    match fmt {
        Fmt::Fp4 => rows * inp / 2 + rows * inp / 32,
        Fmt::Fp8 => rows * inp + rows.div_ceil(128) * inp.div_ceil(128) * 4,
        Fmt::F32 => rows * inp * 4,
        _ => rows * inp * 2,
    }
}

/// One token through `gemv_stream_*`: a grid of two blocks per SM whose warps each take a
/// contiguous run of (4-row group, K split) tasks; K is split until there are at least two
/// tasks per warp (each split keeping two chunk rounds), as far as the workspace allows.
fn gemv_stream(gpu: &Gpu, w: &GpuLinear, inp: &LinIn, y: u64, part: &Partial) -> Result<()> {
    let nrows = w.out;
    let groups = nrows.div_ceil(4);
    let warps = 2 * gpu.sm_count * 8;
    let chunks = w.inp / w.fmt.chunk();
    let s = part.fit_splits(
        (2 * warps).div_ceil(groups).min(chunks / 64).clamp(1, 64),
        nrows,
        groups,
    );
    let args = GemvArgs::new(inp, y, 0, nrows, s, true, part);
    let blocks = (groups * s).div_ceil(8).min(2 * gpu.sm_count);
    gpu.tag(|| {
        (
            format!("gemv_stream {} {}x{} s{s}", w.fmt.name(), nrows, w.inp),
            w.stored_bytes,
        )
    });
    let name = format!("gemv_stream_{}", w.fmt.name());
    gpu.launch(
        &name,
        (blocks as u32, 1, 1),
        (256, 1, 1),
        0,
        &[&w.desc, &args],
    )
}

/// A stage of the bulk-copy kernels (`kernels/gemv_bulk.cu`: `Gpu::bulk_stages` of them), 32 KB
/// of weights, and their threads (8 consumer warps and a producer).
const BULK_STAGE: usize = 32768;
const BULK_THREADS: u32 = 288;

/// Rows per warp of a bulk-copy kernel reading rows of `row_bytes` (a multiple of 1024): the
/// slice is the largest of 4096, 2048 and 1024 bytes that divides the row (whole rows up to
/// 4 KB; a 3 KB row takes three 1 KB slices), and a stage holds 32 KB of slices.
fn bulk_rpw(row_bytes: usize) -> usize {
    let slice = [4096, 2048, 1024]
        .into_iter()
        .find(|&s| row_bytes.is_multiple_of(s))
        .unwrap_or(1024);
    4096 / slice
}

/// Dynamic shared memory of a bulk-copy kernel (`bulk_stage_bytes` × stages; the kernel's ring
/// takes as many stages as fit): the weights and their scale bytes (FP4: one per 32 elements;
/// FP8: the tile's block scales of the slice).
fn bulk_smem(gpu: &Gpu, fmt: Fmt, rpw: usize) -> u32 {
    let aux = match fmt {
        Fmt::Fp8 => (4096 / rpw) / 32,
        Fmt::Fp4 => BULK_STAGE / 16,
        _ => 0,
    };
    (gpu.bulk_stages * (BULK_STAGE + aux)) as u32
}

/// How the bulk-copy kernels stream a matrix for `m` tokens: rows per warp, K slices per
/// row, K splits and tiles of 8·rpw rows. K is split until there is an item per SM, as far
/// as the workspace allows.
struct BulkPlan {
    rpw: usize,
    nslices: usize,
    s: usize,
    tiles: usize,
}

fn bulk_plan(gpu: &Gpu, w: &GpuLinear, m: usize, part: &Partial) -> BulkPlan {
    let nrows = w.out;
    let row_bytes = crate::weights::bulk_row_bytes(w.fmt, w.inp).unwrap_or(0);
    let rpw = match gpu.bulk_rpw {
        r if r > 0 && row_bytes.is_multiple_of(4096 / r) => r,
        _ => bulk_rpw(row_bytes),
    };
    let tiles = nrows.div_ceil(8 * rpw);
    let nslices = row_bytes / (4096 / rpw);
    let s = part.fit_splits(
        gpu.sm_count.div_ceil(tiles).clamp(1, nslices.max(1)),
        m * nrows,
        tiles * 8,
    );
    BulkPlan {
        rpw,
        nslices,
        s,
        tiles,
    }
}

/// Whether the bulk-copy kernels (SIMT or tensor-core) can stream `w` for `inp`: a matrix of
/// whole-KB rows, 16-byte aligned inputs, input groups of whole 32-row tiles.
fn bulk_streams(gpu: &Gpu, w: &GpuLinear, inp: &LinIn) -> bool {
    let gs = inp.group.map_or(0, |(rows, _)| rows);
    gpu.bulk && w.bulk && gemv_vec(w, inp) && gs.is_multiple_of(32)
}

/// Whether [`linear`] takes the bulk-copy kernels for these tokens.
fn bulk_applies(gpu: &Gpu, w: &GpuLinear, inp: &LinIn) -> bool {
    (1..=2).contains(&inp.m) && bulk_streams(gpu, w, inp)
}

/// Whether [`linear_normed`] takes this product: one token of a plain input row (no groups),
/// FP8 or BF16 weights, on the path [`linear`] would take for it (the SIMT bulk kernels).
pub fn normed_applies(gpu: &Gpu, w: &GpuLinear, inp: &LinIn) -> bool {
    inp.m == 1
        && inp.group.is_none()
        && matches!(w.fmt, Fmt::Fp8 | Fmt::Bf16)
        && w.inp.is_multiple_of(4)
        && !bulk_tc_applies(gpu, w, inp)
        && bulk_applies(gpu, w, inp)
}

/// `y = W · rms_norm(x)` for one token in one launch: [`linear`] of the row that [`rms_norm`]
/// with weights `nw` would leave in x (x itself is not changed), the norm in the product's
/// activation loads. Only where [`normed_applies`].
#[allow(clippy::too_many_arguments)]
pub fn linear_normed(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    nw: u64,
    eps: f32,
    y: u64,
    ldy: usize,
    part: &Partial,
) -> Result<()> {
    if !normed_applies(gpu, w, inp) || nw == 0 {
        return Err(crate::Error::Unsupported(format!(
            "a normed product of {} rows of {} ({}) for {} tokens",
            w.out,
            w.inp,
            w.fmt.name(),
            inp.m
        )));
    }
    gemv_bulk(gpu, w, inp, y, ldy, part, Some((nw, eps)))
}

/// One or two tokens through `gemv_bulk_*`: a block per SM at most, each a contiguous run of
/// (tile of 8·rpw rows, K split) items. With `norm` (one token: the RMS norm's weights and
/// epsilon) the input row is normed as it is loaded (`gemv_bulk_norm_*`).
#[allow(clippy::too_many_arguments)]
fn gemv_bulk(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    part: &Partial,
    norm: Option<(u64, f32)>,
) -> Result<()> {
    let (m, nrows) = (inp.m, w.out);
    let BulkPlan {
        rpw,
        nslices,
        s,
        tiles,
    } = bulk_plan(gpu, w, m, part);
    let mut args = GemvArgs::new(inp, y, ldy, nrows, s, true, part);
    let kind = match norm {
        Some((nw, eps)) => {
            args.xnorm = nw;
            args.xnorm_eps = eps;
            "bulk_norm"
        }
        None => "bulk",
    };
    let blocks = (tiles * s).min(gpu.sm_count);
    gpu.tag(|| {
        (
            format!(
                "gemv_{kind} {} {}x{} m{m} r{rpw} s{s}",
                w.fmt.name(),
                nrows,
                w.inp
            ),
            w.stored_bytes,
        )
    });
    let ns = nslices as i32;
    gpu.launch(
        &format!("gemv_{kind}_{}_{m}_r{rpw}", w.fmt.name()),
        (blocks as u32, 1, 1),
        (BULK_THREADS, 1, 1),
        bulk_smem(gpu, w.fmt, rpw),
        &[&w.desc, &args, &ns],
    )
}

/// The most tokens the bulk-copy tensor-core GEMVs (`gemv_bulk_tc_*`) take; fewer than 3 take
/// the SIMT bulk kernels.
pub const BULK_TC_MAX_TOKENS: usize = 32;
/// ... and the most they take by default: all of them (H100, 8 layers: batch 8 8.88 -> 5.96 ms
/// against the SIMT GEMVs, 16 12.84 -> 9.35; batch 32 20.7 -> 16.0 against the 64-token tiles
/// and `gemv_fp8_8`).
pub const BULK_TC_DEFAULT_TOKENS: usize = 32;
/// Rows of a stage of the bulk tensor-core kernels (`BTC_ROWS`): the 32-row input groups
/// [`bulk_streams`] asks for.
const BTC_ROWS: usize = 32;
/// Dynamic shared memory those kernels may take: 227 KB less their static arrays (17 KB; the
/// kernel checks its reduction buffer against this reserve).
const BTC_MAX_SMEM: usize = 227 * 1024 - 18 * 1024;

/// Whether [`linear`] takes the bulk-copy tensor-core kernels: [`Gpu::bulk_tc_min`] (3) to
/// [`Gpu::bulk_tc_tokens`] tokens, a matrix the bulk kernels stream (their 32-row tiles are
/// `BTC_ROWS` too) and the tensor cores compute exactly (FP8 or BF16).
pub fn bulk_tc_applies(gpu: &Gpu, w: &GpuLinear, inp: &LinIn) -> bool {
    (gpu.bulk_tc_min..=gpu.bulk_tc_tokens.min(BULK_TC_MAX_TOKENS)).contains(&inp.m)
        && gpu.tc
        && w.tc
        && matches!(w.fmt, Fmt::Fp8 | Fmt::Bf16)
        && bulk_streams(gpu, w, inp)
}

/// How `gemv_bulk_tc_*` streams a matrix: row slices of `ks` bytes (2 KB, or whole 1 KB rows),
/// `nslices` per row, `s` K splits, `tiles` of 32 rows, `stages` in the ring.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BulkTcPlan {
    ks: usize,
    nslices: usize,
    s: usize,
    tiles: usize,
    stages: usize,
}

/// Bytes of one stage of `gemv_bulk_tc_*`: 32 row slices of `ks` bytes, then (FP8) their
/// f32 block scales.
fn bulk_tc_stride(fmt: Fmt, ks: usize) -> usize {
    BTC_ROWS * ks + if fmt == Fmt::Fp8 { ks / 32 } else { 0 }
}

/// The plan of `nrows` rows of `inp` inputs for `m` tokens on `sms` SMs; `None` for rows that
/// are not whole KB.
fn bulk_tc_plan(
    sms: usize,
    fmt: Fmt,
    nrows: usize,
    inp: usize,
    m: usize,
    part: &Partial,
) -> Option<BulkTcPlan> {
    let row_bytes = crate::weights::bulk_row_bytes(fmt, inp)?;
    let ks = if row_bytes.is_multiple_of(2048) {
        2048
    } else {
        1024
    };
    if row_bytes == 0 || !row_bytes.is_multiple_of(ks) {
        return None;
    }
    let tiles = nrows.div_ceil(BTC_ROWS);
    let nslices = row_bytes / ks;
    let s = part.fit_splits(sms.div_ceil(tiles).clamp(1, nslices), m * nrows, tiles);
    let stages = (BTC_MAX_SMEM / bulk_tc_stride(fmt, ks)).min(4);
    (stages >= 2).then_some(BulkTcPlan {
        ks,
        nslices,
        s,
        tiles,
        stages,
    })
}

/// 3–32 tokens through `gemv_bulk_tc_*` ([`bulk_tc_applies`] holds): a block per SM at most,
/// each a contiguous run of (32-row tile, K split) items.
fn gemv_bulk_tc(
    gpu: &Gpu,
    w: &GpuLinear,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    part: &Partial,
) -> Result<()> {
    let (m, nrows) = (inp.m, w.out);
    let p = bulk_tc_plan(gpu.sm_count, w.fmt, nrows, w.inp, m, part)
        .ok_or_else(|| crate::Error::Unsupported("bulk tensor-core GEMV layout".into()))?;
    let args = GemvArgs::new(inp, y, ldy, nrows, p.s, true, part);
    let blocks = (p.tiles * p.s).min(gpu.sm_count);
    gpu.tag(|| {
        (
            format!(
                "gemv_bulk_tc {} {}x{} m{m} k{} s{}",
                w.fmt.name(),
                nrows,
                w.inp,
                p.ks,
                p.s
            ),
            w.stored_bytes,
        )
    });
    let stride = bulk_tc_stride(w.fmt, p.ks);
    let (ns, terms) = (p.nslices as i32, inp.terms.clamp(1, 3) as i32);
    gpu.launch(
        &format!(
            "gemv_bulk_tc_{}_k{}_m{}",
            w.fmt.name(),
            p.ks,
            m.div_ceil(8).next_power_of_two()
        ),
        (blocks as u32, 1, 1),
        (BULK_THREADS, 1, 1),
        (p.stages * stride) as u32,
        &[&w.desc, &args, &ns, &terms],
    )
}

/// One product of [`linear_pair`]: `y = W · inp`, `y` with leading dimension `ldy`.
pub struct PairJob<'a> {
    pub w: &'a GpuLinear,
    pub inp: LinIn,
    pub y: u64,
    pub ldy: usize,
}

/// `b` after `a` where `b` reads `a`'s output (a decode step's `wo_a` then `wo_b`): one
/// launch of `gemv_bulk_pair_*` when both take the bulk kernels in a format pair it is built
/// for, else two [`linear`] calls. `bar`: two u32 of
/// device memory, zero before the first launch (arrivals return to zero after each barrier;
/// the pass count only grows).
pub fn linear_pair(
    gpu: &Gpu,
    a: &PairJob<'_>,
    b: &PairJob<'_>,
    part: &Partial,
    bar: u64,
) -> Result<()> {
    let Some(plan) = PairPlan::new(gpu, a, b, part) else {
        linear(gpu, a.w, &a.inp, a.y, a.ldy, part)?;
        return linear(gpu, b.w, &b.inp, b.y, b.ldy, part);
    };
    let m = a.inp.m;
    let name = format!(
        "gemv_bulk_pair_{}_r1_{}_r1_{m}",
        a.w.fmt.name(),
        b.w.fmt.name()
    );
    pair_tag(gpu, "gemv_bulk_pair", a, b, Some(m));
    let [args_a, args_b] = &plan.args;
    let [na, nb] = &plan.nslices;
    gpu.launch(
        &name,
        (plan.blocks.min(gpu.sm_count) as u32, 1, 1),
        (BULK_THREADS, 1, 1),
        plan.smem,
        &[&a.w.desc, args_a, na, &b.w.desc, args_b, nb, &bar],
    )
}

/// How `b` after `a` stream through one ring (`gemv_bulk_pair_*`, `attn_tail_*`): where both
/// are for the same tokens, `b` reads `a`'s output, and both take the bulk kernels as
/// whole-row-slice (rpw 1) FP8 or BF16 products, the pair kernels' formats.
struct PairPlan {
    /// Each product's arguments (they share the split-K workspace: the first's partials are
    /// summed and its counters reset before the launch's grid barrier).
    args: [GemvArgs; 2],
    nslices: [i32; 2],
    /// The larger product's work items (tiles × K splits).
    blocks: usize,
    /// The ring's dynamic shared memory.
    smem: u32,
}

impl PairPlan {
    fn new(gpu: &Gpu, a: &PairJob<'_>, b: &PairJob<'_>, part: &Partial) -> Option<Self> {
        let m = a.inp.m;
        let fused = b.inp.m == m
            && b.inp.x == a.y
            && b.inp.ldx == a.ldy
            && bulk_applies(gpu, a.w, &a.inp)
            && bulk_applies(gpu, b.w, &b.inp);
        let (pa, pb) = fused
            .then(|| (bulk_plan(gpu, a.w, m, part), bulk_plan(gpu, b.w, m, part)))
            .filter(|(pa, pb)| {
                matches!(
                    (a.w.fmt, pa.rpw, b.w.fmt, pb.rpw),
                    (Fmt::Fp8, 1, Fmt::Fp8, 1) | (Fmt::Bf16, 1, Fmt::Bf16, 1)
                )
            })?;
        Some(PairPlan {
            args: [
                GemvArgs::new(&a.inp, a.y, a.ldy, a.w.out, pa.s, true, part),
                GemvArgs::new(&b.inp, b.y, b.ldy, b.w.out, pb.s, true, part),
            ],
            nslices: [pa.nslices as i32, pb.nslices as i32],
            blocks: (pa.tiles * pa.s).max(pb.tiles * pb.s),
            smem: bulk_smem(gpu, a.w.fmt, pa.rpw).max(bulk_smem(gpu, b.w.fmt, pb.rpw)),
        })
    }
}

/// The profile's label of a launch streaming `a` then `b` (`what`, their shapes, the tokens `m`
/// where given), and their bytes.
fn pair_tag(gpu: &Gpu, what: &str, a: &PairJob<'_>, b: &PairJob<'_>, m: Option<usize>) {
    gpu.tag(|| {
        let tokens = m.map(|m| format!(" m{m}")).unwrap_or_default();
        (
            format!(
                "{what} {} {}x{} + {}x{}{tokens}",
                a.w.fmt.name(),
                a.w.out,
                a.w.inp,
                b.w.out,
                b.w.inp
            ),
            a.w.stored_bytes + b.w.stored_bytes,
        )
    });
}

/// `CombineArgs` of `kernels/persist.cu`: what `attn_combine` takes beside [`AttnArgs`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CombineArgs {
    /// The rotary inverse frequencies for the outputs' inverse RoPE, or 0 (none).
    pub inv_freq: u64,
    /// The tokens' positions.
    pub positions: u64,
    pub half: i32,
    pub factor: f32,
}
unsafe impl DeviceRepr for CombineArgs {}
const _: () = assert!(std::mem::size_of::<CombineArgs>() == 24);

impl CombineArgs {
    /// The merge's inverse RoPE by `rope` (none where it rotates no channels) at `positions`.
    pub fn new(rope: &RopeDev, positions: u64) -> Self {
        CombineArgs {
            inv_freq: if rope.half > 0 { rope.inv_freq } else { 0 },
            positions,
            half: rope.half as i32,
            factor: rope.factor,
        }
    }
}

/// One token's attention tail in one launch (`attn_tail_*`, kernels/persist.cu): the split
/// attention of `a` over `nsplit` splits into `part`, their merge into `a.out` (with the sinks
/// and `cb`'s inverse RoPE), then `wo_a` and `wo_b` as [`linear_pair`] runs them — the same
/// results bit for bit, the products' weights streaming from the launch's start. Returns false,
/// launching nothing, where it does not apply (then the caller runs the three launches): one
/// token, the 512-wide heads, products the pair's bulk kernels take, and a ring beside the
/// staged keys in an SM's shared memory. `bar`: as [`linear_pair`]'s. `grid`: blocks (at most
/// the SM count, which it is by default; fewer only so tests give a block several of the
/// attention's and the merge's blocks).
#[allow(clippy::too_many_arguments)] // one launch of three phases' arguments
pub fn attn_tail(
    gpu: &Gpu,
    grid: usize,
    a: &AttnArgs,
    part_buf: u64,
    nsplit: usize,
    cb: &CombineArgs,
    wa: &PairJob<'_>,
    wb: &PairJob<'_>,
    part: &Partial,
    bar: u64,
) -> Result<bool> {
    let keys_bytes = (ATT_KEYS * ATT_DMAX * 4) as u32;
    let fits = a.t == 1
        && wa.inp.m == 1
        && (1..=gpu.sm_count).contains(&grid)
        && a.dh as usize == ATT_DMAX
        && wa.inp.x == a.out
        && (1..=COMBINE_MAX_SPLITS).contains(&nsplit);
    let Some(plan) = fits.then(|| PairPlan::new(gpu, wa, wb, part)).flatten() else {
        return Ok(false);
    };
    let smem = plan.smem + keys_bytes;
    // (The kernel's static shared memory — barriers, the sums' buffers, the merge's weights —
    // is under 2 KB.)
    if smem + 2048 > SMEM_OPTIN {
        return Ok(false);
    }
    let name = format!("attn_tail_{}_{}", wa.w.fmt.name(), wb.w.fmt.name());
    pair_tag(gpu, "attn_tail", wa, wb, None);
    let [args_a, args_b] = &plan.args;
    let [na, nb] = &plan.nslices;
    let ns = nsplit as i32;
    gpu.launch(
        &name,
        (grid as u32, 1, 1),
        (BULK_THREADS, 1, 1),
        smem,
        &[
            a, &part_buf, &ns, cb, &wa.w.desc, args_a, na, &wb.w.desc, args_b, nb, &bar,
        ],
    )?;
    Ok(true)
}

/// `BulkJob` / `BulkMulti` of `kernels/gemv_bulk.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BulkJob {
    w: crate::weights::LinearDesc,
    a: GemvArgs,
    nslices: i32,
    rpw: i32,
    items: i32,
    pad: i32,
}
const BULK_MULTI_MAX: usize = 8;
#[repr(C)]
#[derive(Clone, Copy)]
struct BulkMulti {
    n: i32,
    pad: i32,
    j: [BulkJob; BULK_MULTI_MAX],
}
unsafe impl DeviceRepr for BulkMulti {}
const _: () = assert!(std::mem::size_of::<BulkJob>() == 168);

/// Whether [`linear_bulk_multi`] takes these products in one launch: 2 to 8 of them, FP8 or
/// BF16, all for the same one or two tokens, each taking the bulk kernels.
pub fn bulk_multi_ok(gpu: &Gpu, jobs: &[LinJob<'_>]) -> bool {
    let m = jobs.first().map_or(0, |j| j.inp.m);
    (2..=BULK_MULTI_MAX).contains(&jobs.len())
        && jobs.iter().all(|j| {
            j.inp.m == m
                && j.inp.group.is_none()
                && matches!(j.w.fmt, Fmt::Fp8 | Fmt::Bf16)
                && bulk_applies(gpu, j.w, &j.inp)
        })
}

/// The K splits of a [`linear_bulk_multi`] launch, one per job `(rows, tiles, slices)`: the
/// same for all, enough for an item per SM where the slices allow, each split job's partials
/// and counters in its own part of the workspace (`floats`, `n_counters`), no split where it
/// would not fit. Returns `(s, partial offset, counter offset)` per job.
fn plan_bulk_multi(
    shapes: &[(usize, usize, usize)],
    m: usize,
    sm_count: usize,
    floats: usize,
    n_counters: usize,
) -> Vec<(usize, usize, usize)> {
    let tiles: usize = shapes.iter().map(|&(_, t, _)| t).sum();
    let want = sm_count.div_ceil(tiles.max(1));
    let (mut po, mut co) = (0usize, 0usize);
    shapes
        .iter()
        .map(|&(rows, _, nslices)| {
            let counters = rows.div_ceil(4);
            let want = want.clamp(1, nslices.max(1));
            let s = fit_splits(floats - po, n_counters - co, want, m * rows, counters);
            let slot = (s, po, co);
            if s > 1 {
                po += s * m * rows;
                co += counters;
            }
            slot
        })
        .collect()
}

/// Products of one or two tokens' activations (a decode step's projections of h) in one
/// launch of `gemv_bulk_multi_*` where [`bulk_multi_ok`]; an error elsewhere.
pub fn linear_bulk_multi(gpu: &Gpu, jobs: &[LinJob<'_>], part: &Partial) -> Result<()> {
    if !bulk_multi_ok(gpu, jobs) {
        return Err(crate::Error::Unsupported(format!(
            "one bulk launch for {} products",
            jobs.len()
        )));
    }
    let m = jobs[0].inp.m;
    // (`bulk_plan` gives 1, 2 or 4 rows per warp, each built in the kernel.)
    let plans: Vec<BulkPlan> = jobs.iter().map(|j| bulk_plan(gpu, j.w, m, part)).collect();
    let shapes: Vec<_> = jobs
        .iter()
        .zip(&plans)
        .map(|(j, p)| (j.w.out, p.tiles, p.nslices))
        .collect();
    let splits = plan_bulk_multi(&shapes, m, gpu.sm_count, part.floats, part.n_counters);
    let blank = BulkJob {
        w: jobs[0].w.desc,
        a: GemvArgs::new(&jobs[0].inp, 0, 0, 0, 1, true, part),
        nslices: 1,
        rpw: 1,
        items: 0,
        pad: 0,
    };
    let mut g = BulkMulti {
        n: jobs.len() as i32,
        pad: 0,
        j: [blank; BULK_MULTI_MAX],
    };
    let (mut items, mut bytes) = (0, 0);
    for (((slot, j), p), &(s, po, co)) in g.j.iter_mut().zip(jobs).zip(&plans).zip(&splits) {
        let jp = part.past(po, co);
        *slot = BulkJob {
            w: j.w.desc,
            a: GemvArgs::new(&j.inp, j.y, j.w.out, j.w.out, s, true, &jp),
            nslices: p.nslices as i32,
            rpw: p.rpw as i32,
            items: (p.tiles * s) as i32,
            pad: 0,
        };
        items += p.tiles * s;
        bytes += j.w.stored_bytes;
    }
    gpu.tag(|| (format!("gemv_bulk_multi x{} m{m}", jobs.len()), bytes));
    gpu.launch(
        &format!("gemv_bulk_multi_{m}"),
        (items.min(gpu.sm_count) as u32, 1, 1),
        (BULK_THREADS, 1, 1),
        bulk_smem(gpu, Fmt::Fp8, 1),
        &[&g],
    )
}

fn blocks_for(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// Threads per row of the norm kernels: one float4 each up to 1024.
fn norm_threads(width: usize) -> u32 {
    (width.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// RMS norm of `rows` rows of `width` in place, weighted when `w` is non-zero.
pub fn rms_norm(gpu: &Gpu, x: u64, w: u64, width: usize, rows: usize, eps: f32) -> Result<()> {
    row_kernel(gpu, "rms_norm", x, w, width, rows, eps)
}

/// Rows of one [`rms_norm_rope`] set: `rows` rows of `x`, weighted by `w` when non-zero,
/// `rows_per_token` consecutive rows sharing a position.
#[derive(Clone, Copy)]
pub struct NormRows {
    pub x: u64,
    pub w: u64,
    pub rows: usize,
    pub rows_per_token: usize,
}

/// `vals` as a kernel's i32 arguments, or an error naming `what` where one is over i32.
fn i32_args<const N: usize>(what: &str, vals: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, v) in out.iter_mut().zip(vals) {
        *o = i32::try_from(v).map_err(|_| {
            crate::Error::Unsupported(format!("{what}: an argument ({v}) over i32"))
        })?;
    }
    Ok(out)
}

/// One [`indexer_scores`] launch: per token, `scores[t, e] = Σ_h hw[t, h] / √heads · relu(q[t, h]
/// · key[e]) / √dim` over its visible entries. With a positions table (a decode step) token t
/// is its own sequence with its own keys (`seqs[t].i_entries`) and `(positions[t] + 1) /
/// ratio` entries, all written; else the `keys` are shared, token t sees `min((pos0 + t + 1) /
/// ratio, n)` of them and the rest of its first `n` scores are -inf.
#[derive(Clone, Copy)]
pub struct IndexerScores {
    /// `[tokens, heads, dim]` queries and `[tokens, heads]` head weights (f32).
    pub q: u64,
    pub hw: u64,
    /// `[n, dim]` entries (f32), or 0 with `seqs`.
    pub keys: u64,
    pub heads: usize,
    pub dim: usize,
    pub pos0: usize,
    pub ratio: usize,
    pub n: usize,
    /// `[tokens, ld]` scores out.
    pub scores: u64,
    pub ld: usize,
    /// Decode: a device table of one `SeqLayer` per token, and one position per token (or both 0).
    pub seqs: u64,
    pub positions: u64,
    /// The release's 64 × 128 heads on the tensor cores (`indexer_scores_tc`: three TF32
    /// products per pair of operands, ~f32); other shapes ignore it.
    pub tensor_cores: bool,
}

/// The indexer's scores ([`IndexerScores`]). Decode launches a fixed grid (graph-static) that
/// strides over any count of entries; shared keys get blocks enough for their `n`.
pub fn indexer_scores(gpu: &Gpu, tokens: usize, a: &IndexerScores) -> Result<()> {
    let [hi, di, pos0, m, n, ld, ntok] = i32_args(
        "indexer scores",
        [a.heads, a.dim, a.pos0, a.ratio, a.n, a.ld, tokens],
    )?;
    if a.ratio == 0 || (a.seqs == 0 && a.n > a.ld) || (a.seqs == 0) != (a.positions == 0) {
        return Err(crate::Error::Unsupported(format!(
            "indexer scores: ratio {m} must be nonzero, {n} entries fit rows of {ld}, and a \
             per-token key table comes with positions"
        )));
    }
    if tokens == 0 || (a.seqs == 0 && a.n == 0) {
        return Ok(());
    }
    // The release's 64 × 128 heads take 32 entries per block (q, then two buffers of 32 keys
    // padded to 132 floats), or on the tensor cores 64 entries of one token (decode) or two
    // (shared keys; q rows and key rows of 132 floats); any other shape 8 entries per block (q
    // rows padded by one float).
    let release = (a.heads, a.dim) == (64, 128);
    let tc = release && a.tensor_cores;
    let tok = if tc && a.seqs == 0 { 2 } else { 1 };
    let (name, per_block, smem) = match (release, tc) {
        (true, true) => ("indexer_scores_tc", 64, (64 * tok + 2 * 64) * 132 * 4),
        (true, false) => ("indexer_scores", 32, (64 * 128 + 2 * 32 * 132) * 4),
        (false, _) => ("indexer_scores", 8, a.heads * (a.dim + 1) * 4),
    };
    let groups = tokens.div_ceil(tok);
    let blocks = if a.seqs != 0 {
        (2 * gpu.sm_count).div_ceil(tokens).max(1)
    } else if tc {
        // Blocks walk their tiles with q staged once: as few per token pair as fill the GPU.
        (2 * gpu.sm_count)
            .div_ceil(groups)
            .clamp(1, a.n.div_ceil(per_block))
    } else {
        a.n.div_ceil(per_block)
    };
    let (wscale, dscale) = (1.0 / (a.heads as f32).sqrt(), 1.0 / (a.dim as f32).sqrt());
    let mut args: Vec<&dyn crate::gpu::Arg> = vec![
        &a.q,
        &a.hw,
        &a.keys,
        &hi,
        &di,
        &pos0,
        &m,
        &n,
        &wscale,
        &dscale,
        &a.scores,
        &ld,
        &a.seqs,
        &a.positions,
    ];
    if tc {
        args.push(&ntok); // (its last block's second token may be past the call's)
    }
    gpu.launch(
        name,
        (blocks as u32, groups as u32, 1),
        (256, 1, 1),
        smem as u32,
        &args,
    )
}

/// What one [`topk_select`] launch selects from: each token's row of `scores`, of which the
/// first `(positions[t] + 1) / ratio` entries are visible with a positions table (a decode
/// step, every token its own sequence), else the first `min((pos0 + t + 1) / ratio, n)`.
#[derive(Clone, Copy)]
pub struct TopK {
    pub scores: u64,
    /// Floats from one token's scores to the next's.
    pub ld: usize,
    pub pos0: usize,
    pub ratio: usize,
    pub n: usize,
    /// A device array of one position per token, or 0.
    pub positions: u64,
    pub k: usize,
    /// `[tokens, sel_cap]` picks and `[tokens]` counts out.
    pub sel: u64,
    pub sel_cap: usize,
    pub nsel: u64,
}

/// Most visible entries whose order keys `topk_select` stages in shared memory (80 KB: contexts
/// up to 80K tokens at the CSA's ratio of 4); longer rows are read from global memory on each
/// of its passes (~25% slower at 16K entries on an H100). A decode step's launch reserves this
/// much whatever the context (its rows are as long as the longest context), and an
/// early-launched block holds it while it waits: at 80 KB two `indexer_scores` blocks still fit
/// beside it on an SM (at 192 KB none did, so a batch of t tokens kept t SMs from the scores).
pub const TOPK_STAGE_MAX: usize = 20_480;

/// Per token, the `k` best-scoring visible entries (ties to the lower index) in ascending order
/// into its row of `sel`, and their count (`k`, or every visible entry where fewer) into `nsel`.
pub fn topk_select(gpu: &Gpu, tokens: usize, a: &TopK) -> Result<()> {
    let [ld, pos0, ratio, n, k, cap] =
        i32_args("top-k", [a.ld, a.pos0, a.ratio, a.n, a.k, a.sel_cap])?;
    if k == 0 || k > cap || ratio == 0 {
        return Err(crate::Error::Unsupported(format!(
            "top-k: k {k} must be in 1..={cap} (the selection's capacity), ratio {ratio} nonzero"
        )));
    }
    if tokens == 0 {
        return Ok(());
    }
    // A row holds at most `ld` visible entries: stage no more than that.
    let stage = a.ld.min(TOPK_STAGE_MAX);
    let stage_cap = stage as i32;
    gpu.launch(
        "topk_select",
        (tokens as u32, 1, 1),
        (1024, 1, 1),
        (stage * 4) as u32,
        &[
            &a.scores,
            &ld,
            &pos0,
            &ratio,
            &n,
            &k,
            &a.sel,
            &cap,
            &a.nsel,
            &a.positions,
            &stage_cap,
        ],
    )
}

/// [`rms_norm`] then [`rope`] (not inverse) of the same rows in one launch, with the same
/// results, for one or two sets of rows of one width and RoPE table (a decode step's query
/// heads and key row).
pub fn rms_norm_rope(
    gpu: &Gpu,
    a: NormRows,
    b: Option<NormRows>,
    width: usize,
    eps: f32,
    r: &RopeDev,
    pos: Pos,
) -> Result<()> {
    let b = b.unwrap_or(NormRows {
        x: 0,
        w: 0,
        rows: 0,
        rows_per_token: 1,
    });
    let rows = a.rows + b.rows;
    if rows == 0 {
        return Ok(());
    }
    let (pos0, step, table) = pos.args();
    let ints = (
        a.rows as i32,
        a.rows_per_token.max(1) as i32,
        b.rows_per_token.max(1) as i32,
        width as i32,
        r.half as i32,
    );
    gpu.launch(
        "rms_norm_rope",
        (rows as u32, 1, 1),
        (norm_threads(width), 1, 1),
        0,
        &[
            &a.x,
            &a.w,
            &ints.0,
            &ints.1,
            &b.x,
            &b.w,
            &ints.2,
            &ints.3,
            &eps,
            &ints.4,
            &r.inv_freq,
            &r.factor,
            &pos0,
            &step,
            &table,
        ],
    )
}

/// `out[row] = 1 / rms(x[row])` for `rows` rows of `width`.
pub fn inv_rms(gpu: &Gpu, x: u64, out: u64, width: usize, rows: usize, eps: f32) -> Result<()> {
    row_kernel(gpu, "inv_rms", x, out, width, rows, eps)
}

/// A one-block-per-row kernel taking `(x, other, width, eps)`.
fn row_kernel(
    gpu: &Gpu,
    name: &str,
    x: u64,
    other: u64,
    width: usize,
    rows: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let wd = width as i32;
    gpu.launch(
        name,
        (rows as u32, 1, 1),
        (norm_threads(width), 1, 1),
        0,
        &[&x, &other, &wd, &eps],
    )
}

/// RoPE parameters of one table on the device.
pub struct RopeDev {
    pub inv_freq: u64,
    pub half: usize,
    pub factor: f32,
}

/// Positions of the rows' tokens: `pos0 + token · step`, or a device array of one position per
/// token (a batch of sequences).
#[derive(Clone, Copy)]
pub enum Pos {
    Step { pos0: usize, step: usize },
    Table(u64),
}

impl Pos {
    /// The kernels' `(pos0, pos_step, positions)` arguments.
    fn args(self) -> (i32, i32, u64) {
        match self {
            Pos::Step { pos0, step } => (pos0 as i32, step as i32, 0),
            Pos::Table(t) => (0, 0, t),
        }
    }
}

/// Rotates the trailing channels of `rows` rows of `width`; row i belongs to token
/// `i / rows_per_token`.
#[allow(clippy::too_many_arguments)] // the launch's full shape; a struct would only rename it
pub fn rope(
    gpu: &Gpu,
    x: u64,
    rows: usize,
    width: usize,
    rows_per_token: usize,
    r: &RopeDev,
    pos: Pos,
    inverse: bool,
) -> Result<()> {
    if rows == 0 || r.half == 0 {
        return Ok(());
    }
    let (pos0, step, table) = pos.args();
    let per_block = 8;
    let a = (
        rows as i32,
        width as i32,
        rows_per_token as i32,
        r.half as i32,
        pos0,
        step,
        inverse as i32,
    );
    gpu.launch(
        "rope",
        (blocks_for(rows, per_block), 1, 1),
        (32, per_block as u32, 1),
        0,
        &[
            &x,
            &a.0,
            &a.1,
            &a.2,
            &a.3,
            &r.inv_freq,
            &r.factor,
            &a.4,
            &a.5,
            &a.6,
            &table,
        ],
    )
}

/// A flat elementwise launch over `n` items.
pub fn elementwise(gpu: &Gpu, name: &str, n: usize, args: &[&dyn crate::gpu::Arg]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    gpu.launch(name, (blocks_for(n, 256), 1, 1), (256, 1, 1), 0, args)
}

/// `HcArgs` of `kernels/elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HcArgs {
    pub x: u64,
    pub f: u64,
    pub eout: u64,
    pub rw: u64,
    pub fn_: u64,
    pub base: u64,
    pub scale: u64,
    pub norm_w: u64,
    pub partial: u64,
    pub pre: u64,
    pub post: u64,
    pub comb: u64,
    pub h: u64,
    pub count: u64,
    /// Where the mix rows and stream rms go when `hc_mix` runs the Sinkhorn instead (0: the
    /// boundary runs it).
    pub mu: u64,
    pub rinv: u64,
    pub n: i32,
    pub d: i32,
    pub iters: i32,
    pub s: i32,
    pub k: i32,
    pub rw_inside: i32,
    pub hc_eps: f32,
    pub norm_eps: f32,
}
unsafe impl DeviceRepr for HcArgs {}
// The kernel's struct asserts the same size (kernels/elementwise.cu).
const _: () = assert!(std::mem::size_of::<HcArgs>() == 160);

/// Columns per block of `hc_boundary` (one thread per stream and column, 4 streams at most).
pub const HC_COLS: usize = 64;
pub const HC_THREADS: usize = 256;
/// Blocks per token (one thread-block cluster) of `hc_boundary_cluster`, and its most threads.
pub const HC_CLUSTER: usize = 16;
const HC_CL_THREADS: usize = 1024;

/// The block size of `hc_boundary_cluster` for `n` streams of width `d` (one thread per stream
/// and column of a block's d / 16 columns, whole warps), or `None` where it does not apply.
pub fn hc_cluster_threads(n: usize, d: usize) -> Option<u32> {
    let cells = n * (d / HC_CLUSTER);
    (n <= 4 && d.is_multiple_of(HC_CLUSTER) && cells <= HC_CL_THREADS)
        .then(|| cells.div_ceil(32) as u32 * 32)
}

/// One hyper-connection boundary of `t` decode tokens (`HcArgs`), by a thread-block cluster
/// per token when `cluster`, else by `hc_boundary`'s last block per token. With `a.mu` set it
/// leaves `post` and `comb` to [`hc_mix`].
pub fn hc_boundary(gpu: &Gpu, a: &HcArgs, t: usize, cluster: bool) -> Result<()> {
    let (n, d) = (a.n as usize, a.d as usize);
    match hc_cluster_threads(n, d).filter(|_| cluster) {
        Some(threads) => gpu.launch_cluster(
            "hc_boundary_cluster",
            (HC_CLUSTER as u32, t as u32, 1),
            (threads, 1, 1),
            0,
            HC_CLUSTER as u32,
            &[a],
        ),
        None => {
            let a = HcArgs {
                s: d.div_ceil(HC_COLS) as i32,
                ..*a
            };
            gpu.launch(
                "hc_boundary",
                (a.s as u32, t as u32, 1),
                (HC_THREADS as u32, 1, 1),
                0,
                &[&a],
            )
        }
    }
}

/// The Sinkhorn mix of `t` tokens (one warp each) from their mix rows `mu` and stream rms
/// `rinv` (as a deferring [`hc_boundary`] leaves them): `pre`, `post` and `comb`.
#[allow(clippy::too_many_arguments)]
pub fn hc_mix(
    gpu: &Gpu,
    mu: u64,
    rinv: u64,
    base: u64,
    scale: u64,
    (pre, post, comb): (u64, u64, u64),
    n: usize,
    iters: usize,
    eps: f32,
    t: usize,
) -> Result<()> {
    let (ni, it, ti) = (n as i32, iters as i32, t as i32);
    gpu.launch(
        "hc_mix",
        (t as u32, 1, 1),
        (32, 1, 1),
        0,
        &[
            &mu, &rinv, &base, &scale, &pre, &post, &comb, &ni, &it, &eps, &ti,
        ],
    )
}

/// Whether the device can run `hc_boundary_cluster` for `n` streams of width `d`.
pub fn hc_cluster_fits(gpu: &Gpu, n: usize, d: usize) -> Result<bool> {
    match hc_cluster_threads(n, d) {
        Some(threads) => gpu.cluster_fits("hc_boundary_cluster", threads, 0, HC_CLUSTER as u32),
        None => Ok(false),
    }
}

/// Copies `rows` rows of `cols` f32 from `src` (stride `lds`) to `dst` (stride `ldd`).
pub fn copy_rows(
    gpu: &Gpu,
    src: u64,
    lds: usize,
    dst: u64,
    ldd: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let (lds, ldd, r, c) = (lds as i32, ldd as i32, rows as i32, cols as i32);
    elementwise(
        gpu,
        "copy_rows",
        rows * cols,
        &[&src, &lds, &dst, &ldd, &c, &r],
    )
}

/// `AttnArgs` of `kernels/attention.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AttnArgs {
    pub q: u64,
    pub kv_new: u64,
    pub ring: u64,
    pub entries: u64,
    pub sel: u64,
    pub nsel: u64,
    pub sinks: u64,
    pub out: u64,
    /// Per-token [`crate::state::SeqLayerPtrs`] (decode steps) or 0.
    pub seqs: u64,
    pub positions: u64,
    pub t: i32,
    pub h: i32,
    pub dh: i32,
    pub win: i32,
    pub pos0: i32,
    pub ratio: i32,
    pub n_entries: i32,
    pub sel_cap: i32,
    pub scale: f32,
}
unsafe impl DeviceRepr for AttnArgs {}
// The kernel's struct asserts the same size (kernels/attention.cu): 116 bytes of fields and
// the same 4 bytes of tail padding on both sides.
const _: () = assert!(std::mem::size_of::<AttnArgs>() == 120);

/// Keys per staged chunk of the attention kernels and heads per block of `attention_partial`
/// (kernels/attention.cu).
pub const ATT_KEYS: usize = 32;
pub const ATT_HEADS: usize = 8;
/// The head dim `attention_partial` is compiled for (larger ones are refused), and the most key
/// splits `attn_combine` merges (kernels/attention.cu).
pub const ATT_DMAX: usize = 512;
pub const COMBINE_MAX_SPLITS: usize = 256;
/// The most dynamic shared memory a block may opt into on sm_90 (227 KB).
const SMEM_OPTIN: u32 = 232_448;
/// Heads per block of `attention_tc`, and its dynamic shared memory: the group's queries and
/// two chunks of 32 keys in rows of [`ATT_TC_QP`] floats, P in rows of [`ATT_TC_PP`], the warps'
/// row values. (The kernel's `ATT_TC_*` defines; `tests/kernel_sources.rs` checks they agree,
/// and the kernel traps on less shared memory than it uses.)
pub const ATT_TC_HEADS: usize = 32;
pub const ATT_TC_QP: usize = 516;
pub const ATT_TC_PP: usize = 36;
const ATT_TC_SMEM: u32 = ((3 * 32 * ATT_TC_QP + 32 * ATT_TC_PP + 4 * 32) * 4) as u32;

/// Whether `attention_tc` takes this shape: the release's head dim (512) and whole groups of
/// 32 heads (Flash's 64, Pro's 128).
pub fn attention_tc_fits(heads: usize, head_dim: usize) -> bool {
    head_dim == 512 && heads.is_multiple_of(ATT_TC_HEADS)
}

/// The attention's partials for `attn_combine` — `part` [t, nsplit, h, dh + 2]: each split's
/// unnormalized output, score maximum and sum — on the tensor cores (`attention_tc`, where
/// [`attention_tc_fits`]) or the SIMT kernel (`attention_partial`).
pub fn attention_partials(
    gpu: &Gpu,
    a: &AttnArgs,
    part: u64,
    nsplit: usize,
    tc: bool,
) -> Result<()> {
    let (t, h, dh) = (a.t as u32, a.h as usize, a.dh as usize);
    let ns = nsplit as i32;
    if tc {
        if !attention_tc_fits(h, dh) {
            return Err(crate::Error::Unsupported(format!(
                "attention_tc for {h} heads of {dh}"
            )));
        }
        return gpu.launch(
            "attention_tc",
            (t, nsplit as u32, (h / ATT_TC_HEADS) as u32),
            (256, 1, 1),
            ATT_TC_SMEM,
            &[a, &part, &ns],
        );
    }
    gpu.launch(
        "attention_partial",
        (t, nsplit as u32, h.div_ceil(ATT_HEADS) as u32),
        (256, 1, 1),
        (ATT_KEYS * dh * 4) as u32,
        &[a, &part, &ns],
    )
}

/// `MoeArgs` of `kernels/moe.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MoeArgs {
    pub w1: u64,
    pub w3: u64,
    pub w2: u64,
    pub picks: u64,
    pub rw: u64,
    pub x: u64,
    pub h: u64,
    pub out: u64,
    pub k: i32,
    pub d: i32,
    pub i: i32,
    pub vec: i32,
    pub rw_inside: i32,
    pub lim: f32,
}
unsafe impl DeviceRepr for MoeArgs {}

/// `MoeGemmArgs` of `kernels/gemm.cu`: tiles of up to 64 pairs of one expert.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MoeGemmArgs {
    pub w1: u64,
    pub w3: u64,
    pub w2: u64,
    pub tile_expert: u64,
    pub tile_pairs: u64,
    pub tile_n: u64,
    pub x: u64,
    pub h: u64,
    pub out: u64,
    pub k: i32,
    pub d: i32,
    pub i: i32,
    pub vec: i32,
    pub lim: f32,
    /// `[T * k]` routing weights, one per pair (read when `rw_inside`).
    pub rw: u64,
    /// 1: the up kernel scales each pair's SwiGLU output by its routing weight.
    pub rw_inside: i32,
    /// bf16 parts of the activations in the tensor-core kernels (set by [`moe_experts_gemm`]).
    pub terms: i32,
}
unsafe impl DeviceRepr for MoeGemmArgs {}

/// The official profile's treatment of the experts' hidden rows before the down projection:
/// each pair's row multiplied by its routing weight (`rw`, when set) and FP8-rounded per 128
/// (DeepSeek's `Expert.forward` order; the combine must then not weight it again).
#[derive(Clone, Copy)]
pub struct HiddenRound {
    pub rw: Option<u64>,
}

fn round_hidden(
    gpu: &Gpu,
    r: Option<HiddenRound>,
    h: u64,
    width: usize,
    rows: usize,
) -> Result<()> {
    match r {
        None => Ok(()),
        Some(r) => crate::quant::fp8_round_rows(
            gpu,
            h,
            width,
            rows,
            width,
            dsv4_core::numerics::ACT_BLOCK,
            None,
            r.rw,
        ),
    }
}

/// The routed experts for many tokens, over tiles of up to [`MOE_TILE_PAIRS`] pairs of one
/// expert: on the tensor cores (activations in `terms` bf16 parts) when `tc` (every expert's
/// [`GpuLinear::tc`]) and the GPU allows, else the SIMT kernels (64 rows per block). `round`:
/// the hidden rows between the two products (official profile).
#[allow(clippy::too_many_arguments)] // the launch's full shape; a struct would only rename it
pub fn moe_experts_gemm(
    gpu: &Gpu,
    fmt: Fmt,
    tc: bool,
    terms: u8,
    a: &MoeGemmArgs,
    ntile: usize,
    pairs: usize,
    round: Option<HiddenRound>,
) -> Result<()> {
    if ntile == 0 {
        return Ok(());
    }
    let f = fmt.name();
    if tc && gpu.tc && matches!(fmt, Fmt::Bf16 | Fmt::Fp8 | Fmt::Fp4) && ntile <= TC_MAX_TILES {
        // 32 inputs per K step: the MoE tiles' best shape on an H200 (99 vs 88 TFLOP/s on
        // Flash's FP4 experts at 8K tokens, `bench --gemm`).
        return moe_experts_gemm_tc(gpu, fmt, terms, MOE_TC_BK, a, ntile, pairs, round);
    }
    gpu.launch(
        &format!("moe_up_gemm_{f}"),
        (ntile as u32, blocks_for(a.i as usize, GEMM_TILE), 1),
        (256, 1, 1),
        0,
        &[a],
    )?;
    round_hidden(gpu, round, a.h, a.i as usize, pairs)?;
    gpu.launch(
        &format!("moe_down_gemm_{f}"),
        (ntile as u32, blocks_for(a.d as usize, GEMM_TILE), 1),
        (256, 1, 1),
        0,
        &[a],
    )
}

/// The tile lists of the MoE tile kernels: each expert's pairs (`by_expert[e]`, pair indices)
/// cut into tiles of up to [`MOE_TILE_PAIRS`]; per tile its expert, its pair count and
/// [`MOE_TILE_PAIRS`] pair indices (the short tail padded with the tile's first pair).
pub struct MoeTiles {
    pub expert: Vec<i32>,
    pub count: Vec<i32>,
    pub pairs: Vec<i32>,
}

impl MoeTiles {
    pub fn new(by_expert: &[Vec<i32>]) -> Self {
        let mut t = MoeTiles {
            expert: Vec::new(),
            count: Vec::new(),
            pairs: Vec::new(),
        };
        for (ex, list) in by_expert.iter().enumerate() {
            for chunk in list.chunks(MOE_TILE_PAIRS) {
                t.expert.push(ex as i32);
                t.count.push(chunk.len() as i32);
                t.pairs.extend_from_slice(chunk);
                t.pairs
                    .extend(std::iter::repeat_n(chunk[0], MOE_TILE_PAIRS - chunk.len()));
            }
        }
        t
    }
}

/// K step of the tensor-core MoE kernels.
const MOE_TC_BK: usize = 32;

/// Tiles of one tensor-core MoE launch at most (the grid's y dimension).
const TC_MAX_TILES: usize = 65535;

/// The tensor-core half of [`moe_experts_gemm`] stepping `bk` inputs (64, or 32: the `_k32`
/// kernels); `fmt` must be BF16, FP8 or FP4 and every expert [`GpuLinear::tc`].
#[allow(clippy::too_many_arguments)] // the launch's full shape; a struct would only rename it
pub fn moe_experts_gemm_tc(
    gpu: &Gpu,
    fmt: Fmt,
    terms: u8,
    bk: usize,
    a: &MoeGemmArgs,
    ntile: usize,
    pairs: usize,
    round: Option<HiddenRound>,
) -> Result<()> {
    if ntile == 0 {
        return Ok(());
    }
    if ntile > TC_MAX_TILES {
        return Err(crate::Error::Unsupported(format!(
            "{ntile} MoE tiles exceed the tensor-core grid's {TC_MAX_TILES}"
        )));
    }
    // The MoE kernels' tiles are MOE_TILE_PAIRS pairs: only the K step varies.
    let (f, sfx) = (fmt.name(), if bk == 32 { "_k32" } else { "" });
    let terms = terms.clamp(1, 3);
    let a = MoeGemmArgs {
        terms: terms as i32,
        ..*a
    };
    let (smem, xs_smem) = (
        tc_smem(MOE_TILE_PAIRS, terms, bk),
        tc_xs_smem(MOE_TILE_PAIRS, terms, bk),
    );
    let (d, i) = (a.d as usize, a.i as usize);
    // The activations pre-split into bf16 parts (the `_xs` kernels read them through `x`):
    // the tokens' rows for up (pair p reads token p / k), the pairs' hidden rows for down.
    let xs_ok = d.is_multiple_of(8) && i.is_multiple_of(8) && a.k > 0;
    let tokens = pairs.div_ceil(a.k.max(1) as usize);
    // Up: 64 intermediate rows (gate and up) per block; down: 128 output rows. Row blocks
    // vary fastest (see kernels/gemm_tc.cu).
    // `kernel` over rows of `src` (width `ld`): its `_xs` twin on a split copy where one can
    // be made, else the in-block split.
    let launch = |kernel: String, grid: (u32, u32, u32), src: u64, ld: usize, rows: usize| {
        let xs = if xs_ok {
            split_x(gpu, src, ld, rows, ld, terms)?
        } else {
            None
        };
        match xs {
            Some(xs) => gpu.launch(
                &format!("{kernel}_xs"),
                grid,
                (256, 1, 1),
                xs_smem,
                &[&MoeGemmArgs { x: xs, ..a }],
            ),
            None => gpu.launch(&kernel, grid, (256, 1, 1), smem, &[&a]),
        }
    };
    let up_grid = (blocks_for(i, TC_ROWS / 2), ntile as u32, 1);
    launch(format!("moe_up_gemm_tc_{f}{sfx}"), up_grid, a.x, d, tokens)?;
    round_hidden(gpu, round, a.h, i, pairs)?;
    let down_grid = (blocks_for(d, TC_ROWS), ntile as u32, 1);
    launch(
        format!("moe_down_gemm_tc_{f}{sfx}"),
        down_grid,
        a.h,
        i,
        pairs,
    )
}

/// The routed experts, one block row per (token, slot) pair: gate+up (SwiGLU fused), then down.
/// `exact_tc`: every expert matrix passed [`GpuLinear::tc`](crate::weights::GpuLinear);
/// `bulk`: every expert's weights and scales may be bulk-copied
/// ([`GpuMoe::bulk`](crate::weights::GpuMoe)).
pub fn moe_experts(
    gpu: &Gpu,
    fmt: Fmt,
    exact_tc: bool,
    bulk: bool,
    a: &MoeArgs,
    pairs: usize,
    round: Option<HiddenRound>,
) -> Result<()> {
    if pairs == 0 {
        return Ok(());
    }
    if bulk && moe_bulk_ok(gpu, fmt, exact_tc, a, pairs) {
        return moe_experts_bulk(gpu, a, pairs, round);
    }
    if moe_tc_ok(gpu, fmt, exact_tc, a, pairs) {
        return moe_experts_tc(gpu, a, pairs, round);
    }
    let f = fmt.name();
    let expert = |rows: usize, inp: usize| gpu_bytes(fmt, rows, inp);
    let (d, i) = (a.d as usize, a.i as usize);
    gpu.tag(|| (format!("moe_up {f} x{pairs}"), pairs * expert(2 * i, d)));
    gpu.launch(
        &format!("moe_up_{f}"),
        (pairs as u32, blocks_for(a.i as usize, 16), 1),
        (256, 1, 1),
        0,
        &[a],
    )?;
    round_hidden(gpu, round, a.h, i, pairs)?;
    gpu.tag(|| (format!("moe_down {f} x{pairs}"), pairs * expert(d, i)));
    gpu.launch(
        &format!("moe_down_{f}"),
        (pairs as u32, blocks_for(a.d as usize, 32), 1),
        (256, 1, 1),
        0,
        &[a],
    )
}

/// The largest decode batch whose routed experts take the tensor-core kernels (measured up to
/// 32: 8 layers on an H200, batch 32 at 22.8 against 27.8–29.2 ms per step). A block serves at
/// most 4 tokens of an expert, so an expert that many tokens picked is streamed once per 4
/// of them; past 32 tokens that is untested against the per-pair kernels.
pub const MOE_TC_MAX_TOKENS: usize = 32;

/// Whether the routed experts of a decode batch take the tensor-core kernels
/// (`kernels/moe_tc.cu`): FP4 weights in 16-byte aligned rows of whole 256-input steps.
/// `exact_tc`: every expert matrix passed [`GpuLinear::tc`](crate::weights::GpuLinear) (its
/// e8m0 scales are normal numbers, which the kernels read without the zero/NaN codes).
/// Batches of more than [`Gpu::moe_tc_tokens`] tokens keep the SIMT kernels.
pub fn moe_tc_ok(gpu: &Gpu, fmt: Fmt, exact_tc: bool, a: &MoeArgs, pairs: usize) -> bool {
    gpu.moe_tc()
        && exact_tc
        && pairs <= gpu.moe_tc_tokens * a.k.max(1) as usize
        && fmt == Fmt::Fp4
        && a.vec != 0
        && a.d > 0
        && a.i > 0
        && a.d % 256 == 0
        && a.i % 256 == 0
        && moe_tc_smem(moe_tc_tokens_per_block(pairs, a), a.d.max(a.i) as usize) <= MAX_SMEM
}

/// Most tokens `moe_router_route` takes (`RR_TOKENS` in `kernels/moe.cu`).
pub const ROUTER_ROUTE_TOKENS: usize = 4;
/// Gate rows per block of `moe_router_route` (`RR_WARPS`).
const RR_WARPS: usize = 4;

/// The router of a few tokens in one launch: h `[t, d]` at `x`, scores `[t, E]` out, picks and
/// routing weights `[t, k]` (see `moe_route`); `count` a zeroed u32 the kernel resets.
pub struct RouteArgs {
    pub x: u64,
    pub t: usize,
    pub scores: u64,
    pub count: u64,
    pub k: usize,
    pub bias: u64,
    pub tid2eid: u64,
    pub ids: u64,
    pub scale: f32,
    pub picks: u64,
    pub rw: u64,
}

/// Whether `moe_router_route` can take `gate` for `t` tokens: BF16 rows of whole 16-byte
/// chunks, 16-byte aligned.
pub fn router_route_ok(gate: &GpuLinear, t: usize) -> bool {
    (1..=ROUTER_ROUTE_TOKENS).contains(&t)
        && router_route_smem(gate, t) <= MAX_SMEM
        && gate.fmt == Fmt::Bf16
        && gate.vec
        && gate.inp.is_multiple_of(8)
        && gate.desc.w.is_multiple_of(16)
}

/// Dynamic shared memory of `moe_router_route`: the `t` tokens' inputs, staged in f32.
fn router_route_smem(gate: &GpuLinear, t: usize) -> usize {
    t * gate.inp * 4
}

/// `moe_router_route`: the gate's scores and the routing of `a.t` tokens in one launch (the
/// caller checked [`router_route_ok`]).
pub fn router_route(gpu: &Gpu, gate: &GpuLinear, a: &RouteArgs) -> Result<()> {
    let (t, k) = (a.t as i32, a.k as i32);
    gpu.launch(
        "moe_router_route",
        (blocks_for(gate.out, RR_WARPS), 1, 1),
        (32 * RR_WARPS as u32, 1, 1),
        router_route_smem(gate, a.t) as u32,
        &[
            &gate.desc, &a.x, &t, &a.scores, &a.count, &k, &a.bias, &a.tid2eid, &a.ids, &a.scale,
            &a.picks, &a.rw,
        ],
    )
}

/// The largest decode batch whose routed experts take the bulk-copy tensor-core kernels
/// (`kernels/moe_bulk.cu`) by default. Each pair streams its expert there (no grouping of the
/// pairs that picked one expert), yet it beats the per-pair register-pipelined kernels at
/// every batch measured (H200, 8 layers at 1K: batch 8 5.82 -> 4.96 ms, batch 32 19.5 ->
/// 19.2, batch 2 unchanged).
pub const MOE_BULK_MAX_TOKENS: usize = 32;

/// The most stages in flight of the bulk-copy MoE kernels (`MB_MAX_STAGES` in
/// `kernels/moe_bulk.cu`).
pub(crate) const MB_MAX_STAGES: usize = 8;
/// Their threads: 8 consumer warps and the producer.
pub(crate) const MB_THREADS: u32 = 288;
/// Dynamic shared memory they may take: 227 KB less their static arrays (up to 2.2 KB).
pub(crate) const MB_MAX_SMEM: usize = 227 * 1024 - 3072;

/// The launch of one bulk-copy MoE kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MoeBulkLaunch {
    blocks: u32,
    stages: i32,
    planes: i32,
    smem: u32,
}

/// The launch of `moe_{up,down}_bulk_fp4` over `pairs` pairs of `tiles` 16-row tiles each, on
/// inputs of width `kin`, on `sms` SMs: a block per SM, each a contiguous run of (pair, tile)
/// items (as the kernel cuts them), with room for the activation planes of every input its run
/// reads (up: tokens, `k` pairs each; down: pairs) and as many whole-tile stages as then fit.
/// `None` when fewer than two stages fit.
fn moe_bulk_launch(
    sms: usize,
    k: usize,
    pairs: usize,
    tiles: usize,
    kin: usize,
    up: bool,
) -> Option<MoeBulkLaunch> {
    let items = pairs * tiles;
    if items == 0 || k == 0 {
        return None;
    }
    let nb = sms.clamp(1, items);
    let planes = moe_bulk_planes(nb, k, pairs, tiles, up);
    let tile = moe_bulk_tile_bytes(kin);
    let fixed = 64 + planes * (kin * 4 + kin / 8);
    let stages = (MB_MAX_SMEM.checked_sub(fixed)? / tile).min(MB_MAX_STAGES);
    (stages >= 2).then_some(MoeBulkLaunch {
        blocks: nb as u32,
        stages: stages as i32,
        planes: planes as i32,
        smem: (stages * tile + fixed) as u32,
    })
}

/// Stage bytes of a bulk MoE tile of 16 FP4 rows of `kin` inputs: two blocks of 8 rows, then
/// their e8m0 scales, each second block 16 bytes past the first's end against bank conflicts
/// (`MbStage` in `kernels/moe_bulk.cu`).
pub(crate) fn moe_bulk_tile_bytes(kin: usize) -> usize {
    16 * (kin / 2 + kin / 32) + 48
}

/// The most inputs (up: tokens of `k` pairs; down: pairs) that one block's contiguous run of
/// the `pairs · tiles` (pair, tile) items spans when `nb` blocks cut them as the bulk MoE
/// kernels do: the activation planes a block needs.
pub(crate) fn moe_bulk_planes(nb: usize, k: usize, pairs: usize, tiles: usize, up: bool) -> usize {
    let items = pairs * tiles;
    let input = |it: usize| if up { it / tiles / k } else { it / tiles };
    (0..nb.max(1))
        .map(|b| {
            let (i0, i1) = (items * b / nb, items * (b + 1) / nb);
            if i0 < i1 {
                input(i1 - 1) - input(i0) + 1
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0)
}

/// Whether the routed experts of `pairs` pairs take the bulk-copy kernels: the tensor-core
/// kernels' conditions ([`moe_tc_ok`]), a batch of at most [`Gpu::moe_bulk_tokens`] tokens and
/// a shared-memory layout that fits.
pub fn moe_bulk_ok(gpu: &Gpu, fmt: Fmt, exact_tc: bool, a: &MoeArgs, pairs: usize) -> bool {
    let (d, i, k) = (a.d as usize, a.i as usize, a.k.max(1) as usize);
    moe_tc_ok(gpu, fmt, exact_tc, a, pairs)
        && pairs <= gpu.moe_bulk_tokens() * k
        && moe_bulk_launch(gpu.sm_count, k, pairs, i / 8, d, true).is_some()
        && moe_bulk_launch(gpu.sm_count, k, pairs, d / 16, i, false).is_some()
}

/// [`moe_experts`] through `kernels/moe_bulk.cu` ([`moe_bulk_ok`] holds).
fn moe_experts_bulk(
    gpu: &Gpu,
    a: &MoeArgs,
    pairs: usize,
    round: Option<HiddenRound>,
) -> Result<()> {
    let (d, i, k) = (a.d as usize, a.i as usize, a.k.max(1) as usize);
    let expert = |rows: usize, inp: usize| gpu_bytes(Fmt::Fp4, rows, inp);
    let bad = || crate::Error::Unsupported("MoE bulk layout".into());
    let np = pairs as i32;
    let up = moe_bulk_launch(gpu.sm_count, k, pairs, i / 8, d, true).ok_or_else(bad)?;
    gpu.tag(|| {
        (
            format!("moe_up_bulk fp4 x{pairs} s{}", up.stages),
            pairs * expert(2 * i, d),
        )
    });
    // Up waits for the routing before it does anything: launched early it would only hold
    // every SM's shared memory meanwhile, keeping a decode step's shared expert (side stream,
    // beside the router) off the GPU until the routing is done (H100, batch 1: 1.82 / 1.79 ms
    // a step against 1.87 / 1.83 with the early launch).
    gpu.launch_after(
        "moe_up_bulk_fp4",
        (up.blocks, 1, 1),
        (MB_THREADS, 1, 1),
        up.smem,
        &[a, &np, &up.stages, &up.planes],
    )?;
    round_hidden(gpu, round, a.h, i, pairs)?;
    let dn = moe_bulk_launch(gpu.sm_count, k, pairs, d / 16, i, false).ok_or_else(bad)?;
    gpu.tag(|| {
        (
            format!("moe_down_bulk fp4 x{pairs} s{}", dn.stages),
            pairs * expert(d, i),
        )
    });
    gpu.launch(
        "moe_down_bulk_fp4",
        (dn.blocks, 1, 1),
        (MB_THREADS, 1, 1),
        dn.smem,
        &[a, &np, &dn.stages, &dn.planes],
    )
}

/// Dynamic shared memory a Hopper block may opt into (227 KB), less room for static arrays.
const MAX_SMEM: usize = 227 * 1024 - 1024;

/// Tokens per block of the tensor-core expert kernels (their `_m1`, `_m2`, `_m4` variants).
fn moe_tc_tokens_per_block(pairs: usize, a: &MoeArgs) -> usize {
    match pairs.div_ceil(a.k.max(1) as usize) {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// Their dynamic shared memory for inputs of width `k`: 64 bytes of zeros, then per token the
/// activation planes (4 bytes per input) and group factors (a float per 32).
fn moe_tc_smem(mt: usize, k: usize) -> usize {
    64 + mt * (k * 4 + k / 8)
}

/// [`moe_experts`] on the tensor cores: a block row per pair, of which the first pair of each
/// chunk of up to `mt` pairs of one expert works (serving the chunk) and the others exit.
fn moe_experts_tc(gpu: &Gpu, a: &MoeArgs, pairs: usize, round: Option<HiddenRound>) -> Result<()> {
    let (d, i) = (a.d as usize, a.i as usize);
    let mt = moe_tc_tokens_per_block(pairs, a);
    let smem = |k: usize| moe_tc_smem(mt, k) as u32;
    let expert = |rows: usize, inp: usize| gpu_bytes(Fmt::Fp4, rows, inp);
    const WARPS: usize = 4;
    // Tiles per warp: one for a few pairs (every warp in flight is needed to keep the weights
    // streaming), more as pairs grow, so each block's activation planes serve more rows.
    let per_warp = (pairs / 12).next_power_of_two().clamp(1, 8);
    let blocks = |tiles: usize| tiles.div_ceil(WARPS * per_warp) as u32;
    gpu.tag(|| (format!("moe_up_tc fp4 x{pairs}"), pairs * expert(2 * i, d)));
    gpu.launch(
        &format!("moe_up_tc_fp4_m{mt}"),
        (pairs as u32, blocks(i / 8), 1),
        (32 * WARPS as u32, 1, 1),
        smem(d),
        &[a],
    )?;
    round_hidden(gpu, round, a.h, i, pairs)?;
    gpu.tag(|| (format!("moe_down_tc fp4 x{pairs}"), pairs * expert(d, i)));
    gpu.launch(
        &format!("moe_down_tc_fp4_m{mt}"),
        (pairs as u32, blocks(d / 16), 1),
        (32 * WARPS as u32, 1, 1),
        smem(i),
        &[a],
    )
}

/// `y[t, :] = W · act_quant(x[t, :])` on the tensor cores (official profile, FP8 weights):
/// the activations are FP8-quantized per token per 128 inputs (`quant::act_quant_fp8`) and
/// multiplied by cuBLASLt's block-scaled FP8 GEMM, which is DeepSeek's `linear` → `fp8_gemm`
/// with fp32 accumulation. `y` is f32 with row stride `ldy`. Grouped inputs are not taken
/// (the grouped `wo_a` is not quantized in the official code).
pub fn linear_fp8_tc(
    lt: &crate::blaslt::BlasLt,
    w: &crate::blaslt::Fp8TcWeight,
    inp: &LinIn,
    y: u64,
    ldy: usize,
    scratch: &mut crate::blaslt::Fp8Scratch,
) -> Result<()> {
    use crate::blaslt::{Fp8Gemm, OutType, Scaling, M_ALIGN};
    let gpu = lt.gpu();
    let m = inp.m;
    if m == 0 {
        return Ok(());
    }
    if inp.group.is_some() {
        return Err(crate::Error::Unsupported(
            "linear_fp8_tc takes ungrouped inputs".into(),
        ));
    }
    let mp = m.next_multiple_of(M_ALIGN);
    // Rows past m exist only in the staging buffer; y holds exactly m rows.
    let staged = mp != m || !(ldy * 4).is_multiple_of(16);
    let (codes, scales, out) = scratch.ensure(gpu, mp, w.kp, if staged { w.n } else { 0 })?;
    crate::quant::act_quant_fp8(gpu, inp.x, inp.ldx, m, w.k, codes, scales, mp, w.kp)?;
    let (d, ldd) = if staged { (out, w.n) } else { (y, ldy) };
    lt.gemm(&Fp8Gemm {
        m: mp,
        n: w.n,
        k: w.kp,
        w: w.w,
        w_scale: w.scales,
        x: codes,
        x_scale: scales,
        d,
        ldd,
        out: OutType::F32,
        scaling: Scaling::Block,
        fast_accum: false,
    })?;
    if staged {
        copy_rows(gpu, out, w.n, y, ldy, m, w.n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk tensor-core GEMV plans of Flash's decode matrices on 132 SMs: 2 KB slices
    /// (three 64 KB stages) where rows allow, whole 1 KB rows (four 32 KB stages) otherwise, K
    /// split until every SM has an item (at most a split per slice, as far as the workspace
    /// holds the partials), and no plan for rows that are not whole KB.
    #[test]
    fn bulk_tc_plans_fit_the_shapes() {
        let part = |floats: usize| Partial {
            ptr: 0,
            floats,
            counters: 0,
            n_counters: 1 << 16,
        };
        // (format, rows, inputs, tokens, workspace floats) -> (ks, nslices, s, tiles, stages):
        // wq_b, wo_a, wo_b, the shared expert's down, the head, the router's gate, 3 KB rows
        // (1 KB slices), and a workspace too small for the router's four splits.
        let cases = [
            ((Fmt::Fp8, 32768, 1024, 8, 1 << 22), (1024, 1, 1, 1024, 4)),
            ((Fmt::Fp8, 8192, 4096, 8, 1 << 22), (2048, 2, 1, 256, 3)),
            ((Fmt::Fp8, 4096, 8192, 8, 1 << 22), (2048, 4, 2, 128, 3)),
            ((Fmt::Fp8, 4096, 2048, 8, 1 << 22), (2048, 1, 1, 128, 3)),
            (
                (Fmt::Bf16, 129280, 4096, 32, 1 << 22),
                (2048, 4, 1, 4040, 3),
            ),
            ((Fmt::Bf16, 256, 4096, 8, 1 << 22), (2048, 4, 4, 8, 3)),
            ((Fmt::Fp8, 64, 3072, 8, 1 << 22), (1024, 3, 3, 2, 4)),
            ((Fmt::Bf16, 256, 4096, 8, 256 * 8 * 2), (2048, 4, 2, 8, 3)),
        ];
        for ((fmt, out, inp, m, floats), (ks, nslices, s, tiles, stages)) in cases {
            let want = BulkTcPlan {
                ks,
                nslices,
                s,
                tiles,
                stages,
            };
            let got = bulk_tc_plan(132, fmt, out, inp, m, &part(floats));
            assert_eq!(got, Some(want), "{fmt:?} [{out}, {inp}] m={m}");
        }
        assert_eq!(
            bulk_tc_plan(132, Fmt::Fp8, 64, 1000, 8, &part(1 << 22)),
            None
        );
    }

    /// The bulk-copy MoE launches: room for the planes of every input a block's run of items
    /// reads (cut as the kernel cuts it), stages that fit the shared memory, and Flash's decode
    /// shapes on an H200's 132 SMs as measured.
    #[test]
    fn moe_bulk_launch_covers_every_block() {
        for &(sms, k, pairs, tiles, kin, up) in &[
            (132, 6, 6, 256, 4096, true),
            (132, 6, 6, 256, 2048, false),
            (132, 6, 18, 256, 4096, true),
            (132, 3, 9, 160, 2048, true),
            (132, 3, 9, 128, 1280, false),
            (7, 6, 12, 3, 4096, false),
            (200, 1, 1, 8, 256, true),
        ] {
            let l = moe_bulk_launch(sms, k, pairs, tiles, kin, up).unwrap();
            let items = pairs * tiles;
            let nb = l.blocks as usize;
            assert_eq!(nb, sms.min(items));
            let input = |it: usize| if up { it / tiles / k } else { it / tiles };
            for b in 0..nb {
                let (i0, i1) = (items * b / nb, items * (b + 1) / nb);
                assert!(i0 < i1, "block {b} has no items");
                assert!(input(i1 - 1) - input(i0) < l.planes as usize);
            }
            let tile = moe_bulk_tile_bytes(kin);
            let need = l.stages as usize * tile + 64 + l.planes as usize * (kin * 4 + kin / 8);
            assert_eq!(l.smem as usize, need);
            assert!(need <= MB_MAX_SMEM && (2..=MB_MAX_STAGES as i32).contains(&l.stages));
        }
        let up = moe_bulk_launch(132, 6, 6, 256, 4096, true).unwrap();
        assert_eq!((up.blocks, up.stages, up.planes), (132, 6, 1));
        let down = moe_bulk_launch(132, 6, 6, 256, 2048, false).unwrap();
        assert_eq!((down.blocks, down.stages, down.planes), (132, 8, 1));
        // Inputs too wide for two stages and their planes: none.
        assert_eq!(moe_bulk_launch(132, 6, 6, 256, 16384, true), None);
        assert_eq!(moe_bulk_launch(132, 6, 0, 256, 4096, true), None);
    }

    /// Every row of whole KB is read in slices that divide it (the kernel traps otherwise), as
    /// whole rows up to 4 KB.
    #[test]
    fn bulk_slices_divide_rows() {
        for kb in 1..=64 {
            let row = kb * 1024;
            let rpw = bulk_rpw(row);
            assert!([1, 2, 4].contains(&rpw), "{row}");
            assert!(
                row.is_multiple_of(4096 / rpw),
                "{row}: slice {}",
                4096 / rpw
            );
        }
        let got: Vec<usize> = [1024, 2048, 3072, 4096, 6144, 7168, 8192]
            .iter()
            .map(|&r| bulk_rpw(r))
            .collect();
        assert_eq!(got, [4, 2, 4, 1, 2, 4, 1]);
    }

    /// Every split job's partials and counters lie in the workspace and apart from the others',
    /// the grid ranges follow one another, and a full workspace only removes splits.
    #[test]
    fn multi_gemv_plan_keeps_workspaces_apart() {
        let shapes = [
            (1024, 256, true),
            (512, 256, true),
            (96, 128, true),
            (130, 64, false),
            (7, 62, true),
        ];
        for (m, z) in [(1, 1), (3, 1), (8, 1), (33, 5)] {
            for (floats, counters) in [(1 << 22, 1 << 16), (20_000, 40), (0, 0)] {
                let plan = plan_multi(&shapes, m, z, 132, floats, counters);
                let mut end = 0;
                let mut regions = Vec::new();
                for (p, &(rows, chunks, vec)) in plan.iter().zip(&shapes) {
                    assert!(p.s >= 1 && (vec || p.s == 1) && p.s <= (chunks / 32).max(1));
                    assert_eq!(p.gx, rows.div_ceil(GEMV_ROWS));
                    assert_eq!(p.end, end + p.gx * p.s * z);
                    end = p.end;
                    if p.s > 1 {
                        assert!(p.po + p.s * m * rows <= floats, "partials overflow");
                        assert!(p.co + p.gx * z <= counters, "counters overflow");
                        regions.push((p.po, p.s * m * rows, p.co, p.gx * z));
                    }
                }
                for (i, a) in regions.iter().enumerate() {
                    for b in &regions[i + 1..] {
                        assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "partials overlap");
                        assert!(a.2 + a.3 <= b.2 || b.2 + b.3 <= a.2, "counters overlap");
                    }
                }
                if floats == 0 {
                    assert!(plan.iter().all(|p| p.s == 1));
                }
            }
        }
        // Few row blocks: the split fills the GPU.
        let plan = plan_multi(
            &[(64, 256, true), (64, 256, true)],
            1,
            1,
            132,
            1 << 22,
            1 << 16,
        );
        assert!(plan.iter().all(|p| p.s > 1));
    }

    #[test]
    fn bulk_multi_plan_keeps_workspaces_apart() {
        // (rows, tiles, slices): Flash's CSA projections of h, then a launch too small to
        // give every SM an item.
        let csa = [
            (1024, 128, 1),
            (512, 64, 1),
            (1024, 128, 2),
            (1024, 128, 2),
            (256, 32, 2),
            (256, 32, 2),
            (64, 8, 2),
        ];
        let small = [(64, 8, 2), (64, 8, 1)];
        for shapes in [&csa[..], &small[..]] {
            for m in [1, 2] {
                for (floats, counters) in [(1 << 22, 1 << 16), (300, 20), (0, 0)] {
                    let plan = plan_bulk_multi(shapes, m, 132, floats, counters);
                    let mut regions = Vec::new();
                    for (&(s, po, co), &(rows, _, slices)) in plan.iter().zip(shapes) {
                        assert!(s >= 1 && s <= slices, "{s} splits of {slices} slices");
                        if s > 1 {
                            assert!(po + s * m * rows <= floats, "partials overflow");
                            assert!(co + rows.div_ceil(4) <= counters, "counters overflow");
                            regions.push((po, s * m * rows, co, rows.div_ceil(4)));
                        }
                    }
                    for (i, a) in regions.iter().enumerate() {
                        for b in &regions[i + 1..] {
                            assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "partials overlap");
                            assert!(a.2 + a.3 <= b.2 || b.2 + b.3 <= a.2, "counters overlap");
                        }
                    }
                    if floats == 0 {
                        assert!(plan.iter().all(|p| p.0 == 1));
                    }
                }
            }
        }
        // Enough items for every SM: no split. Too few: the jobs with slices to split, split.
        assert!(plan_bulk_multi(&csa, 1, 132, 1 << 22, 1 << 16)
            .iter()
            .all(|p| p.0 == 1));
        let plan = plan_bulk_multi(&small, 1, 132, 1 << 22, 1 << 16);
        assert_eq!((plan[0].0, plan[1].0), (2, 1));
    }
}
