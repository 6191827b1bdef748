//! The multi-token side of linear layers, and the accumulation order it shares with the
//! single-token GEMVs.
//!
//! **The blocked order.** With AVX-512, every (weight row, token) sum is computed the same way,
//! whichever kernel runs it and however many tokens share the call:
//!
//! * the row is cut into full blocks of [`BLOCK`] = 128 inputs (in the kernels' input order,
//!   see `kernels::fp8_order` / `fp4_order`) and a ragged tail;
//! * in each block, 16 lanes each sum their 8 products in one chain (a multiply, then 7 FMAs)
//!   over the block's *unscaled* weights: `p = w₀x₀; p = fma(wₖ, xₖ, p)`;
//! * the block's lane sums join one of two sets of lane totals, even blocks `T₀` and odd blocks
//!   `T₁` (two chains, so a single-token GEMV is not bound by one chain's latency), through the
//!   block's 16 lane scales: `T = fma(p, S, T)` (FP8: the block scale × 2⁸ over weights decoded
//!   as code × 2⁻⁸; FP4: each lane's e8m0 scale; every other format: 1 over weights in f32);
//! * the lanes of `T₀ + T₁` are added in a fixed tree ([`hsum16_ref`]), then the tail's
//!   products one by one in natural order ([`tail_dot`]).
//!
//! The single-token FP8, FP4, BF16, F16 and F32 GEMVs (`kernels`) decode weights in registers
//! and follow this order exactly (rows their fast decode does not take go through the tile's
//! own decode and a one-row kernel); the tile kernel here decodes a few rows once into unscaled f32 plus lane
//! scales ([`Prepped`], `kernels::prep_row`) and applies them to many tokens. So a token's
//! result is bitwise the same alone or in a batch of any size, and the server's batch-invariant
//! mode can keep the GEMV's speed for single tokens.
//!
//! Without AVX-512 the tile falls back to a dot product per (row, token) over rows decoded to
//! f32, and batch invariance comes from using that path for every token count.

use super::kernels;

/// Inputs per block of the blocked order.
pub const BLOCK: usize = 128;

/// Full blocks of a row of `n` inputs.
pub fn blocks(n: usize) -> usize {
    n / BLOCK
}

