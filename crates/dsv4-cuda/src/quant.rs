//! Launches of `kernels/quant.cu`: the official profile's roundings on the GPU (each equal bit
//! for bit to its CPU twin in `dsv4_core::numerics`).

use crate::gpu::Gpu;
use crate::{Error, Result};
use dsv4_core::numerics::ACT_BLOCK;

/// Warps (rows or blocks) per thread block of the quantization kernels.
const WARPS: usize = 8;

/// `act_quant(x, 128)` before an FP8 GEMM: `m` rows of `k` f32 (row stride `ldx`) → e4m3
/// codes `[mp, kp]` and f32 power-of-two scales `[kp/128, mp]` (tokens contiguous, cuBLASLt's
/// `VEC128_32F` layout). `mp ≥ m` and `kp ≥ k` (`kp` a multiple of 128) are padding: zero
/// codes, scale 1.
#[allow(clippy::too_many_arguments)] // the two shapes and three buffers of one launch
pub fn act_quant_fp8(
    gpu: &Gpu,
    x: u64,
    ldx: usize,
    m: usize,
    k: usize,
    codes: u64,
    scales: u64,
    mp: usize,
    kp: usize,
) -> Result<()> {
    if mp < m || kp < k || !kp.is_multiple_of(ACT_BLOCK) {
        return Err(Error::Unsupported(format!(
            "act_quant_fp8: padded shape [{mp}, {kp}] does not hold [{m}, {k}] in whole \
             128-blocks"
        )));
    }
    if mp == 0 || kp == 0 {
        return Ok(());
    }
    let (ldx, m, k, mp, kp) = (ldx as i32, m as i32, k as i32, mp as i32, kp as i32);
    gpu.launch(
        "act_quant_fp8",
        (
            (kp as usize / ACT_BLOCK) as u32,
            (mp as usize).div_ceil(WARPS) as u32,
            1,
        ),
        (32 * WARPS as u32, 1, 1),
        0,
        &[&x, &ldx, &m, &k, &codes, &scales, &mp, &kp],
    )
}

/// In place: the first `width` values of each of `rows` rows (stride `ld`) ← their FP8 round
/// trip in blocks of `block` (≤ 128): `numerics::fp8_round_trip(&mut row[..width], block)`.
/// Block 128 over whole rows is `gemm_input` (GEMM inputs in official mode); block 64 over the
/// nope channels is the K/V rounding.
pub fn fp8_round_trip(
    gpu: &Gpu,
    x: u64,
    ld: usize,
    rows: usize,
    width: usize,
    block: usize,
) -> Result<()> {
    fp8_round_rows(gpu, x, ld, rows, width, block, None, None)
}

/// [`fp8_round_trip`] of a copy: rows of `src` (stride `lds`) rounded into `x` (stride `ld`).
pub fn fp8_round_copy(
    gpu: &Gpu,
    src: (u64, usize),
    x: u64,
    ld: usize,
    rows: usize,
    width: usize,
) -> Result<()> {
    fp8_round_rows(gpu, x, ld, rows, width, ACT_BLOCK, Some(src), None)
}

/// The general form: row r of `src` (or of `x` itself) times `row_scale[r]` (when given), FP8
/// round-tripped in blocks of `block`, into `x`.
#[allow(clippy::too_many_arguments)] // one launch's shape, source and scaling
pub fn fp8_round_rows(
    gpu: &Gpu,
    x: u64,
    ld: usize,
    rows: usize,
    width: usize,
    block: usize,
    src: Option<(u64, usize)>,
    row_scale: Option<u64>,
) -> Result<()> {
    if block == 0 || block > 128 {
        return Err(Error::Unsupported(format!(
            "fp8_round_trip: block {block} outside 1..=128"
        )));
    }
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let (ld, r, w, b) = (ld as i32, rows as i32, width as i32, block as i32);
    let (sp, lds) = src.unwrap_or((0, 0));
    let lds = lds as i32;
    let rs = row_scale.unwrap_or(0);
    gpu.launch(
        "fp8_round_trip",
        (width.div_ceil(block) as u32, rows.div_ceil(WARPS) as u32, 1),
        (32 * WARPS as u32, 1, 1),
        0,
        &[&x, &ld, &r, &w, &b, &rs, &sp, &lds],
    )
}

/// In place: each `n`-wide row (stride `ld`; n ∈ {32, 64, 128}) ← FP4 round trip (blocks of
/// 32) of its Hadamard rotation, as `numerics::hadamard` then `numerics::fp4_round_trip(_, 32)`
/// (the indexer's queries and keys).
pub fn hadamard_fp4_round_trip(gpu: &Gpu, x: u64, ld: usize, rows: usize, n: usize) -> Result<()> {
    check_hadamard_width(n)?;
    if !ld.is_multiple_of(n / 32) || !x.is_multiple_of(4 * n as u64 / 32) {
        return Err(Error::Unsupported(
            "hadamard_fp4_round_trip needs rows aligned to n/32 floats".into(),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let inv_sqrt = hadamard_factor(n);
    let (ld, r, ni) = (ld as i32, rows as i32, n as i32);
    gpu.launch(
        "hadamard_fp4_round_trip",
        (rows.div_ceil(WARPS) as u32, 1, 1),
        (32 * WARPS as u32, 1, 1),
        0,
        &[&x, &ld, &r, &ni, &inv_sqrt],
    )
}

/// The widths the warp Hadamard kernels take (one warp, 1–4 values per lane).
pub fn check_hadamard_width(n: usize) -> Result<()> {
    if matches!(n, 32 | 64 | 128) {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "the official profile's indexer rounding takes index_head_dim 32, 64 or 128, not {n}"
        )))
    }
}

/// `1/sqrt(n)`, the CPU's Hadamard factor bit for bit.
pub fn hadamard_factor(n: usize) -> f32 {
    1.0 / (n as f32).sqrt()
}
