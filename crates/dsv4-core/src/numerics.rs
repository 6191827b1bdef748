//! The low-precision formats of DeepSeek's official inference (NUMERICS.md §1): FP8 e4m3 and FP4
//! e2m1 block quantization with power-of-two (e8m0) scales, and the Sylvester Hadamard transform.
//! The `official` numerics profile stores its caches in these formats; the `reference` profile
//! (transformers-exact) uses none of them.

use crate::tensor::{e8m0_to_f32, E2M1_VALUES, E4M3_LUT};

/// Which arithmetic the model follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// transformers 5.23 `DeepseekV4ForCausalLM` in f32: no simulated low precision.
    #[default]
    Reference,
    /// DeepSeek's inference: FP8 K/V cache (e4m3, e8m0 per 64 nope channels), Hadamard-rotated FP4
    /// indexer queries and keys; with `act_quant`, FP8 activations before every FP8/FP4 GEMM.
    Official { act_quant: bool },
}

impl Numerics {
    pub fn is_official(self) -> bool {
        matches!(self, Numerics::Official { .. })
    }
    pub fn act_quant(self) -> bool {
        matches!(self, Numerics::Official { act_quant: true })
    }
}

/// Block width of the K/V FP8 scales.
pub const KV_BLOCK: usize = 64;
/// Block width of the indexer FP4 scales.
pub const FP4_BLOCK: usize = 32;
/// Block width of activation quantization before GEMMs.
pub const ACT_BLOCK: usize = 128;

const E4M3_MAX: f32 = 448.0;
const E2M1_MAX: f32 = 6.0;

/// `2^ceil(log2(amax·inv_max))` the way the official kernels compute it (`fast_round_scale`):
/// `t = fl32(amax · fl32(1/max))`, then the exponent of `t`, plus one unless `t` is a power of two.
/// Returned as the e8m0 byte.
pub fn round_scale_e8m0(amax: f32, inv_max: f32) -> u8 {
    let t = amax * inv_max;
    let bits = t.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let up = (bits & 0x7f_ffff != 0) as i32;
    (e + up + 127).clamp(0, 254) as u8
}

/// Nearest e4m3fn code to `v` (round to nearest, ties to even mantissa; saturates at ±448).
pub fn e4m3_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(E4M3_MAX);
    if a.is_nan() {
        return 0x7f;
    }
    // Quantum 2^(e-3) in binade e ≥ -6; below 2^-6 the subnormal quantum 2^-9.
    let e = if a > 0.0 {
        a.log2().floor().max(-6.0) as i32
    } else {
        -6
    };
    let q = (a / exp2i(e - 3)).round_ties_even() * exp2i(e - 3);
    if q == 0.0 {
        return sign;
    }
    if q < exp2i(-6) {
        return sign | (q / exp2i(-9)) as u8; // subnormal: m·2^-9
    }
    let e = q.log2().floor() as i32;
    let m = ((q / exp2i(e) - 1.0) * 8.0) as u8;
    sign | (((e + 7) as u8) << 3) | m
}

/// Nearest e2m1 nibble to `v` (ties to even mantissa; saturates at ±6).
pub fn e2m1_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 8 } else { 0 };
    let a = v.abs().min(E2M1_MAX);
    let quantum = if a < 2.0 {
        0.5
    } else if a < 4.0 {
        1.0
    } else {
        2.0
    };
    let q = (a / quantum).round_ties_even() * quantum;
    let idx = E2M1_VALUES[..8]
        .iter()
        .position(|&x| x == q)
        .expect("on the e2m1 grid") as u8;
    sign | idx // zero keeps its sign (-0 = code 8), as torch's casts do
}

fn exp2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Codes and e8m0 scales of `x` in blocks of `block`: per block `s = 2^ceil(log2(amax/max))`
/// (amax floored at `floor`), codes `encode(x/s)`.
fn block_quantize(
    x: &[f32],
    block: usize,
    max: f32,
    floor: f32,
    encode: fn(f32) -> u8,
) -> (Vec<u8>, Vec<u8>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len().div_ceil(block));
    for b in x.chunks(block) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
        let s = round_scale_e8m0(amax, 1.0 / max);
        let inv = 1.0 / e8m0_to_f32(s);
        codes.extend(b.iter().map(|&v| encode(v * inv)));
        scales.push(s);
    }
    (codes, scales)
}

/// `out = table[code] · scale` per block.
fn block_dequantize(codes: &[u8], scales: &[u8], block: usize, table: &[f32], out: &mut [f32]) {
    for ((o, c), &s) in out.chunks_mut(block).zip(codes.chunks(block)).zip(scales) {
        let s = e8m0_to_f32(s);
        o.iter_mut()
            .zip(c)
            .for_each(|(o, &c)| *o = table[c as usize] * s);
    }
}

/// Quantizes `x` to e4m3 codes with one e8m0 scale per `block` values (amax floored at 1e-4).
/// Returns (codes, scales); `x[i] ≈ e4m3(codes[i]) · 2^(scales[i/block]-127)`.
pub fn fp8_quantize(x: &[f32], block: usize) -> (Vec<u8>, Vec<u8>) {
    block_quantize(x, block, E4M3_MAX, 1e-4, e4m3_encode)
}

/// Decodes [`fp8_quantize`] output.
pub fn fp8_dequantize(codes: &[u8], scales: &[u8], block: usize, out: &mut [f32]) {
    block_dequantize(codes, scales, block, &E4M3_LUT, out)
}