/// The 16 lane totals added in the blocked order's fixed tree: halves, then quarters, then
/// pairs, then the last two.
pub fn hsum16_ref(l: &[f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    let p: [f32; 2] = std::array::from_fn(|i| q[i] + q[i + 2]);
    p[0] + p[1]
}

/// A row's sum from its lane totals' sum and its ragged tail (weights and activations): the
/// tail's products added one by one in natural order, none added when there is no tail.
#[inline]
pub fn finish(total: f32, w: &[f32], x: &[f32]) -> f32 {
    if w.is_empty() {
        total
    } else {
        total + tail_dot(w, x)
    }
}

/// The ragged tail's products, added one by one in natural order.
#[inline]
pub fn tail_dot(w: &[f32], x: &[f32]) -> f32 {
    let mut s = 0f32;
    for (a, b) in w.iter().zip(x) {
        s += a * b;
    }
    s
}

/// The blocked order computed lane by lane in scalar code, from unscaled block weights `w`
/// (tail scaled), lane scales `s` (16 per block) and activations `x` in the same input order.
/// The reference the SIMD kernels are tested against.
pub fn dot_blocked_ref(w: &[f32], s: &[f32], x: &[f32]) -> f32 {
    let nb = blocks(x.len());
    let mut t = [[0f32; 16]; 2];
    for b in 0..nb {
        let (wb, xb) = (&w[BLOCK * b..], &x[BLOCK * b..]);
        for (j, tj) in t[b % 2].iter_mut().enumerate() {
            let mut p = wb[j] * xb[j];
            for k in 1..8 {
                p = wb[16 * k + j].mul_add(xb[16 * k + j], p);
            }
            *tj = p.mul_add(s[16 * b + j], *tj);
        }
    }
    let lanes: [f32; 16] = std::array::from_fn(|j| t[0][j] + t[1][j]);
    finish(hsum16_ref(&lanes), &w[BLOCK * nb..], &x[BLOCK * nb..])
}

/// A few weight rows decoded once for the tile kernel: per row `n` f32 (full blocks unscaled in
/// the kernel order, the tail scaled in natural order) and 16 lane scales per full block.
/// Reused across calls (per thread) so that no tile is ever a fresh allocation.
#[derive(Default)]
pub struct Prepped {
    pub w: Vec<f32>,
    pub s: Vec<f32>,
}

impl Prepped {
    /// Room for `rows` rows of `n` inputs (grown only, so alternating layer widths do not
    /// refill it).
    pub fn reserve(&mut self, rows: usize, n: usize) {
        if self.w.len() < rows * n {
            self.w.resize(rows * n, 0.0);
        }
        if self.s.len() < rows * blocks(n) * 16 {
            self.s.resize(rows * blocks(n) * 16, 0.0);
        }
    }

    /// Row `r`'s weights and lane scales.
    pub fn row_mut(&mut self, r: usize, n: usize) -> (&mut [f32], &mut [f32]) {
        let ns = blocks(n) * 16;
        (
            &mut self.w[r * n..(r + 1) * n],
            &mut self.s[r * ns..(r + 1) * ns],
        )
    }
}

/// Where a tile's results go: `put(r, t, v)` for tile row `r` and token `t`.
pub trait Sink {
    fn put(&self, r: usize, t: usize, v: f32);
}

/// `out(r, t) = row r · x[t]` for `rows` prepared rows of `n` inputs and `m` token rows of `xs`
/// (`[m, n]`, in the rows' input order): the blocked order with AVX-512 (`prepped` from
/// `kernels::prep_row`), otherwise a dot per pair over rows decoded to f32 (`prepped.w` only).
pub fn tile(prepped: &Prepped, rows: usize, n: usize, xs: &[f32], m: usize, out: &impl Sink) {
    assert!(
        prepped.w.len() >= rows * n
            && prepped.s.len() >= rows * blocks(n) * 16
            && xs.len() >= m * n,
        "tile: buffers too short for {rows} rows × {m} tokens of {n} inputs"
    );
    #[cfg(target_arch = "x86_64")]
    if kernels::blocked_order() {
        // SAFETY: `blocked_order` implies AVX-512F.
        return unsafe { avx512::tile(prepped, rows, n, xs, m, out) };
    }
    for t in 0..m {
        for r in 0..rows {
            let v = kernels::dot_f32(&prepped.w[r * n..(r + 1) * n], &xs[t * n..(t + 1) * n]);
            out.put(r, t, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{blocks, finish, Prepped, Sink, BLOCK};
    use std::arch::x86_64::*;

    /// The blocked order's end of the lane totals: `T₀ + T₁` lane by lane, then
    /// [`super::hsum16_ref`]'s tree.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn total(t0: __m512, t1: __m512) -> f32 {
        hsum16(_mm512_add_ps(t0, t1))
    }

    /// [`super::hsum16_ref`]'s tree on a register.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn hsum16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let h = _mm256_add_ps(lo, hi);
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(p, p))
    }

    /// One row's blocked dot from prepared weights and lane scales (`x` in the same order).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_blocked(w: &[f32], s: &[f32], x: &[f32]) -> f32 {
        let n = x.len();
        let [t0, t1] = micro::<1, 1>(w.as_ptr(), s.as_ptr(), n, blocks(n), [x.as_ptr()]);
        let nb = blocks(n);
        finish(
            total(t0[0][0], t1[0][0]),
            &w[BLOCK * nb..n],
            &x[BLOCK * nb..],
        )
    }

    /// Lane totals (`[T₀, T₁]`) of `R` rows × `NT` tokens. Each (row, token) pair keeps its
    /// own chains, so its sum is the same sequence of operations whatever `R` and `NT` are; the
    /// pairs only share loads (`R + NT` loads feed `R · NT` FMAs).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro<const R: usize, const NT: usize>(
        w: *const f32,
        s: *const f32,
        n: usize,
        nb: usize,
        x: [*const f32; NT],
    ) -> [[[__m512; NT]; R]; 2] {
        let mut acc = [[[_mm512_setzero_ps(); NT]; R]; 2];
        // One block into lane totals `T` (a macro: the two sets must stay in registers).
        macro_rules! block {
            ($b:expr, $t:expr) => {{
                let off = BLOCK * $b;
                let mut p = [[_mm512_setzero_ps(); NT]; R];
                for k in 0..8 {
                    let mut wv = [_mm512_setzero_ps(); R];
                    for (r, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(w.add(r * n + off + 16 * k));
                    }
                    for t in 0..NT {
                        let xv = _mm512_loadu_ps(x[t].add(off + 16 * k));
                        for r in 0..R {
                            p[r][t] = if k == 0 {
                                _mm512_mul_ps(wv[r], xv)
                            } else {
                                _mm512_fmadd_ps(wv[r], xv, p[r][t])
                            };
                        }
                    }
                }
                for r in 0..R {
                    let sv = _mm512_loadu_ps(s.add((r * nb + $b) * 16));
                    for t in 0..NT {
                        $t[r][t] = _mm512_fmadd_ps(p[r][t], sv, $t[r][t]);
                    }
                }
            }};
        }
        let [t0, t1] = &mut acc;
        let mut b = 0;
        while b + 2 <= nb {
            block!(b, t0);
            block!(b + 1, t1);
            b += 2;
        }
        if b < nb {
            block!(b, t0);
        }
        acc
    }

    /// Rows per micro-kernel call, and tokens: 3 × 3 pairs with 3 lane registers each (the
    /// block sum and the two totals) leave room for the loads in the 32 vector registers.
    const MR: usize = 3;
    const MT: usize = 3;

    /// Tokens outermost: a group's activations stay in cache while every row of the tile (in
    /// L2) passes over them.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        prepped: &Prepped,
        rows: usize,
        n: usize,
        xs: &[f32],
        m: usize,
        out: &impl Sink,
    ) {
        let nb = blocks(n);
        let (w, s) = (prepped.w.as_ptr(), prepped.s.as_ptr());
        let mut t0 = 0;
        while t0 < m {
            let nt = (m - t0).min(MT);
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(MR);
                let (wr, sr) = (w.add(r0 * n), s.add(r0 * nb * 16));
                macro_rules! run {
                    ($r:literal, $t:literal) => {{
                        let x: [*const f32; $t] =
                            std::array::from_fn(|j| xs.as_ptr().add((t0 + j) * n));
                        let [a0, a1] = micro::<$r, $t>(wr, sr, n, nb, x);
                        for i in 0..$r {
                            let wt = &prepped.w[(r0 + i) * n + BLOCK * nb..(r0 + i + 1) * n];
                            for j in 0..$t {
                                let xt = &xs[(t0 + j) * n + BLOCK * nb..(t0 + j + 1) * n];
                                let v = finish(total(a0[i][j], a1[i][j]), wt, xt);
                                out.put(r0 + i, t0 + j, v);
                            }
                        }
                    }};
                }
                match (nr, nt) {
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, 1) => run!(3, 1),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, 1) => run!(2, 1),
                    (1, 3) => run!(1, 3),
                    (1, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                r0 += MR;
            }
            t0 += MT;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Grid(RefCell<Vec<f32>>, usize);
    impl Sink for Grid {
        fn put(&self, r: usize, t: usize, v: f32) {
            self.0.borrow_mut()[r * self.1 + t] = v;
        }
    }

    fn lcg(s: &mut u64) -> f32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The tile kernel gives every (row, token) the scalar reference of the blocked order,
    /// bitwise, over ragged lengths (odd and even block counts) and remainders of the 3 × 3
    /// micro-kernel; without AVX-512
    /// the fallback agrees with an f64 dot.
    #[test]
    fn tile_follows_the_blocked_order() {
        let mut seed = 7u64;
        for (rows, m, n) in [
            (1, 1, 1),
            (3, 5, 17),
            (4, 3, 128),
            (3, 3, 384),
            (7, 9, 300),
            (16, 4, 1024),
            (5, 7, 4096 + 96),
        ] {
            let mut p = Prepped::default();
            p.reserve(rows, n);
            for v in p.w.iter_mut() {
                *v = lcg(&mut seed);
            }
            for v in p.s.iter_mut() {
                *v = 2f32.powi((lcg(&mut seed) * 8.0) as i32) * (1.0 + lcg(&mut seed).abs());
            }
            let xs: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
            let out = Grid(RefCell::new(vec![f32::NAN; rows * m]), m);
            tile(&p, rows, n, &xs, m, &out);
            let got = out.0.into_inner();
            let ns = blocks(n) * 16;
            for r in 0..rows {
                let (w, s) = (&p.w[r * n..(r + 1) * n], &p.s[r * ns..(r + 1) * ns]);
                for t in 0..m {
                    let x = &xs[t * n..(t + 1) * n];
                    let g = got[r * m + t];
                    if kernels::blocked_order() {
                        let want = dot_blocked_ref(w, s, x);
                        assert_eq!(g.to_bits(), want.to_bits(), "{rows}x{m}x{n} [{r},{t}]");
                        #[cfg(target_arch = "x86_64")]
                        {
                            // SAFETY: `blocked_order` implies AVX-512F.
                            let one = unsafe { avx512::dot_blocked(w, s, x) };
                            assert_eq!(one.to_bits(), want.to_bits(), "dot_blocked {n}");
                        }
                    } else {
                        let want: f64 = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        assert!((g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }
}
