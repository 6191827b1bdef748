//! Every weight of the model, located in the checkpoint and checked (presence, shape, dtype)
//! before the first forward. Large matrices stay in their stored format ([`Linear`]); small
//! vectors (norms, hyper-connection params, sinks, ape, router bias) are decoded to f32.

use crate::checkpoint::Checkpoint;
use crate::config::{AttnKind, MlpKind, ModelConfig};
use crate::cpu::linear::Linear;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Hyper-connection parameters of one site: `fn` `[(2+n)·n, n·D]` (or `[n, n·D]` for the head),
/// `base`, `scale`.
pub struct HcWeights {
    pub fn_: Linear,
    pub base: Vec<f32>,
    pub scale: Vec<f32>,
}

/// One compressor (main, or the indexer's): projections of width `c·dim`, slot bias, norm.
pub struct CompressorWeights {
    pub ratio: usize,
    /// CSA (ratio 4) windows overlap: width `2·dim`, previous window's first half joins.
    pub overlap: bool,
    pub dim: usize,
    pub wkv: Linear,
    pub wgate: Linear,
    /// `[ratio, c·dim]` (fp32).
    pub ape: Vec<f32>,
    pub norm: Vec<f32>,
}

pub struct IndexerWeights {
    pub compressor: CompressorWeights,
    pub wq_b: Linear,
    pub weights_proj: Linear,
}

pub struct AttentionWeights {
    pub wq_a: Linear,
    pub q_norm: Vec<f32>,
    pub wq_b: Linear,
    pub wkv: Linear,
    pub kv_norm: Vec<f32>,
    pub wo_a: Linear,
    pub wo_b: Linear,
    pub sinks: Vec<f32>,
    pub compressor: Option<CompressorWeights>,
    pub indexer: Option<IndexerWeights>,
}

/// A SwiGLU MLP: gate `w1`, up `w3`, down `w2`.
pub struct Expert {
    pub w1: Linear,
    pub w3: Linear,
    pub w2: Linear,
}

pub enum Router {
    /// Frozen expert ids per token: `[vocab, k]`.
    Hash { tid2eid: Vec<u32> },
    /// Learned top-k; the bias only affects which experts are selected.
    TopK { bias: Vec<f32> },
}

pub struct MoeWeights {
    pub gate: Linear,
    pub router: Router,
    pub experts: Vec<Expert>,
    pub shared: Option<Expert>,
}

pub struct LayerWeights {
    pub kind: AttnKind,
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub hc_attn: HcWeights,
    pub hc_ffn: HcWeights,
    pub attn: AttentionWeights,
    pub moe: MoeWeights,
}

pub struct ModelWeights {
    pub embed: Linear,
    pub head: Linear,
    pub norm: Vec<f32>,
    pub hc_head: HcWeights,
    pub layers: Vec<LayerWeights>,
}

/// Loads weights by official key with the expected shapes.
struct Loader<'a> {
    ck: &'a Checkpoint,
    block: Option<[usize; 2]>,
}

