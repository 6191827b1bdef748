//! MLX quantization formats (what mlx-community checkpoints store) and MLX's own quantizers.
//!
//! * affine: per row, each run of `group` inputs has a scale and a bias (bf16/f16/f32);
//!   `w = scale·q + bias` with `q` a `bits`-wide code; codes form a little-endian bit stream per
//!   row packed into `uint32` (element 0 in the lowest bits).
//! * mxfp4: e2m1 codes, 8 per `uint32` (low nibble first), one e8m0 scale byte per 32 inputs.
//! * mxfp8: e4m3 codes, 4 per `uint32`, one e8m0 scale byte per 32 inputs.
//!
//! The quantizers reproduce `mlx.core.quantize` bit for bit (checked against mlx 0.32 by
//! `tools/make_mlx_fixtures.py` and the committed fixtures).

pub mod affine;
pub mod config;
pub mod mx;

use crate::error::{Error, Result};

/// One MLX quantization mode with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantMode {
    Affine { bits: u32, group: usize },
    Mxfp4,
    Mxfp8,
}

/// Bits MLX's affine mode supports.
pub const AFFINE_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes MLX's affine mode supports.
pub const AFFINE_GROUPS: [usize; 3] = [32, 64, 128];
/// The group size of both microscaling modes.
pub const MX_GROUP: usize = 32;

impl QuantMode {
    /// Validates an MLX `(mode, bits, group_size)` triple.
    pub fn new(mode: &str, bits: u32, group: usize) -> Result<Self> {
        let bad = |why: String| Err(Error::Config(format!("quantization: {why}")));
        match mode {
            "affine" => {
                if !AFFINE_BITS.contains(&bits) {
                    return bad(format!(
                        "affine bits {bits} is not supported (MLX supports {AFFINE_BITS:?})"
                    ));
                }
                if !AFFINE_GROUPS.contains(&group) {
                    return bad(format!(
                        "affine group size {group} is not supported (MLX supports {AFFINE_GROUPS:?})"
                    ));
                }
                Ok(QuantMode::Affine { bits, group })
            }
            "mxfp4" | "mxfp8" => {
                let want = if mode == "mxfp4" { 4 } else { 8 };
                if bits != want || group != MX_GROUP {
                    return bad(format!(
                        "{mode} needs bits {want} and group size {MX_GROUP}, got bits {bits}, group size {group}"
                    ));
                }
                Ok(if want == 4 {
                    QuantMode::Mxfp4
                } else {
                    QuantMode::Mxfp8
                })
            }
            other => bad(format!(
                "mode `{other}` is not supported (expected affine, mxfp4 or mxfp8)"
            )),
        }
    }

    /// Bits of one code.
    pub fn bits(self) -> u32 {
        match self {
            QuantMode::Affine { bits, .. } => bits,
            QuantMode::Mxfp4 => 4,
            QuantMode::Mxfp8 => 8,
        }
    }

    /// Inputs sharing one scale.
    pub fn group(self) -> usize {
        match self {
            QuantMode::Affine { group, .. } => group,
            _ => MX_GROUP,
        }
    }

    /// MLX's name for the mode.
    pub fn mode_name(self) -> &'static str {
        match self {
            QuantMode::Affine { .. } => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
        }
    }

    /// Stored bits per weight including scales (and biases), for a scale dtype of `scale_bytes`.
    pub fn bits_per_weight(self, scale_bytes: usize) -> f64 {
        let g = self.group() as f64;
        match self {
            QuantMode::Affine { bits, .. } => bits as f64 + 2.0 * 8.0 * scale_bytes as f64 / g,
            _ => self.bits() as f64 + 8.0 / g,
        }
    }

    /// `u32` words of one packed row of `inp` inputs.
    pub fn packed_cols(self, inp: usize) -> usize {
        inp * self.bits() as usize / 32
    }

    /// Whether a row of `inp` inputs can be stored in this mode.
    pub fn fits(self, inp: usize) -> bool {
        inp.is_multiple_of(self.group()) && (inp * self.bits() as usize).is_multiple_of(32)
    }

    /// A short label such as `affine q4/g64`, `mxfp4`.
    pub fn label(self) -> String {
        match self {
            QuantMode::Affine { bits, group } => format!("affine q{bits}/g{group}"),
            m => m.mode_name().to_string(),
        }
    }
}
