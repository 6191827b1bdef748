//! Per-sequence state for incremental decoding. Everything a token contributes depends only on
//! absolute positions, so feeding a prompt in any chunking gives the one-call result.
//! The state is plain data (`Clone`): a snapshot at any point is a prefix cache entry.
//!
//! Rows (window K=V rows, compressed entries, indexer keys) live in a [`RowStore`] whose format
//! follows the numerics profile: f32 (reference), or the official compact formats — FP8 e4m3
//! nope channels with an e8m0 scale per 64 plus f32 rotary channels, and FP4 e2m1 (two per byte)
//! with an e8m0 scale per 32 for the Hadamard-rotated indexer keys.

use crate::numerics::{self, FP4_BLOCK, KV_BLOCK};
use crate::tensor::{e8m0_to_f32, E2M1_VALUES};

/// How a [`RowStore`] keeps its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    F32,
    /// The first `dim - rope` channels as e4m3 + e8m0 per 64; the last `rope` channels f32.
    Fp8Nope {
        rope: usize,
    },
    /// e2m1 codes, two per byte, + e8m0 per 32.
    Fp4,
}

/// A growable (or ring) array of rows of width `dim` in a storage format.
#[derive(Clone, Debug)]
pub struct RowStore {
    pub dim: usize,
    pub format: RowFormat,
    rows: usize,
    f32s: Vec<f32>,
    codes: Vec<u8>,
    scales: Vec<u8>,
}

impl RowStore {
    pub fn new(dim: usize, format: RowFormat) -> Self {
        RowStore {
            dim,
            format,
            rows: 0,
            f32s: Vec::new(),
            codes: Vec::new(),
            scales: Vec::new(),
        }
    }

    /// Number of rows held.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rounds `row` in place to exactly the values this format stores (identity for f32).
    /// Callers round before using a row so this call's attention sees the cached values.
    pub fn round(&self, row: &mut [f32]) {
        match self.format {
            RowFormat::F32 => {}
            RowFormat::Fp8Nope { rope } => {
                let nope = self.dim - rope;
                numerics::fp8_round_trip(&mut row[..nope], KV_BLOCK);
            }
            RowFormat::Fp4 => numerics::fp4_round_trip(row, FP4_BLOCK),
        }
    }

    /// Per-row sizes of the three buffers.
    fn strides(&self) -> (usize, usize, usize) {
        match self.format {
            RowFormat::F32 => (self.dim, 0, 0),
            RowFormat::Fp8Nope { rope } => {
                let nope = self.dim - rope;
                (rope, nope, nope.div_ceil(KV_BLOCK))
            }
            RowFormat::Fp4 => (0, self.dim.div_ceil(2), self.dim.div_ceil(FP4_BLOCK)),
        }
    }

    /// Appends a row (already [`round`](Self::round)ed when the format is not f32).
    pub fn push(&mut self, row: &[f32]) {
        let (f, c, s) = self.strides();
        self.f32s.resize(self.f32s.len() + f, 0.0);
        self.codes.resize(self.codes.len() + c, 0);
        self.scales.resize(self.scales.len() + s, 0);
        self.rows += 1;
        self.set(self.rows - 1, row);
    }

    /// Makes room for `n` rows (a ring buffer of fixed size).
    pub fn reserve_rows(&mut self, n: usize) {
        while self.rows < n {
            let zero = vec![0f32; self.dim];
            self.push(&zero);
        }
    }

    /// Overwrites row `i`.
    pub fn set(&mut self, i: usize, row: &[f32]) {
        debug_assert_eq!(row.len(), self.dim);
        let (f, c, s) = self.strides();
        match self.format {
            RowFormat::F32 => self.f32s[i * f..(i + 1) * f].copy_from_slice(row),
            RowFormat::Fp8Nope { rope } => {
                let nope = self.dim - rope;
                let (codes, scales) = numerics::fp8_quantize(&row[..nope], KV_BLOCK);
                self.codes[i * c..(i + 1) * c].copy_from_slice(&codes);
                self.scales[i * s..(i + 1) * s].copy_from_slice(&scales);
                self.f32s[i * f..(i + 1) * f].copy_from_slice(&row[nope..]);
            }
            RowFormat::Fp4 => {
                let (codes, scales) = numerics::fp4_quantize(row, FP4_BLOCK);
                let packed = &mut self.codes[i * c..(i + 1) * c];
                for (j, p) in packed.iter_mut().enumerate() {
                    let hi = codes.get(2 * j + 1).copied().unwrap_or(0);
                    *p = codes[2 * j] | (hi << 4);
                }
                self.scales[i * s..(i + 1) * s].copy_from_slice(&scales);
            }
        }
    }

