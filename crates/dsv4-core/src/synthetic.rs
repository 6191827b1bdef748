//! Synthetic checkpoints: deterministic random weights in the official storage formats (FP8 e4m3
//! with e8m0 128×128 block scales, packed FP4 e2m1 experts with e8m0 scales per 32, BF16, F32),
//! generated in memory. Used by `dsv4 bench` (real layer shapes, fewer layers/experts) and by the
//! built-in demo model. Values are random: the outputs mean nothing, the work is real.

use crate::checkpoint::Checkpoint;
use crate::config::{AttnKind, MlpKind, ModelConfig};
use crate::error::Result;
use crate::tensor::{f32_to_bf16, DType, Storage, Tensor};
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// A small, fast PRNG (xorshift64*), seeded per tensor so generation is parallel and repeatable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, name: &str) -> Self {
        let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// How a synthetic tensor is filled.
enum Fill {
    /// Uniform in ±a, stored as BF16.
    Bf16(f32),
    /// Uniform in ±a, stored as F32.
    F32(f32),
    /// `center` ± a, stored as F32.
    Around(f32, f32),
    /// FP8 e4m3 weight `[out, in]` with e8m0 128×128 scales (two tensors).
    Fp8,
    /// Packed FP4 weight `[out, in]` with e8m0 scales per 32 (two tensors).
    Fp4,
    /// `[vocab, k]` distinct expert ids, I32.
    ExpertIds { experts: usize },
}

struct Spec {
    name: String,
    shape: [usize; 2],
    fill: Fill,
}

fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> (String, Tensor) {
    let len = bytes.len();
    let t = Tensor::new(
        name.to_string(),
        Arc::new(PathBuf::from("<synthetic>")),
        dtype,
        shape,
        Arc::new(Storage::Owned(bytes)),
        0,
        len,
    )
    .expect("synthetic tensor sizes are consistent");
    (name.to_string(), t)
}

/// e8m0 byte of the power of two nearest to `x`.
fn e8m0_near(x: f32) -> u8 {
    (x.log2().round() as i32 + 127).clamp(1, 254) as u8
}

fn generate(spec: &Spec, seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(seed, &spec.name);
    let [rows, cols] = spec.shape;
    let n = rows * cols;
    let shape = if rows == 1 {
        vec![cols]
    } else {
        vec![rows, cols]
    };
    match spec.fill {
        Fill::Bf16(a) => {
            let bytes = (0..n)
                .flat_map(|_| f32_to_bf16(rng.uniform() * a).to_le_bytes())
                .collect();
            vec![owned(&spec.name, DType::BF16, shape, bytes)]
        }
        Fill::F32(a) => {
            let bytes = (0..n)
                .flat_map(|_| (rng.uniform() * a).to_le_bytes())
                .collect();
            vec![owned(&spec.name, DType::F32, shape, bytes)]
        }
        Fill::Around(c, a) => {
            let bytes = (0..n)
                .flat_map(|_| (c + rng.uniform() * a).to_le_bytes())
                .collect();
            vec![owned(&spec.name, DType::F32, shape, bytes)]
        }
        Fill::Fp8 => {
            // Codes with exponents 4..8 (magnitudes 2^-3..~3.75), scale ≈ 1/(2·sqrt(in)).
            let codes: Vec<u8> = (0..n)
                .map(|_| {
                    let r = rng.next() >> 32;
                    let sign = ((r & 1) << 7) as u8;
                    let e = 4 + ((r >> 1) % 5) as u8;
                    let m = ((r >> 4) & 7) as u8;
                    sign | (e << 3) | m
                })
                .collect();
            let s = e8m0_near(0.5 / (cols as f32).sqrt());
            let grid = [rows.div_ceil(128), cols.div_ceil(128)];
            let base = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
            vec![
                owned(&spec.name, DType::F8E4M3, shape, codes),
                owned(
                    &format!("{base}.scale"),
                    DType::F8E8M0,
                    grid.to_vec(),
                    vec![s; grid[0] * grid[1]],
                ),
            ]
        }
        Fill::Fp4 => {
            let packed: Vec<u8> = (0..n / 2).map(|_| (rng.next() >> 33) as u8).collect();
            let s = e8m0_near(0.5 / (cols as f32).sqrt());
            let base = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
            vec![
                owned(&spec.name, DType::I8, vec![rows, cols / 2], packed),
                owned(
                    &format!("{base}.scale"),
                    DType::F8E8M0,
                    vec![rows, cols / 32],
                    vec![s; rows * cols / 32],
                ),
            ]
        }
        Fill::ExpertIds { experts } => {
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..rows {
                let mut picked: Vec<u32> = Vec::with_capacity(cols);
                while picked.len() < cols {
                    let e = (rng.next() % experts as u64) as u32;
                    if !picked.contains(&e) {
                        picked.push(e);
                    }
                }
                picked
                    .iter()
                    .for_each(|e| bytes.extend_from_slice(&(*e as i32).to_le_bytes()));
            }
            vec![owned(&spec.name, DType::I32, shape, bytes)]
        }
    }
}

