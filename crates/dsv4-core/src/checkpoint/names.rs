//! Tensor key names. The engine addresses weights by the official deepseek-ai names
//! (`layers.3.attn.wq_a.weight`); transformers names (`model.layers.3.self_attn.q_a_proj.weight`)
//! are translated on load. Stacked transformers experts keep a stacked name
//! (`layers.N.ffn.experts.gate_up_proj`) that the weight loader slices per expert; so do MLX's
//! stacked experts (`model.layers.N.ffn.switch_mlp.gate_proj.*` → `layers.N.ffn.switch_mlp.w1.*`).
//! MLX-quantized tensors keep their `.scales` / `.biases` suffixes.

/// Which naming scheme a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStyle {
    Official,
    Transformers,
    /// mlx-lm module names (`model.layers.N.attn.wq_a`, `ffn.switch_mlp`, `attn_hc.fn`).
    Mlx,
}

impl KeyStyle {
    pub fn label(self) -> &'static str {
        match self {
            KeyStyle::Official => "official (deepseek-ai)",
            KeyStyle::Transformers => "transformers",
            KeyStyle::Mlx => "mlx-lm",
        }
    }
}

/// Ordered substring rewrites inside a layer (`layers.N.` already stripped of `model.`).
/// Longer, more specific patterns come first.
const LAYER_RULES: &[(&str, &str)] = &[
    (
        ".self_attn.compressor.indexer.scorer.weights_proj.",
        ".attn.indexer.weights_proj.",
    ),
    (
        ".self_attn.compressor.indexer.q_b_proj.",
        ".attn.indexer.wq_b.",
    ),
    (
        ".self_attn.compressor.indexer.kv_proj.",
        ".attn.indexer.compressor.wkv.",
    ),
    (
        ".self_attn.compressor.indexer.gate_proj.",
        ".attn.indexer.compressor.wgate.",
    ),
    (
        ".self_attn.compressor.indexer.kv_norm.",
        ".attn.indexer.compressor.norm.",
    ),
    (
        ".self_attn.compressor.indexer.position_bias",
        ".attn.indexer.compressor.ape",
    ),
    (".self_attn.compressor.kv_proj.", ".attn.compressor.wkv."),
    (
        ".self_attn.compressor.gate_proj.",
        ".attn.compressor.wgate.",
    ),
    (".self_attn.compressor.kv_norm.", ".attn.compressor.norm."),
    (
        ".self_attn.compressor.position_bias",
        ".attn.compressor.ape",
    ),
    (".self_attn.q_a_proj.", ".attn.wq_a."),
    (".self_attn.q_a_norm.", ".attn.q_norm."),
    (".self_attn.q_b_proj.", ".attn.wq_b."),
    (".self_attn.kv_proj.", ".attn.wkv."),
    (".self_attn.kv_norm.", ".attn.kv_norm."),
    (".self_attn.o_a_proj.", ".attn.wo_a."),
    (".self_attn.o_b_proj.", ".attn.wo_b."),
    (".self_attn.sinks", ".attn.attn_sink"),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".attn_hc.", ".hc_attn_"),
    (".ffn_hc.", ".hc_ffn_"),
    (".mlp.gate.e_score_correction_bias", ".ffn.gate.bias"),
    (".mlp.shared_experts.gate_proj.", ".ffn.shared_experts.w1."),
    (".mlp.shared_experts.up_proj.", ".ffn.shared_experts.w3."),
    (".mlp.shared_experts.down_proj.", ".ffn.shared_experts.w2."),
    (".mlp.", ".ffn."),
];

