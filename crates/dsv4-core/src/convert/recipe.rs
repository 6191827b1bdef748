//! `--quant` recipes: which MLX mode each module of an official checkpoint is converted to.

use crate::error::{Error, Result};
use crate::quant::{QuantMode, AFFINE_BITS, AFFINE_GROUPS};

/// A conversion recipe: one mode for everything, or attention/shared/embedding/head at one mode
/// and the routed experts at another (`mixed-8-4`, `mixed-8-mxfp4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recipe {
    /// Attention, indexer `wq_b`, shared experts, embedding, lm head.
    pub dense: QuantMode,
    /// Routed experts (the bulk of the weights).
    pub routed: QuantMode,
}

fn one(s: &str, group: usize) -> Result<QuantMode> {
    let bad = || {
        Error::Config(format!(
            "quant type `{s}` is not supported: use q2, q3, q4, q5, q6, q8, mxfp4 or mxfp8"
        ))
    };
    match s {
        "mxfp4" => Ok(QuantMode::Mxfp4),
        "mxfp8" => Ok(QuantMode::Mxfp8),
        _ => {
            let bits: u32 = s
                .strip_prefix('q')
                .unwrap_or(s)
                .parse()
                .map_err(|_| bad())?;
            if !AFFINE_BITS.contains(&bits) {
                return Err(bad());
            }
            QuantMode::new("affine", bits, group)
        }
    }
}

impl Recipe {
    /// Parses `q4`, `q8`, `mxfp4`, `mxfp8`, `mixed-A-E` (A, E: 2…8 or mxfp4/mxfp8); `group`
    /// applies to affine modes.
    pub fn parse(s: &str, group: usize) -> Result<Self> {
        if !AFFINE_GROUPS.contains(&group) {
            return Err(Error::Config(format!(
                "group size {group} is not supported (MLX supports {AFFINE_GROUPS:?})"
            )));
        }
        if let Some(rest) = s.strip_prefix("mixed-") {
            let (a, e) = rest.split_once('-').ok_or_else(|| {
                Error::Config(format!(
                    "`{s}`: a mixed recipe is mixed-DENSE-ROUTED, e.g. mixed-8-4 or mixed-8-mxfp4"
                ))
            })?;
            return Ok(Recipe {
                dense: one(a, group)?,
                routed: one(e, group)?,
            });
        }
        let m = one(s, group)?;
        Ok(Recipe {
            dense: m,
            routed: m,
        })
    }

    /// The mode of an official module (`layers.3.ffn.experts.7.w1`, `embed`, …).
    pub fn mode_for(&self, module: &str) -> QuantMode {
        if module.contains(".ffn.experts.") {
            self.routed
        } else {
            self.dense
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recipes() {
        let r = Recipe::parse("q4", 64).unwrap();
        assert_eq!(r.routed, QuantMode::Affine { bits: 4, group: 64 });
        let r = Recipe::parse("mixed-8-mxfp4", 32).unwrap();
        assert_eq!(r.dense, QuantMode::Affine { bits: 8, group: 32 });
        assert_eq!(r.mode_for("layers.0.ffn.experts.3.w2"), QuantMode::Mxfp4);
        assert_eq!(r.mode_for("layers.0.ffn.shared_experts.w2"), r.dense);
        assert!(Recipe::parse("q7", 64).is_err());
        assert!(Recipe::parse("q4", 48).is_err());
        assert!(Recipe::parse("mixed-8", 64).is_err());
        assert!(Recipe::parse("nf4", 64).is_err());
    }
}