fn specs(c: &ModelConfig) -> Vec<Spec> {
    let (d, n, v) = (c.hidden_size, c.hc_mult, c.vocab_size);
    let mut s = Vec::new();
    let mut add = |name: String, rows: usize, cols: usize, fill: Fill| {
        s.push(Spec {
            name,
            shape: [rows, cols],
            fill,
        })
    };
    let hc = 0.05 / ((n * d) as f32).sqrt();
    add("embed.weight".into(), v, d, Fill::Bf16(1.0));
    add(
        "head.weight".into(),
        v,
        d,
        Fill::Bf16(1.0 / (d as f32).sqrt()),
    );
    add("norm.weight".into(), 1, d, Fill::Around(1.0, 0.1));
    add("hc_head_fn".into(), n, n * d, Fill::F32(hc));
    add("hc_head_base".into(), 1, n, Fill::F32(0.5));
    add("hc_head_scale".into(), 1, 1, Fill::Around(1.0, 0.2));
    for i in 0..c.num_layers {
        let p = format!("layers.{i}");
        let (h, dh, q, e, inter) = (
            c.num_heads,
            c.head_dim,
            c.q_lora_rank,
            c.n_routed_experts,
            c.moe_intermediate_size,
        );
        for site in ["attn", "ffn"] {
            add(
                format!("{p}.{site}_norm.weight"),
                1,
                d,
                Fill::Around(1.0, 0.1),
            );
            add(
                format!("{p}.hc_{site}_fn"),
                (2 + n) * n,
                n * d,
                Fill::F32(hc),
            );
            add(
                format!("{p}.hc_{site}_base"),
                1,
                (2 + n) * n,
                Fill::F32(0.5),
            );
            add(format!("{p}.hc_{site}_scale"), 1, 3, Fill::Around(1.0, 0.2));
        }
        add(format!("{p}.attn.attn_sink"), 1, h, Fill::F32(1.0));
        add(
            format!("{p}.attn.q_norm.weight"),
            1,
            q,
            Fill::Around(1.0, 0.1),
        );
        add(
            format!("{p}.attn.kv_norm.weight"),
            1,
            dh,
            Fill::Around(1.0, 0.1),
        );
        add(format!("{p}.attn.wq_a.weight"), q, d, Fill::Fp8);
        add(format!("{p}.attn.wq_b.weight"), h * dh, q, Fill::Fp8);
        add(format!("{p}.attn.wkv.weight"), dh, d, Fill::Fp8);
        add(
            format!("{p}.attn.wo_a.weight"),
            c.o_groups * c.o_lora_rank,
            h / c.o_groups * dh,
            Fill::Fp8,
        );
        add(
            format!("{p}.attn.wo_b.weight"),
            d,
            c.o_groups * c.o_lora_rank,
            Fill::Fp8,
        );
        let mut compressor = |prefix: String, m: usize, overlap: bool, dim: usize| {
            let w = if overlap { 2 * dim } else { dim };
            add(
                format!("{prefix}.wkv.weight"),
                w,
                d,
                Fill::Bf16(1.0 / (d as f32).sqrt()),
            );
            add(
                format!("{prefix}.wgate.weight"),
                w,
                d,
                Fill::Bf16(1.0 / (d as f32).sqrt()),
            );
            add(format!("{prefix}.ape"), m, w, Fill::F32(0.5));
            add(
                format!("{prefix}.norm.weight"),
                1,
                dim,
                Fill::Around(1.0, 0.1),
            );
        };
        if let AttnKind::Compressed { ratio, sparse } = c.attn_kinds[i] {
            compressor(format!("{p}.attn.compressor"), ratio, sparse, dh);
            if sparse {
                compressor(
                    format!("{p}.attn.indexer.compressor"),
                    ratio,
                    true,
                    c.index_head_dim,
                );
                add(
                    format!("{p}.attn.indexer.wq_b.weight"),
                    c.index_n_heads * c.index_head_dim,
                    q,
                    Fill::Fp8,
                );
                add(
                    format!("{p}.attn.indexer.weights_proj.weight"),
                    c.index_n_heads,
                    d,
                    Fill::Bf16(1.0 / (d as f32).sqrt()),
                );
            }
        }
        add(
            format!("{p}.ffn.gate.weight"),
            e,
            d,
            Fill::Bf16(1.0 / (d as f32).sqrt()),
        );
        match c.mlp_kinds[i] {
            MlpKind::Hash => add(
                format!("{p}.ffn.gate.tid2eid"),
                v,
                c.num_experts_per_tok,
                Fill::ExpertIds { experts: e },
            ),
            MlpKind::TopK => add(format!("{p}.ffn.gate.bias"), 1, e, Fill::F32(0.1)),
        }
        {
            let si = inter;
            add(
                format!("{p}.ffn.shared_experts.w1.weight"),
                si,
                d,
                Fill::Fp8,
            );
            add(
                format!("{p}.ffn.shared_experts.w3.weight"),
                si,
                d,
                Fill::Fp8,
            );
            add(
                format!("{p}.ffn.shared_experts.w2.weight"),
                d,
                si,
                Fill::Fp8,
            );
        }
        for x in 0..e {
            add(
                format!("{p}.ffn.experts.{x}.w1.weight"),
                inter,
                d,
                Fill::Fp4,
            );
            add(
                format!("{p}.ffn.experts.{x}.w3.weight"),
                inter,
                d,
                Fill::Fp4,
            );
            add(
                format!("{p}.ffn.experts.{x}.w2.weight"),
                d,
                inter,
                Fill::Fp4,
            );
        }
    }
    s
}

