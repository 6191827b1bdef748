//! `config.json` in both shapes people download: the official deepseek-ai one (`compress_ratios`,
//! `num_hash_layers`, `rope_scaling`, `qk_rope_head_dim`, ...) and the transformers one
//! (`layer_types`, `compress_rates`, `mlp_layer_types`, `rope_parameters`). Both are folded into
//! one typed [`ModelConfig`], validated once.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Attention flavour of one layer. Every layer also has the sliding-window branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    /// Sliding window only (official ratio 0).
    Sliding,
    /// Compressed entries every `ratio` tokens. `sparse` is compressed-sparse attention (CSA:
    /// overlapping windows + lightning indexer top-k); otherwise heavily compressed attention
    /// (HCA: no overlap, every visible entry attended). In the official `compress_ratios`, 4 means
    /// CSA and any other non-zero ratio HCA; transformers' `layer_types` name the kind.
    Compressed { ratio: usize, sparse: bool },
}

impl AttnKind {
    /// Compression ratio, `None` for sliding layers.
    pub fn ratio(self) -> Option<usize> {
        match self {
            AttnKind::Sliding => None,
            AttnKind::Compressed { ratio, .. } => Some(ratio),
        }
    }
    /// CSA layers (ratio 4) have overlapping compressor windows and an indexer.
    pub fn is_csa(self) -> bool {
        matches!(self, AttnKind::Compressed { sparse: true, .. })
    }
    /// Short label for schedules and logs.
    pub fn label(self) -> String {
        match self {
            AttnKind::Sliding => "sliding".into(),
            AttnKind::Compressed {
                ratio,
                sparse: true,
            } => format!("csa/{ratio}"),
            AttnKind::Compressed {
                ratio,
                sparse: false,
            } => format!("hca/{ratio}"),
        }
    }
}

/// The ratio that means compressed-sparse attention with the lightning indexer.
pub const CSA_RATIO: usize = 4;

/// Routing of one MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// Experts from the frozen `tid2eid[token]` table.
    Hash,
    /// Learned top-k with selection bias.
    TopK,
}

/// YaRN frequency blend for the compressed layers' RoPE table.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Floor/ceil the correction range (transformers' `truncate`, default true).
    pub truncate: bool,
    /// cos/sin multiplier; DeepSeek-V4 uses 1.0 (no YaRN magnitude scaling).
    pub attention_factor: f64,
}

/// A RoPE table: base and optional YaRN scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// Weight quantization declared by the checkpoint (`quantization_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    pub method: String,
    pub fmt: String,
    pub scale_fmt: String,
    pub block: [usize; 2],
    pub expert_dtype: Option<String>,
}

/// Everything the engine needs to know about a DeepSeek-V4 model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Rotary channels: the *last* `rope_dim` channels of each head.
    pub rope_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub sliding_window: usize,
    pub attn_kinds: Vec<AttnKind>,
    pub mlp_kinds: Vec<MlpKind>,
    pub rope_main: RopeSpec,
    pub rope_compress: RopeSpec,
    pub max_position_embeddings: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub rms_norm_eps: f32,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: usize,
    pub routed_scaling_factor: f32,
    /// SwiGLU clamp; `None` (`null` in the file) disables it.
    pub swiglu_limit: Option<f32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quant: Option<QuantConfig>,
    /// MLX checkpoints: the `quantization` section (default mode + per-module overrides).
    pub mlx_quant: Option<crate::quant::config::MlxQuantConfig>,
}

fn get<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn req_usize(m: &Map<String, Value>, key: &str) -> Result<usize> {
    opt_usize(m, key)?.ok_or_else(|| Error::Config(format!("missing field `{key}`")))
}

fn opt_usize(m: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match get(m, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            Error::Config(format!(
                "field `{key}` must be a non-negative integer, got {v}"
            ))
        }),
    }
}

fn opt_f64(m: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match get(m, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::Config(format!("field `{key}` must be a number, got {v}"))),
    }
}

fn f64_or(m: &Map<String, Value>, key: &str, default: f64) -> Result<f64> {
    Ok(opt_f64(m, key)?.unwrap_or(default))
}

fn usize_or(m: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    Ok(opt_usize(m, key)?.unwrap_or(default))
}

fn token_ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    let bad = || {
        Error::Config(format!(
            "field `{key}` must be a token id or a list of them"
        ))
    };
    match v {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(bad))
            .collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]).ok_or_else(bad),
    }
}

