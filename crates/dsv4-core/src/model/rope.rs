//! Partial rotary embeddings: interleaved pairs on the *last* `rope_dim` channels of a vector.
//! Two tables per model: plain (sliding layers) and YaRN-blended (compressed layers).
//! Frequencies and angles follow transformers' float32 arithmetic.

use crate::config::RopeSpec;

/// Inverse frequencies of one table and its cos/sin multiplier.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

impl RopeTable {
    pub fn new(spec: &RopeSpec, rope_dim: usize) -> Self {
        let half = rope_dim / 2;
        let base = spec.theta;
        // pos_freq_i = base^(2i/dim), evaluated in f32 like transformers.
        let pos_freq: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let Some(y) = &spec.yarn else {
            return RopeTable {
                inv_freq: pos_freq.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
            };
        };
        let dim = rope_dim as f64;
        let corr = |rot: f64| {
            dim * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut lo, mut hi) = (corr(y.beta_fast), corr(y.beta_slow));
        if y.truncate {
            lo = lo.floor();
            hi = hi.ceil();
        }
        let lo = lo.max(0.0);
        let mut hi = hi.min(dim - 1.0);
        if lo == hi {
            hi += 0.001;
        }
        let inv_freq = (0..half)
            .map(|i| {
                let ramp = ((i as f32 - lo as f32) / (hi as f32 - lo as f32)).clamp(0.0, 1.0);
                let extrap = 1.0 - ramp;
                let p = pos_freq[i];
                (1.0 / (y.factor as f32 * p)) * (1.0 - extrap) + (1.0 / p) * extrap
            })
            .collect();
        RopeTable {
            inv_freq,
            attention_factor: y.attention_factor as f32,
        }
    }

    /// cos and sin for one position (`rope_dim/2` each).
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = (p * f) as f64;
                (
                    a.cos() as f32 * self.attention_factor,
                    a.sin() as f32 * self.attention_factor,
                )
            })
            .unzip()
    }
}

/// Rotates the trailing `2·cos.len()` channels of `x` in interleaved pairs; `inverse` rotates by
/// the negative angle (used to de-rotate attention outputs).
#[inline]
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let r = 2 * cos.len();
    let off = x.len() - r;
    let tail = &mut x[off..];
    for i in 0..cos.len() {
        let (c, s) = (cos[i], if inverse { -sin[i] } else { sin[i] });
        let (a, b) = (tail[2 * i], tail[2 * i + 1]);
        tail[2 * i] = a * c - b * s;
        tail[2 * i + 1] = b * c + a * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    /// MODEL.md §1.4: Flash compress table starts 1, 0.687656, ... and ends ~5.68e-7 (÷16 above hi).
    #[test]
    fn flash_yarn_table() {
        let spec = RopeSpec {
            theta: 160000.0,
            yarn: Some(Yarn {
                factor: 16.0,
                original_max_position_embeddings: 65536.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 1.0,
            }),
        };
        let t = RopeTable::new(&spec, 64);
        assert!((t.inv_freq[0] - 1.0).abs() < 1e-7);
        assert!((t.inv_freq[1] - 0.687656).abs() < 1e-6);
        assert!((t.inv_freq[15] - 0.00363554).abs() < 1e-8);
        assert!((t.inv_freq[31] / 5.68053e-7 - 1.0).abs() < 1e-4);
    }

    #[test]
    fn inverse_undoes_rotation() {
        let t = RopeTable::new(
            &RopeSpec {
                theta: 10000.0,
                yarn: None,
            },
            8,
        );
        let mut x: Vec<f32> = (0..12).map(|i| i as f32 * 0.3 - 1.0).collect();
        let orig = x.clone();
        let (c, s) = t.cos_sin(37);
        rotate(&mut x, &c, &s, false);
        assert_eq!(x[..4], orig[..4]);
        rotate(&mut x, &c, &s, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
