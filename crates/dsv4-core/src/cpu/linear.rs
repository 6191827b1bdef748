//! A linear layer over weights in their stored format: `y[t] = W · x[t]` with `W` `[out, in]`
//! as BF16/F16/F32, FP8 e4m3 + block scales, packed FP4 e2m1 + e8m0 scales per 32 inputs, or an
//! MLX format (affine with scales + biases, mxfp4, mxfp8).
//! Rows are dequantized inside the kernel; no f32 copy of a weight ever exists.

use super::gemm;
use super::kernels::{self, Row};
use super::mlx_rows::{AffineRow, Params};
use crate::error::Result;
use crate::quant::QuantMode;
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

thread_local! {
    static BATCH_INVARIANT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While a guard is alive, linear layers called from this thread give a token the same result
/// alone as in any batch: a lone token takes the GEMV only where it follows the tile's blocked
/// order (`gemm`; FP8, FP4, BF16, F16, F32 with AVX-512), the tile otherwise (the MLX formats'
/// GEMVs accumulate in their own order). (Linear layers are only called from the thread running
/// the forward, never from inside rayon tasks, so a thread-local flag covers the whole call.)
pub struct BatchInvariant {
    was: bool,
}

impl BatchInvariant {
    pub fn enter() -> Self {
        BatchInvariant {
            was: BATCH_INVARIANT.with(|f| f.replace(true)),
        }
    }

    pub fn active() -> bool {
        BATCH_INVARIANT.with(|f| f.get())
    }
}

impl Drop for BatchInvariant {
    fn drop(&mut self) {
        BATCH_INVARIANT.with(|f| f.set(self.was));
    }
}

/// Most tokens a call serves through the fused multi-token GEMV (`kernels::dot_multi`) rather
/// than the tile, where the GEMV follows the blocked order.
const FUSED_TOKENS: usize = 8;

/// Weight rows decoded per tile of the multi-token path: enough rows that a group of tokens,
/// once in cache, meets many of them; few enough that the tile (16 rows of 4096 inputs: 256 KB)
/// stays in L2.
const TILE: usize = 16;

thread_local! {
    /// Each worker's decoded tile, reused across calls (a fresh 256 KB allocation per call would
    /// be a fresh, zeroed mapping).
    static PREPPED: std::cell::RefCell<gemm::Prepped> = std::cell::RefCell::default();
    /// The calling thread's reordered activations, reused likewise.
    static XS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y` (`[m, n]`) shared by the tasks of [`Linear::forward_tiled`] and
/// [`Linear::forward_fused`], which write disjoint columns of it.
struct Out {
    y: *mut f32,
    n: usize,
}

// SAFETY: tasks write disjoint elements (their own output columns) and `y` outlives them.
unsafe impl Sync for Out {}

/// [`Out`] from column `o0` on: tile row `r`, token `t` is `y[t·n + o0 + r]`.
struct OutAt<'a> {
    out: &'a Out,
    o0: usize,
}

impl Out {
    fn at(&self, o0: usize) -> OutAt<'_> {
        OutAt { out: self, o0 }
    }
}

impl gemm::Sink for OutAt<'_> {
    #[inline]
    fn put(&self, r: usize, t: usize, v: f32) {
        // SAFETY: in bounds (`t < m`, `o0 + r < n`); no other task writes this column.
        unsafe { *self.out.y.add(t * self.out.n + self.o0 + r) = v }
    }
}

/// Stored format of a weight matrix.
#[derive(Clone, Debug)]
pub enum Format {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3 with one (decoded) scale per `[block_out, block_in]` block, row-major
    /// `[ceil(out/block_out), ceil(in/block_in)]`.
    Fp8 {
        scales: Vec<f32>,
        block_out: usize,
        block_in: usize,
    },
    /// Packed FP4 e2m1 `[out, in/2]`; `scales` is e8m0 `[out, in/32]`.
    Fp4 {
        scales: Tensor,
    },
    /// MLX affine: packed `bits`-wide codes `[out, in·bits/8]` bytes; `scales` and `biases`
    /// `[out, in/group]` in BF16/F16/F32.
    Affine {
        bits: u32,
        group: usize,
        scales: Tensor,
        biases: Tensor,
    },
    /// MLX mxfp4: the official FP4 layout (e2m1 pairs per byte, e8m0 per 32).
    Mxfp4 {
        scales: Tensor,
    },
    /// MLX mxfp8: e4m3 codes, e8m0 scales `[out, in/32]`.
    Mxfp8 {
        scales: Tensor,
    },
}

impl Format {
    pub fn label(&self) -> String {
        match self {
            Format::F32 => "f32".into(),
            Format::Bf16 => "bf16".into(),
            Format::F16 => "f16".into(),
            Format::Fp8 {
                block_out,
                block_in,
                ..
            } => format!("fp8-e4m3 {block_out}x{block_in}"),
            Format::Fp4 { .. } => "fp4-e2m1/32".into(),
            Format::Affine {
                bits,
                group,
                scales,
                ..
            } => format!(
                "affine q{bits}/g{group} {}",
                scales.dtype.name().to_lowercase()
            ),
            Format::Mxfp4 { .. } => "mxfp4".into(),
            Format::Mxfp8 { .. } => "mxfp8".into(),
        }
    }

    /// Packed FP4 rows (official or mxfp4), which share kernels and the activation reordering.
    fn is_fp4(&self) -> bool {
        matches!(self, Format::Fp4 { .. } | Format::Mxfp4 { .. })
    }

    /// The MLX mode, for MLX formats.
    pub fn mlx_mode(&self) -> Option<QuantMode> {
        match self {
            Format::Affine { bits, group, .. } => Some(QuantMode::Affine {
                bits: *bits,
                group: *group,
            }),
            Format::Mxfp4 { .. } => Some(QuantMode::Mxfp4),
            Format::Mxfp8 { .. } => Some(QuantMode::Mxfp8),
            _ => None,
        }
    }
}

/// Row `o` of a `[out, g]` table of affine scales or biases.
fn param_row(t: &Tensor, o: usize, g: usize) -> Params<'_> {
    let w = t.dtype.size() * g;
    let r = &t.bytes()[o * w..(o + 1) * w];
    match t.dtype {
        DType::F32 => Params::F32(r),
        DType::F16 => Params::F16(r),
        _ => Params::Bf16(r),
    }
}

/// The FP8 block shape of a `[out, inp]` weight whose config names none, from its scale grid
/// `[sr, sc]`: per dimension DeepSeek's 128 wherever that grid fits it (the last block partial,
/// as the official checkpoints store edges), else the smallest block that gives the grid.
/// (1000 rows over 8 scale rows are 128-row blocks, not 125-row ones.)
pub fn fp8_block_from_grid(out: usize, inp: usize, sr: usize, sc: usize) -> [usize; 2] {
    let dim = |n: usize, g: usize| {
        if n.div_ceil(FP8_STD_BLOCK) == g {
            FP8_STD_BLOCK
        } else {
            n.div_ceil(g.max(1)).max(1)
        }
    };
    [dim(out, sr), dim(inp, sc)]
}

/// The FP8 block edge DeepSeek's checkpoints use.
const FP8_STD_BLOCK: usize = 128;

/// A weight matrix `[out, in]` applied as `y = W x`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out: usize,
    pub inp: usize,
    weight: Tensor,
    pub format: Format,
}

impl Linear {
    /// Interprets `weight` (and its `scale`, if quantized) as a `[out, inp]` matrix, checking
    /// dtypes and shapes. `block` is the FP8 block size from `quantization_config`.
    pub fn new(
        weight: &Tensor,
        scale: Option<&Tensor>,
        out: usize,
        inp: usize,
        block: Option<[usize; 2]>,
    ) -> Result<Self> {
        let want_shape = |shape: &[usize]| -> Result<()> {
            if weight.shape != shape {
                return Err(weight.err(format!(
                    "shape {:?}, expected {:?} for a {} weight [{out}, {inp}]",
                    weight.shape,
                    shape,
                    weight.dtype.name()
                )));
            }
            Ok(())
        };
        let format = match weight.dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                want_shape(&[out, inp])?;
                match weight.dtype {
                    DType::F32 => Format::F32,
                    DType::BF16 => Format::Bf16,
                    _ => Format::F16,
                }
            }
            DType::F8E4M3 => {
                want_shape(&[out, inp])?;
                let scale =
                    scale.ok_or_else(|| weight.err("FP8 weight without its `.scale` tensor"))?;
                if scale.shape.len() != 2 {
                    return Err(scale.err(format!(
                        "FP8 block scales must be 2-D, got {:?}",
                        scale.shape
                    )));
                }
                let (sr, sc) = (scale.shape[0], scale.shape[1]);
                let [bo, bi] = block.unwrap_or_else(|| fp8_block_from_grid(out, inp, sr, sc));
                if sr != out.div_ceil(bo) || sc != inp.div_ceil(bi) {
                    return Err(scale.err(format!(
                        "FP8 scale grid {:?} does not fit weight [{out}, {inp}] with {bo}x{bi} blocks (expected [{}, {}])",
                        scale.shape,
                        out.div_ceil(bo),
                        inp.div_ceil(bi)
                    )));
                }
                let scales = match scale.dtype {
                    DType::F8E8M0 | DType::U8 | DType::F32 | DType::BF16 => {
                        if scale.dtype == DType::U8 {
                            scale
                                .bytes()
                                .iter()
                                .map(|&u| crate::tensor::e8m0_to_f32(u))
                                .collect()
                        } else {
                            scale.to_f32()?
                        }
                    }
                    d => {
                        return Err(
                            scale.err(format!("FP8 scale dtype {} is not supported", d.name()))
                        )
                    }
                };
                if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
                    return Err(scale.err(format!("scale #{i} is not finite")));
                }
                Format::Fp8 {
                    scales,
                    block_out: bo,
                    block_in: bi,
                }
            }
            DType::I8 | DType::U8 => {
                if !inp.is_multiple_of(32) {
                    return Err(weight.err(format!(
                        "packed FP4 needs the input dim ({inp}) to be a multiple of 32"
                    )));
                }
                want_shape(&[out, inp / 2])?;
                let scale = scale
                    .ok_or_else(|| weight.err("packed FP4 weight without its `.scale` tensor"))?;
                if !matches!(scale.dtype, DType::F8E8M0 | DType::U8)
                    || scale.shape != [out, inp / 32]
                {
                    return Err(scale.err(format!(
                        "FP4 scales must be F8_E8M0 [{out}, {}], got {} {:?}",
                        inp / 32,
                        scale.dtype.name(),
                        scale.shape
                    )));
                }
                Format::Fp4 {
                    scales: scale.clone(),
                }
            }
            d => return Err(weight.err(format!("dtype {} cannot be a linear weight", d.name()))),
        };
        Ok(Linear {
            out,
            inp,
            weight: weight.clone(),
            format,
        })
    }

    /// An MLX-quantized `[out, inp]` matrix: `weight` (packed `uint32`), `scales`, and `biases`
    /// for affine. The mode is read from the shapes and must agree with `expected` (the
    /// config's entry for this module) when given.
    pub fn new_mlx(
        weight: &Tensor,
        scales: &Tensor,
        biases: Option<&Tensor>,
        out: usize,
        inp: usize,
        expected: Option<QuantMode>,
    ) -> Result<Self> {
        if !matches!(weight.dtype, DType::U32 | DType::U8 | DType::I8) {
            return Err(weight.err(format!(
                "quantized weight dtype {}, expected U32 (packed codes)",
                weight.dtype.name()
            )));
        }
        let per_word = 4 / weight.dtype.size();
        let cols = weight.shape.get(1).copied().unwrap_or(0) / per_word;
        if weight.shape.len() != 2 || weight.shape[0] != out || cols == 0 {
            return Err(weight.err(format!(
                "shape {:?}, expected [{out}, in·bits/32] for a quantized [{out}, {inp}] weight",
                weight.shape
            )));
        }
        if !(cols * 32).is_multiple_of(inp) {
            return Err(weight.err(format!(
                "{cols} packed words per row do not hold {inp} inputs at a whole number of bits"
            )));
        }
        let bits = (cols * 32 / inp) as u32;
        if scales.shape.len() != 2 || scales.shape[0] != out || scales.shape[1] == 0 {
            return Err(scales.err(format!(
                "shape {:?}, expected [{out}, in/group_size] for weight `{}`",
                scales.shape, weight.name
            )));
        }
        let ngroups = scales.shape[1];
        if !inp.is_multiple_of(ngroups) {
            return Err(scales.err(format!(
                "{ngroups} groups per row do not divide the {inp} inputs of weight `{}`",
                weight.name
            )));
        }
        let group = inp / ngroups;
        let mode = match biases {
            Some(b) => {
                let mode = QuantMode::new("affine", bits, group).map_err(|e| {
                    weight.err(format!(
                        "{e} (from shapes {:?} and scales {:?})",
                        weight.shape, scales.shape
                    ))
                })?;
                if !matches!(scales.dtype, DType::BF16 | DType::F16 | DType::F32) {
                    return Err(scales.err(format!(
                        "affine scales dtype {}, expected BF16, F16 or F32",
                        scales.dtype.name()
                    )));
                }
                if b.dtype != scales.dtype || b.shape != scales.shape {
                    return Err(b.err(format!(
                        "biases {} {:?} do not match scales {} {:?}",
                        b.dtype.name(),
                        b.shape,
                        scales.dtype.name(),
                        scales.shape
                    )));
                }
                mode
            }
            None => {
                let name = if bits == 4 { "mxfp4" } else { "mxfp8" };
                let mode = QuantMode::new(name, bits, group).map_err(|e| {
                    weight.err(format!(
                        "{e}; a quantized weight without biases must be mxfp4 or mxfp8"
                    ))
                })?;
                if !matches!(scales.dtype, DType::U8 | DType::F8E8M0) {
                    return Err(scales.err(format!(
                        "{name} scales dtype {}, expected U8 (e8m0)",
                        scales.dtype.name()
                    )));
                }
                mode
            }
        };
        if let Some(want) = expected {
            if want != mode {
                return Err(weight.err(format!(
                    "config.json `quantization` says {} but the tensors hold {} (weight {:?}, scales {:?})",
                    want.label(),
                    mode.label(),
                    weight.shape,
                    scales.shape
                )));
            }
        }
        let format = match mode {
            QuantMode::Affine { bits, group } => Format::Affine {
                bits,
                group,
                scales: scales.clone(),
                biases: biases
                    .cloned()
                    .ok_or_else(|| weight.err("affine without biases"))?,
            },
            QuantMode::Mxfp4 => Format::Mxfp4 {
                scales: scales.clone(),
            },
            QuantMode::Mxfp8 => Format::Mxfp8 {
                scales: scales.clone(),
            },
        };
        Ok(Linear {
            out,
            inp,
            weight: weight.clone(),
            format,
        })
    }

    /// Stored bytes of (weight codes, scales, biases). FP8 scales count as stored (1 byte each).
    pub fn component_bytes(&self) -> (usize, usize, usize) {
        let w = self.weight.bytes().len();
        match &self.format {
            Format::Fp4 { scales } | Format::Mxfp4 { scales } | Format::Mxfp8 { scales } => {
                (w, scales.bytes().len(), 0)
            }
            Format::Affine { scales, biases, .. } => {
                (w, scales.bytes().len(), biases.bytes().len())
            }
            Format::Fp8 { scales, .. } => (w, scales.len(), 0),
            _ => (w, 0, 0),
        }
    }

    /// Stored bytes of the weight and its scales (what one full pass reads).
    pub fn stored_bytes(&self) -> usize {
        self.weight.bytes().len()
            + match &self.format {
                Format::Fp4 { scales } | Format::Mxfp4 { scales } | Format::Mxfp8 { scales } => {
                    scales.bytes().len()
                }
                Format::Affine { scales, biases, .. } => {
                    scales.bytes().len() + biases.bytes().len()
                }
                Format::Fp8 { scales, .. } => scales.len(),
                _ => 0,
            }
    }

    /// The weight tensor's name in its checkpoint (for error messages).
    pub fn name(&self) -> &str {
        &self.weight.name
    }

    /// The stored weight bytes, row-major (what a device backend uploads as is).
    pub fn weight_bytes(&self) -> &[u8] {
        self.weight.bytes()
    }

    /// Row `o` in its stored format.
    #[inline]
    pub fn row(&self, o: usize) -> Row<'_> {
        let b = self.weight.bytes();
        match &self.format {
            Format::F32 => Row::F32(&b[o * self.inp * 4..(o + 1) * self.inp * 4]),
            Format::Bf16 => Row::Bf16(&b[o * self.inp * 2..(o + 1) * self.inp * 2]),
            Format::F16 => Row::F16(&b[o * self.inp * 2..(o + 1) * self.inp * 2]),
            Format::Fp8 {
                scales,
                block_out,
                block_in,
            } => {
                let cols = self.inp.div_ceil(*block_in);
                let r = o / block_out;
                Row::Fp8 {
                    codes: &b[o * self.inp..(o + 1) * self.inp],
                    scales: &scales[r * cols..(r + 1) * cols],
                    block: *block_in,
                }
            }
            Format::Fp4 { scales } | Format::Mxfp4 { scales } => {
                let g = self.inp / 32;
                Row::Fp4 {
                    packed: &b[o * self.inp / 2..(o + 1) * self.inp / 2],
                    scales: &scales.bytes()[o * g..(o + 1) * g],
                }
            }
            Format::Mxfp8 { scales } => {
                let g = self.inp / 32;
                Row::Mxfp8 {
                    codes: &b[o * self.inp..(o + 1) * self.inp],
                    scales: &scales.bytes()[o * g..(o + 1) * g],
                }
            }
            Format::Affine {
                bits,
                group,
                scales,
                biases,
            } => {
                let rb = self.inp * *bits as usize / 8;
                let g = self.inp / group;
                Row::Affine(AffineRow {
                    packed: &b[o * rb..(o + 1) * rb],
                    scales: param_row(scales, o, g),
                    biases: param_row(biases, o, g),
                    bits: *bits,
                    group: *group,
                })
            }
        }
    }

    /// Dequantizes row `o` into `out` (`inp` values).
    pub fn row_f32(&self, o: usize, out: &mut [f32]) {
        kernels::dequant(self.row(o), out);
    }

    /// `y[t, :] = W x[t, :]` for `m` rows; `x` is `[m, inp]`, `y` is `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.forward_rows(x, m, 0, self.out, y);
    }

    /// Like [`forward`](Self::forward) with only weight rows `r0..r0+n`: `y` is `[m, n]`.
    /// (The grouped output projection applies one row block per head group.)
    pub fn forward_rows(&self, x: &[f32], m: usize, r0: usize, n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.inp, "linear input length");
        assert_eq!(y.len(), m * n, "linear output length");
        assert!(r0 + n <= self.out, "linear row range");
        if m == 0 || n == 0 {
            return;
        }
        // Work splits over output rows; each task reads its rows once and applies them to all m
        // inputs (a decoded row is reused across tokens when m > 1).
        let per_task = rows_per_task(n);
        // The GEMV may serve a lone token even in batch-invariant mode when it accumulates like
        // the tile kernel (the blocked order, `gemm`).
        if m == 1 && self.one_token_gemv() {
            let xp = self.one_token_order(x);
            y.par_chunks_mut(per_task).enumerate().for_each(|(c, ys)| {
                let o0 = r0 + c * per_task;
                for (j, yv) in ys.iter_mut().enumerate() {
                    *yv = kernels::dot_prepared(self.row(o0 + j), x, &xp);
                }
            });
            return;
        }
        if m <= FUSED_TOKENS && kernels::gemv_is_blocked(self.row(r0)) {
            return self.forward_fused(x, m, r0, n, y, per_task);
        }
        self.forward_tiled(x, m, r0, n, y, per_task);
    }

    /// Whether one token takes the GEMV (`dot_prepared` per row): always, but in batch-invariant
    /// mode only where it accumulates like the tile kernel (the blocked order, `gemm`).
    fn one_token_gemv(&self) -> bool {
        !BatchInvariant::active() || kernels::gemv_is_blocked(self.row(0))
    }

    /// One token reordered for the GEMV's row kernels of this format (or nothing to reorder).
    fn one_token_order(&self, x: &[f32]) -> kernels::Prepared {
        match self.format {
            Format::Fp4 { .. } | Format::Mxfp4 { .. } => kernels::fp4_order(x),
            Format::Fp8 { .. } => kernels::fp8_order(x),
            Format::Affine { bits: 4, .. } => kernels::affine4_order(x),
            _ => kernels::Prepared::default(),
        }
    }

    /// How the multi-token paths reorder each token to meet rows decoded in the kernels' order
    /// (FP4 and FP8 where the kernels want it; `None`: natural order).
    fn multi_token_order(&self) -> Option<fn(&[f32]) -> kernels::Prepared> {
        match self.format {
            _ if !kernels::wants_fp4_order() => None,
            ref f if f.is_fp4() => Some(kernels::fp4_order),
            Format::Fp8 { .. } => Some(kernels::fp8_order),
            _ => None,
        }
    }

    /// A few tokens (decode batches): each row decoded once in registers per group of
    /// `kernels::MULTI_TOKENS` tokens (`kernels::dot_multi`), in the blocked order, so each token
    /// gets bitwise what it gets alone or in the tile.
    fn forward_fused(&self, x: &[f32], m: usize, r0: usize, n: usize, y: &mut [f32], per: usize) {
        let order = self.multi_token_order();
        let prepared: Vec<kernels::Prepared> = match order {
            Some(order) => x.chunks(self.inp).map(order).collect(),
            None => Vec::new(),
        };
        let xs: Vec<&[f32]> = match order {
            Some(_) => prepared.iter().map(|p| &p[..]).collect(),
            None => x.chunks(self.inp).collect(),
        };
        let out = Out {
            y: y.as_mut_ptr(),
            n,
        };
        (0..n.div_ceil(per)).into_par_iter().for_each(|c| {
            let (o0, mut v) = (c * per, [0f32; FUSED_TOKENS]);
            let at = out.at(o0);
            for j in 0..per.min(n - o0) {
                kernels::dot_multi(self.row(r0 + o0 + j), &xs, &mut v[..m]);
                for (t, &v) in v[..m].iter().enumerate() {
                    gemm::Sink::put(&at, j, t, v);
                }
            }
        });
    }

    /// The multi-token path: rows decoded [`TILE`] at a time (`kernels::prep_row`) and applied
    /// to every token by `gemm::tile`, results written straight into `y` (`[m, n]`).
    fn forward_tiled(&self, x: &[f32], m: usize, r0: usize, n: usize, y: &mut [f32], per: usize) {
        let inp = self.inp;
        let order = self.multi_token_order();
        XS.with(|cell| {
            // Defensive: Linear is not called from rayon tasks, but a nested call on this thread
            // would find the buffer taken and use its own.
            let (mut guard, mut own) = (cell.try_borrow_mut().ok(), Vec::new());
            let buf = guard.as_deref_mut().unwrap_or(&mut own);
            let xs = match order {
                Some(order) => {
                    buf.resize(m * inp, 0.0);
                    buf.par_chunks_mut(inp)
                        .zip(x.par_chunks(inp))
                        .for_each(|(o, t)| o.copy_from_slice(&order(t)));
                    &buf[..m * inp]
                }
                None => x,
            };
            let per = per.div_ceil(TILE) * TILE;
            let out = Out {
                y: y.as_mut_ptr(),
                n,
            };
            (0..n.div_ceil(per)).into_par_iter().for_each(|c| {
                PREPPED.with(|cell| {
                    let (mut guard, mut own) =
                        (cell.try_borrow_mut().ok(), gemm::Prepped::default());
                    let p = guard.as_deref_mut().unwrap_or(&mut own);
                    p.reserve(TILE, inp);
                    let rows = per.min(n - c * per);
                    for j0 in (0..rows).step_by(TILE) {
                        let nr = (rows - j0).min(TILE);
                        let o0 = c * per + j0;
                        for j in 0..nr {
                            let (w, s) = p.row_mut(j, inp);
                            kernels::prep_row(self.row(r0 + o0 + j), w, s);
                        }
                        gemm::tile(p, nr, inp, xs, m, &out.at(o0));
                    }
                });
            });
        });
    }

    /// Convenience: allocate the output.
    pub fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.out];
        self.forward(x, m, &mut y);
        y
    }
}