/// Builds a checkpoint with random weights for `config` (official key names and formats).
pub fn checkpoint(config: ModelConfig, seed: u64) -> Result<Checkpoint> {
    let tensors: Vec<(String, Tensor)> = specs(&config)
        .par_iter()
        .flat_map_iter(|s| generate(s, seed))
        .collect();
    let bytes: u64 = tensors.iter().map(|(_, t)| t.bytes().len() as u64).sum();
    Checkpoint::from_tensors(
        PathBuf::from("<synthetic>"),
        config,
        tensors,
        vec![(PathBuf::from("<synthetic>"), bytes)],
    )
}

/// Writes a random checkpoint for `config_json` to `dir` in the official layout: shards of at
/// most `max_shard_bytes` (whole tensors, a layer's tensors together), the index, `config.json`.
/// For measuring tools on multi-shard checkpoints of any size (e.g. `dsv4 convert`'s memory).
pub fn write_official(
    dir: &std::path::Path,
    config_json: &serde_json::Value,
    seed: u64,
    max_shard_bytes: u64,
) -> Result<()> {
    use crate::convert::st_writer::{Entry, ShardWriter};
    let ck = checkpoint(ModelConfig::from_json(config_json)?, seed)?;
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut shards: Vec<Vec<(&str, &Tensor)>> = vec![vec![]];
    let mut acc = 0u64;
    let mut sorted: Vec<(&str, &Tensor)> = ck.sorted().into_iter().collect();
    sorted.sort_by_key(|(k, _)| {
        let layer = k
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        (layer.unwrap_or(usize::MAX), k.to_string())
    });
    for (k, t) in sorted {
        let b = t.bytes().len() as u64;
        if acc > 0 && acc + b > max_shard_bytes {
            shards.push(vec![]);
            acc = 0;
        }
        acc += b;
        if let Some(s) = shards.last_mut() {
            s.push((k, t));
        }
    }
    let n = shards.len();
    let mut map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let entries = shard
            .iter()
            .map(|(k, t)| Entry {
                name: k.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let w = ShardWriter::create(&dir.join(&file), entries)?;
        for (k, t) in shard {
            w.write(k, 0, t.bytes())?;
            map.insert(k.to_string(), json!(file));
        }
        w.finish()?;
    }
    let write = |name: &str, v: &serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).map_err(|e| crate::Error::io(&p, e))
    };
    write(
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": ck.total_bytes()}, "weight_map": map}),
    )?;
    write("config.json", config_json)
}

/// An official-style `config.json` value with DeepSeek-V4-Flash shapes, overridable per field.
pub fn flash_config_json() -> serde_json::Value {
    json!({
        "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096,
        "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
        "o_lora_rank": 1024, "sliding_window": 128,
        "compress_ratios": flash_schedule(43),
        "num_hash_layers": 3, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128,
        "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1,
        "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "scoring_func": "sqrtsoftplus", "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "expert_dtype": "fp4"
    })
}