    /// Decodes row `i` into `out`.
    pub fn get(&self, i: usize, out: &mut [f32]) {
        let (f, c, s) = self.strides();
        match self.format {
            RowFormat::F32 => out.copy_from_slice(&self.f32s[i * f..(i + 1) * f]),
            RowFormat::Fp8Nope { rope } => {
                let nope = self.dim - rope;
                numerics::fp8_dequantize(
                    &self.codes[i * c..(i + 1) * c],
                    &self.scales[i * s..(i + 1) * s],
                    KV_BLOCK,
                    &mut out[..nope],
                );
                out[nope..].copy_from_slice(&self.f32s[i * f..(i + 1) * f]);
            }
            RowFormat::Fp4 => {
                let packed = &self.codes[i * c..(i + 1) * c];
                let scales = &self.scales[i * s..(i + 1) * s];
                for (j, o) in out.iter_mut().enumerate() {
                    let nib = (packed[j / 2] >> (4 * (j % 2))) & 15;
                    *o = E2M1_VALUES[nib as usize] * e8m0_to_f32(scales[j / FP4_BLOCK]);
                }
            }
        }
    }

    /// All rows as one f32 slice, when stored as f32 (no copy needed).
    pub fn as_f32(&self) -> Option<&[f32]> {
        (self.format == RowFormat::F32).then_some(&self.f32s[..])
    }

    /// Decodes the given rows, in order, into one `[idx.len(), dim]` buffer.
    pub fn gather(&self, idx: impl Iterator<Item = usize>) -> Vec<f32> {
        let mut out = Vec::new();
        let mut row = vec![0f32; self.dim];
        for i in idx {
            self.get(i, &mut row);
            out.extend_from_slice(&row);
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.f32s.len() * 4 + self.codes.len() + self.scales.len()
    }
}

/// Compressor state: rows of the open window, emitted entries, and (CSA) the previous window's
/// first halves.
#[derive(Clone, Debug)]
pub struct CompressorState {
    /// Projected kv rows of tokens after the last complete window, `[rows, width]`.
    pub buf_kv: Vec<f32>,
    /// Projected gate rows (without ape), `[rows, width]`.
    pub buf_gate: Vec<f32>,
    /// Emitted entries (normed, rotated, and in the official profile rounded/rotated).
    pub entries: RowStore,
    /// CSA overlap: the last complete window's A-halves, kv and gate+ape, `[ratio, dim]` each.
    pub overlap: Option<(Vec<f32>, Vec<f32>)>,
}

impl CompressorState {
    pub fn new(entries: RowStore) -> Self {
        CompressorState {
            buf_kv: Vec::new(),
            buf_gate: Vec::new(),
            entries,
            overlap: None,
        }
    }

    fn bytes(&self) -> usize {
        (self.buf_kv.len() + self.buf_gate.len()) * 4
            + self.entries.bytes()
            + self
                .overlap
                .as_ref()
                .map_or(0, |(a, b)| (a.len() + b.len()) * 4)
    }
}

/// State of one layer.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// Ring buffer of window K=V rows; slot `pos % window`.
    pub window: RowStore,
    pub compressor: Option<CompressorState>,
    pub indexer: Option<CompressorState>,
}

/// The whole state of one sequence.
#[derive(Clone, Debug)]
pub struct SeqCache {
    /// Tokens processed so far (the next token's position).
    pub pos: usize,
    pub layers: Vec<LayerCache>,
}

impl SeqCache {
    /// Bytes held by this sequence's state.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.window.bytes()
                    + l.compressor.as_ref().map_or(0, |c| c.bytes())
                    + l.indexer.as_ref().map_or(0, |c| c.bytes())
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_hold_exactly_the_rounded_rows() {
        let row: Vec<f32> = (0..96)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) * 0.11)
            .collect();
        for format in [
            RowFormat::F32,
            RowFormat::Fp8Nope { rope: 32 },
            RowFormat::Fp4,
        ] {
            let mut s = RowStore::new(96, format);
            let mut r = row.clone();
            s.round(&mut r);
            s.push(&r);
            s.push(&r);
            let mut back = vec![0f32; 96];
            s.get(1, &mut back);
            assert_eq!(back, r, "{format:?}");
            if let RowFormat::Fp8Nope { rope } = format {
                assert_eq!(
                    r[96 - rope..],
                    row[96 - rope..],
                    "rotary channels untouched"
                );
            }
        }
        // Official formats are compact: 64 FP8 + 1 scale + 32 f32 vs 96 f32.
        let mut s = RowStore::new(96, RowFormat::Fp8Nope { rope: 32 });
        s.push(&row);
        assert_eq!(s.bytes(), 64 + 1 + 32 * 4);
    }
}
