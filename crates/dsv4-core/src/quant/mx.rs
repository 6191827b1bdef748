//! MLX's microscaling quantizers (mxfp4, mxfp8): one power-of-two scale per 32 inputs.

use crate::tensor::{E2M1_VALUES, E4M3_LUT};

/// Largest finite e2m1 / e4m3 magnitudes.
const E2M1_MAX: f32 = 6.0;
const E4M3_MAX: f32 = 448.0;

/// The e8m0 scale byte MLX picks for a group: `2^ceil(log2(amax / max_code))`, 1 for a zero group.
pub fn scale_byte(group: &[f32], max_code: f32) -> u8 {
    let amax = group.iter().fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return 127;
    }
    let e = ((amax / max_code) as f64).log2().ceil() as i32;
    (e + 127).clamp(0, 254) as u8
}

/// e2m1 code of `x`: nearest value, ties toward zero (as MLX rounds), saturating at ±6.
pub fn e2m1_code(x: f32) -> u8 {
    const MIDPOINTS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let m = x.abs();
    let code = MIDPOINTS.iter().filter(|&&t| m > t).count() as u8;
    if x < 0.0 && code != 0 {
        code | 8
    } else {
        code
    }
}

/// e4m3fn code of `x`: round to nearest even, saturating at ±448; negative zero keeps its sign.
pub fn e4m3_code(x: f32) -> u8 {
    let m = x.abs().min(E4M3_MAX);
    // Codes 0..=126 are the finite non-negative values in increasing order.
    let hi = E4M3_LUT[..127].partition_point(|&v| v < m).min(126);
    let code = if hi == 0 || E4M3_LUT[hi] == m {
        hi
    } else {
        let (lo_v, hi_v) = (E4M3_LUT[hi - 1], E4M3_LUT[hi]);
        let (dl, dh) = (m - lo_v, hi_v - m);
        if dl < dh || (dl == dh && (hi - 1) % 2 == 0) {
            hi - 1
        } else {
            hi
        }
    } as u8;
    // Unlike e2m1, MLX keeps the sign of values that round to zero (and of -0).
    if x.is_sign_negative() {
        code | 0x80
    } else {
        code
    }
}

/// Quantizes one row (`w.len()` a multiple of 32) to mxfp4: appends packed codes (low nibble
/// first) and one scale byte per group.
pub fn quantize_mxfp4_row(w: &[f32], packed: &mut Vec<u8>, scales: &mut Vec<u8>) {
    for g in w.chunks(32) {
        let s = scale_byte(g, E2M1_MAX);
        let inv = scale_value(s).recip();
        scales.push(s);
        for pair in g.chunks(2) {
            let lo = e2m1_code(pair[0] * inv);
            let hi = pair.get(1).map_or(0, |&x| e2m1_code(x * inv));
            packed.push(lo | (hi << 4));
        }
    }
}

/// Quantizes one row to mxfp8: appends e4m3 codes and one scale byte per 32 inputs.
pub fn quantize_mxfp8_row(w: &[f32], codes: &mut Vec<u8>, scales: &mut Vec<u8>) {
    for g in w.chunks(32) {
        let s = scale_byte(g, E4M3_MAX);
        let inv = scale_value(s).recip();
        scales.push(s);
        codes.extend(g.iter().map(|&x| e4m3_code(x * inv)));
    }
}

/// `2^(s-127)` as f32 (normal range only; MLX's scales for real weights never leave it).
fn scale_value(s: u8) -> f32 {
    crate::tensor::e8m0_to_f32(s)
}

/// e2m1 value of a code (for tests and the converter's exact paths).
pub fn e2m1_value(code: u8) -> f32 {
    E2M1_VALUES[(code & 15) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_rounds_ties_toward_zero_and_saturates() {
        let cases = [
            (0.25, 0.0),
            (0.26, 0.5),
            (0.75, 0.5),
            (1.25, 1.0),
            (2.5, 2.0),
            (5.0, 4.0),
            (5.1, 6.0),
            (100.0, 6.0),
            (-0.75, -0.5),
            (-0.1, 0.0),
        ];
        for (x, want) in cases {
            assert_eq!(e2m1_value(e2m1_code(x)), want, "{x}");
        }
    }

    #[test]
    fn e4m3_round_trips_and_ties_to_even() {
        for c in 0u8..127 {
            assert_eq!(e4m3_code(E4M3_LUT[c as usize]), c);
            assert_eq!(e4m3_code(-E4M3_LUT[c as usize]), c | 0x80);
        }
        // Midpoint of codes 0x38 (1.0) and 0x39 (1.125) goes to the even code.
        assert_eq!(e4m3_code(1.0625), 0x38);
        assert_eq!(e4m3_code(1.1875), 0x3a); // between 0x39 and 0x3a → 0x3a
        assert_eq!(e4m3_code(1000.0), 0x7e);
        assert_eq!(e4m3_code(-1e-9), 0x80);
        assert_eq!(e4m3_code(-0.0), 0x80);
        assert_eq!(e2m1_code(-0.0), 0);
    }

    #[test]
    fn scale_bytes_follow_mlx() {
        assert_eq!(scale_byte(&[0.0; 32], 6.0), 127);
        assert_eq!(scale_byte(&[24.0], 6.0), 129); // exactly 4·6
        assert_eq!(scale_byte(&[24.01], 6.0), 130);
        assert_eq!(scale_byte(&[-3.0], 6.0), 126);
        assert_eq!(scale_byte(&[230.0], 448.0), 127);
    }
}
