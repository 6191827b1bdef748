//! Row kernels for the MLX formats: affine (any of 2/3/4/5/6/8 bits, scales and biases in
//! bf16/f16/f32) and mxfp8 (e4m3 + e8m0 per 32). mxfp4 is byte-identical to the official FP4
//! experts and uses their kernels. Scalar versions are the reference; AVX2 paths cover 4- and
//! 8-bit affine and mxfp8.
//!
//! Affine dot products use `Σ_g scale_g·Σ q_i x_i + bias_g·Σ x_i`, so codes are never scaled one
//! by one.
//!
//! Safety of the SIMD functions: callers must have detected the CPU features each one enables
//! (`kernels` does, once, at run time).

use crate::quant::affine::unpack_codes;
use crate::tensor::{bf16_to_f32, e8m0_to_f32, E4M3_LUT};

/// A row of per-group scales or biases in their stored dtype.
#[derive(Clone, Copy)]
pub enum Params<'a> {
    Bf16(&'a [u8]),
    F16(&'a [u8]),
    F32(&'a [u8]),
}

impl Params<'_> {
    #[inline]
    pub fn get(&self, g: usize) -> f32 {
        match *self {
            Params::Bf16(b) => bf16_to_f32(u16::from_le_bytes([b[2 * g], b[2 * g + 1]])),
            Params::F16(b) => {
                half::f16::from_bits(u16::from_le_bytes([b[2 * g], b[2 * g + 1]])).to_f32()
            }
            Params::F32(b) => {
                f32::from_le_bytes([b[4 * g], b[4 * g + 1], b[4 * g + 2], b[4 * g + 3]])
            }
        }
    }
}

/// One affine row: packed codes plus a scale and a bias per `group` inputs.
#[derive(Clone, Copy)]
pub struct AffineRow<'a> {
    pub packed: &'a [u8],
    pub scales: Params<'a>,
    pub biases: Params<'a>,
    pub bits: u32,
    pub group: usize,
}

pub mod scalar {
    use super::*;

    /// Largest MLX group size (codes of one group are decoded into a stack buffer).
    const MAX_GROUP: usize = 128;

    pub fn dequant_affine(r: AffineRow, out: &mut [f32]) {
        let mut codes = [0u8; MAX_GROUP];
        for (g, o) in out.chunks_mut(r.group).enumerate() {
            let (s, b) = (r.scales.get(g), r.biases.get(g));
            let c = &mut codes[..o.len()];
            unpack_codes(r.packed, r.bits, g * r.group, c);
            for (o, &q) in o.iter_mut().zip(c.iter()) {
                *o = s * q as f32 + b;
            }
        }
    }