impl Loader<'_> {
    fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.ck.require(key)
    }

    /// A small float vector/matrix decoded to f32, with its shape checked.
    fn vec(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(key)?;
        if t.shape != shape {
            return Err(t.err(format!("shape {:?}, expected {:?}", t.shape, shape)));
        }
        if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(t.err(format!(
                "dtype {}, expected F32, BF16 or F16",
                t.dtype.name()
            )));
        }
        let v = t.to_f32()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(t.err(format!("element {i} is not finite")));
        }
        Ok(v)
    }

    /// `prefix.weight` (+ `prefix.scale` when FP8/FP4, `prefix.scales`/`.biases` when MLX-
    /// quantized) as a `[out, inp]` matrix.
    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        self.linear_from(
            prefix,
            w,
            self.ck.get(&format!("{prefix}.scales")),
            self.ck.get(&format!("{prefix}.biases")),
            out,
            inp,
        )
    }

    /// A matrix from its tensors (possibly reshaped or sliced views of stored ones).
    fn linear_from(
        &self,
        prefix: &str,
        w: &Tensor,
        scales: Option<&Tensor>,
        biases: Option<&Tensor>,
        out: usize,
        inp: usize,
    ) -> Result<Linear> {
        match scales {
            Some(s) => Linear::new_mlx(w, s, biases, out, inp, self.mlx_mode(w)?),
            None => {
                if let Some(b) = biases {
                    return Err(b.err("`.biases` without `.scales`"));
                }
                Linear::new(
                    w,
                    self.ck.get(&format!("{prefix}.scale")),
                    out,
                    inp,
                    self.block,
                )
            }
        }
    }

    /// The mode `config.json`'s `quantization` section gives the module that stores `w`
    /// (looked up under the stored name, as mlx-lm writes it).
    fn mlx_mode(&self, w: &Tensor) -> Result<Option<crate::quant::QuantMode>> {
        let Some(q) = &self.ck.config.mlx_quant else {
            return Ok(None);
        };
        let stored = w.name.split('[').next().unwrap_or(&w.name);
        let module = stored.strip_suffix(".weight").unwrap_or(stored);
        match q.mode_for(module) {
            Some(m) => Ok(Some(m)),
            None => Err(w.err(
                "config.json `quantization` marks this module unquantized, but it has `.scales`",
            )),
        }
    }

    /// The grouped output projection `wo_a` `[G·R, in]`: stored 2-D, as MLX's 3-D
    /// `[G, R, in]`, or as one tensor per group (`wo_a.{g}.*`, concatenated here).
    fn wo_a(&self, prefix: &str, groups: usize, out: usize, inp: usize) -> Result<Linear> {
        let key = |s: &str| format!("{prefix}.{s}");
        if let Some(w) = self.ck.get(&key("weight")) {
            let flat = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
                t.map(|t| match t.shape.len() {
                    3 => t.reshaped(vec![t.shape[0] * t.shape[1], t.shape[2]]),
                    _ => Ok(t.clone()),
                })
                .transpose()
            };
            let w = flat(Some(w))?.ok_or_else(|| Error::tensor(prefix, "missing"))?;
            let s = flat(self.ck.get(&key("scales")))?;
            let b = flat(self.ck.get(&key("biases")))?;
            return self.linear_from(prefix, &w, s.as_ref(), b.as_ref(), out, inp);
        }
        if self.ck.get(&key("0.weight")).is_none() {
            // Neither layout: report the usual missing-tensor error.
            self.ck.require(&key("weight"))?;
        }
        // Per-group tensors: validate each group as a matrix, then join the rows once.
        let rows = out / groups.max(1);
        for g in 0..groups {
            self.linear(&format!("{prefix}.{g}"), rows, inp)?;
        }
        let join = |suffix: &str| -> Result<Option<Tensor>> {
            let ts: Vec<&Tensor> = (0..groups)
                .filter_map(|g| self.ck.get(&format!("{prefix}.{g}.{suffix}")))
                .collect();
            if ts.is_empty() {
                return Ok(None);
            }
            if ts.len() != groups {
                return Err(Error::tensor(
                    &format!("{prefix}.*.{suffix}"),
                    format!("only {} of {groups} groups have it", ts.len()),
                ));
            }
            concat_rows(&ts, &format!("{prefix}.{suffix}")).map(Some)
        };
        let w = join("weight")?.ok_or_else(|| Error::tensor(prefix, "no group weights"))?;
        let (s, b) = (join("scales")?, join("biases")?);
        let fp8 = join("scale")?;
        match (&s, &fp8) {
            // Each group was checked against its own config entry above.
            (Some(s), _) => Linear::new_mlx(&w, s, b.as_ref(), out, inp, None),
            (None, f) => Linear::new(&w, f.as_ref(), out, inp, self.block),
        }
    }

    /// A bare (un-suffixed) float matrix such as `hc_attn_fn`.
    fn matrix(&self, key: &str, out: usize, inp: usize) -> Result<Linear> {
        let t = self.tensor(key)?;
        if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(t.err(format!(
                "dtype {}, expected F32, BF16 or F16",
                t.dtype.name()
            )));
        }
        Linear::new(t, None, out, inp, None)
    }

    fn hc(&self, prefix: &str, rows: usize, d: usize, nscale: usize) -> Result<HcWeights> {
        Ok(HcWeights {
            fn_: self.matrix(&format!("{prefix}_fn"), rows, d)?,
            base: self.vec(&format!("{prefix}_base"), &[rows])?,
            scale: self.vec(&format!("{prefix}_scale"), &[nscale])?,
        })
    }

    fn compressor(
        &self,
        prefix: &str,
        ratio: usize,
        overlap: bool,
        dim: usize,
        hidden: usize,
    ) -> Result<CompressorWeights> {
        let width = if overlap { 2 * dim } else { dim };
        Ok(CompressorWeights {
            ratio,
            overlap,
            dim,
            wkv: self.linear(&format!("{prefix}.wkv"), width, hidden)?,
            wgate: self.linear(&format!("{prefix}.wgate"), width, hidden)?,
            ape: self.vec(&format!("{prefix}.ape"), &[ratio, width])?,
            norm: self.vec(&format!("{prefix}.norm.weight"), &[dim])?,
        })
    }

    fn expert(&self, prefix: &str, inter: usize, hidden: usize) -> Result<Expert> {
        Ok(Expert {
            w1: self.linear(&format!("{prefix}.w1"), inter, hidden)?,
            w3: self.linear(&format!("{prefix}.w3"), inter, hidden)?,
            w2: self.linear(&format!("{prefix}.w2"), hidden, inter)?,
        })
    }

    /// Routed experts: per-expert official tensors, or transformers' stacked
    /// `gate_up_proj` `[E, 2I, D]` / `down_proj` `[E, D, I]` sliced without copying.
    fn experts(&self, layer: usize, c: &ModelConfig) -> Result<Vec<Expert>> {
        let (e, i, d) = (c.n_routed_experts, c.moe_intermediate_size, c.hidden_size);
        let p = format!("layers.{layer}.ffn.experts");
        if self
            .ck
            .get(&format!("layers.{layer}.ffn.switch_mlp.w1.weight"))
            .is_some()
        {
            return self.switch_mlp(layer, c);
        }
        if self.ck.get(&format!("{p}.gate_up_proj")).is_none() {
            return (0..e)
                .map(|x| self.expert(&format!("{p}.{x}"), i, d))
                .collect();
        }
        let gu = self.tensor(&format!("{p}.gate_up_proj"))?;
        let dn = self.tensor(&format!("{p}.down_proj"))?;
        let gu_s = self.ck.get(&format!("{p}.gate_up_proj.scale"));
        let dn_s = self.ck.get(&format!("{p}.down_proj.scale"));
        let packed = matches!(gu.dtype, DType::I8 | DType::U8);
        let (gu_cols, dn_cols) = if packed { (d / 2, i / 2) } else { (d, i) };
        if gu.shape != [e, 2 * i, gu_cols] {
            return Err(gu.err(format!(
                "shape {:?}, expected {:?}",
                gu.shape,
                [e, 2 * i, gu_cols]
            )));
        }
        if dn.shape != [e, d, dn_cols] {
            return Err(dn.err(format!(
                "shape {:?}, expected {:?}",
                dn.shape,
                [e, d, dn_cols]
            )));
        }
        let gu2 = gu.reshaped(vec![e * 2 * i, gu_cols])?;
        let dn2 = dn.reshaped(vec![e * d, dn_cols])?;
        // Scales are stacked the same way: [E, rows', cols'] → rows of the flattened matrix.
        let flat = |s: Option<&Tensor>| -> Result<Option<Tensor>> {
            s.map(|s| {
                let rows: usize = s.shape[..s.shape.len() - 1].iter().product();
                s.reshaped(vec![rows, *s.shape.last().unwrap_or(&1)])
            })
            .transpose()
        };
        let (gu_s, dn_s) = (flat(gu_s)?, flat(dn_s)?);
        let scale_rows =
            |s: &Option<Tensor>, total: usize, start: usize, n: usize| -> Result<Option<Tensor>> {
                let Some(s) = s else { return Ok(None) };
                let per = s.shape[0] * n / total; // scale rows covering n weight rows
                if per == 0 || !(s.shape[0] * start).is_multiple_of(total) {
                    return Err(s.err("stacked expert scales do not align with expert boundaries"));
                }
                s.slice_outer(s.shape[0] * start / total, per).map(Some)
            };
        (0..e)
            .map(|x| {
                let gs = scale_rows(&gu_s, e * 2 * i, x * 2 * i, i)?;
                let us = scale_rows(&gu_s, e * 2 * i, x * 2 * i + i, i)?;
                let ds = scale_rows(&dn_s, e * d, x * d, d)?;
                Ok(Expert {
                    w1: Linear::new(
                        &gu2.slice_outer(x * 2 * i, i)?,
                        gs.as_ref(),
                        i,
                        d,
                        self.block,
                    )?,
                    w3: Linear::new(
                        &gu2.slice_outer(x * 2 * i + i, i)?,
                        us.as_ref(),
                        i,
                        d,
                        self.block,
                    )?,
                    w2: Linear::new(&dn2.slice_outer(x * d, d)?, ds.as_ref(), d, i, self.block)?,
                })
            })
            .collect()
    }
}

