//! Inner loops of the CPU backend: dot products of an f32 activation row with one stored weight
//! row, dequantizing on the fly (FP8 e4m3 with block scales, FP4 e2m1 with e8m0 scales per 32,
//! BF16, F16, F32). AVX2+FMA+F16C versions are chosen at run time; the scalar versions are the
//! reference and the fallback.

use super::mlx_rows::{self, AffineRow};
use crate::tensor::{bf16_to_f32, e8m0_to_f32, E2M1_VALUES, E4M3_LUT};

/// One weight row in its stored format.
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [u8]),
    Bf16(&'a [u8]),
    F16(&'a [u8]),
    /// e4m3 codes; one scale per `block` consecutive inputs.
    Fp8 {
        codes: &'a [u8],
        scales: &'a [f32],
        block: usize,
    },
    /// Packed e2m1 (low nibble first); one e8m0 scale byte per 32 inputs.
    Fp4 {
        packed: &'a [u8],
        scales: &'a [u8],
    },
    /// MLX affine codes with a scale and bias per group.
    Affine(AffineRow<'a>),
    /// MLX mxfp8: e4m3 codes; one e8m0 scale byte per 32 inputs.
    Mxfp8 {
        codes: &'a [u8],
        scales: &'a [u8],
    },
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `Σ_i w[i]·x[i]` for a stored row of `x.len()` inputs.
#[inline]
pub fn dot(row: Row, x: &[f32]) -> f32 {
    let xp = if row.wants_fp4_order() {
        fp4_order(x)
    } else {
        Vec::new()
    };
    dot_prepared(row, x, &xp)
}

impl Row<'_> {
    /// Rows of 4-bit nibble pairs (FP4, mxfp4, 4-bit affine), whose fastest dot product takes the
    /// activations in [`fp4_order`].
    pub fn wants_fp4_order(&self) -> bool {
        match self {
            Row::Fp4 { .. } => true,
            Row::Affine(r) => r.bits == 4,
            _ => false,
        }
    }
}

/// Whether FP4 rows want their activations in [`fp4_order`] (the fastest kernel does).
pub fn wants_fp4_order() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Reorders each full group of 32 inputs as its 16 even then its 16 odd elements, matching
/// the low/high nibbles of packed FP4 bytes; a ragged tail stays as is. Empty when no kernel
/// needs it.
pub fn fp4_order(x: &[f32]) -> Vec<f32> {
    if !wants_fp4_order() {
        return Vec::new();
    }
    let mut out = x.to_vec();
    for (o, g) in out.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for j in 0..16 {
            o[j] = g[2 * j];
            o[16 + j] = g[2 * j + 1];
        }
    }
    out
}

/// Inverse of [`fp4_order`].
fn unorder_fp4(xp: &[f32]) -> Vec<f32> {
    let mut out = xp.to_vec();
    for (o, g) in out.chunks_exact_mut(32).zip(xp.chunks_exact(32)) {
        for j in 0..16 {
            o[2 * j] = g[j];
            o[2 * j + 1] = g[16 + j];
        }
    }
    out
}

/// [`dot`] with the FP4 reordering of `x` computed once by the caller (`xp`, from [`fp4_order`]).
#[inline]
pub fn dot_prepared(row: Row, x: &[f32], xp: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected above.
        return unsafe { avx512::dot(row, x, xp) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the features were detected above.
        return unsafe { avx2::dot(row, x) };
    }
    scalar::dot(row, x)
}

/// Dot product of two f32 slices of equal length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features detected.
        return unsafe { avx2::dot_f32(a, b) };
    }
    scalar::dot_f32(a, b)
}

/// `y += a·x` over slices of equal length.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Decodes a stored row into f32 like [`dequant`], but FP4 rows come out in [`fp4_order`]
/// (pair them with activations reordered the same way).
pub fn dequant_prepared(row: Row, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected above.
        return unsafe { avx512::dequant(row, out) };
    }
    dequant(row, out)
}