    /// 8 codes starting at byte `at` (8 codes of `bits` bits are exactly `bits` bytes).
    #[inline(always)]
    fn eight(packed: &[u8], at: usize, bits: u32) -> [f32; 8] {
        let b = bits as usize;
        let v = match packed.get(at..at + 8) {
            Some(w) => u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]),
            None => packed[at..at + b]
                .iter()
                .enumerate()
                .fold(0u64, |v, (j, &byte)| v | (byte as u64) << (8 * j)),
        };
        let mask = (1u64 << bits) - 1;
        std::array::from_fn(|j| ((v >> (j * b)) & mask) as f32)
    }

    pub fn dot_affine(r: AffineRow, x: &[f32]) -> f32 {
        if !r.group.is_multiple_of(8) || !x.len().is_multiple_of(r.group) {
            return dot_affine_any(r, x);
        }
        let b = r.bits as usize;
        let mut total = 0f32;
        for (g, xs) in x.chunks_exact(r.group).enumerate() {
            // Eight independent lanes: straight-line code the compiler vectorizes.
            let (mut qx, mut sx) = ([0f32; 8], [0f32; 8]);
            let base = g * r.group * b / 8;
            for (k, xc) in xs.chunks_exact(8).enumerate() {
                let q = eight(r.packed, base + k * b, r.bits);
                for l in 0..8 {
                    qx[l] += q[l] * xc[l];
                    sx[l] += xc[l];
                }
            }
            let (qx, sx): (f32, f32) = (qx.iter().sum(), sx.iter().sum());
            total += r.scales.get(g) * qx + r.biases.get(g) * sx;
        }
        total
    }

    /// Any shape (ragged rows): codes decoded group by group.
    fn dot_affine_any(r: AffineRow, x: &[f32]) -> f32 {
        let mut codes = [0u8; MAX_GROUP];
        let mut total = 0f32;
        for (g, xs) in x.chunks(r.group).enumerate() {
            let c = &mut codes[..xs.len()];
            unpack_codes(r.packed, r.bits, g * r.group, c);
            let qx: f32 = c.iter().zip(xs).map(|(&q, &v)| q as f32 * v).sum();
            let sx: f32 = xs.iter().sum();
            total += r.scales.get(g) * qx + r.biases.get(g) * sx;
        }
        total
    }

    pub fn dequant_mxfp8(codes: &[u8], scales: &[u8], out: &mut [f32]) {
        for (g, (o, c)) in out.chunks_mut(32).zip(codes.chunks(32)).enumerate() {
            let s = e8m0_to_f32(scales[g]);
            for (o, &c) in o.iter_mut().zip(c) {
                *o = E4M3_LUT[c as usize] * s;
            }
        }
    }

    pub fn dot_mxfp8(codes: &[u8], scales: &[u8], x: &[f32]) -> f32 {
        let mut total = 0f32;
        for (g, (c, xs)) in codes.chunks(32).zip(x.chunks(32)).enumerate() {
            let acc: f32 = c
                .iter()
                .zip(xs)
                .map(|(&c, &x)| E4M3_LUT[c as usize] * x)
                .sum();
            total += acc * e8m0_to_f32(scales[g]);
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 8 u8 codes at `p` as f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn u8x8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// Affine rows of 4 or 8 bits whose groups are whole multiples of 32; else `None`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_affine(r: AffineRow, x: &[f32]) -> Option<f32> {
        if !matches!(r.bits, 4 | 8)
            || !r.group.is_multiple_of(32)
            || !x.len().is_multiple_of(r.group)
        {
            return None;
        }
        let mask = _mm_set1_epi8(0x0f);
        let mut total = _mm256_setzero_ps();
        let xp = x.as_ptr();
        for g in 0..x.len() / r.group {
            let (mut qx0, mut qx1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut sx0, mut sx1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = g * r.group;
            let end = i + r.group;
            while i < end {
                // 32 codes per step, in input order.
                let codes: [__m128i; 2] = if r.bits == 4 {
                    let b = _mm_loadu_si128(r.packed.as_ptr().add(i / 2) as *const __m128i);
                    let lo = _mm_and_si128(b, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                    [_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)]
                } else {
                    [
                        _mm_loadu_si128(r.packed.as_ptr().add(i) as *const __m128i),
                        _mm_loadu_si128(r.packed.as_ptr().add(i + 16) as *const __m128i),
                    ]
                };
                for (k, c) in codes.iter().enumerate() {
                    let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(*c));
                    let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(*c, 8)));
                    let x0 = _mm256_loadu_ps(xp.add(i + 16 * k));
                    let x1 = _mm256_loadu_ps(xp.add(i + 16 * k + 8));
                    qx0 = _mm256_fmadd_ps(q0, x0, qx0);
                    qx1 = _mm256_fmadd_ps(q1, x1, qx1);
                    sx0 = _mm256_add_ps(sx0, x0);
                    sx1 = _mm256_add_ps(sx1, x1);
                }
                i += 32;
            }
            total = _mm256_fmadd_ps(
                _mm256_add_ps(qx0, qx1),
                _mm256_set1_ps(r.scales.get(g)),
                total,
            );
            total = _mm256_fmadd_ps(
                _mm256_add_ps(sx0, sx1),
                _mm256_set1_ps(r.biases.get(g)),
                total,
            );
        }
        Some(hsum(total))
    }

    /// 8 e4m3 codes → 8 f32 equal to the true values × 2^-8 (via the f16 bit pattern).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fp8x8(p: *const u8) -> __m256 {
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
        let mag = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7);
        _mm256_cvtph_ps(_mm_or_si128(sign, mag))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // g indexes codes, x and scales together
    pub unsafe fn dot_mxfp8(codes: &[u8], scales: &[u8], x: &[f32]) -> f32 {
        let groups = x.len() / 32;
        let mut total = _mm256_setzero_ps();
        for g in 0..groups {
            let (c, xp) = (codes.as_ptr().add(32 * g), x.as_ptr().add(32 * g));
            let a = _mm256_mul_ps(fp8x8(c), _mm256_loadu_ps(xp));
            let a = _mm256_fmadd_ps(fp8x8(c.add(8)), _mm256_loadu_ps(xp.add(8)), a);
            let a = _mm256_fmadd_ps(fp8x8(c.add(16)), _mm256_loadu_ps(xp.add(16)), a);
            let a = _mm256_fmadd_ps(fp8x8(c.add(24)), _mm256_loadu_ps(xp.add(24)), a);
            // fp8x8 yields values × 2^-8; fold 2^8 into the scale.
            total = _mm256_fmadd_ps(a, _mm256_set1_ps(e8m0_to_f32(scales[g]) * 256.0), total);
        }
        let mut s = hsum(total);
        if groups * 32 < x.len() {
            s += scalar::dot_mxfp8(&codes[32 * groups..], &scales[groups..], &x[32 * groups..]);
        }
        s
    }

    /// Affine 4/8-bit rows decoded 8 at a time (for the tiled matmul); `None` for other widths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequant_affine(r: AffineRow, out: &mut [f32]) -> Option<()> {
        if !matches!(r.bits, 4 | 8)
            || !r.group.is_multiple_of(8)
            || !out.len().is_multiple_of(r.group)
        {
            return None;
        }
        let mut tmp = [0u8; 8];
        for g in 0..out.len() / r.group {
            let (s, b) = (
                _mm256_set1_ps(r.scales.get(g)),
                _mm256_set1_ps(r.biases.get(g)),
            );
            for i in (g * r.group..(g + 1) * r.group).step_by(8) {
                let q = if r.bits == 8 {
                    u8x8(r.packed.as_ptr().add(i))
                } else {
                    for (j, t) in tmp.iter_mut().enumerate() {
                        let byte = r.packed[(i + j) / 2];
                        *t = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                    }
                    u8x8(tmp.as_ptr())
                };
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(q, s, b));
            }
        }
        Some(())
    }
}

