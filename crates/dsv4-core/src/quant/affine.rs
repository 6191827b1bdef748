//! MLX affine quantization: bit-stream packing of codes and `mlx.core.quantize`'s rounding.

/// Code `i` of a row packed as a little-endian bit stream of `bits`-wide codes.
#[inline]
pub fn code_at(packed: &[u8], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    // A code spans at most 2 bytes (bits ≤ 8); read what exists.
    let lo = packed[byte] as u32;
    let hi = packed.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | (hi << 8)) >> shift) & ((1u32 << bits) - 1)
}

/// Codes `start..start+out.len()` of a packed row (`start·bits` on a byte boundary), decoded
/// with a running bit buffer (much faster than [`code_at`] per element).
#[inline]
pub fn unpack_codes(packed: &[u8], bits: u32, start: usize, out: &mut [u8]) {
    let b = bits as usize;
    let mask = (1u64 << bits) - 1;
    // Whole runs of 8 codes are exactly `bits` bytes: one little-endian load each.
    if start.is_multiple_of(8) && out.len().is_multiple_of(8) {
        let first = start * b / 8;
        for (k, o) in out.chunks_exact_mut(8).enumerate() {
            let mut v = 0u64;
            for (j, &byte) in packed[first + k * b..first + (k + 1) * b]
                .iter()
                .enumerate()
            {
                v |= (byte as u64) << (8 * j);
            }
            for (j, c) in o.iter_mut().enumerate() {
                *c = ((v >> (j * b)) & mask) as u8;
            }
        }
        return;
    }
    let mut byte = start * bits as usize / 8;
    let (mut acc, mut have) = (0u64, 0u32);
    for o in out.iter_mut() {
        while have < bits {
            acc |= (packed[byte] as u64) << have;
            byte += 1;
            have += 8;
        }
        *o = (acc & mask) as u8;
        acc >>= bits;
        have -= bits;
    }
}

/// Appends `codes` (each `< 2^bits`) to `out` as a little-endian bit stream; the row length
/// times `bits` must be a multiple of 8.
pub fn pack_codes(codes: &[u8], bits: u32, out: &mut Vec<u8>) {
    let mut acc = 0u32;
    let mut have = 0u32;
    for &c in codes {
        acc |= (c as u32) << have;
        have += bits;
        while have >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            have -= 8;
        }
    }
    debug_assert_eq!(have, 0, "row of codes does not end on a byte");
}

/// One group quantized the way MLX does: the f32 scale and bias used for rounding (stored
/// rounded to the scales' dtype) and the codes.
pub fn quantize_group(w: &[f32], bits: u32, codes: &mut [u8]) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let (mut w_min, mut w_max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in w {
        w_min = w_min.min(x);
        w_max = w_max.max(x);
    }
    // MLX anchors the grid on the endpoint of larger magnitude so that it is represented exactly.
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    for (c, &x) in codes.iter_mut().zip(w) {
        *c = ((x - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u8;
    }
    (scale, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_read_every_width() {
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let codes: Vec<u8> = (0..64).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let mut packed = Vec::new();
            pack_codes(&codes, bits, &mut packed);
            assert_eq!(packed.len(), 64 * bits as usize / 8);
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(code_at(&packed, bits, i), c as u32, "bits {bits} code {i}");
            }
            let mut got = vec![0u8; 32];
            unpack_codes(&packed, bits, 32, &mut got);
            assert_eq!(got, codes[32..], "bits {bits} unpack");
            let mut odd = vec![0u8; 5];
            unpack_codes(&packed, bits, 8, &mut odd);
            assert_eq!(odd, codes[8..13], "bits {bits} unpack (ragged)");
        }
        // 4-bit: element 0 in the low nibble of byte 0 (MLX's uint32 order, little endian).
        let mut p = Vec::new();
        pack_codes(&[1, 2, 3, 4, 5, 6, 7, 8], 4, &mut p);
        assert_eq!(u32::from_le_bytes([p[0], p[1], p[2], p[3]]), 0x8765_4321);
    }

    #[test]
    fn quantize_group_reconstructs_the_anchor_exactly() {
        let w: Vec<f32> = (0..32)
            .map(|i| (i as f32 * 0.37).sin() * 2.0 - 0.5)
            .collect();
        let mut codes = vec![0u8; 32];
        let (s, b) = quantize_group(&w, 4, &mut codes);
        let max_abs = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let anchor = w.iter().copied().find(|x| x.abs() == max_abs).unwrap();
        assert!(w
            .iter()
            .zip(&codes)
            .any(|(&x, &c)| x == anchor && (s * c as f32 + b - x).abs() <= 1e-6 * max_abs));
        for (&x, &c) in w.iter().zip(&codes) {
            assert!((s * c as f32 + b - x).abs() <= s.abs() * 0.5 + 1e-6, "{x}");
        }
        // A constant group: zero bias, every code decodes to the value.
        let (s, b) = quantize_group(&[3.0; 32], 4, &mut codes);
        assert!(codes.iter().all(|&c| (s * c as f32 + b - 3.0).abs() < 1e-6));
    }
}