/// Decodes a stored row into f32 (`out.len()` inputs).
pub fn dequant(row: Row, out: &mut [f32]) {
    match row {
        Row::Affine(r) => {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the features were detected above.
                if unsafe { mlx_rows::avx2::dequant_affine(r, out) }.is_some() {
                    return;
                }
            }
            mlx_rows::scalar::dequant_affine(r, out)
        }
        Row::Mxfp8 { codes, scales } => mlx_rows::scalar::dequant_mxfp8(codes, scales, out),
        Row::F32(b) => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Row::Bf16(b) => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Row::F16(b) => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Row::Fp8 {
            codes,
            scales,
            block,
        } => {
            for (bi, (o, c)) in out.chunks_mut(block).zip(codes.chunks(block)).enumerate() {
                let s = scales[bi];
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = E4M3_LUT[c as usize] * s;
                }
            }
        }
        Row::Fp4 { packed, scales } => {
            for (g, (o, p)) in out.chunks_mut(32).zip(packed.chunks(16)).enumerate() {
                let s = e8m0_to_f32(scales[g]);
                for (j, &b) in p.iter().enumerate() {
                    o[2 * j] = E2M1_VALUES[(b & 15) as usize] * s;
                    if 2 * j + 1 < o.len() {
                        o[2 * j + 1] = E2M1_VALUES[(b >> 4) as usize] * s;
                    }
                }
            }
        }
    }
}

pub(crate) mod scalar {
    use super::*;

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let n8 = a.len() / 8 * 8;
        for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
            for k in 0..8 {
                acc[k] += ca[k] * cb[k];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in n8..a.len() {
            s += a[i] * b[i];
        }
        s
    }

    pub fn dot(row: Row, x: &[f32]) -> f32 {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => {
                let mut total = 0f32;
                for (bi, (c, xs)) in codes.chunks(block).zip(x.chunks(block)).enumerate() {
                    let mut acc = 0f32;
                    for (&c, &x) in c.iter().zip(xs) {
                        acc += E4M3_LUT[c as usize] * x;
                    }
                    total += acc * scales[bi];
                }
                total
            }
            Row::Fp4 { packed, scales } => {
                let mut total = 0f32;
                for (g, (p, xs)) in packed.chunks(16).zip(x.chunks(32)).enumerate() {
                    let mut acc = 0f32;
                    for (j, &b) in p.iter().enumerate() {
                        acc += E2M1_VALUES[(b & 15) as usize] * xs[2 * j];
                        if 2 * j + 1 < xs.len() {
                            acc += E2M1_VALUES[(b >> 4) as usize] * xs[2 * j + 1];
                        }
                    }
                    total += acc * e8m0_to_f32(scales[g]);
                }
                total
            }
            Row::Affine(r) => mlx_rows::scalar::dot_affine(r, x),
            Row::Mxfp8 { codes, scales } => mlx_rows::scalar::dot_mxfp8(codes, scales, x),
            other => {
                let mut buf = vec![0f32; x.len()];
                dequant(other, &mut buf);
                dot_f32(&buf, x)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * k)),
                    _mm256_loadu_ps(pb.add(i + 8 * k)),
                    *acc,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(v);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
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
    unsafe fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
        let n = x.len();
        let mut total = _mm256_setzero_ps();
        let mut tail = 0f32;
        let mut start = 0;
        let mut bi = 0;
        while start < n {
            let end = (start + block).min(n);
            let s = scales[bi] * 256.0;
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = start;
            while i + 16 <= end {
                acc0 = _mm256_fmadd_ps(
                    fp8x8(codes.as_ptr().add(i)),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    fp8x8(codes.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= end {
                acc0 = _mm256_fmadd_ps(
                    fp8x8(codes.as_ptr().add(i)),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    acc0,
                );
                i += 8;
            }
            let mut rest = 0f32;
            while i < end {
                rest += E4M3_LUT[codes[i] as usize] * x[i];
                i += 1;
            }
            total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(s), total);
            tail += rest * scales[bi];
            start = end;
            bi += 1;
        }
        hsum(total) + tail
    }

    /// Doubled e2m1 values as int8, indexed by nibble.
    const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // g indexes packed, scales and x together
    unsafe fn dot_fp4(packed: &[u8], scales: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let lut = _mm_loadu_si128(E2M1_X2.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let mut total = _mm256_setzero_ps();
        let groups = n / 32;
        for g in 0..groups {
            let b = _mm_loadu_si128(packed.as_ptr().add(16 * g) as *const __m128i);
            let lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, mask));
            let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), mask));
            let v0 = _mm_unpacklo_epi8(lo, hi); // elements 0..16
            let v1 = _mm_unpackhi_epi8(lo, hi); // elements 16..32
            let xp = x.as_ptr().add(32 * g);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
            let a = _mm256_fmadd_ps(
                w0,
                _mm256_loadu_ps(xp),
                _mm256_mul_ps(w1, _mm256_loadu_ps(xp.add(8))),
            );
            let a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), a);
            let a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), a);
            let s = _mm256_set1_ps(e8m0_to_f32(scales[g]) * 0.5);
            total = _mm256_fmadd_ps(a, s, total);
        }
        let mut s = hsum(total);
        if groups * 32 < n {
            s += scalar::dot(
                Row::Fp4 {
                    packed: &packed[16 * groups..],
                    scales: &scales[groups..],
                },
                &x[32 * groups..],
            );
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        let p = w.as_ptr();
        while i + 16 <= n {
            let a = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
            let b = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i + 16) as *const __m128i));
            acc0 = _mm256_fmadd_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])) * x[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: Row, x: &[f32]) -> f32 {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => dot_fp8(codes, scales, block, x),
            Row::Fp4 { packed, scales } => dot_fp4(packed, scales, x),
            Row::Bf16(w) => dot_bf16(w, x),
            Row::Affine(r) => mlx_rows::avx2::dot_affine(r, x)
                .unwrap_or_else(|| mlx_rows::scalar::dot_affine(r, x)),
            Row::Mxfp8 { codes, scales } => mlx_rows::avx2::dot_mxfp8(codes, scales, x),
            other => scalar::dot(other, x),
        }
    }
}