/// AVX-512 paths: 4-bit rows through a per-group table (`scale·[0..16) + bias`, one permute per
/// 16 codes, activations in the FP4 kernels' even/odd order), 8-bit rows decoded 16 at a time.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Groups decoded up front (a 16384-wide row at group 32); wider rows use the AVX2 path.
    const MAX_GROUPS: usize = 512;

    /// A row's group parameters as f32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn decode_params(p: Params, out: &mut [f32]) {
        match p {
            Params::Bf16(b) => {
                let mut g = 0;
                while g + 16 <= out.len() {
                    let u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        b.as_ptr().add(2 * g) as *const __m256i
                    ));
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(g),
                        _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)),
                    );
                    g += 16;
                }
                for (k, o) in out.iter_mut().enumerate().skip(g) {
                    *o = p.get(k);
                }
            }
            _ => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = p.get(k);
                }
            }
        }
    }

    const IOTA: [f32; 16] = [
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    ];

    /// `xp` in `kernels::affine4_order`; `None` when the row is not 4- or 8-bit with groups of 32k.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_affine(r: AffineRow, x: &[f32], xp: &[f32]) -> Option<f32> {
        let n = x.len();
        if !r.group.is_multiple_of(32) || !n.is_multiple_of(r.group) {
            return None;
        }
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        match r.bits {
            4 if xp.len() == n => {
                let groups = n / r.group;
                if groups > MAX_GROUPS {
                    return None;
                }
                // The row's scales and biases decoded up front (bf16: a shift per 16), then a
                // 16-entry table per group; two 32-code steps into four accumulators.
                let (mut sc, mut bi) = ([0f32; MAX_GROUPS], [0f32; MAX_GROUPS]);
                decode_params(r.scales, &mut sc[..groups]);
                decode_params(r.biases, &mut bi[..groups]);
                let iota = _mm512_loadu_ps(IOTA.as_ptr());
                let nib = _mm512_set1_epi32(0x0f);
                let (pk, xq) = (r.packed.as_ptr(), xp.as_ptr());
                let (mut acc2, mut acc3) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let step = |i: usize, t: __m512| {
                    let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(pk.add(i / 2) as *const __m128i));
                    (
                        _mm512_mul_ps(
                            _mm512_permutexvar_ps(_mm512_and_si512(b, nib), t),
                            _mm512_loadu_ps(xq.add(i)),
                        ),
                        _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t),
                    )
                };
                for g in 0..groups {
                    let t = _mm512_fmadd_ps(iota, _mm512_set1_ps(sc[g]), _mm512_set1_ps(bi[g]));
                    let mut i = g * r.group;
                    let end = i + r.group;
                    while i + 64 <= end {
                        let (l0, h0) = step(i, t);
                        let (l1, h1) = step(i + 32, t);
                        acc0 = _mm512_add_ps(acc0, l0);
                        acc1 = _mm512_fmadd_ps(h0, _mm512_loadu_ps(xq.add(i + 16)), acc1);
                        acc2 = _mm512_add_ps(acc2, l1);
                        acc3 = _mm512_fmadd_ps(h1, _mm512_loadu_ps(xq.add(i + 48)), acc3);
                        i += 64;
                    }
                    if i < end {
                        let (l0, h0) = step(i, t);
                        acc0 = _mm512_add_ps(acc0, l0);
                        acc1 = _mm512_fmadd_ps(h0, _mm512_loadu_ps(xq.add(i + 16)), acc1);
                    }
                }
                acc0 = _mm512_add_ps(acc0, acc2);
                acc1 = _mm512_add_ps(acc1, acc3);
            }
            8 => {
                for g in 0..n / r.group {
                    let (s, b) = (
                        _mm512_set1_ps(r.scales.get(g)),
                        _mm512_set1_ps(r.biases.get(g)),
                    );
                    for i in (g * r.group..(g + 1) * r.group).step_by(32) {
                        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            r.packed.as_ptr().add(i) as *const __m128i,
                        )));
                        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            r.packed.as_ptr().add(i + 16) as *const __m128i,
                        )));
                        let w0 = _mm512_fmadd_ps(q0, s, b);
                        let w1 = _mm512_fmadd_ps(q1, s, b);
                        acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.as_ptr().add(i)), acc0);
                        acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.as_ptr().add(i + 16)), acc1);
                    }
                }
            }
            2 | 3 | 5 | 6 => {
                let groups = n / r.group;
                if groups > MAX_GROUPS {
                    return None;
                }
                let (mut sc, mut bi) = ([0f32; MAX_GROUPS], [0f32; MAX_GROUPS]);
                decode_params(r.scales, &mut sc[..groups]);
                decode_params(r.biases, &mut bi[..groups]);
                // 16 codes = 2·bits ≤ 12 bytes: broadcast one 16-byte load to every 128-bit
                // lane, move each code's two bytes into its 32-bit slot (`vpshufb`), shift by
                // its bit offset and mask.
                let bits = r.bits as usize;
                let mut ctrl = [-128i8; 64];
                let mut shifts = [0i32; 16];
                for j in 0..16 {
                    let off = j * bits / 8;
                    ctrl[4 * j] = off as i8;
                    ctrl[4 * j + 1] = off as i8 + 1;
                    shifts[j] = (j * bits % 8) as i32;
                }
                let ctrl = _mm512_loadu_si512(ctrl.as_ptr() as *const _);
                let shifts = _mm512_loadu_si512(shifts.as_ptr() as *const _);
                let mask = _mm512_set1_epi32((1 << bits) - 1);
                let mut tail = [0u8; 16];
                for g in 0..groups {
                    let (s, b) = (_mm512_set1_ps(sc[g]), _mm512_set1_ps(bi[g]));
                    for i in (g * r.group..(g + 1) * r.group).step_by(16) {
                        let at = i * bits / 8;
                        let p = if at + 16 <= r.packed.len() {
                            r.packed.as_ptr().add(at)
                        } else {
                            let have = r.packed.len() - at;
                            tail[..have].copy_from_slice(&r.packed[at..]);
                            tail.as_ptr()
                        };
                        let v = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
                        let q = _mm512_and_si512(
                            _mm512_srlv_epi32(_mm512_shuffle_epi8(v, ctrl), shifts),
                            mask,
                        );
                        let w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, b);
                        acc0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.as_ptr().add(i)), acc0);
                    }
                }
            }
            _ => return None,
        }
        Some(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)))
    }
}
