//! Inner loops of the CPU backend: dot products of an f32 activation row with one stored weight
//! row, dequantizing on the fly (FP8 e4m3 with block scales, FP4 e2m1 with e8m0 scales per 32,
//! BF16, F16, F32). AVX2+FMA+F16C and AVX-512 versions are chosen at run time; the scalar
//! versions are the reference and the fallback.

use super::gemm;
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

/// f32 activations in 64-byte aligned storage, so that each 16-lane load a kernel makes from a
/// prepared activation row stays within one cache line. Derefs to `[f32]`; empty by default.
#[derive(Clone, Default)]
pub struct Prepared {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

impl Prepared {
    /// An aligned copy of `x`.
    pub fn from_slice(x: &[f32]) -> Self {
        let mut p = Prepared {
            lines: vec![Line([0.0; 16]); x.len().div_ceil(16)],
            len: x.len(),
        };
        p.copy_from_slice(x);
        p
    }
}

impl std::ops::Deref for Prepared {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds `16 · lines.len() >= len` contiguous, initialized f32 (`Line` is
        // `repr(C)` over `[f32; 16]`, 64 bytes, no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }
}

impl std::ops::DerefMut for Prepared {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
}

/// `Σ_i w[i]·x[i]` for a stored row of `x.len()` inputs.
#[inline]
pub fn dot(row: Row, x: &[f32]) -> f32 {
    let xp = match row {
        Row::Fp4 { .. } => fp4_order(x),
        Row::Fp8 { .. } => fp8_order(x),
        Row::Affine(r) if r.bits == 4 => affine4_order(x),
        _ => Prepared::default(),
    };
    dot_prepared(row, x, &xp)
}

/// Whether FP4, FP8 and 4-bit affine rows want their activations reordered ([`fp4_order`],
/// [`fp8_order`], [`affine4_order`]); the fastest kernels do.
pub fn wants_fp4_order() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the FP8, FP4, BF16, F16 and F32 GEMVs and the tile kernel follow the blocked accumulation
/// order (`gemm`), so that a token's result does not depend on how many share the call.
pub fn blocked_order() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the single-token GEMV for rows of this kind follows the blocked order (then the
/// tile kernel gives the same result for a token in any batch).
pub fn gemv_is_blocked(row: Row) -> bool {
    blocked_order()
        && matches!(
            row,
            Row::Fp8 { .. } | Row::Fp4 { .. } | Row::Bf16(_) | Row::F16(_) | Row::F32(_)
        )
}

/// Decodes a row for the tile kernel (`gemm::tile`): with the blocked order, the full blocks'
/// weights unscaled in the kernel order into `w`, their 16 lane scales per block into `s`, and
/// the tail scaled in natural order; otherwise the row as [`dequant_prepared`] gives it.
pub fn prep_row(row: Row, w: &mut [f32], s: &mut [f32]) {
    assert!(
        s.len() >= gemm::blocks(w.len()) * 16,
        "prep_row: too few lane scales"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected above.
        return unsafe { avx512::prep_row(row, w, s) };
    }
    dequant_prepared(row, w)
}

/// One row of `n` inputs through [`prep_row`] into new buffers: (weights, lane scales).
fn prepped(row: Row, n: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut w, mut s) = (vec![0f32; n], vec![0f32; gemm::blocks(n) * 16]);
    prep_row(row, &mut w, &mut s);
    (w, s)
}

/// Activations for FP4 rows (e2m1 + e8m0 per 32, official or mxfp4). Each full block of 128
/// inputs is transposed as 8 × 16: position `16k + j` holds input `8j + k`, so that the `k`-th
/// nibble of the block's `j`-th 32-bit word of packed codes (nibbles low first) meets its input
/// in lane `j` of the `k`-th vector. A ragged tail (`len % 128`) stays in natural order. Empty
/// when no kernel needs it.
pub fn fp4_order(x: &[f32]) -> Prepared {
    if !wants_fp4_order() {
        return Prepared::default();
    }
    let mut out = Prepared::from_slice(x);
    for (o, b) in out.chunks_exact_mut(128).zip(x.chunks_exact(128)) {
        for k in 0..8 {
            for j in 0..16 {
                o[16 * k + j] = b[8 * j + k];
            }
        }
    }
    out
}

/// Activations for FP8 rows (e4m3 codes with block scales): each 64-input chunk of the full
/// 128-input blocks as its 32 even then its 32 odd inputs, the two halves in which `vpmaddubsw`
/// decodes 64 code bytes (position `64c + j` holds input `64c + 2j`, position `64c + 32 + j`
/// input `64c + 2j + 1`). A ragged tail (`len % 128`) stays in natural order, as the blocked
/// order (`gemm`) wants. Empty when no kernel needs it.
pub fn fp8_order(x: &[f32]) -> Prepared {
    if !wants_fp4_order() {
        return Prepared::default();
    }
    let mut out = Prepared::from_slice(x);
    let full = x.len() / 128 * 128;
    for (o, c) in out[..full]
        .chunks_exact_mut(64)
        .zip(x[..full].chunks_exact(64))
    {
        for j in 0..32 {
            o[j] = c[2 * j];
            o[32 + j] = c[2 * j + 1];
        }
    }
    out
}

/// Inverse of [`fp8_order`] (on any slice, whether or not a kernel wants the order).
#[cfg(test)]
fn unorder_fp8(xp: &[f32]) -> Vec<f32> {
    let mut out = xp.to_vec();
    let full = xp.len() / 128 * 128;
    for (o, c) in out[..full]
        .chunks_exact_mut(64)
        .zip(xp[..full].chunks_exact(64))
    {
        for j in 0..32 {
            o[2 * j] = c[j];
            o[2 * j + 1] = c[32 + j];
        }
    }
    out
}

/// Activations for 4-bit MLX affine rows: each full group of 32 inputs as its 16 even then its
/// 16 odd elements, matching the low/high nibbles of packed bytes; a ragged tail stays as is.
/// Empty when no kernel needs it.
pub fn affine4_order(x: &[f32]) -> Prepared {
    if !wants_fp4_order() {
        return Prepared::default();
    }
    let mut out = Prepared::from_slice(x);
    for (o, g) in out.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for j in 0..16 {
            o[j] = g[2 * j];
            o[16 + j] = g[2 * j + 1];
        }
    }
    out
}

/// [`dot`] with the reordering of `x` computed once by the caller (`xp`: [`fp4_order`] for FP4
/// rows, [`fp8_order`] for FP8 rows, [`affine4_order`] for 4-bit affine rows, empty otherwise).
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

/// Most tokens [`dot_multi`] serves from one decode of a row; more go in groups this size.
pub const MULTI_TOKENS: usize = 4;

/// [`dot_prepared`] of one row against several tokens (`xs`, each in the row's order: the
/// `xp` of [`dot_prepared`] for FP8/FP4, natural otherwise), each weight vector decoded once in
/// registers for up to [`MULTI_TOKENS`] of them. For rows whose GEMV follows the blocked order
/// ([`gemv_is_blocked`]) only: every token's result is bitwise its [`dot_prepared`].
pub fn dot_multi(row: Row, xs: &[&[f32]], out: &mut [f32]) {
    assert!(gemv_is_blocked(row) && out.len() == xs.len());
    let n = xs.first().map_or(0, |x| x.len());
    assert!(
        xs.iter().all(|x| x.len() == n),
        "dot_multi: tokens of unequal length"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `gemv_is_blocked` implies AVX-512.
    unsafe {
        avx512::dot_multi(row, xs, out)
    }
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

/// Decodes a stored row into f32 like [`dequant`], but FP4 rows come out in [`fp4_order`] and
/// FP8 rows in [`fp8_order`] when [`wants_fp4_order`] (pair them with activations reordered the
/// same way).
pub fn dequant_prepared(row: Row, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected above.
        return unsafe { avx512::dequant(row, out) };
    }
    dequant(row, out)
}

/// Whether every FP8 block scale times 2^8 is finite: the SIMD kernels decode e4m3 codes to their
/// values × 2^-8 and fold the 2^8 into the block scale.
fn fp8_scales_fit(scales: &[f32]) -> bool {
    scales.iter().all(|&s| (s * 256.0).is_finite())
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

/// Inputs `from..from + out.len()` of a row decoded to f32 in natural order: the blocked order's
/// ragged tail (`from` a multiple of 128), shared by every kernel that follows that order.
fn dequant_tail(row: Row, from: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    match row {
        Row::Fp8 {
            codes,
            scales,
            block,
        } => {
            for (j, o) in (from..).zip(out.iter_mut()) {
                *o = E4M3_LUT[codes[j] as usize] * scales[j / block];
            }
        }
        Row::Fp4 { packed, scales } => dequant(
            Row::Fp4 {
                packed: &packed[from / 2..],
                scales: &scales[from / 32..],
            },
            out,
        ),
        Row::Bf16(b) => dequant(Row::Bf16(&b[2 * from..]), out),
        Row::F16(b) => dequant(Row::F16(&b[2 * from..]), out),
        Row::F32(b) => dequant(Row::F32(&b[4 * from..]), out),
        other => {
            let mut all = vec![0f32; from + out.len()];
            dequant(other, &mut all);
            out.copy_from_slice(&all[from..]);
        }
    }
}

/// [`dequant_tail`] into a new vector: inputs `from..n`.
fn tail_of(row: Row, from: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0f32; n - from];
    dequant_tail(row, from, &mut t);
    t
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

    /// The FP8 dot over inputs `from..x.len()`: each block's (or block part's) sum times its
    /// scale. A NaN code (0x7f, 0xff) makes the result NaN.
    pub fn dot_fp8_from(codes: &[u8], scales: &[f32], block: usize, x: &[f32], from: usize) -> f32 {
        let mut total = 0f32;
        let mut i = from;
        while i < x.len() {
            let bi = i / block;
            let end = ((bi + 1) * block).min(x.len());
            let mut acc = 0f32;
            for (&c, &x) in codes[i..end].iter().zip(&x[i..end]) {
                acc += E4M3_LUT[c as usize] * x;
            }
            total += acc * scales[bi];
            i = end;
        }
        total
    }

    pub fn dot(row: Row, x: &[f32]) -> f32 {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => dot_fp8_from(codes, scales, block, x, 0),
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

    /// 8 e4m3 codes → 8 f32 equal to the true values × 2^-8 (via the f16 bit pattern). Lanes of
    /// `nan` become all ones where a code is a NaN (0x7f, 0xff).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fp8x8(p: *const u8, nan: &mut __m128i) -> __m256 {
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
        let mag = _mm_and_si128(b, _mm_set1_epi16(0x7f));
        *nan = _mm_or_si128(*nan, _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f)));
        _mm256_cvtph_ps(_mm_or_si128(sign, _mm_slli_epi16(mag, 7)))
    }