/// AVX-512 (F+BW) versions of the FP8 and FP4 rows: 32 inputs per step.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// FP8: widen 32 codes to u16 and rebuild them as f16 bit patterns
    /// (`sign<<15 | magnitude<<7` is the code's value × 2^-8), then convert to f32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
        let n = x.len();
        let mut total = _mm512_setzero_ps();
        let mut tail = 0f32;
        let keep = _mm512_set1_epi16(0xbfffu16 as i16);
        let mut start = 0;
        let mut bi = 0;
        while start < n {
            let end = (start + block).min(n);
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut i = start;
            while i + 32 <= end {
                // Sign-extend, shift the 7 magnitude bits into place, clear the smeared bit 14.
                let b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                    codes.as_ptr().add(i) as *const __m256i
                ));
                let h = _mm512_and_si512(_mm512_slli_epi16(b, 7), keep);
                let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
                let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
                acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x.as_ptr().add(i)), acc0);
                acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.as_ptr().add(i + 16)), acc1);
                i += 32;
            }
            let mut rest = 0f32;
            while i < end {
                rest += E4M3_LUT[codes[i] as usize] * x[i];
                i += 1;
            }
            total = _mm512_fmadd_ps(
                _mm512_add_ps(acc0, acc1),
                _mm512_set1_ps(scales[bi] * 256.0),
                total,
            );
            tail += rest * scales[bi];
            start = end;
            bi += 1;
        }
        _mm512_reduce_add_ps(total) + tail
    }

    /// FP4 over activations in [`fp4_order`]: each byte's low nibble pairs with the group's
    /// even inputs, its high nibble with the odd ones. Nibbles index a 16-entry f32 table
    /// (e2m1 values × the group's scale) with one permute each.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn dot_fp4(packed: &[u8], scales: &[u8], xp: &[f32]) -> f32 {
        let n = xp.len();
        let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
        let nib = _mm512_set1_epi32(0x0f);
        let groups = n / 32;
        // All of the row's scales decoded up front (`u << 23` is 2^(u-127) for 1 ≤ u ≤ 254).
        const MAX_GROUPS: usize = 512;
        if groups > MAX_GROUPS {
            return super::scalar::dot(Row::Fp4 { packed, scales }, &unorder_fp4(xp));
        }
        let mut sc = [0f32; MAX_GROUPS];
        let mut g = 0;
        while g + 16 <= groups {
            let u = _mm512_cvtepu8_epi32(_mm_loadu_si128(scales.as_ptr().add(g) as *const __m128i));
            _mm512_storeu_ps(
                sc.as_mut_ptr().add(g),
                _mm512_castsi512_ps(_mm512_slli_epi32(u, 23)),
            );
            g += 16;
        }
        for k in g..groups {
            sc[k] = e8m0_to_f32(scales[k]);
        }
        // One group: its scaled table, then even/odd nibbles through it.
        let group = |g: usize| {
            let t = _mm512_mul_ps(table, _mm512_set1_ps(sc[g]));
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                packed.as_ptr().add(16 * g) as *const __m128i
            ));
            (
                _mm512_permutexvar_ps(_mm512_and_si512(b, nib), t),
                _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t),
            )
        };
        // Two groups per step into four accumulators: the FMA latency chain, not the
        // decoding, bounded the one-group loop.
        let (mut acc0, mut acc1, mut acc2, mut acc3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let mut g = 0;
        while g + 2 <= groups {
            let (e0, o0) = group(g);
            let (e1, o1) = group(g + 1);
            let xg = xp.as_ptr().add(32 * g);
            acc0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xg), acc0);
            acc1 = _mm512_fmadd_ps(o0, _mm512_loadu_ps(xg.add(16)), acc1);
            acc2 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xg.add(32)), acc2);
            acc3 = _mm512_fmadd_ps(o1, _mm512_loadu_ps(xg.add(48)), acc3);
            g += 2;
        }
        if g < groups {
            let (e0, o0) = group(g);
            let xg = xp.as_ptr().add(32 * g);
            acc0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xg), acc0);
            acc1 = _mm512_fmadd_ps(o0, _mm512_loadu_ps(xg.add(16)), acc1);
        }
        let (acc0, acc1) = (_mm512_add_ps(acc0, acc2), _mm512_add_ps(acc1, acc3));
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        // A ragged tail group (in % 32 != 0) is stored in natural order.
        for j in 0..(n - 32 * groups).div_ceil(2) {
            let b = packed[16 * groups + j];
            let sc = e8m0_to_f32(scales[groups]);
            let i = 32 * groups + 2 * j;
            s += E2M1_VALUES[(b & 15) as usize] * sc * xp[i];
            if i + 1 < n {
                s += E2M1_VALUES[(b >> 4) as usize] * sc * xp[i + 1];
            }
        }
        s
    }

    /// Row decode for the tiled matmul: FP8 as in `dot_fp8`; FP4 in [`fp4_order`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dequant(row: Row, out: &mut [f32]) {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => {
                let n = out.len();
                let keep = _mm512_set1_epi16(0xbfffu16 as i16);
                for (bi, start) in (0..n).step_by(block).enumerate() {
                    let end = (start + block).min(n);
                    let s = _mm512_set1_ps(scales[bi] * 256.0);
                    let mut i = start;
                    while i + 32 <= end {
                        let b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                            codes.as_ptr().add(i) as *const __m256i
                        ));
                        let h = _mm512_and_si512(_mm512_slli_epi16(b, 7), keep);
                        _mm512_storeu_ps(
                            out.as_mut_ptr().add(i),
                            _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), s),
                        );
                        _mm512_storeu_ps(
                            out.as_mut_ptr().add(i + 16),
                            _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), s),
                        );
                        i += 32;
                    }
                    for j in i..end {
                        out[j] = E4M3_LUT[codes[j] as usize] * scales[bi];
                    }
                }
            }
            Row::Fp4 { packed, scales } => {
                let n = out.len();
                let groups = n / 32;
                let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
                let nib = _mm512_set1_epi32(0x0f);
                for (g, &sc) in scales.iter().enumerate().take(groups) {
                    let t = _mm512_mul_ps(table, _mm512_set1_ps(e8m0_to_f32(sc)));
                    let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        packed.as_ptr().add(16 * g) as *const __m128i
                    ));
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(32 * g),
                        _mm512_permutexvar_ps(_mm512_and_si512(b, nib), t),
                    );
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(32 * g + 16),
                        _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t),
                    );
                }
                if groups * 32 < n {
                    super::dequant(
                        Row::Fp4 {
                            packed: &packed[16 * groups..],
                            scales: &scales[groups..],
                        },
                        &mut out[32 * groups..],
                    );
                }
            }
            other => super::dequant(other, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dot(row: Row, x: &[f32], xp: &[f32]) -> f32 {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => dot_fp8(codes, scales, block, x),
            Row::Fp4 { packed, scales } => dot_fp4(packed, scales, xp),
            Row::Affine(r) => match mlx_rows::avx512::dot_affine(r, x, xp) {
                Some(v) => v,
                None => avx2::dot(row, x),
            },
            other => avx2::dot(other, x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The SIMD paths agree with dequantize-then-dot for every format, with ragged lengths.
    #[test]
    fn simd_matches_reference() {
        let mut s = 0x1234_5678_9abc_def0u64;
        for n in [1usize, 7, 32, 33, 64, 100, 128, 160, 257, 1024, 16448] {
            let x: Vec<f32> = (0..n).map(|_| rng(&mut s)).collect();
            let codes: Vec<u8> = (0..n).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect(); // no NaN codes
            let nb = n.div_ceil(128);
            let scales: Vec<f32> = (0..nb).map(|b| 2f32.powi((b % 7) as i32 - 3)).collect();
            let packed: Vec<u8> = (0..n.div_ceil(2))
                .map(|i| ((i * 91 + 5) % 256) as u8)
                .collect();
            let sc4: Vec<u8> = (0..n.div_ceil(32)).map(|g| 120 + (g % 9) as u8).collect();
            let bf: Vec<u8> = (0..n)
                .flat_map(|i| crate::tensor::f32_to_bf16(x[(i * 7) % n] * 3.0).to_le_bytes())
                .collect();
            let rows = [
                Row::Fp8 {
                    codes: &codes,
                    scales: &scales,
                    block: 128,
                },
                Row::Fp4 {
                    packed: &packed,
                    scales: &sc4,
                },
                Row::Bf16(&bf),
            ];
            for row in rows {
                let mut w = vec![0f32; n];
                dequant(row, &mut w);
                let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let got = dot(row, &x) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * norm.max(1e-6),
                    "n={n}: {got} vs {want}"
                );
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: features detected.
                    let got = unsafe { avx2::dot(row, &x) } as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * norm.max(1e-6),
                        "avx2 n={n}: {got} vs {want}"
                    );
                }
                let got = scalar::dot(row, &x) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * norm.max(1e-6),
                    "scalar n={n}: {got} vs {want}"
                );
            }
        }
    }

    /// MLX rows: the scalar dot equals dequantize-then-dot for every affine width, group and
    /// scale dtype, and the SIMD paths (4/8-bit affine, mxfp8) agree with scalar.
    #[test]
    fn mlx_rows_match_scalar() {
        use super::mlx_rows::{AffineRow, Params};
        let mut s = 0x0bad_cafe_u64;
        for n in [128usize, 256, 4096] {
            let x: Vec<f32> = (0..n).map(|_| rng(&mut s)).collect();
            let check = |row: Row, label: &str| {
                let mut w = vec![0f32; n];
                scalar_dequant(row, &mut w);
                let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let tol = 1e-5 * norm.max(1e-6);
                let got = scalar::dot(row, &x) as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{label} scalar n={n}: {got} vs {want}"
                );
                let got = dot(row, &x) as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{label} dispatch n={n}: {got} vs {want}"
                );
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: features detected.
                    let got = unsafe { avx2::dot(row, &x) } as f64;
                    assert!(
                        (got - want).abs() <= tol,
                        "{label} avx2 n={n}: {got} vs {want}"
                    );
                }
                let mut w2 = vec![0f32; n];
                dequant(row, &mut w2);
                for (a, b) in w.iter().zip(&w2) {
                    assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{label} dequant");
                }
            };
            for bits in [2u32, 3, 4, 5, 6, 8] {
                for group in [32usize, 64, 128] {
                    let packed: Vec<u8> = (0..n * bits as usize / 8)
                        .map(|i| ((i * 131 + 17) % 256) as u8)
                        .collect();
                    let ng = n / group;
                    let sc: Vec<f32> = (0..ng).map(|g| 0.01 * (g % 5) as f32 - 0.02).collect();
                    let bi: Vec<f32> = (0..ng).map(|g| 0.3 - 0.07 * (g % 3) as f32).collect();
                    let bf = |v: &[f32]| -> Vec<u8> {
                        v.iter()
                            .flat_map(|&x| crate::tensor::f32_to_bf16(x).to_le_bytes())
                            .collect()
                    };
                    let f16 = |v: &[f32]| -> Vec<u8> {
                        v.iter()
                            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                            .collect()
                    };
                    let f32b =
                        |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
                    let (sb, bb, sh, bh, sf, bff) =
                        (bf(&sc), bf(&bi), f16(&sc), f16(&bi), f32b(&sc), f32b(&bi));
                    for (scales, biases) in [
                        (Params::Bf16(&sb), Params::Bf16(&bb)),
                        (Params::F16(&sh), Params::F16(&bh)),
                        (Params::F32(&sf), Params::F32(&bff)),
                    ] {
                        let row = Row::Affine(AffineRow {
                            packed: &packed,
                            scales,
                            biases,
                            bits,
                            group,
                        });
                        check(row, &format!("affine q{bits}/g{group}"));
                    }
                }
            }
            let codes: Vec<u8> = (0..n).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect();
            let sc8: Vec<u8> = (0..n / 32).map(|g| 118 + (g % 11) as u8).collect();
            check(
                Row::Mxfp8 {
                    codes: &codes,
                    scales: &sc8,
                },
                "mxfp8",
            );
        }
    }

    /// Reference decode with no SIMD involved.
    fn scalar_dequant(row: Row, out: &mut [f32]) {
        match row {
            Row::Affine(r) => super::mlx_rows::scalar::dequant_affine(r, out),
            other => dequant(other, out),
        }
    }
}
