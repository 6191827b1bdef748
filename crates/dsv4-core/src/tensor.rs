//! Raw tensors as stored in a checkpoint: a dtype, a shape, and a byte range of a shared buffer
//! (a memory-mapped shard or, for synthetic models, an owned vector). Nothing is converted on load.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Storage dtypes that occur in DeepSeek-V4 checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// FP8 e4m3fn codes.
    F8E4M3,
    /// Power-of-two scales, `2^(u-127)`.
    F8E8M0,
    /// Packed FP4 e2m1 (two per byte) in the official release, or plain int8.
    I8,
    U8,
    I32,
    I64,
    U32,
}

impl DType {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            DType::F8E4M3 | DType::F8E8M0 | DType::I8 | DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 => 8,
        }
    }

    /// Maps a safetensors dtype; anything else is rejected with its name.
    pub fn from_safetensors(d: safetensors::Dtype) -> std::result::Result<Self, String> {
        use safetensors::Dtype as S;
        Ok(match d {
            S::BF16 => DType::BF16,
            S::F16 => DType::F16,
            S::F32 => DType::F32,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E8M0 => DType::F8E8M0,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::U32 => DType::U32,
            other => return Err(format!("unsupported dtype {other:?}")),
        })
    }

    /// Name as safetensors spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::U32 => "U32",
        }
    }
}

/// A byte buffer tensors point into.
pub enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A stored tensor: dtype + shape + a byte range of shared storage.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub file: Arc<PathBuf>,
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Arc<Storage>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}{:?}", self.name, self.dtype.name(), self.shape)
    }
}

impl Tensor {
    /// A tensor over `storage[offset..offset+len]`; the caller guarantees the range is valid.
    pub fn new(
        name: String,
        file: Arc<PathBuf>,
        dtype: DType,
        shape: Vec<usize>,
        storage: Arc<Storage>,
        offset: usize,
        len: usize,
    ) -> Result<Self> {
        let expect = shape.iter().product::<usize>() * dtype.size();
        if expect != len || offset + len > storage.bytes().len() {
            return Err(Error::tensor(
                &name,
                format!(
                    "in {}: {} bytes for shape {:?} {} (expected {expect})",
                    file.display(),
                    len,
                    shape,
                    dtype.name()
                ),
            ));
        }
        Ok(Tensor {
            name,
            file,
            dtype,
            shape,
            storage,
            offset,
            len,
        })
    }

    /// The raw stored bytes (little endian).
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// An error about this tensor that names it and its file.
    pub fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::tensor(&self.name, format!("in {}: {reason}", self.file.display()))
    }

    /// Rows `[start, start+n)` of the tensor viewed as `[shape[0], rest...]` (a zero-copy view).
    pub fn slice_outer(&self, start: usize, n: usize) -> Result<Tensor> {
        let outer = *self
            .shape
            .first()
            .ok_or_else(|| self.err("cannot slice a scalar"))?;
        if start + n > outer {
            return Err(self.err(format!("slice {start}..{} out of {outer} rows", start + n)));
        }
        let row = self.len / outer.max(1);
        let mut shape = self.shape.clone();
        shape[0] = n;
        Ok(Tensor {
            name: format!("{}[{start}..{}]", self.name, start + n),
            file: self.file.clone(),
            dtype: self.dtype,
            shape,
            storage: self.storage.clone(),
            offset: self.offset + start * row,
            len: n * row,
        })
    }

    /// The same bytes under another shape with the same number of elements.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(self.err(format!("cannot view {:?} as {:?}", self.shape, shape)));
        }
        Ok(Tensor {
            shape,
            ..self.clone()
        })
    }

    /// Decodes a float tensor (BF16/F16/F32) to f32. For small tensors (norms, biases, hc params).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F8E8M0 => b.iter().map(|&u| e8m0_to_f32(u)).collect(),
            d => return Err(self.err(format!("expected a float tensor, found {}", d.name()))),
        })
    }

    /// Decodes an integer tensor (I32/I64/U32/U8) to i64.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect(),
            DType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            DType::U32 => b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            DType::U8 => b.iter().map(|&x| x as i64).collect(),
            d => return Err(self.err(format!("expected an integer tensor, found {}", d.name()))),
        })
    }
}

/// bfloat16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bfloat16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// E8M0 scale byte to f32: `2^(u-127)`; 255 is NaN.
#[inline]
pub fn e8m0_to_f32(u: u8) -> f32 {
    match u {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000), // 2^-127, an f32 subnormal
        u => f32::from_bits((u as u32) << 23),
    }
}

/// FP8 e4m3fn byte to f32 (exact; 0x7f/0xff are NaN).
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_LUT[b as usize]
}

/// FP4 e2m1 nibble values (sign = bit 3).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

const fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && (b & 7) == 7 {
        return f32::NAN;
    }
    // value = (e == 0 ? m/8 * 2^-6 : (1 + m/8) * 2^(e-7)); powers of two built exactly
    let (mant, exp) = if e == 0 {
        (m / 8.0, -6)
    } else {
        (1.0 + m / 8.0, e - 7)
    };
    let mut p = 1.0f32;
    let mut i = 0;
    if exp >= 0 {
        while i < exp {
            p *= 2.0;
            i += 1;
        }
    } else {
        while i < -exp {
            p *= 0.5;
            i += 1;
        }
    }
    sign * mant * p
}

const fn build_e4m3_lut() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode(i as u8);
        i += 1;
    }
    t
}

/// Every e4m3fn byte decoded.
pub static E4M3_LUT: [f32; 256] = build_e4m3_lut();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // e=7, m=0
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // max finite
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
    }

    #[test]
    fn e8m0_and_bf16() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
    }
}
