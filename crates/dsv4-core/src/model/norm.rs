//! RMS normalization, weighted and unweighted, over rows of a flat buffer.

use crate::cpu::kernels;

/// `x ← w ⊙ x / sqrt(mean(x²) + eps)` for each row of width `w.len()`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let r = inv_rms(row, eps);
        row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * r * w);
    }
}

/// `x ← x / sqrt(mean(x²) + eps)` for each row of width `width`.
pub fn rms_norm_unweighted(x: &mut [f32], width: usize, eps: f32) {
    for row in x.chunks_mut(width) {
        let r = inv_rms(row, eps);
        row.iter_mut().for_each(|v| *v *= r);
    }
}

#[inline]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (kernels::dot_f32(row, row) / row.len() as f32 + eps).sqrt()
}