    /// FP8 with any block size over activations in natural order. Rows with a NaN code, or with
    /// a scale too large to carry the 2^8 that the decoded weights lack, take the scalar path.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
        let n = x.len();
        let row = || Row::Fp8 {
            codes,
            scales,
            block,
        };
        if !fp8_scales_fit(&scales[..n.div_ceil(block)]) {
            return scalar::dot(row(), x);
        }
        let mut total = _mm256_setzero_ps();
        let mut nan = _mm_setzero_si128();
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
                    fp8x8(codes.as_ptr().add(i), &mut nan),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    fp8x8(codes.as_ptr().add(i + 8), &mut nan),
                    _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= end {
                acc0 = _mm256_fmadd_ps(
                    fp8x8(codes.as_ptr().add(i), &mut nan),
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
        if _mm_movemask_epi8(nan) != 0 {
            return scalar::dot(row(), x);
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

/// AVX-512 (F+BW) versions of the FP8 and FP4 rows: 128-input blocks.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// f16 bit patterns of 256 FP8 codes (two 128-input blocks), aligned for whole-line stores
    /// and loads.
    #[repr(C, align(64))]
    struct Halves([u16; 256]);

    /// 64 e4m3 codes at `c` → f16 bit patterns equal to the codes' values × 2^-8: the 32 even
    /// codes at `out`, the 32 odd ones at `out + 32` (the inputs' [`fp8_order`]).
    ///
    /// `vpmaddubsw` multiplies unsigned bytes by signed bytes and adds pairs into 16-bit words:
    /// with 128 on one byte of each pair and 0 on the other, it sign-extends that code to 16
    /// bits and shifts it left by 7 in one instruction (no saturation: 128 · [-128, 127] fits).
    /// That gives `s s eeee mmm 0000000`; clearing bit 14 leaves the f16 pattern with the e4m3
    /// exponent field as f16's (bias 15 against 7, hence 2^-8), e4m3 subnormals on f16
    /// subnormals, so `vcvtph2ps` decodes every code exactly. `nan` keeps the byte-wise maximum
    /// of `2 · code mod 256`, which is 0xfe exactly when some code is a NaN (0x7f, 0xff).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn fp8_halves(c: *const u8, out: *mut u16, nan: &mut __m512i) {
        let v = _mm512_loadu_si512(c as *const _);
        let keep = _mm512_set1_epi16(0xbfffu16 as i16);
        let even = _mm512_maddubs_epi16(_mm512_set1_epi16(0x0080), v);
        let odd = _mm512_maddubs_epi16(_mm512_set1_epi16(0x8000u16 as i16), v);
        _mm512_store_si512(out as *mut _, _mm512_and_si512(even, keep));
        _mm512_store_si512(out.add(32) as *mut _, _mm512_and_si512(odd, keep));
        *nan = _mm512_max_epu8(*nan, _mm512_add_epi8(v, v));
    }

    /// 16 f16 patterns at `h` as f32. The load is folded into `vcvtph2ps`, whose memory form
    /// takes one arithmetic uop (the register form needs a second one, on the shuffle port).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn cvt16(h: *const u16) -> __m512 {
        _mm512_cvt_roundph_ps::<_MM_FROUND_CUR_DIRECTION>(_mm256_load_si256(h as *const __m256i))
    }

    /// Σ of one 128-input block: 8 × 16 f16 patterns at `h` against activations in
    /// [`fp8_order`] at `xq`. Unscaled lane sums in one FMA chain, the blocked order's block sum
    /// (`gemm`). Latency is hidden by the two independent blocks of each step.
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    #[inline]
    unsafe fn fp8_block(h: *const u16, xq: *const f32) -> __m512 {
        let w = |k: usize| cvt16(h.add(16 * k));
        let x = |k: usize| _mm512_loadu_ps(xq.add(16 * k));
        let mut a = _mm512_mul_ps(w(0), x(0));
        for k in 1..8 {
            a = _mm512_fmadd_ps(w(k), x(k), a);
        }
        a
    }

    /// Whether some byte of a [`fp8_halves`] NaN accumulator is 0xfe.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn fp8_any_nan(nan: __m512i) -> bool {
        _mm512_cmpeq_epi8_mask(nan, _mm512_set1_epi8(0xfeu8 as i8)) != 0
    }