impl Loader<'_> {
    /// MLX's stacked experts `switch_mlp.{w1,w3,w2}.{weight,scales,biases}` `[E, rows, cols]`,
    /// sliced per expert without copying.
    fn switch_mlp(&self, layer: usize, c: &ModelConfig) -> Result<Vec<Expert>> {
        let (e, i, d) = (c.n_routed_experts, c.moe_intermediate_size, c.hidden_size);
        let p = format!("layers.{layer}.ffn.switch_mlp");
        let one = |w: &str, x: usize, out: usize, inp: usize| -> Result<Linear> {
            let prefix = format!("{p}.{w}");
            let slice = |suffix: &str| -> Result<Option<Tensor>> {
                let Some(t) = self.ck.get(&format!("{prefix}.{suffix}")) else {
                    return Ok(None);
                };
                if t.shape.len() != 3 || t.shape[0] != e || t.shape[1] != out {
                    return Err(t.err(format!(
                        "shape {:?}, expected stacked experts [{e}, {out}, …]",
                        t.shape
                    )));
                }
                let cols = t.shape[2];
                // The module path (for the config lookup) is the stored name without `.weight`.
                let mut s = t.slice_outer(x, 1)?.reshaped(vec![out, cols])?;
                s.name = format!("{}[{x}]", t.name);
                Ok(Some(s))
            };
            let wt = slice("weight")?.ok_or_else(|| {
                Error::tensor(&format!("{prefix}.weight"), "missing from the checkpoint")
            })?;
            self.linear_from(
                &prefix,
                &wt,
                slice("scales")?.as_ref(),
                slice("biases")?.as_ref(),
                out,
                inp,
            )
        };
        (0..e)
            .map(|x| {
                Ok(Expert {
                    w1: one("w1", x, i, d)?,
                    w3: one("w3", x, i, d)?,
                    w2: one("w2", x, d, i)?,
                })
            })
            .collect()
    }
}

