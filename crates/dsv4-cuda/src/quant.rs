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
/// Block 128 over whole rows is `gemm_input` (GEMV inputs in official mode); block 64 over the
/// nope channels is the K/V rounding.
pub fn fp8_round_trip(
    gpu: &Gpu,
    x: u64,
    ld: usize,
    rows: usize,
    width: usize,
    block: usize,
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
    gpu.launch(
        "fp8_round_trip",
        (width.div_ceil(block) as u32, rows.div_ceil(WARPS) as u32, 1),
        (32 * WARPS as u32, 1, 1),
        0,
        &[&x, &ld, &r, &w, &b],
    )
}

/// In place: each 128-wide row (stride `ld`, a multiple of 4) ← FP4 round trip (blocks of 32)
/// of its Hadamard rotation, as `numerics::hadamard` then `numerics::fp4_round_trip(_, 32)`
/// (the indexer's queries and keys).
pub fn hadamard128_fp4_round_trip(gpu: &Gpu, x: u64, ld: usize, rows: usize) -> Result<()> {
    if !ld.is_multiple_of(4) || !x.is_multiple_of(16) {
        return Err(Error::Unsupported(
            "hadamard128_fp4_round_trip needs 16-byte aligned rows".into(),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let inv_sqrt = 1.0f32 / 128f32.sqrt(); // the CPU's factor, bit for bit
    let (ld, r) = (ld as i32, rows as i32);
    gpu.launch(
        "hadamard128_fp4_round_trip",
        (rows.div_ceil(WARPS) as u32, 1, 1),
        (32 * WARPS as u32, 1, 1),
        0,
        &[&x, &ld, &r, &inv_sqrt],
    )
}
