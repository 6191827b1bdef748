//! Manifold-constrained hyper-connections: `n` residual streams per token, collapsed before each
//! block by learned `pre` weights and re-mixed after it by `post` and a Sinkhorn-normalized
//! `comb` matrix (applied transposed: new stream k takes column k).

use super::weights::HcWeights;
use crate::cpu::kernels;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Mixing weights of one site for one token.
pub struct HcMix {
    pub post: Vec<f32>,
    /// Row-major `[n, n]`.
    pub comb: Vec<f32>,
}

/// `fn · (v / rms(v))` for every token of `x` `[l, n·D]`.
fn projections(w: &HcWeights, x: &[f32], l: usize, eps: f32) -> Vec<f32> {
    let nd = w.fn_.inp;
    let mut normed = x.to_vec();
    for row in normed.chunks_mut(nd) {
        let ms = kernels::dot_f32(row, row) / nd as f32;
        let r = 1.0 / (ms + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= r);
    }
    w.fn_.apply(&normed, l)
}

/// Collapses the streams `x` `[l, n, D]` into `[l, D]`, returning each token's mix for `post`.
pub fn pre(
    w: &HcWeights,
    x: &[f32],
    l: usize,
    n: usize,
    iters: usize,
    rms_eps: f32,
    hc_eps: f32,
) -> (Vec<f32>, Vec<HcMix>) {
    let d = x.len() / (l * n);
    let mu = projections(w, x, l, rms_eps);
    let rows = (2 + n) * n;
    let mut out = vec![0f32; l * d];
    let mut mixes = Vec::with_capacity(l);
    for t in 0..l {
        let m = &mu[t * rows..(t + 1) * rows];
        let pre: Vec<f32> = (0..n)
            .map(|i| sigmoid(m[i] * w.scale[0] + w.base[i]) + hc_eps)
            .collect();
        let post: Vec<f32> = (0..n)
            .map(|i| 2.0 * sigmoid(m[n + i] * w.scale[1] + w.base[n + i]))
            .collect();
        let mut c: Vec<f32> = (0..n * n)
            .map(|k| m[2 * n + k] * w.scale[2] + w.base[2 * n + k])
            .collect();
        sinkhorn(&mut c, n, iters, hc_eps);
        let o = &mut out[t * d..(t + 1) * d];
        for (i, &p) in pre.iter().enumerate() {
            kernels::axpy(p, &x[(t * n + i) * d..(t * n + i + 1) * d], o);
        }
        mixes.push(HcMix { post, comb: c });
    }
    (out, mixes)
}

/// Row softmax + eps, then one column normalization and `iters-1` (row, column) rounds.
fn sinkhorn(c: &mut [f32], n: usize, iters: usize, eps: f32) {
    for row in c.chunks_mut(n) {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0f32;
        row.iter_mut().for_each(|v| {
            *v = (*v - mx).exp();
            s += *v;
        });
        row.iter_mut().for_each(|v| *v = *v / s + eps);
    }
    let cols = |c: &mut [f32]| {
        for j in 0..n {
            let s: f32 = (0..n).map(|i| c[i * n + j]).sum::<f32>() + eps;
            (0..n).for_each(|i| c[i * n + j] /= s);
        }
    };
    cols(c);
    for _ in 1..iters {
        for row in c.chunks_mut(n) {
            let s: f32 = row.iter().sum::<f32>() + eps;
            row.iter_mut().for_each(|v| *v /= s);
        }
        cols(c);
    }
}

/// New streams `X'_k = post_k·f + Σ_j comb[j][k]·X_j` for every token; `x` `[l, n, D]` in place.
pub fn post(f: &[f32], x: &mut [f32], mixes: &[HcMix], n: usize) {
    let l = mixes.len();
    let d = f.len() / l;
    let mut new = vec![0f32; n * d];
    for (t, mix) in mixes.iter().enumerate() {
        let xs = &mut x[t * n * d..(t + 1) * n * d];
        let ft = &f[t * d..(t + 1) * d];
        for k in 0..n {
            let o = &mut new[k * d..(k + 1) * d];
            o.iter_mut().zip(ft).for_each(|(o, f)| *o = mix.post[k] * f);
            for j in 0..n {
                kernels::axpy(mix.comb[j * n + k], &xs[j * d..(j + 1) * d], o);
            }
        }
        xs.copy_from_slice(&new);
    }
}

/// The hyper-head: `y = Σ_i (sigmoid(μ_i·scale + base_i) + eps)·X_i` for each token.
pub fn head(w: &HcWeights, x: &[f32], l: usize, n: usize, rms_eps: f32, hc_eps: f32) -> Vec<f32> {
    let d = x.len() / (l * n);
    let mu = projections(w, x, l, rms_eps);
    let mut out = vec![0f32; l * d];
    for t in 0..l {
        let o = &mut out[t * d..(t + 1) * d];
        for i in 0..n {
            let p = sigmoid(mu[t * n + i] * w.scale[0] + w.base[i]) + hc_eps;
            kernels::axpy(p, &x[(t * n + i) * d..(t * n + i + 1) * d], o);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After Sinkhorn the matrix is (nearly) doubly stochastic, columns exactly normalized last.
    #[test]
    fn sinkhorn_is_doubly_stochastic() {
        let mut c: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 * 0.7 - 1.0).collect();
        sinkhorn(&mut c, 4, 20, 1e-6);
        for j in 0..4 {
            let s: f32 = (0..4).map(|i| c[i * 4 + j]).sum();
            assert!((s - 1.0).abs() < 1e-5, "col {j}: {s}");
        }
        for i in 0..4 {
            let s: f32 = c[i * 4..i * 4 + 4].iter().sum();
            assert!((s - 1.0).abs() < 1e-3, "row {i}: {s}");
        }
    }
}