/// Rows of several `[r_k, cols]` tensors of one dtype joined into one owned `[Σ r_k, cols]`.
fn concat_rows(parts: &[&Tensor], name: &str) -> Result<Tensor> {
    let first = parts[0];
    let cols = &first.shape[1..];
    let mut bytes = Vec::new();
    let mut rows = 0;
    for t in parts {
        if t.dtype != first.dtype || &t.shape[1..] != cols || t.shape.is_empty() {
            return Err(t.err(format!(
                "cannot join {} {:?} with {} {:?} into `{name}`",
                t.dtype.name(),
                t.shape,
                first.dtype.name(),
                first.shape
            )));
        }
        rows += t.shape[0];
        bytes.extend_from_slice(t.bytes());
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(cols);
    let len = bytes.len();
    Tensor::new(
        name.to_string(),
        first.file.clone(),
        first.dtype,
        shape,
        std::sync::Arc::new(crate::tensor::Storage::Owned(bytes)),
        0,
        len,
    )
}

impl ModelWeights {
    /// Locates and validates every tensor the forward pass needs.
    pub fn load(ck: &Checkpoint) -> Result<Self> {
        let c = &ck.config;
        let l = Loader {
            ck,
            block: c.quant.as_ref().map(|q| q.block),
        };
        let (d, n) = (c.hidden_size, c.hc_mult);
        let hc_rows = (2 + n) * n;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("layers.{i}");
            let kind = c.attn_kinds[i];
            let (h, dh) = (c.num_heads, c.head_dim);
            let compressor = match kind.ratio() {
                Some(m) => {
                    Some(l.compressor(&format!("{p}.attn.compressor"), m, kind.is_csa(), dh, d)?)
                }
                None => None,
            };
            let indexer = if kind.is_csa() {
                let (hi, di) = (c.index_n_heads, c.index_head_dim);
                Some(IndexerWeights {
                    compressor: l.compressor(
                        &format!("{p}.attn.indexer.compressor"),
                        kind.ratio().unwrap_or(4),
                        true,
                        di,
                        d,
                    )?,
                    wq_b: l.linear(&format!("{p}.attn.indexer.wq_b"), hi * di, c.q_lora_rank)?,
                    weights_proj: l.linear(&format!("{p}.attn.indexer.weights_proj"), hi, d)?,
                })
            } else {
                None
            };
            let attn = AttentionWeights {
                wq_a: l.linear(&format!("{p}.attn.wq_a"), c.q_lora_rank, d)?,
                q_norm: l.vec(&format!("{p}.attn.q_norm.weight"), &[c.q_lora_rank])?,
                wq_b: l.linear(&format!("{p}.attn.wq_b"), h * dh, c.q_lora_rank)?,
                wkv: l.linear(&format!("{p}.attn.wkv"), dh, d)?,
                kv_norm: l.vec(&format!("{p}.attn.kv_norm.weight"), &[dh])?,
                wo_a: l.wo_a(
                    &format!("{p}.attn.wo_a"),
                    c.o_groups,
                    c.o_groups * c.o_lora_rank,
                    h / c.o_groups * dh,
                )?,
                wo_b: l.linear(&format!("{p}.attn.wo_b"), d, c.o_groups * c.o_lora_rank)?,
                sinks: l.vec(&format!("{p}.attn.attn_sink"), &[h])?,
                compressor,
                indexer,
            };
            let (e, k) = (c.n_routed_experts, c.num_experts_per_tok);
            let router = match c.mlp_kinds[i] {
                MlpKind::Hash => {
                    let t = l.tensor(&format!("{p}.ffn.gate.tid2eid"))?;
                    if t.shape != [c.vocab_size, k] {
                        return Err(t.err(format!(
                            "shape {:?}, expected {:?}",
                            t.shape,
                            [c.vocab_size, k]
                        )));
                    }
                    let ids = t.to_i64()?;
                    if let Some(bad) = ids.iter().position(|&x| x < 0 || x as usize >= e) {
                        return Err(t.err(format!(
                            "entry {bad} = {} is not an expert id < {e}",
                            ids[bad]
                        )));
                    }
                    Router::Hash {
                        tid2eid: ids.into_iter().map(|x| x as u32).collect(),
                    }
                }
                MlpKind::TopK => Router::TopK {
                    bias: l.vec(&format!("{p}.ffn.gate.bias"), &[e])?,
                },
            };
            // Like transformers: exactly one shared expert of the routed width, whatever
            // `n_shared_experts` says (every released checkpoint has 1).
            let shared = Some(l.expert(
                &format!("{p}.ffn.shared_experts"),
                c.moe_intermediate_size,
                d,
            )?);
            let moe = MoeWeights {
                gate: l.linear(&format!("{p}.ffn.gate"), e, d)?,
                router,
                experts: l.experts(i, c)?,
                shared,
            };
            layers.push(LayerWeights {
                kind,
                attn_norm: l.vec(&format!("{p}.attn_norm.weight"), &[d])?,
                ffn_norm: l.vec(&format!("{p}.ffn_norm.weight"), &[d])?,
                hc_attn: l.hc(&format!("{p}.hc_attn"), hc_rows, n * d, 3)?,
                hc_ffn: l.hc(&format!("{p}.hc_ffn"), hc_rows, n * d, 3)?,
                attn,
                moe,
            });
        }
        let w = ModelWeights {
            embed: l.linear("embed", c.vocab_size, d)?,
            head: l.linear("head", c.vocab_size, d)?,
            norm: l.vec("norm.weight", &[d])?,
            hc_head: l.hc("hc_head", n, n * d, 1)?,
            layers,
        };
        Ok(w)
    }

    /// Every matrix with its official name (for `inspect`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v: Vec<(String, &Linear)> = vec![
            ("embed".into(), &self.embed),
            ("head".into(), &self.head),
            ("hc_head_fn".into(), &self.hc_head.fn_),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("layers.{i}.{s}");
            let a = &l.attn;
            for (n, x) in [
                ("attn.wq_a", &a.wq_a),
                ("attn.wq_b", &a.wq_b),
                ("attn.wkv", &a.wkv),
                ("attn.wo_a", &a.wo_a),
                ("attn.wo_b", &a.wo_b),
                ("hc_attn_fn", &l.hc_attn.fn_),
                ("hc_ffn_fn", &l.hc_ffn.fn_),
                ("ffn.gate", &l.moe.gate),
            ] {
                v.push((p(n), x));
            }
            if let Some(c) = &a.compressor {
                v.push((p("attn.compressor.wkv"), &c.wkv));
                v.push((p("attn.compressor.wgate"), &c.wgate));
            }
            if let Some(ix) = &a.indexer {
                v.push((p("attn.indexer.wq_b"), &ix.wq_b));
                v.push((p("attn.indexer.weights_proj"), &ix.weights_proj));
                v.push((p("attn.indexer.compressor.wkv"), &ix.compressor.wkv));
                v.push((p("attn.indexer.compressor.wgate"), &ix.compressor.wgate));
            }
            let experts = l
                .moe
                .shared
                .iter()
                .map(|e| ("shared_experts".to_string(), e));
            let routed = l
                .moe
                .experts
                .iter()
                .enumerate()
                .map(|(x, e)| (format!("experts.{x}"), e));
            for (n, e) in experts.chain(routed) {
                v.push((p(&format!("ffn.{n}.w1")), &e.w1));
                v.push((p(&format!("ffn.{n}.w3")), &e.w3));
                v.push((p(&format!("ffn.{n}.w2")), &e.w2));
            }
        }
        v
    }

    /// Bytes of weights read for one token by a decode step (every dense weight, the head, and
    /// `k` routed experts per layer; the embedding row is negligible).
    pub fn decode_bytes(&self, k: usize) -> usize {
        self.head.stored_bytes()
            + self.hc_head.fn_.stored_bytes()
            + self
                .layers
                .iter()
                .map(|l| l.dense_bytes() + k * l.expert_bytes())
                .sum::<usize>()
    }
}