/// Output rows per parallel task when `n` rows are split: about four tasks per thread, at most
/// 256 rows each.
fn rows_per_task(n: usize) -> usize {
    (n / (rayon::current_num_threads().max(1) * 4)).clamp(1, 256)
}

/// One token through several matrices in one parallel region: for each job `(w, r0, x, y)`,
/// `y = w[r0..r0 + y.len()] · x`, the same row dots as [`Linear::forward_rows`] gives one token
/// alone (bit for bit), with one fork-join for all of them instead of one per product — a
/// decode step's many small products (a layer's experts: gate and up of each, then each down;
/// the groups of the grouped output projection) each paid the threads' hand-off.
pub fn forward_one_many(jobs: Vec<(&Linear, usize, &[f32], &mut [f32])>) {
    if jobs.len() < 2 || !jobs.iter().all(|(w, ..)| w.one_token_gemv()) {
        for (w, r0, x, y) in jobs {
            let n = y.len();
            w.forward_rows(x, 1, r0, n, y);
        }
        return;
    }
    let mut ins = Vec::with_capacity(jobs.len());
    let mut outs = Vec::with_capacity(jobs.len());
    for (w, r0, x, y) in jobs {
        assert_eq!(x.len(), w.inp, "linear input length");
        assert!(r0 + y.len() <= w.out, "linear row range");
        ins.push((w, r0, x, w.one_token_order(x)));
        outs.push(y);
    }
    let per = rows_per_task(outs.iter().map(|y| y.len()).sum());
    let tasks: Vec<(usize, usize, &mut [f32])> = outs
        .into_iter()
        .enumerate()
        .flat_map(|(i, y)| {
            y.chunks_mut(per)
                .enumerate()
                .map(move |(c, ys)| (i, c * per, ys))
        })
        .collect();
    tasks.into_par_iter().for_each(|(i, o0, ys)| {
        let (w, r0, x, xp) = &ins[i];
        for (j, yv) in ys.iter_mut().enumerate() {
            *yv = kernels::dot_prepared(w.row(r0 + o0 + j), x, xp);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{f32_to_bf16, Storage};
    use std::path::PathBuf;
    use std::sync::Arc;

    fn tensor(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
        let len = bytes.len();
        Tensor::new(
            "w".into(),
            Arc::new(PathBuf::from("test")),
            dtype,
            shape,
            Arc::new(Storage::Owned(bytes)),
            0,
            len,
        )
        .expect("tensor")
    }

    fn bytes(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (*seed >> 56) as u8
            })
            .collect()
    }

    fn unit(seed: &mut u64) -> f32 {
        bytes(seed, 3)
            .iter()
            .fold(0f32, |a, &b| a * 256.0 + b as f32)
            / 8388608.0
            - 1.0
    }

    /// One matrix per stored format (and per special case of the kernels: non-power-of-two FP8
    /// scales, 64-input FP8 blocks, a NaN code, FP4 scale bytes 0 and 255).
    fn matrices(out: usize, inp: usize) -> Vec<(String, Linear)> {
        let mut s = 0x5eed_u64 + inp as u64;
        let mut v = Vec::new();
        // FP8: codes without NaN except where placed on purpose.
        let codes = |s: &mut u64| -> Vec<u8> {
            bytes(s, out * inp)
                .into_iter()
                .map(|c| if c & 0x7f == 0x7f { c ^ 1 } else { c })
                .collect()
        };
        let grid = |bi: usize| out.div_ceil(128) * inp.div_ceil(bi);
        let e8m0: Vec<u8> = bytes(&mut s, grid(128))
            .iter()
            .map(|b| 118 + b % 12)
            .collect();
        let w = tensor(DType::F8E4M3, vec![out, inp], codes(&mut s));
        let sc = tensor(
            DType::F8E8M0,
            vec![out.div_ceil(128), inp.div_ceil(128)],
            e8m0,
        );
        v.push((
            "fp8 e8m0".into(),
            Linear::new(&w, Some(&sc), out, inp, Some([128, 128])),
        ));
        for (label, bi, nan) in [
            ("fp8 f32 scales, NaN code", 128, true),
            ("fp8 64-blocks", 64, false),
            ("fp8 256-blocks", 256, false),
        ] {
            let mut c = codes(&mut s);
            if nan {
                c[3 * inp + inp / 2] = 0x7f;
            }
            let f: Vec<u8> = (0..grid(bi))
                .flat_map(|_| (0.01 * (1.0 + unit(&mut s).abs())).to_le_bytes())
                .collect();
            let w = tensor(DType::F8E4M3, vec![out, inp], c);
            let sc = tensor(DType::F32, vec![out.div_ceil(128), inp.div_ceil(bi)], f);
            v.push((
                label.into(),
                Linear::new(&w, Some(&sc), out, inp, Some([128, bi])),
            ));
        }
        let mut fp4_scales: Vec<u8> = bytes(&mut s, out * inp / 32)
            .iter()
            .map(|b| 120 + b % 8)
            .collect();
        fp4_scales[inp / 32 + 1] = 0; // row 1: a 2^-127 scale
        fp4_scales[5 * inp / 32] = 255; // row 5: NaN
        let w = tensor(DType::U8, vec![out, inp / 2], bytes(&mut s, out * inp / 2));
        let sc = tensor(DType::F8E8M0, vec![out, inp / 32], fp4_scales.clone());
        v.push(("fp4".into(), Linear::new(&w, Some(&sc), out, inp, None)));
        let sc = tensor(DType::U8, vec![out, inp / 32], fp4_scales);
        v.push((
            "mxfp4".into(),
            Linear::new_mlx(&w, &sc, None, out, inp, None),
        ));
        let w = tensor(DType::U8, vec![out, inp], codes(&mut s));
        let sc8 = tensor(
            DType::U8,
            vec![out, inp / 32],
            bytes(&mut s, out * inp / 32)
                .iter()
                .map(|b| 120 + b % 8)
                .collect(),
        );
        v.push((
            "mxfp8".into(),
            Linear::new_mlx(&w, &sc8, None, out, inp, None),
        ));
        let real = |s: &mut u64, n: usize, f: &dyn Fn(f32) -> Vec<u8>| -> Vec<u8> {
            (0..n).flat_map(|_| f(unit(s) * 0.05)).collect()
        };
        let bf = real(&mut s, out * inp, &|x| {
            f32_to_bf16(x).to_le_bytes().to_vec()
        });
        v.push((
            "bf16".into(),
            Linear::new(
                &tensor(DType::BF16, vec![out, inp], bf),
                None,
                out,
                inp,
                None,
            ),
        ));
        let f = real(&mut s, out * inp, &|x| x.to_le_bytes().to_vec());
        v.push((
            "f32".into(),
            Linear::new(&tensor(DType::F32, vec![out, inp], f), None, out, inp, None),
        ));
        let h = real(&mut s, out * inp, &|x| {
            half::f16::from_f32(x).to_bits().to_le_bytes().to_vec()
        });
        v.push((
            "f16".into(),
            Linear::new(&tensor(DType::F16, vec![out, inp], h), None, out, inp, None),
        ));
        for (bits, group) in [(4usize, 64usize), (8, 32)] {
            let w = tensor(
                DType::U8,
                vec![out, inp * bits / 8],
                bytes(&mut s, out * inp * bits / 8),
            );
            let g = out * inp / group;
            let sc = tensor(
                DType::BF16,
                vec![out, inp / group],
                real(&mut s, g, &|x| f32_to_bf16(x).to_le_bytes().to_vec()),
            );
            let bs = tensor(
                DType::BF16,
                vec![out, inp / group],
                real(&mut s, g, &|x| f32_to_bf16(x).to_le_bytes().to_vec()),
            );
            v.push((
                format!("affine q{bits}"),
                Linear::new_mlx(&w, &sc, Some(&bs), out, inp, None),
            ));
        }
        v.into_iter()
            .map(|(l, m)| (l.clone(), m.unwrap_or_else(|e| panic!("{l}: {e}"))))
            .collect()
    }

    /// Without a block size from the config, an FP8 weight's scale grid is read with 128 ×
    /// 128 blocks wherever the grid fits them (edge blocks partial), and with the smallest
    /// block that gives the grid otherwise.
    #[test]
    fn fp8_blocks_inferred_from_the_scale_grid() {
        // Every code 1.0 (e4m3 0x38); block (r, c) scaled by 2^(r * 4 + c).
        let fp8 = |out: usize, inp: usize, sr: usize, sc: usize| {
            let w = tensor(DType::F8E4M3, vec![out, inp], vec![0x38; out * inp]);
            let scales = (0..sr * sc)
                .map(|i| 127 + ((i / sc) * 4 + i % sc) as u8)
                .collect();
            let s = tensor(DType::F8E8M0, vec![sr, sc], scales);
            Linear::new(&w, Some(&s), out, inp, None).expect("FP8 linear")
        };
        let scale_at = |lin: &Linear, o: usize, i: usize| {
            let mut row = vec![0f32; lin.inp];
            lin.row_f32(o, &mut row);
            row[i].log2() as usize
        };
        // 1000 × 300 over [8, 3]: 128-blocks (125 × 100 would give the same grid).
        let lin = fp8(1000, 300, 8, 3);
        for (o, i, r, c) in [
            (0, 0, 0, 0),
            (125, 100, 0, 0),
            (128, 128, 1, 1),
            (999, 299, 7, 2),
        ] {
            assert_eq!(scale_at(&lin, o, i), r * 4 + c, "[{o}, {i}]");
        }
        // 64 × 64 over [2, 2]: 128 does not give that grid, so 32 × 32.
        let lin = fp8(64, 64, 2, 2);
        for (o, i, r, c) in [(31, 31, 0, 0), (32, 0, 1, 0), (0, 63, 0, 1)] {
            assert_eq!(scale_at(&lin, o, i), r * 4 + c, "[{o}, {i}]");
        }
        assert_eq!(fp8_block_from_grid(32, 160, 1, 2), [128, 128]);
        assert_eq!(fp8_block_from_grid(300, 5, 10, 1), [30, 128]);
    }

    fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    /// Several one-token products in one parallel region (`forward_one_many`, row ranges
    /// included) give each exactly what `forward_rows` gives it alone, for every stored format,
    /// with and without batch-invariant mode (where it falls back to one product at a time).
    #[test]
    fn one_token_products_in_one_region_match_each_alone() {
        let out = 37;
        for inp in [4096, 256, 192] {
            let mut s = 7u64 + inp as u64;
            let mats = matrices(out, inp);
            let xs: Vec<Vec<f32>> = mats
                .iter()
                .map(|_| (0..inp).map(|_| unit(&mut s)).collect())
                .collect();
            // Each matrix whole, and rows 5..25 and 30..37 of it (the grouped projection's way).
            let ranges = [(0, out), (5, 20), (30, 7)];
            for invariant in [false, true] {
                let _g = invariant.then(BatchInvariant::enter);
                let want: Vec<Vec<f32>> = mats
                    .iter()
                    .zip(&xs)
                    .flat_map(|((_, lin), x)| {
                        ranges.iter().map(move |&(r0, n)| {
                            let mut y = vec![0f32; n];
                            lin.forward_rows(x, 1, r0, n, &mut y);
                            y
                        })
                    })
                    .collect();
                let mut got: Vec<Vec<f32>> = want.iter().map(|w| vec![0f32; w.len()]).collect();
                let mut ys = got.iter_mut();
                let mut jobs = Vec::new();
                for ((_, lin), x) in mats.iter().zip(&xs) {
                    for &(r0, _) in &ranges {
                        jobs.push((lin, r0, &x[..], &mut ys.next().expect("slot")[..]));
                    }
                }
                forward_one_many(jobs);
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    let label = &mats[k / ranges.len()].0;
                    assert!(
                        same(g, w),
                        "{label} {inp} range {k} (invariant {invariant})"
                    );
                }
            }
        }
    }

    /// In batch-invariant mode a token's outputs are bitwise the same alone, in a batch of 13,
    /// of 2 to 8 and of 3 from the middle, for every stored format and ragged width; where the GEMV follows the
    /// blocked order (FP8, FP4, BF16, F16, F32 with AVX-512) that holds without the mode too. The batch
    /// agrees with an f64 dot over the decoded rows.
    #[test]
    fn a_token_gets_the_same_result_in_any_batch() {
        // 13 tokens take the tile, 2 to 8 the fused multi-token GEMV (for the blocked formats).
        let (out, m) = (37, 13);
        // Odd and even block counts, with and without a ragged tail (4096: the Flash width).
        for inp in [4096 + 192, 4096, 256, 192, 64] {
            let mut s = 99u64;
            let x: Vec<f32> = (0..m * inp).map(|_| unit(&mut s)).collect();
            for (label, lin) in matrices(out, inp) {
                let run = |x: &[f32], k: usize| {
                    let mut y = vec![0f32; k * out];
                    lin.forward(x, k, &mut y);
                    y
                };
                let blocked = kernels::gemv_is_blocked(lin.row(0));
                for invariant in [true, false] {
                    if !invariant && !blocked {
                        continue;
                    }
                    let _g = invariant.then(BatchInvariant::enter);
                    let all = run(&x, m);
                    let mid = run(&x[2 * inp..5 * inp], 3);
                    assert!(
                        same(&mid, &all[2 * out..5 * out]),
                        "{label} {inp}: 3 vs {m}"
                    );
                    for k in 2..=8 {
                        let some = run(&x[..k * inp], k);
                        assert!(same(&some, &all[..k * out]), "{label} {inp}: {k} vs {m}");
                    }
                    // A row range (the grouped output projection's path), fused and tiled.
                    for k in [3, m] {
                        let (r0, nr) = (5, 20);
                        let mut part = vec![0f32; k * nr];
                        lin.forward_rows(&x[..k * inp], k, r0, nr, &mut part);
                        for t in 0..k {
                            let want = &all[t * out + r0..t * out + r0 + nr];
                            assert!(same(&part[t * nr..(t + 1) * nr], want), "{label} rows {k}");
                        }
                    }
                    for t in 0..m {
                        let one = run(&x[t * inp..(t + 1) * inp], 1);
                        let want = &all[t * out..(t + 1) * out];
                        assert!(
                            same(&one, want),
                            "{label} {inp} invariant={invariant}: token {t}"
                        );
                    }
                    let mut w = vec![0f32; inp];
                    for o in 0..out {
                        lin.row_f32(o, &mut w);
                        for t in 0..m {
                            let xt = &x[t * inp..(t + 1) * inp];
                            let want: f64 =
                                w.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let norm: f64 = w
                                .iter()
                                .zip(xt)
                                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                                .sum();
                            let got = all[t * out + o] as f64;
                            if want.is_nan() {
                                assert!(got.is_nan(), "{label} {inp} [{t},{o}]: {got} vs NaN");
                                continue;
                            }
                            assert!(
                                (got - want).abs() <= 1e-5 * norm + 1e-30,
                                "{label} {inp} [{t},{o}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