/// Translates a transformers key to the official one; `None` for keys the engine ignores.
pub fn transformers_to_official(key: &str) -> Option<String> {
    let fixed = match key {
        "model.embed_tokens.weight" => Some("embed.weight"),
        "lm_head.weight" => Some("head.weight"),
        "model.norm.weight" => Some("norm.weight"),
        "model.hc_head.hc_fn" => Some("hc_head_fn"),
        "model.hc_head.hc_base" => Some("hc_head_base"),
        "model.hc_head.hc_scale" => Some("hc_head_scale"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = key.strip_prefix("model.layers.")?;
    let mut name = format!("layers.{rest}");
    for (from, to) in LAYER_RULES {
        if name.contains(from) {
            name = name.replacen(from, to, 1);
        }
    }
    // FP8 scales: transformers calls the dequantization factor `weight_scale_inv`.
    if let Some(base) = name.strip_suffix(".weight_scale_inv") {
        name = format!("{base}.scale");
    } else if let Some(base) = name.strip_suffix("_scale_inv") {
        name = format!("{base}.scale");
    }
    Some(name)
}

/// Guesses the key style from the tensor names present: `model.`-prefixed names are
/// transformers' when they use `self_attn`, else mlx-lm's.
pub fn detect_style<'a>(keys: impl Iterator<Item = &'a str>) -> KeyStyle {
    let (mut prefixed, mut self_attn) = (false, false);
    for k in keys {
        prefixed |= k.starts_with("model.");
        self_attn |= k.contains(".self_attn.");
    }
    match (prefixed, self_attn) {
        (true, true) => KeyStyle::Transformers,
        (true, false) => KeyStyle::Mlx,
        _ => KeyStyle::Official,
    }
}

/// Translates a stored key of `style` to the internal (official) name; `None` for keys the
/// engine ignores.
pub fn to_official(key: &str, style: KeyStyle) -> Option<String> {
    let name = match style {
        KeyStyle::Official => key.to_string(),
        KeyStyle::Transformers => transformers_to_official(key)?,
        KeyStyle::Mlx => mlx_to_official(key)?,
    };
    Some(common_quirks(&name))
}

/// Rewrites inside an mlx-lm layer key (after `model.` is stripped).
const MLX_LAYER_RULES: &[(&str, &str)] = &[
    (".attn_hc.", ".hc_attn_"),
    (".ffn_hc.", ".hc_ffn_"),
    (".ffn.gate.e_score_correction_bias", ".ffn.gate.bias"),
    (".shared_experts.gate_proj.", ".shared_experts.w1."),
    (".shared_experts.up_proj.", ".shared_experts.w3."),
    (".shared_experts.down_proj.", ".shared_experts.w2."),
    (".switch_mlp.gate_proj.", ".switch_mlp.w1."),
    (".switch_mlp.up_proj.", ".switch_mlp.w3."),
    (".switch_mlp.down_proj.", ".switch_mlp.w2."),
];

/// Translates an mlx-lm key (`model.layers.3.attn.wq_a.scales`) to the official one.
pub fn mlx_to_official(key: &str) -> Option<String> {
    for (from, to) in [
        ("model.embed_tokens.", "embed."),
        ("lm_head.", "head."),
        ("model.norm.", "norm."),
    ] {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    if let Some(p) = key.strip_prefix("model.hc_head.") {
        // mlx-lm says `fn`, transformers `hc_fn`.
        return Some(format!("hc_head_{}", p.strip_prefix("hc_").unwrap_or(p)));
    }
    let mut name = format!("layers.{}", key.strip_prefix("model.layers.")?);
    for (from, to) in MLX_LAYER_RULES {
        if name.contains(from) {
            name = name.replacen(from, to, 1);
        }
    }
    Some(name)
}

/// Variants seen in community checkpoints whatever their naming style: the FP8 scale named
/// `weight_scale_inv`, experts pre-stacked under official names (`ffn.experts.w1.weight`, no
/// expert index), and hyper-connection params as `hc_attn.fn` / `attn_hc.fn`.
fn common_quirks(name: &str) -> String {
    let mut name = match name.strip_suffix(".weight_scale_inv") {
        Some(base) => format!("{base}.scale"),
        None => name.to_string(),
    };
    for w in ["w1", "w2", "w3"] {
        let stacked = format!(".ffn.experts.{w}.");
        if name.contains(&stacked) {
            name = name.replacen(&stacked, &format!(".ffn.switch_mlp.{w}."), 1);
        }
    }
    for (from, to) in [
        (".attn_hc.", ".hc_attn_"),
        (".ffn_hc.", ".hc_ffn_"),
        (".hc_attn.", ".hc_attn_"),
        (".hc_ffn.", ".hc_ffn_"),
    ] {
        if name.contains(from) {
            name = name.replacen(from, to, 1);
        }
    }
    name
}

/// Whether an official-style key belongs to a part the engine does not run (MTP).
pub fn is_ignored(key: &str) -> bool {
    key.starts_with("mtp.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_mlx_and_community_names() {
        let cases = [
            ("model.embed_tokens.scales", KeyStyle::Mlx, "embed.scales"),
            ("lm_head.biases", KeyStyle::Mlx, "head.biases"),
            ("model.hc_head.fn", KeyStyle::Mlx, "hc_head_fn"),
            (
                "model.layers.3.attn_hc.base",
                KeyStyle::Mlx,
                "layers.3.hc_attn_base",
            ),
            (
                "model.layers.3.attn.wq_a.scales",
                KeyStyle::Mlx,
                "layers.3.attn.wq_a.scales",
            ),
            (
                "model.layers.3.attn.indexer.compressor.ape",
                KeyStyle::Mlx,
                "layers.3.attn.indexer.compressor.ape",
            ),
            (
                "model.layers.3.ffn.gate.e_score_correction_bias",
                KeyStyle::Mlx,
                "layers.3.ffn.gate.bias",
            ),
            (
                "model.layers.3.ffn.switch_mlp.down_proj.weight",
                KeyStyle::Mlx,
                "layers.3.ffn.switch_mlp.w2.weight",
            ),
            (
                "model.layers.3.ffn.shared_experts.up_proj.biases",
                KeyStyle::Mlx,
                "layers.3.ffn.shared_experts.w3.biases",
            ),
            (
                "layers.1.ffn.experts.w1.scales",
                KeyStyle::Official,
                "layers.1.ffn.switch_mlp.w1.scales",
            ),
            (
                "layers.1.ffn.experts.7.w1.weight",
                KeyStyle::Official,
                "layers.1.ffn.experts.7.w1.weight",
            ),
            (
                "layers.1.attn.wq_a.weight_scale_inv",
                KeyStyle::Official,
                "layers.1.attn.wq_a.scale",
            ),
            (
                "layers.1.hc_ffn.fn",
                KeyStyle::Official,
                "layers.1.hc_ffn_fn",
            ),
        ];
        for (k, style, want) in cases {
            assert_eq!(to_official(k, style).as_deref(), Some(want), "{k}");
        }
        let mlx = ["model.layers.0.attn.wq_a.weight", "lm_head.weight"];
        assert_eq!(detect_style(mlx.into_iter()), KeyStyle::Mlx);
        let hf = ["model.layers.0.self_attn.q_a_proj.weight"];
        assert_eq!(detect_style(hf.into_iter()), KeyStyle::Transformers);
    }

    #[test]
    fn maps_transformers_names() {
        let cases = [
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.hc_head.hc_fn", "hc_head_fn"),
            ("model.layers.3.attn_hc.fn", "layers.3.hc_attn_fn"),
            ("model.layers.3.ffn_hc.scale", "layers.3.hc_ffn_scale"),
            (
                "model.layers.0.input_layernorm.weight",
                "layers.0.attn_norm.weight",
            ),
            (
                "model.layers.0.self_attn.q_a_proj.weight",
                "layers.0.attn.wq_a.weight",
            ),
            (
                "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
                "layers.0.attn.wq_a.scale",
            ),
            (
                "model.layers.0.self_attn.q_a_norm.weight",
                "layers.0.attn.q_norm.weight",
            ),
            ("model.layers.0.self_attn.sinks", "layers.0.attn.attn_sink"),
            (
                "model.layers.2.self_attn.compressor.kv_proj.weight",
                "layers.2.attn.compressor.wkv.weight",
            ),
            (
                "model.layers.2.self_attn.compressor.position_bias",
                "layers.2.attn.compressor.ape",
            ),
            (
                "model.layers.2.self_attn.compressor.indexer.kv_norm.weight",
                "layers.2.attn.indexer.compressor.norm.weight",
            ),
            (
                "model.layers.2.self_attn.compressor.indexer.q_b_proj.weight",
                "layers.2.attn.indexer.wq_b.weight",
            ),
            (
                "model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight",
                "layers.2.attn.indexer.weights_proj.weight",
            ),
            (
                "model.layers.2.mlp.gate.e_score_correction_bias",
                "layers.2.ffn.gate.bias",
            ),
            (
                "model.layers.2.mlp.gate.tid2eid",
                "layers.2.ffn.gate.tid2eid",
            ),
            (
                "model.layers.2.mlp.experts.gate_up_proj",
                "layers.2.ffn.experts.gate_up_proj",
            ),
            (
                "model.layers.2.mlp.shared_experts.up_proj.weight",
                "layers.2.ffn.shared_experts.w3.weight",
            ),
        ];
        for (hf, off) in cases {
            assert_eq!(transformers_to_official(hf).as_deref(), Some(off), "{hf}");
        }
    }
}