fn parse_yarn(m: &Map<String, Value>) -> Result<Option<Yarn>> {
    let kind = get(m, "rope_type")
        .or_else(|| get(m, "type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "yarn" => Ok(Some(Yarn {
            factor: f64_or(m, "factor", 1.0)?,
            original_max_position_embeddings: opt_f64(m, "original_max_position_embeddings")?
                .ok_or_else(|| {
                    Error::Config("yarn rope needs `original_max_position_embeddings`".into())
                })?,
            beta_fast: f64_or(m, "beta_fast", 32.0)?,
            beta_slow: f64_or(m, "beta_slow", 1.0)?,
            truncate: get(m, "truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            attention_factor: f64_or(m, "attention_factor", 1.0)?,
        })),
        other => Err(Error::Config(format!(
            "rope type `{other}` is not supported (DeepSeek-V4 uses default or yarn)"
        ))),
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&v).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    /// Builds a config from a parsed `config.json` value (either style).
    pub fn from_json(v: &Value) -> Result<Self> {
        let m = v
            .as_object()
            .ok_or_else(|| Error::Config("config.json must be a JSON object".into()))?;
        if let Some(mt) = get(m, "model_type").and_then(|v| v.as_str()) {
            if mt != "deepseek_v4" {
                return Err(Error::Config(format!(
                    "model_type `{mt}` is not supported (expected `deepseek_v4`)"
                )));
            }
        }
        let num_layers = req_usize(m, "num_hidden_layers")?;
        let head_dim = usize_or(m, "head_dim", 512)?;

        // Rotary width: official `qk_rope_head_dim`, else transformers' `partial_rotary_factor`.
        let rope_dim = match opt_usize(m, "qk_rope_head_dim")? {
            Some(r) => r,
            None => {
                let f = opt_f64(m, "partial_rotary_factor")?.unwrap_or(64.0 / 512.0);
                (head_dim as f64 * f).round() as usize
            }
        };

        let attn_kinds = Self::parse_attn_schedule(m, num_layers)?;
        let mlp_kinds = Self::parse_mlp_schedule(m, num_layers)?;
        let (rope_main, rope_compress) = Self::parse_rope(m)?;

        let mlx_quant = get(m, "quantization")
            .map(crate::quant::config::MlxQuantConfig::from_json)
            .transpose()?;
        let quant = match get(m, "quantization_config") {
            None => None,
            // mlx-lm mirrors its `quantization` section here (no `quant_method`); not FP8.
            Some(Value::Object(q)) if !q.contains_key("quant_method") && q.contains_key("bits") => {
                None
            }
            Some(Value::Object(q)) => {
                let block = match get(q, "weight_block_size") {
                    None => [128, 128],
                    Some(Value::Array(a)) if a.len() == 2 => {
                        let d = |i: usize| a[i].as_u64().map(|x| x as usize);
                        match (d(0), d(1)) {
                            (Some(a), Some(b)) if a > 0 && b > 0 => [a, b],
                            _ => {
                                return Err(Error::Config(
                                    "`weight_block_size` must be two positive integers".into(),
                                ))
                            }
                        }
                    }
                    Some(_) => {
                        return Err(Error::Config(
                            "`weight_block_size` must be two positive integers".into(),
                        ))
                    }
                };
                let s =
                    |k: &str, d: &str| get(q, k).and_then(|v| v.as_str()).unwrap_or(d).to_string();
                Some(QuantConfig {
                    method: s("quant_method", "fp8"),
                    fmt: s("fmt", "e4m3"),
                    scale_fmt: s("scale_fmt", "ue8m0"),
                    block,
                    expert_dtype: get(q, "expert_dtype")
                        .or_else(|| get(m, "expert_dtype"))
                        .and_then(|v| v.as_str())
                        .map(str::to_string),
                })
            }
            Some(_) => {
                return Err(Error::Config(
                    "`quantization_config` must be an object".into(),
                ))
            }
        };

        // transformers clamps at whatever value is given (0 included); only an explicit null
        // disables the clamp.
        let swiglu = match m.get("swiglu_limit") {
            Some(Value::Null) => None,
            _ => Some(f64_or(m, "swiglu_limit", 10.0)? as f32),
        };
        let cfg = ModelConfig {
            vocab_size: req_usize(m, "vocab_size")?,
            hidden_size: req_usize(m, "hidden_size")?,
            num_layers,
            num_heads: req_usize(m, "num_attention_heads")?,
            head_dim,
            rope_dim,
            q_lora_rank: req_usize(m, "q_lora_rank")?,
            o_groups: req_usize(m, "o_groups")?,
            o_lora_rank: req_usize(m, "o_lora_rank")?,
            sliding_window: usize_or(m, "sliding_window", 128)?,
            attn_kinds,
            mlp_kinds,
            rope_main,
            rope_compress,
            max_position_embeddings: usize_or(m, "max_position_embeddings", 1 << 20)?,
            index_n_heads: usize_or(m, "index_n_heads", 64)?,
            index_head_dim: usize_or(m, "index_head_dim", 128)?,
            index_topk: usize_or(m, "index_topk", 512)?,
            hc_mult: usize_or(m, "hc_mult", 4)?,
            hc_sinkhorn_iters: usize_or(m, "hc_sinkhorn_iters", 20)?,
            hc_eps: f64_or(m, "hc_eps", 1e-6)? as f32,
            rms_norm_eps: f64_or(m, "rms_norm_eps", 1e-6)? as f32,
            n_routed_experts: req_usize(m, "n_routed_experts")?,
            num_experts_per_tok: req_usize(m, "num_experts_per_tok")?,
            moe_intermediate_size: req_usize(m, "moe_intermediate_size")?,
            n_shared_experts: usize_or(m, "n_shared_experts", 1)?,
            routed_scaling_factor: f64_or(m, "routed_scaling_factor", 1.0)? as f32,
            swiglu_limit: swiglu,
            bos_token_id: token_ids(get(m, "bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(get(m, "eos_token_id"), "eos_token_id")?,
            quant,
            mlx_quant,
        };
        if let Some(s) = get(m, "scoring_func").and_then(|v| v.as_str()) {
            if s != "sqrtsoftplus" {
                return Err(Error::Config(format!(
                    "scoring_func `{s}` is not supported (DeepSeek-V4 uses sqrtsoftplus)"
                )));
            }
        }
        let kv_heads = usize_or(m, "num_key_value_heads", 1)?;
        if kv_heads != 1 {
            return Err(Error::Config(format!(
                "num_key_value_heads must be 1 (DeepSeek-V4 shares one K=V head), got {kv_heads}"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_attn_schedule(m: &Map<String, Value>, n: usize) -> Result<Vec<AttnKind>> {
        let kinds: Vec<AttnKind> = if let Some(lt) = get(m, "layer_types") {
            // transformers style: names + a rate per compressed type.
            let rates = get(m, "compress_rates").and_then(|v| v.as_object());
            let rate = |key: &str, legacy: &str, default: usize| -> Result<usize> {
                if let Some(r) = rates.and_then(|r| get(r, key)) {
                    return r.as_u64().map(|x| x as usize).ok_or_else(|| {
                        Error::Config(format!("compress_rates.{key} must be an integer"))
                    });
                }
                usize_or(m, legacy, default)
            };
            let csa = rate("compressed_sparse_attention", "compress_rate_csa", 4)?;
            let hca = rate("heavily_compressed_attention", "compress_rate_hca", 128)?;
            let arr = lt
                .as_array()
                .ok_or_else(|| Error::Config("`layer_types` must be a list".into()))?;
            arr.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(AttnKind::Sliding),
                    Some("compressed_sparse_attention") => Ok(AttnKind::Compressed {
                        ratio: csa,
                        sparse: true,
                    }),
                    Some("heavily_compressed_attention") => Ok(AttnKind::Compressed {
                        ratio: hca,
                        sparse: false,
                    }),
                    _ => Err(Error::Config(format!(
                        "unknown layer type {t} in `layer_types`"
                    ))),
                })
                .collect::<Result<_>>()?
        } else if let Some(cr) = get(m, "compress_ratios") {
            // official style: one ratio per layer (+ a trailing MTP entry).
            let arr = cr
                .as_array()
                .ok_or_else(|| Error::Config("`compress_ratios` must be a list".into()))?;
            arr.iter()
                .map(|r| match r.as_u64() {
                    Some(0) => Ok(AttnKind::Sliding),
                    Some(r) => Ok(AttnKind::Compressed {
                        ratio: r as usize,
                        sparse: r as usize == CSA_RATIO,
                    }),
                    None => Err(Error::Config(format!("bad entry {r} in `compress_ratios`"))),
                })
                .collect::<Result<_>>()?
        } else {
            return Err(Error::Config(
                "neither `compress_ratios` nor `layer_types` is given: the attention schedule must be explicit".into(),
            ));
        };
        if kinds.len() < n {
            return Err(Error::Config(format!(
                "attention schedule has {} entries for {n} layers",
                kinds.len()
            )));
        }
        Ok(kinds[..n].to_vec())
    }

    fn parse_mlp_schedule(m: &Map<String, Value>, n: usize) -> Result<Vec<MlpKind>> {
        if let Some(lt) = get(m, "mlp_layer_types") {
            let arr = lt
                .as_array()
                .ok_or_else(|| Error::Config("`mlp_layer_types` must be a list".into()))?;
            let kinds: Vec<MlpKind> = arr
                .iter()
                .map(|t| match t.as_str() {
                    Some("hash_moe") => Ok(MlpKind::Hash),
                    Some("moe") => Ok(MlpKind::TopK),
                    _ => Err(Error::Config(format!(
                        "unknown entry {t} in `mlp_layer_types`"
                    ))),
                })
                .collect::<Result<_>>()?;
            if kinds.len() < n {
                return Err(Error::Config(format!(
                    "`mlp_layer_types` has {} entries for {n} layers",
                    kinds.len()
                )));
            }
            return Ok(kinds[..n].to_vec());
        }
        let hash = usize_or(m, "num_hash_layers", 3)?;
        Ok((0..n)
            .map(|i| {
                if i < hash {
                    MlpKind::Hash
                } else {
                    MlpKind::TopK
                }
            })
            .collect())
    }

    fn parse_rope(m: &Map<String, Value>) -> Result<(RopeSpec, RopeSpec)> {
        let theta = f64_or(m, "rope_theta", 10000.0)?;
        let ctheta = f64_or(m, "compress_rope_theta", 160000.0)?;
        if let Some(Value::Object(rp)) = get(m, "rope_parameters") {
            if let (Some(Value::Object(main)), Some(Value::Object(comp))) =
                (get(rp, "main"), get(rp, "compress"))
            {
                let main = RopeSpec {
                    theta: f64_or(main, "rope_theta", theta)?,
                    yarn: parse_yarn(main)?,
                };
                let comp = RopeSpec {
                    theta: f64_or(comp, "rope_theta", ctheta)?,
                    yarn: parse_yarn(comp)?,
                };
                return Ok((main, comp));
            }
            // A flat rope_parameters dict describes the compressed layers' scaling.
            return Ok((
                RopeSpec { theta, yarn: None },
                RopeSpec {
                    theta: ctheta,
                    yarn: parse_yarn(rp)?,
                },
            ));
        }
        let yarn = match get(m, "rope_scaling") {
            Some(Value::Object(rs)) => parse_yarn(rs)?,
            Some(_) => return Err(Error::Config("`rope_scaling` must be an object".into())),
            None => None,
        };
        Ok((
            RopeSpec { theta, yarn: None },
            RopeSpec {
                theta: ctheta,
                yarn,
            },
        ))
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
        {
            return bad("vocab_size, hidden_size, num_hidden_layers and num_attention_heads must be positive".into());
        }
        if self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return bad(format!(
                "rotary dims ({}) must be even and at most head_dim ({})",
                self.rope_dim, self.head_dim
            ));
        }
        if self.o_groups == 0 || !self.num_heads.is_multiple_of(self.o_groups) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of o_groups ({})",
                self.num_heads, self.o_groups
            ));
        }
        if self.hc_mult == 0 || self.hc_sinkhorn_iters == 0 {
            return bad("hc_mult and hc_sinkhorn_iters must be positive".into());
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
            return bad(format!(
                "num_experts_per_tok ({}) must be in 1..=n_routed_experts ({})",
                self.num_experts_per_tok, self.n_routed_experts
            ));
        }
        if self.sliding_window == 0 {
            return bad("sliding_window must be positive".into());
        }
        let bad_indexer =
            self.index_head_dim < self.rope_dim || self.index_n_heads == 0 || self.index_topk == 0;
        if bad_indexer && self.attn_kinds.iter().any(|k| k.is_csa()) {
            return bad(
                "indexer needs index_n_heads > 0, index_topk > 0 and index_head_dim >= rotary dims"
                    .into(),
            );
        }
        if let Some(r) = self
            .attn_kinds
            .iter()
            .filter_map(|k| k.ratio())
            .find(|&r| r < 2)
        {
            return bad(format!(
                "compression ratio {r} is not supported (must be 0 or at least 2)"
            ));
        }
        if let Some(q) = &self.quant {
            if q.method != "fp8" {
                return bad(format!(
                    "quant_method `{}` is not supported (expected fp8)",
                    q.method
                ));
            }
        }
        Ok(())
    }

    /// Number of routed experts each token is sent to.
    pub fn topk(&self) -> usize {
        self.num_experts_per_tok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn official() -> Value {
        json!({
            "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096,
            "num_hidden_layers": 4, "num_attention_heads": 64, "num_key_value_heads": 1,
            "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
            "o_lora_rank": 1024, "sliding_window": 128, "compress_ratios": [0, 4, 128, 4, 0],
            "num_hash_layers": 3, "rope_theta": 10000, "compress_rope_theta": 160000,
            "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1},
            "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
            "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "scoring_func": "sqrtsoftplus",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                    "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
            "expert_dtype": "fp4", "bos_token_id": 0, "eos_token_id": 1
        })
    }

    #[test]
    fn official_style() {
        let c = ModelConfig::from_json(&official()).unwrap();
        assert_eq!(c.rope_dim, 64);
        assert_eq!(
            c.attn_kinds,
            vec![
                AttnKind::Sliding,
                AttnKind::Compressed {
                    ratio: 4,
                    sparse: true
                },
                AttnKind::Compressed {
                    ratio: 128,
                    sparse: false
                },
                AttnKind::Compressed {
                    ratio: 4,
                    sparse: true
                }
            ]
        );
        assert_eq!(c.mlp_kinds[..3], [MlpKind::Hash; 3]);
        assert_eq!(c.mlp_kinds[3], MlpKind::TopK);
        let y = c.rope_compress.yarn.as_ref().unwrap();
        assert_eq!(
            (y.factor, y.original_max_position_embeddings),
            (16.0, 65536.0)
        );
        assert!(c.rope_main.yarn.is_none());
        assert_eq!(
            c.quant.as_ref().unwrap().expert_dtype.as_deref(),
            Some("fp4")
        );
    }

    #[test]
    fn transformers_style() {
        let mut v = official();
        let m = v.as_object_mut().unwrap();
        for k in [
            "compress_ratios",
            "num_hash_layers",
            "qk_rope_head_dim",
            "rope_scaling",
        ] {
            m.remove(k);
        }
        m.insert(
            "layer_types".into(),
            json!([
                "sliding_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
                "heavily_compressed_attention"
            ]),
        );
        m.insert(
            "compress_rates".into(),
            json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}),
        );
        m.insert(
            "mlp_layer_types".into(),
            json!(["hash_moe", "moe", "moe", "moe"]),
        );
        m.insert("partial_rotary_factor".into(), json!(0.125));
        m.insert(
            "rope_parameters".into(),
            json!({
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                         "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                         "attention_factor": 1.0}}),
        );
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(
            c.attn_kinds[2],
            AttnKind::Compressed {
                ratio: 16,
                sparse: false
            }
        );
        assert_eq!(
            c.mlp_kinds,
            vec![MlpKind::Hash, MlpKind::TopK, MlpKind::TopK, MlpKind::TopK]
        );
        assert_eq!(c.rope_dim, 64);
        assert!(c.rope_compress.yarn.is_some());
        // The layer type, not the rate, decides CSA vs HCA; swiglu_limit 0 clamps at 0.
        let mut v2 = v.clone();
        v2["compress_rates"] =
            json!({"compressed_sparse_attention": 8, "heavily_compressed_attention": 4});
        v2["swiglu_limit"] = json!(0.0);
        let c = ModelConfig::from_json(&v2).unwrap();
        assert_eq!(
            c.attn_kinds[1],
            AttnKind::Compressed {
                ratio: 8,
                sparse: true
            }
        );
        assert_eq!(
            c.attn_kinds[2],
            AttnKind::Compressed {
                ratio: 4,
                sparse: false
            }
        );
        assert_eq!(c.swiglu_limit, Some(0.0));
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = official();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let mut v = official();
        v["compress_ratios"] = json!([0, 4]);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("schedule"), "{e}");
        let mut v = official();
        v["num_attention_heads"] = json!("many");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }
}
