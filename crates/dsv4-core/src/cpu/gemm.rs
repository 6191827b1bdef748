//! The small matmul behind multi-token linear layers: a tile of dequantized weight rows times
//! the token rows, register-blocked 4 rows × 4 tokens so each loaded vector feeds four FMAs.

use super::kernels;

/// `out[r·m + t] = tile[r] · x[t]` for `rows` weight rows and `m` token rows of length `k`.
pub fn tile_matmul(tile: &[f32], rows: usize, x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    debug_assert!(tile.len() >= rows * k && x.len() >= m * k && out.len() >= rows * m);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected above.
        return unsafe { avx512::tile_matmul(tile, rows, x, m, k, out) };
    }
    for r in 0..rows {
        for t in 0..m {
            out[r * m + t] = kernels::dot_f32(&tile[r * k..(r + 1) * k], &x[t * k..(t + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_matmul(
        tile: &[f32],
        rows: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let mut t0 = 0;
        while t0 < m {
            // Only the tokens that exist are computed (one decode token costs one column, not
            // four); each (row, token) sum is the same sequence of FMAs whatever the block
            // width, so a token's result does not depend on how many share the call.
            match m - t0 {
                1 => block::<1>(tile, rows, x, m, k, out, t0),
                2 => block::<2>(tile, rows, x, m, k, out, t0),
                3 => block::<3>(tile, rows, x, m, k, out, t0),
                _ => block::<4>(tile, rows, x, m, k, out, t0),
            }
            t0 += 4;
        }
    }

    /// Every row of the tile times tokens `t0..t0+NT`, 4 rows at a time.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const NT: usize>(
        tile: &[f32],
        rows: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32],
        t0: usize,
    ) {
        let tail = (k % 16) as u32;
        let mask: __mmask16 = if tail == 0 {
            0
        } else {
            ((1u32 << tail) - 1) as __mmask16
        };
        let k16 = k - k % 16;
        let xs: [*const f32; NT] = std::array::from_fn(|j| x.as_ptr().add((t0 + j) * k));
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(4);
            let mut acc = [[_mm512_setzero_ps(); NT]; 4];
            let w: [*const f32; 4] =
                std::array::from_fn(|i| tile.as_ptr().add((r0 + i.min(nr - 1)) * k));
            let mut kk = 0;
            while kk < k16 {
                let wv: [__m512; 4] = std::array::from_fn(|i| _mm512_loadu_ps(w[i].add(kk)));
                for j in 0..NT {
                    let xv = _mm512_loadu_ps(xs[j].add(kk));
                    for i in 0..4 {
                        acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
                    }
                }
                kk += 16;
            }
            if tail != 0 {
                let wv: [__m512; 4] =
                    std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, w[i].add(k16)));
                for j in 0..NT {
                    let xv = _mm512_maskz_loadu_ps(mask, xs[j].add(k16));
                    for i in 0..4 {
                        acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
                    }
                }
            }
            for i in 0..nr {
                for j in 0..NT {
                    out[(r0 + i) * m + t0 + j] = _mm512_reduce_add_ps(acc[i][j]);
                }
            }
            r0 += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_matmul_matches_dots() {
        for (rows, m, k) in [(1, 1, 1), (3, 5, 17), (4, 4, 32), (7, 9, 100), (8, 2, 4096)] {
            let tile: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 17 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let mut out = vec![f32::NAN; rows * m];
            tile_matmul(&tile, rows, &x, m, k, &mut out);
            for r in 0..rows {
                for t in 0..m {
                    let want: f64 = (0..k)
                        .map(|i| tile[r * k + i] as f64 * x[t * k + i] as f64)
                        .sum();
                    let got = out[r * m + t] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{m}x{k} [{r},{t}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