/// The built-in demo model: a tiny DeepSeek-V4 (all three layer types, hash and top-k MoE) with
/// the real 129,280-token vocabulary, so the real tokenizer works with it.
pub fn demo_config() -> ModelConfig {
    let mut j = flash_config_json();
    let small = json!({"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "head_dim": 64, "qk_rope_head_dim": 16, "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 32,
        "sliding_window": 32, "compress_ratios": [0, 4, 16, 4, 0], "num_hash_layers": 1,
        "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 128, "max_position_embeddings": 65536});
    for (k, v) in small.as_object().expect("object") {
        j[k] = v.clone();
    }
    ModelConfig::from_json(&j).expect("the demo config is valid")
}

/// Flash's attention schedule for `n` layers: two sliding layers, then CSA/HCA alternating
/// (plus the trailing MTP entry).
pub fn flash_schedule(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n)
        .map(|i| {
            if i < 2 {
                0
            } else if i % 2 == 0 {
                4
            } else {
                128
            }
        })
        .collect();
    v.push(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Logits, Model};

    /// A tiny synthetic model loads through the validating loader and runs one-call ≡ chunked.
    #[test]
    fn synthetic_model_runs_and_chunks_agree() {
        let mut j = flash_config_json();
        let over = json!({"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32,
            "o_groups": 2, "o_lora_rank": 16, "sliding_window": 8, "compress_ratios": [0, 4, 8, 4, 0],
            "num_hash_layers": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 3,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32});
        for (k, v) in over.as_object().unwrap() {
            j[k] = v.clone();
        }
        let cfg = ModelConfig::from_json(&j).unwrap();
        let ck = checkpoint(cfg, 7).unwrap();
        let model = Model::load(&ck).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 300) as u32).collect();
        let mut c1 = model.new_cache();
        let one = model.forward(&mut c1, &ids, Logits::All).unwrap();
        assert!(one.iter().all(|x| x.is_finite()));
        let mut c2 = model.new_cache();
        let mut inc = Vec::new();
        for ch in ids.chunks(3) {
            inc.extend(model.forward(&mut c2, ch, Logits::All).unwrap());
        }
        let scale = one.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = one
            .iter()
            .zip(&inc)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-4 * scale,
            "chunked differs: {err} (scale {scale})"
        );
    }
}

/// Storage formats a synthetic matrix can take (for kernel benchmarks).
#[derive(Clone, Copy, Debug)]
pub enum MatrixFormat {
    /// Unquantized f32 (the hyper-connection `fn` rows).
    F32,
    Bf16,
    Fp8,
    Fp4,
    /// An MLX format (random codes, small scales, bf16 scales and biases for affine).
    Mlx(crate::quant::QuantMode),
}

/// A random `[out, inp]` weight matrix in the given stored format.
pub fn random_linear(
    format: MatrixFormat,
    out: usize,
    inp: usize,
    seed: u64,
) -> Result<crate::cpu::linear::Linear> {
    if let MatrixFormat::Mlx(mode) = format {
        return random_mlx_linear(mode, out, inp, seed);
    }
    let fill = match format {
        MatrixFormat::Mlx(_) => unreachable!("handled above"),
        MatrixFormat::F32 => Fill::F32(1.0 / (inp as f32).sqrt()),
        MatrixFormat::Bf16 => Fill::Bf16(1.0 / (inp as f32).sqrt()),
        MatrixFormat::Fp8 => Fill::Fp8,
        MatrixFormat::Fp4 => Fill::Fp4,
    };
    let spec = Spec {
        name: "bench.weight".into(),
        shape: [out, inp],
        fill,
    };
    let t = generate(&spec, seed);
    crate::cpu::linear::Linear::new(&t[0].1, t.get(1).map(|(_, s)| s), out, inp, None)
}

fn random_mlx_linear(
    mode: crate::quant::QuantMode,
    out: usize,
    inp: usize,
    seed: u64,
) -> Result<crate::cpu::linear::Linear> {
    use crate::quant::QuantMode;
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut codes = vec![0u8; out * mode.packed_cols(inp) * 4];
    rng.fill_bytes(&mut codes);
    if mode == QuantMode::Mxfp8 {
        codes.iter_mut().for_each(|c| *c &= 0xf7); // no NaN codes
    }
    let groups = inp / mode.group();
    let w = owned(
        "bench.weight",
        DType::U32,
        vec![out, mode.packed_cols(inp)],
        codes,
    );
    let (scales, biases) = match mode {
        QuantMode::Affine { .. } => {
            let s = (0..out * groups)
                .flat_map(|i| f32_to_bf16(1e-3 * (1 + i % 7) as f32).to_le_bytes());
            let b =
                (0..out * groups).flat_map(|i| f32_to_bf16(-1e-2 * (i % 5) as f32).to_le_bytes());
            (
                owned("bench.scales", DType::BF16, vec![out, groups], s.collect()),
                Some(owned(
                    "bench.biases",
                    DType::BF16,
                    vec![out, groups],
                    b.collect(),
                )),
            )
        }
        _ => {
            let s = (0..out * groups).map(|i| 115 + (i % 8) as u8).collect();
            (owned("bench.scales", DType::U8, vec![out, groups], s), None)
        }
    };
    crate::cpu::linear::Linear::new_mlx(
        &w.1,
        &scales.1,
        biases.as_ref().map(|b| &b.1),
        out,
        inp,
        Some(mode),
    )
}