    /// Software prefetch distance for the FP8 codes, in bytes ahead of the step being decoded.
    /// A row is 4 KB (one page) for the 4096-wide matrices, where the hardware streamer stops;
    /// the prefetch runs into the next row. Without it the memory-bound GEMV lost about a
    /// quarter of its speed; 1–4 KB measured the same.
    const FP8_PREFETCH: usize = 2048;

    /// FP8 over activations in [`fp8_order`] (`xp`), in the blocked order (`gemm`): 128 inputs
    /// per block, two blocks per step. The 256 codes are decoded to f16 patterns in an aligned
    /// scratch ([`fp8_halves`]: 2 arithmetic uops per 32 codes), which `vcvtph2ps` reads back
    /// from memory ([`cvt16`]); one FMA per 16 weights, and one more per block that adds the
    /// block's lane sums, times its scale × 2^8, to the even or odd blocks' totals (a single
    /// chain of totals measured 8% slower). Per 32 weights that is
    /// about 6 arithmetic uops (plus the NaN check). Rows whose scale blocks are not a multiple
    /// of 128, with a NaN code or a scale too large for the folded 2^8 go through
    /// [`prep_row`] and [`gemm::avx512::dot_blocked`]: the same order as the tile kernel.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32], xp: &[f32]) -> f32 {
        let n = x.len();
        let row = Row::Fp8 {
            codes,
            scales,
            block,
        };
        if xp.len() != n {
            return dot_fp8(codes, scales, block, x, &fp8_order(x));
        }
        if !block.is_multiple_of(128) || !fp8_scales_fit(&scales[..n.div_ceil(block)]) {
            return dot_via_prep(row, xp);
        }
        let blocks = n / 128;
        let per = block / 128; // 128-input blocks per scale (1 for DeepSeek's 128 × 128)
        let scale_of = |b: usize| scales[if per == 1 { b } else { b / per }] * 256.0;
        let mut buf = Halves([0; 256]);
        let mut nan = _mm512_setzero_si512();
        let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (cp, xq) = (codes.as_ptr(), xp.as_ptr());
        let mut b = 0;
        while b + 2 <= blocks {
            let c = cp.add(128 * b);
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(FP8_PREFETCH + 64 * l) as *const i8);
            }
            let h = buf.0.as_mut_ptr();
            for k in 0..4 {
                fp8_halves(c.add(64 * k), h.add(64 * k), &mut nan);
            }
            // The scratch is written and read back through memory on purpose (the folded
            // `vcvtph2ps` loads are the point): keep the compiler from forwarding the stores.
            let h = std::hint::black_box(h) as *const u16;
            let p0 = fp8_block(h, xq.add(128 * b));
            let p1 = fp8_block(h.add(128), xq.add(128 * b + 128));
            t0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(scale_of(b)), t0);
            t1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(scale_of(b + 1)), t1);
            b += 2;
        }
        if b < blocks {
            let c = cp.add(128 * b);
            let h = buf.0.as_mut_ptr();
            fp8_halves(c, h, &mut nan);
            fp8_halves(c.add(64), h.add(64), &mut nan);
            let h = std::hint::black_box(h) as *const u16;
            let p = fp8_block(h, xq.add(128 * b));
            t0 = _mm512_fmadd_ps(p, _mm512_set1_ps(scale_of(b)), t0); // `b` is even here
        }
        if fp8_any_nan(nan) {
            return dot_via_prep(row, xp);
        }
        let total = gemm::avx512::total(t0, t1);
        if 128 * blocks == n {
            return total;
        }
        gemm::finish(total, &tail_of(row, 128 * blocks, n), &xp[128 * blocks..])
    }

    /// One block's 8 weight vectors (`w`, unscaled) and lane scales `s` applied to each token of
    /// `xs` at input `off`: per token a chain of 8 FMAs, then `t[j] = fma(p, s, t[j])`. The
    /// blocked order's block step (`gemm`), token by token.
    macro_rules! block_tokens {
        ($w:expr, $s:expr, $xs:expr, $off:expr, $t:expr) => {{
            // Over the const `NT` pointers: unrolled, the totals stay in registers.
            for j in 0..$xs.len() {
                let xq = $xs[j].add($off);
                let mut p = _mm512_mul_ps($w[0], _mm512_loadu_ps(xq));
                for k in 1..8 {
                    p = _mm512_fmadd_ps($w[k], _mm512_loadu_ps(xq.add(16 * k)), p);
                }
                $t[j] = _mm512_fmadd_ps(p, $s, $t[j]);
            }
        }};
    }

    /// Several tokens against one row in the blocked order, `NT` at a time (see
    /// [`super::dot_multi`]). Rows the fast decodes do not take (as for the GEMVs) go through
    /// [`prep_row`] once and [`gemm::avx512::dot_blocked`] per token.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dot_multi(row: Row, xs: &[&[f32]], out: &mut [f32]) {
        let mut j = 0;
        while j < xs.len() {
            let g = (xs.len() - j).min(MULTI_TOKENS);
            let (x, o) = (&xs[j..j + g], &mut out[j..j + g]);
            let done = match g {
                4 => multi::<4>(row, x, o),
                3 => multi::<3>(row, x, o),
                2 => multi::<2>(row, x, o),
                _ => {
                    o[0] = dot(row, x[0], x[0]);
                    true
                }
            };
            if !done {
                // A row the fast decodes do not take: decode it once for all remaining tokens.
                let (w, s) = prepped(row, x[0].len());
                for (o, x) in out[j..].iter_mut().zip(&xs[j..]) {
                    *o = gemm::avx512::dot_blocked(&w, &s, x);
                }
                return;
            }
            j += g;
        }
    }

    /// `NT` tokens of [`dot_multi`]; false when the row needs the prepared decode.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn multi<const NT: usize>(row: Row, xs: &[&[f32]], out: &mut [f32]) -> bool {
        let n = xs[0].len();
        let blocks = n / 128;
        let (mut t0, mut t1) = ([_mm512_setzero_ps(); NT], [_mm512_setzero_ps(); NT]);
        let mut xq = [std::ptr::null::<f32>(); NT];
        for (p, x) in xq.iter_mut().zip(xs) {
            *p = x.as_ptr();
        }
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => {
                if !block.is_multiple_of(128) || !fp8_scales_fit(&scales[..n.div_ceil(block)]) {
                    return false;
                }
                let per = block / 128;
                let mut buf = Halves([0; 256]);
                let mut nan = _mm512_setzero_si512();
                for b in 0..blocks {
                    let c = codes.as_ptr().add(128 * b);
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(FP8_PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(FP8_PREFETCH + 64) as *const i8);
                    let h = buf.0.as_mut_ptr();
                    fp8_halves(c, h, &mut nan);
                    fp8_halves(c.add(64), h.add(64), &mut nan);
                    let h = std::hint::black_box(h) as *const u16;
                    let mut w = [_mm512_setzero_ps(); 8];
                    for (k, v) in w.iter_mut().enumerate() {
                        *v = cvt16(h.add(16 * k));
                    }
                    let s = _mm512_set1_ps(scales[b / per] * 256.0);
                    if b % 2 == 0 {
                        block_tokens!(w, s, xq, 128 * b, t0);
                    } else {
                        block_tokens!(w, s, xq, 128 * b, t1);
                    }
                }
                if fp8_any_nan(nan) {
                    return false;
                }
            }
            Row::Fp4 { packed, scales } => {
                if !scales_normal(&scales[..n.div_ceil(32)]) {
                    return false;
                }
                let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
                let spread = _mm512_loadu_si512(SCALE_SPREAD.as_ptr() as *const _);
                for b in 0..blocks {
                    let pk = packed.as_ptr().add(64 * b);
                    _mm_prefetch::<_MM_HINT_T0>(pk.wrapping_add(1024) as *const i8);
                    let v = _mm512_loadu_si512(pk as *const _);
                    let w = [
                        _mm512_permutexvar_ps(v, table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<8>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<12>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<16>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<20>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<24>(v), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<28>(v), table),
                    ];
                    let s = fp4_lane_scales(scales.as_ptr().add(4 * b), spread);
                    if b % 2 == 0 {
                        block_tokens!(w, s, xq, 128 * b, t0);
                    } else {
                        block_tokens!(w, s, xq, 128 * b, t1);
                    }
                }
            }
            Row::Bf16(_) | Row::F16(_) | Row::F32(_) => {
                let one = _mm512_set1_ps(1.0);
                // Each format's load written inline in its own loop.
                macro_rules! widened {
                    (|$i:ident| $load:expr) => {
                        for b in 0..blocks {
                            let mut w = [_mm512_setzero_ps(); 8];
                            for (k, v) in w.iter_mut().enumerate() {
                                let $i = 128 * b + 16 * k;
                                *v = $load;
                            }
                            if b % 2 == 0 {
                                block_tokens!(w, one, xq, 128 * b, t0);
                            } else {
                                block_tokens!(w, one, xq, 128 * b, t1);
                            }
                        }
                    };
                }
                match row {
                    Row::Bf16(r) => {
                        let p = r.as_ptr() as *const u16;
                        widened!(|i| widen_bf16(p.add(i)));
                    }
                    Row::F16(r) => {
                        let p = r.as_ptr() as *const u16;
                        widened!(|i| widen_f16(p.add(i)));
                    }
                    Row::F32(r) => {
                        let p = r.as_ptr() as *const f32;
                        widened!(|i| _mm512_loadu_ps(p.add(i)));
                    }
                    _ => unreachable!(),
                }
            }
            _ => return false,
        }
        let tail = tail_of(row, 128 * blocks, n);
        for (j, o) in out.iter_mut().enumerate() {
            *o = gemm::finish(
                gemm::avx512::total(t0[j], t1[j]),
                &tail,
                &xs[j][128 * blocks..],
            );
        }
        true
    }

    /// One row in the blocked order through its prepared decode (`xp` in the row's order): the
    /// GEMVs' path for rows their fast decode does not take.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[cold]
    #[inline(never)]
    unsafe fn dot_via_prep(row: Row, xp: &[f32]) -> f32 {
        let (w, s) = prepped(row, xp.len());
        gemm::avx512::dot_blocked(&w, &s, xp)
    }

    /// FP8 row decode for the tiled matmul, in [`fp8_order`]: each 64-input chunk as in
    /// [`fp8_halves`], times its block scale × 2^8. Rows whose blocks are not a multiple of 64,
    /// with a NaN code or with a scale too large for the folded 2^8 are decoded by the scalar
    /// code (then reordered).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn dequant_fp8(codes: &[u8], scales: &[f32], block: usize, out: &mut [f32]) {
        let n = out.len();
        let row = Row::Fp8 {
            codes,
            scales,
            block,
        };
        let scalar = |out: &mut [f32]| {
            super::dequant(row, out);
            let natural = out.to_vec();
            out.copy_from_slice(&fp8_order(&natural));
        };
        if !block.is_multiple_of(64) || !fp8_scales_fit(&scales[..n.div_ceil(block)]) {
            return scalar(out);
        }
        let chunks = n / 128 * 2; // the blocked order's full blocks; the tail stays natural
        let mut buf = Halves([0; 256]);
        let mut nan = _mm512_setzero_si512();
        let o = out.as_mut_ptr();
        let per = block / 64; // chunks per scale block
        for (bi, &scale) in scales.iter().enumerate().take(chunks.div_ceil(per)) {
            let s = _mm512_set1_ps(scale * 256.0);
            for u in bi * per..((bi + 1) * per).min(chunks) {
                let h = buf.0.as_mut_ptr();
                fp8_halves(codes.as_ptr().add(64 * u), h, &mut nan);
                let h = std::hint::black_box(h) as *const u16;
                for k in 0..4 {
                    _mm512_storeu_ps(
                        o.add(64 * u + 16 * k),
                        _mm512_mul_ps(cvt16(h.add(16 * k)), s),
                    );
                }
            }
        }
        if fp8_any_nan(nan) {
            return scalar(out);
        }
        dequant_tail(row, 64 * chunks, &mut out[64 * chunks..]);
    }

    /// `vpshufb` control that spreads a broadcast dword of 4 scale bytes over 16 lanes: lane `j`
    /// gets byte `j / 4` (the scale of the 32 inputs that its nibbles come from), zero-extended.
    const SCALE_SPREAD: [i8; 64] = {
        let mut c = [-128i8; 64];
        let mut j = 0;
        while j < 16 {
            c[4 * j] = (j / 4) as i8;
            j += 1;
        }
        c
    };

    /// Whether every e8m0 scale byte is a normal power of two (1..=254), for which `u << 23` is
    /// its f32 bit pattern.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scales_normal(scales: &[u8]) -> bool {
        let (mut lo, mut hi) = (_mm512_set1_epi8(-1), _mm512_setzero_si512());
        let mut chunks = scales.chunks_exact(64);
        for c in chunks.by_ref() {
            let v = _mm512_loadu_si512(c.as_ptr() as *const _);
            lo = _mm512_min_epu8(lo, v);
            hi = _mm512_max_epu8(hi, v);
        }
        let zero = _mm512_cmpeq_epi8_mask(lo, _mm512_setzero_si512());
        let full = _mm512_cmpeq_epi8_mask(hi, _mm512_set1_epi8(-1));
        zero == 0 && full == 0 && chunks.remainder().iter().all(|&u| u != 0 && u != 255)
    }

    /// One 128-input FP4 block's 16 unscaled lane sums: 64 code bytes at `pk`, activations in
    /// [`fp4_order`] at `xq`, in one chain over the 8 nibble planes (the blocked order).
    ///
    /// `vpermps` reads only the low 4 bits of each 32-bit index, so the codes need no masking:
    /// the block's 16 words shifted right by `4k` give the `k`-th nibble of every word, and one
    /// permute of the 16-entry e2m1 table turns them into 16 f32 weights.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    #[inline]
    unsafe fn fp4_block(pk: *const u8, xq: *const f32, table: __m512) -> __m512 {
        let v = _mm512_loadu_si512(pk as *const _);
        let x = |k: usize| _mm512_loadu_ps(xq.add(16 * k));
        let w = |i: __m512i| _mm512_permutexvar_ps(i, table);
        let p = _mm512_mul_ps(w(v), x(0));
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<4>(v)), x(1), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<8>(v)), x(2), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<12>(v)), x(3), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<16>(v)), x(4), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<20>(v)), x(5), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<24>(v)), x(6), p);
        _mm512_fmadd_ps(w(_mm512_srli_epi32::<28>(v)), x(7), p)
    }

    /// [`fp4_block`] for a block that is not the row's last: the low nibbles of bytes `4j + m`
    /// come from a load at byte offset `m` (which reads up to 3 bytes past the block) instead of
    /// a shift, so only the high nibbles need one. Same planes, same chain.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    #[inline]
    unsafe fn fp4_block_inner(pk: *const u8, xq: *const f32, table: __m512) -> __m512 {
        let ld = |m: usize| _mm512_loadu_si512(pk.add(m) as *const _);
        let x = |k: usize| _mm512_loadu_ps(xq.add(16 * k));
        let w = |i: __m512i| _mm512_permutexvar_ps(i, table);
        let (v0, v1, v2, v3) = (ld(0), ld(1), ld(2), ld(3));
        let p = _mm512_mul_ps(w(v0), x(0));
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<4>(v0)), x(1), p);
        let p = _mm512_fmadd_ps(w(v1), x(2), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<4>(v1)), x(3), p);
        let p = _mm512_fmadd_ps(w(v2), x(4), p);
        let p = _mm512_fmadd_ps(w(_mm512_srli_epi32::<4>(v2)), x(5), p);
        let p = _mm512_fmadd_ps(w(v3), x(6), p);
        _mm512_fmadd_ps(w(_mm512_srli_epi32::<4>(v3)), x(7), p)
    }

    /// The block's 4 e8m0 scale bytes at `sp` as 16 f32 lane scales (see [`SCALE_SPREAD`]).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn fp4_lane_scales(sp: *const u8, spread: __m512i) -> __m512 {
        let u = _mm512_set1_epi32((sp as *const i32).read_unaligned());
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_shuffle_epi8(u, spread)))
    }

    /// FP4 over activations in [`fp4_order`], in the blocked order: 128 inputs (64 bytes of
    /// codes) per block, two blocks per step, each block's lane sums added to the even or odd
    /// blocks' totals through their lanes' group scales. Rows with a zero or NaN scale byte go through
    /// [`prep_row`] (exact lane scales, same order).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    #[inline(never)]
    unsafe fn dot_fp4(packed: &[u8], scales: &[u8], xp: &[f32]) -> f32 {
        let n = xp.len();
        if !scales_normal(&scales[..n.div_ceil(32)]) {
            return dot_via_prep(Row::Fp4 { packed, scales }, xp);
        }
        let blocks = n / 128;
        let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
        let spread = _mm512_loadu_si512(SCALE_SPREAD.as_ptr() as *const _);
        let (pk, sp, xq) = (packed.as_ptr(), scales.as_ptr(), xp.as_ptr());
        let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // Every block but the row's last may read 3 bytes past itself.
        let inner = if 64 * blocks + 3 <= packed.len() {
            blocks
        } else {
            blocks.saturating_sub(1)
        };
        let mut b = 0;
        while b + 2 <= inner {
            _mm_prefetch::<_MM_HINT_T0>(pk.wrapping_add(64 * b + 1024) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pk.wrapping_add(64 * b + 1088) as *const i8);
            let p0 = fp4_block_inner(pk.add(64 * b), xq.add(128 * b), table);
            let p1 = fp4_block_inner(pk.add(64 * b + 64), xq.add(128 * b + 128), table);
            t0 = _mm512_fmadd_ps(p0, fp4_lane_scales(sp.add(4 * b), spread), t0);
            t1 = _mm512_fmadd_ps(p1, fp4_lane_scales(sp.add(4 * b + 4), spread), t1);
            b += 2;
        }
        while b < blocks {
            let p = fp4_block(pk.add(64 * b), xq.add(128 * b), table);
            let s = fp4_lane_scales(sp.add(4 * b), spread);
            if b % 2 == 0 {
                t0 = _mm512_fmadd_ps(p, s, t0);
            } else {
                t1 = _mm512_fmadd_ps(p, s, t1);
            }
            b += 1;
        }
        // The ragged tail is stored, and ordered, naturally.
        let tail = tail_of(Row::Fp4 { packed, scales }, 128 * blocks, n);
        gemm::finish(gemm::avx512::total(t0, t1), &tail, &xp[128 * blocks..])
    }

    /// 16 BF16 weights at `p` as f32 (`bf16 << 16`).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn widen_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 16 F16 weights at `p` as f32.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn widen_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// A row of weights that widen exactly to f32 (BF16, F16, F32) in the blocked order:
    /// `|i| load` gives the 16 weights from input `i`. One chain per
    /// 128-input block, the block sums added to the even or odd blocks' lane totals (through a
    /// lane scale of 1, as the tile kernel does), two blocks per step; the prefetch runs
    /// `FP8_PREFETCH` bytes ahead of `w`, whose elements are `size` bytes (a row of the BF16 head
    /// is 8 KB, two pages). A macro, so that each format's load is written inline in its loop.
    macro_rules! dot_widened {
        ($row:expr, $w:expr, $size:expr, $x:expr, |$i:ident| $load:expr) => {{
            let (w, size, x): (*const u8, usize, &[f32]) = ($w, $size, $x);
            let n = x.len();
            let blocks = n / 128;
            let xq = x.as_ptr();
            macro_rules! block {
                ($b:expr) => {{
                    let b = $b;
                    let $i = 128 * b;
                    let mut p = _mm512_mul_ps($load, _mm512_loadu_ps(xq.add(128 * b)));
                    for k in 1..8 {
                        let $i = 128 * b + 16 * k;
                        p = _mm512_fmadd_ps($load, _mm512_loadu_ps(xq.add($i)), p);
                    }
                    p
                }};
            }
            let one = _mm512_set1_ps(1.0);
            let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut b = 0;
            while b + 2 <= blocks {
                let c = w.wrapping_add(128 * size * b);
                for l in 0..4 * size {
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(FP8_PREFETCH + 64 * l) as *const i8);
                }
                let (p0, p1) = (block!(b), block!(b + 1));
                t0 = _mm512_fmadd_ps(p0, one, t0);
                t1 = _mm512_fmadd_ps(p1, one, t1);
                b += 2;
            }
            if b < blocks {
                t0 = _mm512_fmadd_ps(block!(b), one, t0);
            }
            let tail = tail_of($row, 128 * blocks, n);
            gemm::finish(gemm::avx512::total(t0, t1), &tail, &x[128 * blocks..])
        }};
    }

    /// [`dot_widened`] over BF16 (`bf16 << 16` is the f32), F16 (`vcvtph2ps`) or F32 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn dot_exact(row: Row, x: &[f32]) -> f32 {
        match row {
            Row::Bf16(w) => {
                let p = w.as_ptr() as *const u16;
                dot_widened!(row, w.as_ptr(), 2, x, |i| widen_bf16(p.add(i)))
            }
            Row::F16(w) => {
                let p = w.as_ptr() as *const u16;
                dot_widened!(row, w.as_ptr(), 2, x, |i| widen_f16(p.add(i)))
            }
            Row::F32(w) => {
                let p = w.as_ptr() as *const f32;
                dot_widened!(row, w.as_ptr(), 4, x, |i| _mm512_loadu_ps(p.add(i)))
            }
            other => dot_via_prep(other, x),
        }
    }

    /// A row for the tile kernel in the blocked order (see [`super::prep_row`]): FP8 rows with
    /// blocks of 128 as codes × 2^-8 and lane scales of the block scale × 2^8 (codes and scales
    /// as they are when the scale cannot carry the 2^8, and through the scalar decode when a
    /// code is NaN); FP4 as e2m1 values with each lane's e8m0 scale; BF16 as is; everything
    /// else decoded and scaled by [`dequant`] in its kernel order, with lane scales of 1.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn prep_row(row: Row, w: &mut [f32], s: &mut [f32]) {
        let n = w.len();
        let nb = gemm::blocks(n);
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } if block.is_multiple_of(128) => {
                let fits = fp8_scales_fit(&scales[..n.div_ceil(block)]);
                let per = block / 128;
                let mut nan = _mm512_setzero_si512();
                if fits {
                    let mut buf = Halves([0; 256]);
                    for u in 0..2 * nb {
                        let h = buf.0.as_mut_ptr();
                        fp8_halves(codes.as_ptr().add(64 * u), h, &mut nan);
                        let h = std::hint::black_box(h) as *const u16;
                        for k in 0..4 {
                            _mm512_storeu_ps(
                                w.as_mut_ptr().add(64 * u + 16 * k),
                                cvt16(h.add(16 * k)),
                            );
                        }
                    }
                }
                let (unit, lift) = if fits {
                    (1.0 / 256.0, 256.0)
                } else {
                    (1.0, 1.0)
                };
                if !fits || fp8_any_nan(nan) {
                    let natural: Vec<f32> = codes[..128 * nb]
                        .iter()
                        .map(|&c| E4M3_LUT[c as usize] * unit)
                        .collect();
                    w[..128 * nb].copy_from_slice(&fp8_order(&natural));
                }
                for b in 0..nb {
                    s[16 * b..16 * (b + 1)].fill(scales[b / per] * lift);
                }
                dequant_tail(row, 128 * nb, &mut w[128 * nb..]);
            }
            Row::Fp4 { packed, scales } => {
                let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
                for b in 0..nb {
                    let v = _mm512_loadu_si512(packed.as_ptr().add(64 * b) as *const _);
                    let o = w.as_mut_ptr().add(128 * b);
                    macro_rules! put {
                        ($k:literal, $i:expr) => {
                            _mm512_storeu_ps(o.add(16 * $k), _mm512_permutexvar_ps($i, table))
                        };
                    }
                    put!(0, v);
                    put!(1, _mm512_srli_epi32::<4>(v));
                    put!(2, _mm512_srli_epi32::<8>(v));
                    put!(3, _mm512_srli_epi32::<12>(v));
                    put!(4, _mm512_srli_epi32::<16>(v));
                    put!(5, _mm512_srli_epi32::<20>(v));
                    put!(6, _mm512_srli_epi32::<24>(v));
                    put!(7, _mm512_srli_epi32::<28>(v));
                    for (j, l) in s[16 * b..16 * (b + 1)].iter_mut().enumerate() {
                        *l = e8m0_to_f32(scales[4 * b + j / 4]);
                    }
                }
                dequant_tail(row, 128 * nb, &mut w[128 * nb..]);
            }
            other => {
                dequant(other, w);
                s[..16 * nb].fill(1.0);
            }
        }
    }

    /// Row decode for the tiled matmul: FP8 in [`fp8_order`], FP4 in [`fp4_order`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dequant(row: Row, out: &mut [f32]) {
        match row {
            Row::Fp8 {
                codes,
                scales,
                block,
            } => dequant_fp8(codes, scales, block, out),
            Row::Fp4 { packed, scales } => {
                let n = out.len();
                if !scales_normal(&scales[..n.div_ceil(32)]) {
                    super::dequant(Row::Fp4 { packed, scales }, out);
                    let natural = out.to_vec();
                    out.copy_from_slice(&fp4_order(&natural));
                    return;
                }
                let blocks = n / 128;
                let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
                let spread = _mm512_loadu_si512(SCALE_SPREAD.as_ptr() as *const _);
                for b in 0..blocks {
                    let v = _mm512_loadu_si512(packed.as_ptr().add(64 * b) as *const _);
                    let s = fp4_lane_scales(scales.as_ptr().add(4 * b), spread);
                    let o = out.as_mut_ptr().add(128 * b);
                    let put = |k: usize, i: __m512i| {
                        _mm512_storeu_ps(
                            o.add(16 * k),
                            _mm512_mul_ps(_mm512_permutexvar_ps(i, table), s),
                        )
                    };
                    put(0, v);
                    put(1, _mm512_srli_epi32::<4>(v));
                    put(2, _mm512_srli_epi32::<8>(v));
                    put(3, _mm512_srli_epi32::<12>(v));
                    put(4, _mm512_srli_epi32::<16>(v));
                    put(5, _mm512_srli_epi32::<20>(v));
                    put(6, _mm512_srli_epi32::<24>(v));
                    put(7, _mm512_srli_epi32::<28>(v));
                }
                dequant_tail(
                    Row::Fp4 { packed, scales },
                    128 * blocks,
                    &mut out[128 * blocks..],
                );
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
            } => dot_fp8(codes, scales, block, x, xp),
            Row::Fp4 { packed, scales } => {
                if xp.len() == x.len() {
                    dot_fp4(packed, scales, xp)
                } else {
                    dot_fp4(packed, scales, &fp4_order(x))
                }
            }
            Row::Bf16(_) | Row::F16(_) | Row::F32(_) => dot_exact(row, x),
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

    /// With the blocked order, the dispatched GEMV and the fused multi-token GEMV equal the
    /// scalar reference of that order (`gemm::dot_blocked_ref`) over the tile's own decode of
    /// the row, bitwise (NaN with NaN): the invariant that lets one token take the GEMV in
    /// batch-invariant mode.
    fn assert_gemv_is_blocked(row: Row, x: &[f32], what: &str) {
        if !gemv_is_blocked(row) {
            return;
        }
        let xo = match row {
            Row::Fp8 { .. } => fp8_order(x),
            Row::Fp4 { .. } => fp4_order(x),
            _ => Prepared::from_slice(x),
        };
        let (w, s) = prepped(row, x.len());
        let want = gemm::dot_blocked_ref(&w, &s, &xo);
        let got = dot(row, x);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        assert!(
            same(got, want),
            "{what}: GEMV {got} vs blocked order {want}"
        );
        // The fused multi-token GEMV: groups of 4, 3 and 1.
        for k in [3, 5] {
            let xs = vec![&xo[..]; k];
            let mut out = vec![0f32; k];
            dot_multi(row, &xs, &mut out);
            for v in out {
                assert!(
                    same(v, want),
                    "{what}: {k} tokens {v} vs blocked order {want}"
                );
            }
        }
    }

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
                assert_gemv_is_blocked(row, &x, &format!("n={n}"));
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

    /// FP4 rows with random codes (all 16 nibbles, both positions) and random scales, over
    /// lengths that end mid-byte, mid-group and mid-block: the dispatched dot, the AVX2 and the
    /// scalar dot agree with dequantize-then-dot, and the prepared decode for the tiled path is
    /// the plain decode in [`fp4_order`].
    #[test]
    fn fp4_random_rows() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let next = |s: &mut u64| {
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *s
        };
        let lens = [
            1usize, 2, 3, 31, 32, 33, 63, 64, 65, 95, 127, 128, 129, 160, 191, 255, 256, 257, 384,
            416, 511, 1000, 2048, 4096, 4097, 4192, 7168,
        ];
        for (case, &n) in lens.iter().enumerate() {
            let x: Vec<f32> = (0..n).map(|_| rng(&mut s)).collect();
            let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| next(&mut s) as u8).collect();
            // Scales 2^-20..2^12; every third case also has the special bytes 0 (2^-127) and,
            // in its last group, nothing special (so the fast path and the fallback both run).
            let mut sc: Vec<u8> = (0..n.div_ceil(32))
                .map(|_| 107 + (next(&mut s) % 33) as u8)
                .collect();
            if case % 3 == 2 {
                sc[0] = 0;
            }
            let row = Row::Fp4 {
                packed: &packed,
                scales: &sc,
            };
            let mut w = vec![0f32; n];
            dequant(row, &mut w);
            let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let norm: f64 = w
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let tol = 2e-6 * norm.max(1e-30);
            let mut got = vec![("dispatch", dot(row, &x)), ("scalar", scalar::dot(row, &x))];
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: features detected.
                got.push(("avx2", unsafe { avx2::dot(row, &x) }));
            }
            for (label, g) in got {
                assert!(
                    (g as f64 - want).abs() <= tol,
                    "{label} n={n}: {g} vs {want}"
                );
            }
            assert_gemv_is_blocked(row, &x, &format!("fp4 n={n} case {case}"));
            let mut wp = vec![0f32; n];
            dequant_prepared(row, &mut wp);
            let order = fp4_order(&w);
            let expect = if order.is_empty() { &w[..] } else { &order[..] };
            assert_eq!(&wp[..], expect, "prepared decode n={n}");
        }
        // Every nibble value in every position of a 128-input block pairs with its own input.
        let n = 256;
        for code in 0..16u8 {
            for pos in 0..n {
                let mut packed = vec![0u8; n / 2];
                packed[pos / 2] = if pos % 2 == 0 { code } else { code << 4 };
                let sc: Vec<u8> = (0..n / 32).map(|g| 125 + g as u8).collect();
                let mut x = vec![0f32; n];
                x[pos] = 1.0;
                let got = dot(
                    Row::Fp4 {
                        packed: &packed,
                        scales: &sc,
                    },
                    &x,
                );
                let want = E2M1_VALUES[code as usize] * e8m0_to_f32(sc[pos / 32]);
                assert_eq!(got, want, "code {code} at {pos}");
            }
        }
    }

    /// Every FP8 implementation (the dispatched one, AVX2, scalar) for one row; all take
    /// activations in natural order.
    fn fp8_dots(row: Row, x: &[f32]) -> Vec<(&'static str, f32)> {
        let mut got = vec![("dispatch", dot(row, x)), ("scalar", scalar::dot(row, x))];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: features detected.
            got.push(("avx2", unsafe { avx2::dot(row, x) }));
        }
        got
    }

    /// Every e4m3 code (NaN codes included) at every position of rows whose length ends in a
    /// partial 64-input chunk, for scale blocks of 128 and 256 (the fast path) and 64 and 32
    /// (fallbacks): each path gives code × x × scale rounded as `(code · x) · scale` or (where
    /// the blocked order scales weights first: the ragged tail, blocks that are not a multiple
    /// of 128) as `(code · scale) · x`, or NaN for 0x7f and 0xff. With one nonzero weight every
    /// path rounds just those two products, so the results are equal to one of them (up to the
    /// sign of zero); distinct activations check that each code meets its own input.
    #[test]
    fn fp8_every_code_every_position() {
        let n: usize = 3 * 128 + 37;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 512.0).collect();
        for block in [128usize, 256, 64, 32] {
            let scales: Vec<f32> = (0..n.div_ceil(block))
                .map(|b| [0.75f32, 3.0, 2f32.powi(-20), 1.0e-3][b % 4])
                .collect();
            let mut codes = vec![0u8; n];
            for code in 0..=255u8 {
                for pos in 0..n {
                    codes[pos] = code;
                    let row = Row::Fp8 {
                        codes: &codes,
                        scales: &scales,
                        block,
                    };
                    let c = E4M3_LUT[code as usize];
                    let want = (c * x[pos]) * scales[pos / block];
                    let scaled_first = (c * scales[pos / block]) * x[pos];
                    for (label, got) in fp8_dots(row, &x) {
                        assert!(
                            got == want || got == scaled_first || (got.is_nan() && want.is_nan()),
                            "{label} block {block} code {code:#04x} at {pos}: {got} vs {want}"
                        );
                    }
                    codes[pos] = 0;
                }
            }
        }
    }

    /// FP8 rows of random non-NaN codes over ragged lengths (partial 64-input chunks, partial
    /// 128-input blocks, partial scale blocks) and block sizes, with scales from e8m0 bytes
    /// (0 = 2^-127 included) and arbitrary f32 values: every path agrees with an f64 reference.
    /// A scale too large to carry the kernels' 2^8 takes the unscaled decode and still agrees
    /// (on blocks of 128-multiples that lie in the full blocks: the blocked order scales the
    /// ragged tail's weights first, where such a scale overflows f32 as the reference would).
    /// The prepared decode (tiled path) is the plain decode in [`fp8_order`], bitwise.
    #[test]
    fn fp8_random_rows() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let next = |s: &mut u64| {
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *s
        };
        let lens = [
            1usize, 2, 31, 63, 64, 65, 127, 128, 129, 191, 255, 256, 257, 300, 383, 384, 385, 511,
            512, 1000, 2048, 4096, 4097, 7168, 7173,
        ];
        for block in [128usize, 256, 384, 64, 32, 100] {
            for (case, &n) in lens.iter().enumerate() {
                let huge = case % 5 == 4;
                let x: Vec<f32> = (0..n)
                    .map(|_| rng(&mut s) * if huge { 1e-12 } else { 1.0 })
                    .collect();
                let codes: Vec<u8> = (0..n)
                    .map(|_| {
                        let c = next(&mut s) as u8;
                        if c & 0x7f == 0x7f {
                            c ^ 1
                        } else {
                            c
                        }
                    })
                    .collect();
                let scales: Vec<f32> = (0..n.div_ceil(block))
                    .map(|b| match (next(&mut s) % 4, b, huge) {
                        // × 2^8 overflows f32
                        (_, 0, true) if block % 128 == 0 && n >= block => 2f32.powi(125),
                        (0, _, _) => e8m0_to_f32((next(&mut s) % 40) as u8 + 100),
                        (1, _, _) if case % 3 == 0 => e8m0_to_f32(0),
                        (1, _, _) => e8m0_to_f32(1),
                        _ => rng(&mut s) * 0.01,
                    })
                    .collect();
                let row = Row::Fp8 {
                    codes: &codes,
                    scales: &scales,
                    block,
                };
                let (mut want, mut norm) = (0f64, 0f64);
                for i in 0..n {
                    let t =
                        E4M3_LUT[codes[i] as usize] as f64 * x[i] as f64 * scales[i / block] as f64;
                    want += t;
                    norm += t.abs();
                }
                let tol = 2e-6 * norm + 1e-40;
                for (label, got) in fp8_dots(row, &x) {
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{label} block {block} n={n}: {got} vs {want}"
                    );
                }
                assert_gemv_is_blocked(row, &x, &format!("fp8 block {block} n={n}"));
                let mut w = vec![0f32; n];
                dequant(row, &mut w);
                let mut wp = vec![0f32; n];
                dequant_prepared(row, &mut wp);
                let order = fp8_order(&w);
                let expect = if order.is_empty() { &w[..] } else { &order[..] };
                assert_eq!(&wp[..], expect, "prepared decode block {block} n={n}");
                assert_eq!(unorder_fp8(&fp8_order(&x)).len(), n);
            }
        }
    }

    /// A NaN code anywhere (first block, the middle of the fast part, a partial block, the
    /// ragged tail) makes every FP8 dot NaN, as in the scalar reference, and the prepared decode
    /// NaN at exactly that input.
    #[test]
    fn fp8_nan_codes() {
        let n: usize = 1024 + 64 + 21;
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let scales = vec![0.5f32; n.div_ceil(128)];
        for nan in [0x7fu8, 0xff] {
            for pos in [
                0usize,
                1,
                63,
                64,
                130,
                511,
                700,
                1023,
                1024,
                1087,
                1088,
                n - 1,
            ] {
                let mut codes: Vec<u8> = (0..n).map(|i| (i * 29 % 120) as u8).collect();
                codes[pos] = nan;
                let row = Row::Fp8 {
                    codes: &codes,
                    scales: &scales,
                    block: 128,
                };
                for (label, got) in fp8_dots(row, &x) {
                    assert!(got.is_nan(), "{label} NaN {nan:#04x} at {pos}: {got}");
                }
                assert_gemv_is_blocked(row, &x, &format!("NaN at {pos}"));
                let mut wp = vec![0f32; n];
                dequant_prepared(row, &mut wp);
                let wn = if wants_fp4_order() {
                    unorder_fp8(&wp)
                } else {
                    wp
                };
                for (i, v) in wn.iter().enumerate() {
                    assert_eq!(
                        v.is_nan(),
                        i == pos,
                        "prepared decode {nan:#04x} at {pos}, {i}"
                    );
                }
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