impl LayerWeights {
    /// Stored bytes every token reads in this layer: attention (with its compressors and
    /// indexer), both hyper-connection sites, the router and the shared expert.
    pub fn dense_bytes(&self) -> usize {
        let a = &self.attn;
        let mut total = [&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b]
            .iter()
            .map(|x| x.stored_bytes())
            .sum::<usize>();
        for c in a
            .compressor
            .iter()
            .chain(a.indexer.as_ref().map(|i| &i.compressor))
        {
            total += c.wkv.stored_bytes() + c.wgate.stored_bytes();
        }
        if let Some(ix) = &a.indexer {
            total += ix.wq_b.stored_bytes() + ix.weights_proj.stored_bytes();
        }
        total
            + self.hc_attn.fn_.stored_bytes()
            + self.hc_ffn.fn_.stored_bytes()
            + self.moe.gate.stored_bytes()
            + self.moe.shared.as_ref().map_or(0, Expert::stored_bytes)
    }

    /// Stored bytes of one routed expert (they all share a shape and format).
    pub fn expert_bytes(&self) -> usize {
        self.moe.experts.first().map_or(0, Expert::stored_bytes)
    }
}

impl Expert {
    pub fn stored_bytes(&self) -> usize {
        self.w1.stored_bytes() + self.w2.stored_bytes() + self.w3.stored_bytes()
    }
}