/// In-place FP8 round trip (`act_quant(x, block, inplace=True)`).
pub fn fp8_round_trip(x: &mut [f32], block: usize) {
    let (c, s) = fp8_quantize(x, block);
    fp8_dequantize(&c, &s, block, x);
}

/// Quantizes `x` to e2m1 nibbles (one per byte here, low nibble) with one e8m0 scale per
/// `block` values (amax floored at 6·2^-126).
pub fn fp4_quantize(x: &[f32], block: usize) -> (Vec<u8>, Vec<u8>) {
    block_quantize(x, block, E2M1_MAX, 6.0 * f32::MIN_POSITIVE, e2m1_encode)
}

/// Decodes [`fp4_quantize`] output.
pub fn fp4_dequantize(codes: &[u8], scales: &[u8], block: usize, out: &mut [f32]) {
    block_dequantize(codes, scales, block, &E2M1_VALUES, out)
}

/// In-place FP4 round trip (`fp4_act_quant(x, block, inplace=True)`).
pub fn fp4_round_trip(x: &mut [f32], block: usize) {
    let (c, s) = fp4_quantize(x, block);
    fp4_dequantize(&c, &s, block, x);
}

/// The input of an FP8/FP4 GEMM under `--act-quant`: each row of `width` values FP8-rounded in
/// blocks of 128 (the last block of a row may be shorter); borrowed unchanged otherwise.
pub fn gemm_input(x: &[f32], width: usize, act_quant: bool) -> std::borrow::Cow<'_, [f32]> {
    if !act_quant {
        return std::borrow::Cow::Borrowed(x);
    }
    let mut v = x.to_vec();
    v.chunks_mut(width)
        .for_each(|r| fp8_round_trip(r, ACT_BLOCK));
    std::borrow::Cow::Owned(v)
}

/// `x ← x · H_n / √n` with the Sylvester Hadamard matrix (`H[i][j] = (-1)^popcount(i&j)`);
/// `n = x.len()` must be a power of two.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_encode_inverts_the_table_and_rounds_to_even() {
        for b in 0u8..=255 {
            let v = E4M3_LUT[b as usize];
            if v.is_nan() || b == 0x80 {
                continue;
            }
            assert_eq!(e4m3_encode(v), b, "code {b:#x} ({v})");
        }
        // Midpoints: between 1.0 (m=0) and 1.125 (m=1) → 1.0; between 1.125 and 1.25 → 1.25.
        assert_eq!(E4M3_LUT[e4m3_encode(1.0625) as usize], 1.0);
        assert_eq!(E4M3_LUT[e4m3_encode(1.1875) as usize], 1.25);
        // Subnormal midpoint 0.5·2^-9 → 0, 1.5·2^-9 → 2·2^-9.
        assert_eq!(E4M3_LUT[e4m3_encode(0.5 * 2f32.powi(-9)) as usize], 0.0);
        assert_eq!(
            E4M3_LUT[e4m3_encode(1.5 * 2f32.powi(-9)) as usize],
            2.0 * 2f32.powi(-9)
        );
        assert_eq!(E4M3_LUT[e4m3_encode(1000.0) as usize], 448.0);
        assert_eq!(E4M3_LUT[e4m3_encode(-464.0) as usize], -448.0);
    }

    #[test]
    fn e2m1_rounding_examples() {
        let r = |v: f32| E2M1_VALUES[e2m1_encode(v) as usize];
        for (v, want) in [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (7.0, 6.0),
            (-0.75, -1.0),
            (-5.5, -6.0),
        ] {
            assert_eq!(r(v), want, "{v}");
        }
    }

    #[test]
    fn scales_are_the_smallest_covering_power_of_two() {
        for amax in [1e-4f32, 0.3, 1.0, 448.0, 449.0, 896.0, 1e6] {
            let s = e8m0_to_f32(round_scale_e8m0(amax, 1.0 / 448.0));
            assert!(
                amax <= 448.0 * s * (1.0 + 1e-6) && amax > 224.0 * s * (1.0 - 1e-6),
                "{amax} → {s}"
            );
        }
        // Zero block: the amax floor keeps the scale finite, codes are zero.
        let (c, s) = fp8_quantize(&[0.0; 64], 64);
        assert!(c.iter().all(|&c| c == 0) && s[0] > 0);
    }

    #[test]
    fn round_trips_are_idempotent_and_close() {
        let x: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07)
            .collect();
        let mut a = x.clone();
        fp8_round_trip(&mut a, 64);
        let mut b = a.clone();
        fp8_round_trip(&mut b, 64);
        assert_eq!(a, b);
        for (u, v) in x.iter().zip(&a) {
            assert!((u - v).abs() <= 0.0625 * u.abs().max(0.1));
        }
        let mut c = x.clone();
        fp4_round_trip(&mut c, 32);
        let mut d = c.clone();
        fp4_round_trip(&mut d, 32);
        assert_eq!(c, d);
    }

    #[test]
    fn hadamard_is_orthonormal_and_self_inverse() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        hadamard(&mut y);
        let n2 = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n2(&x) - n2(&y)).abs() < 1e-4);
        // Row 1 of H is (+1, -1, +1, -1, ...).
        let want1: f32 = x
            .iter()
            .enumerate()
            .map(|(j, v)| if j % 2 == 0 { *v } else { -v })
            .sum::<f32>()
            / 128f32.sqrt();
        assert!((y[1] - want1).abs() < 1e-5);
        hadamard(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
