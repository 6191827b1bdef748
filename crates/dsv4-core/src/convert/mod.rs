//! `dsv4 convert`: the official FP8/FP4 checkpoint → an MLX-quantized checkpoint in mlx-lm
//! names (what mlx-community publishes), with bounded memory.
//!
//! * Quantized: every module the official release quantizes (attention projections, indexer
//!   `wq_b`, shared and routed experts) plus the embedding and the lm head. Compressors,
//!   `weights_proj`, the router, norms and hyper-connection parameters keep their stored dtype
//!   (DeepSeek kept them high precision on purpose).
//! * Rounding is MLX's own (`quant::affine`, `quant::mx`), so the output equals what
//!   `mlx.core.quantize` gives on the dequantized weights. FP4 experts → mxfp4 keep their bytes;
//!   FP8 → mxfp8 repeats each 128×128 block scale (both exact, as mlx-lm's `sanitize` does).
//! * Memory: tensors are read and written in row chunks of at most `chunk_bytes` (input + output)
//!   straight into output shards whose headers are computed from shapes up front. Every buffer is
//!   counted ([`ledger`]); the peak is reported and tested.
//! * Atomicity: everything is written under `OUT.partial/` and renamed to `OUT` only after the
//!   shards are synced and the index and config (written last) are in place.

pub mod ledger;
pub mod recipe;
pub mod source;
pub mod st_writer;

use crate::config::ModelConfig;
use crate::cpu::kernels::{self, Row};
use crate::error::{Error, Result};
use crate::quant::config::MlxQuantConfig;
use crate::quant::{affine, mx, QuantMode};
use crate::tensor::{e8m0_to_f32, f32_to_bf16, DType};
use ledger::{Buf, Ledger};
use rayon::prelude::*;
use recipe::Recipe;
use source::{Source, SrcTensor};
use st_writer::{Entry, ShardWriter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to convert and how.
#[derive(Clone, Debug)]
pub struct Options {
    pub model: PathBuf,
    pub out: PathBuf,
    pub recipe: Recipe,
    /// Output shards are cut at this many bytes (a tensor is never split).
    pub max_shard_bytes: u64,
    /// Input + output bytes processed at once (a single row may exceed it).
    pub chunk_bytes: u64,
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct Report {
    pub out_shards: usize,
    pub out_tensors: usize,
    pub out_bytes: u64,
    pub in_bytes: u64,
    pub largest_input_shard: u64,
    /// Most bytes of buffers held at once.
    pub peak_buffer_bytes: u64,
    /// Stored bytes per quantized component (weights, scales, biases, unquantized tensors).
    pub bytes_by_component: BTreeMap<&'static str, u64>,
    /// Quantized weights (elements).
    pub quantized_weights: u64,
}

/// How a source weight is stored.
#[derive(Clone, Copy, Debug)]
enum SrcFormat {
    /// e4m3 with block scales.
    Fp8 {
        block: [usize; 2],
    },
    /// Packed e2m1 + e8m0 per 32.
    Fp4,
    Float,
}

/// One source matrix `[rows, inp]` (one expert of a stack, or a whole module).
#[derive(Clone, Debug)]
struct Part {
    weight: SrcTensor,
    scale: Option<SrcTensor>,
    format: SrcFormat,
}

/// A unit of output: a plain tensor copied under its MLX name, or one quantized module
/// (`E` parts for stacked experts).
#[derive(Clone, Debug)]
enum Work {
    Copy {
        src: SrcTensor,
        out: String,
    },
    Quant {
        module: String,
        parts: Vec<Part>,
        stacked: bool,
        mode: QuantMode,
        rows: usize,
        inp: usize,
    },
}

impl Work {
    fn entries(&self) -> Vec<Entry> {
        match self {
            Work::Copy { src, out } => vec![Entry {
                name: out.clone(),
                dtype: src.dtype,
                shape: src.shape.clone(),
            }],
            Work::Quant {
                module,
                parts,
                stacked,
                mode,
                rows,
                inp,
            } => {
                let lead = |last: usize| -> Vec<usize> {
                    if *stacked {
                        vec![parts.len(), *rows, last]
                    } else {
                        vec![*rows, last]
                    }
                };
                let groups = inp / mode.group();
                let mut v = vec![Entry {
                    name: format!("{module}.weight"),
                    dtype: DType::U32,
                    shape: lead(mode.packed_cols(*inp)),
                }];
                match mode {
                    QuantMode::Affine { .. } => {
                        for s in ["scales", "biases"] {
                            v.push(Entry {
                                name: format!("{module}.{s}"),
                                dtype: DType::BF16,
                                shape: lead(groups),
                            });
                        }
                    }
                    _ => v.push(Entry {
                        name: format!("{module}.scales"),
                        dtype: DType::U8,
                        shape: lead(groups),
                    }),
                }
                v
            }
        }
    }

    fn in_bytes(&self) -> u64 {
        match self {
            Work::Copy { src, .. } => src.len,
            Work::Quant { parts, .. } => parts
                .iter()
                .map(|p| p.weight.len + p.scale.as_ref().map_or(0, |s| s.len))
                .sum(),
        }
    }
}

/// The official name of a tensor mapped to mlx-lm's (`layers.3.hc_attn_fn` →
/// `model.layers.3.attn_hc.fn`); also used for module paths (`embed` → `model.embed_tokens`).
pub fn to_mlx_name(official: &str) -> String {
    for (from, to) in [
        ("embed", "model.embed_tokens"),
        ("head", "lm_head"),
        ("norm", "model.norm"),
    ] {
        if official == from {
            return to.to_string();
        }
        if let Some(rest) = official.strip_prefix(&format!("{from}.")) {
            return format!("{to}.{rest}");
        }
    }
    if let Some(p) = official.strip_prefix("hc_head_") {
        return format!("model.hc_head.{p}");
    }
    let Some(rest) = official.strip_prefix("layers.") else {
        return official.to_string();
    };
    let (n, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let mut rest = rest.to_string();
    for sub in ["attn", "ffn"] {
        if let Some(p) = rest.strip_prefix(&format!("hc_{sub}_")) {
            rest = format!("{sub}_hc.{p}");
        }
    }
    for (from, to) in [
        ("ffn.gate.bias", "ffn.gate.e_score_correction_bias"),
        ("ffn.shared_experts.w1", "ffn.shared_experts.gate_proj"),
        ("ffn.shared_experts.w3", "ffn.shared_experts.up_proj"),
        ("ffn.shared_experts.w2", "ffn.shared_experts.down_proj"),
    ] {
        if rest == from || rest.starts_with(&format!("{from}.")) {
            rest = rest.replacen(from, to, 1);
        }
    }
    format!("model.layers.{n}.{rest}")
}

/// Sort key keeping a layer's tensors together, layers in numeric order.
fn order_key(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(usize::MAX, |n| n);
    (layer, name.to_string())
}

/// Plans the output: one [`Work`] per output tensor group, validated against the recipe.
fn plan(src: &Source, config: &ModelConfig, recipe: &Recipe) -> Result<Vec<Work>> {
    if let Some(k) = src.tensors.keys().find(|k| k.starts_with("model.")) {
        return Err(Error::Checkpoint(format!(
            "`{k}`: convert reads the official deepseek-ai layout (`layers.N.attn.wq_a.weight`); \
             this checkpoint uses transformers or mlx-lm names"
        )));
    }
    // Official names, with `weight_scale_inv` read as `.scale`.
    let by_name: BTreeMap<String, &SrcTensor> = src
        .tensors
        .iter()
        .filter(|(k, _)| !crate::checkpoint::names::is_ignored(k))
        .map(|(k, t)| {
            let k = k
                .strip_suffix(".weight_scale_inv")
                .map_or(k.clone(), |b| format!("{b}.scale"));
            (k, t)
        })
        .collect();
    let block = config.quant.as_ref().map(|q| q.block);
    let part = |module: &str| -> Result<(Part, usize, usize)> {
        let w = by_name
            .get(&format!("{module}.weight"))
            .ok_or_else(|| Error::tensor(&format!("{module}.weight"), "missing"))?;
        let scale = by_name
            .get(&format!("{module}.scale"))
            .map(|s| (*s).clone());
        if w.shape.len() != 2 {
            return Err(Error::tensor(
                &w.name,
                format!(
                    "in {}: expected a matrix, got shape {:?}",
                    src.file_of(w).display(),
                    w.shape
                ),
            ));
        }
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let (format, inp) = match (w.dtype, &scale) {
            (DType::F8E4M3, Some(s)) => {
                let [bo, bi] = block.unwrap_or_else(|| {
                    crate::cpu::linear::fp8_block_from_grid(
                        rows,
                        cols,
                        s.shape[0],
                        s.shape.get(1).copied().unwrap_or(1),
                    )
                });
                if s.shape != [rows.div_ceil(bo), cols.div_ceil(bi)] {
                    return Err(Error::tensor(
                        &s.name,
                        format!("FP8 scale grid {:?} does not fit weight [{rows}, {cols}] with {bo}x{bi} blocks", s.shape),
                    ));
                }
                (SrcFormat::Fp8 { block: [bo, bi] }, cols)
            }
            (DType::I8 | DType::U8, Some(s)) => {
                if s.shape != [rows, cols * 2 / 32] || !(cols * 2).is_multiple_of(32) {
                    return Err(Error::tensor(
                        &s.name,
                        format!(
                            "FP4 scales {:?} do not fit packed weight [{rows}, {cols}]",
                            s.shape
                        ),
                    ));
                }
                (SrcFormat::Fp4, cols * 2)
            }
            (DType::BF16 | DType::F16 | DType::F32, None) => (SrcFormat::Float, cols),
            (d, _) => {
                return Err(Error::tensor(
                    &w.name,
                    format!(
                        "dtype {} (scale {}) cannot be converted",
                        d.name(),
                        scale.is_some()
                    ),
                ))
            }
        };
        Ok((
            Part {
                weight: (*w).clone(),
                scale,
                format,
            },
            rows,
            inp,
        ))
    };
    let check_fit = |module: &str, mode: QuantMode, inp: usize| -> Result<()> {
        if mode.fits(inp) {
            return Ok(());
        }
        Err(Error::tensor(
            &format!("{module}.weight"),
            format!(
                "input dim {inp} is not a multiple of the group size {} of {}; pick a smaller --group-size",
                mode.group(),
                mode.label()
            ),
        ))
    };

    // Modules to quantize: everything with an official scale, plus embedding and head.
    let mut modules: Vec<String> = by_name
        .keys()
        .filter_map(|k| k.strip_suffix(".scale"))
        .filter(|m| by_name.contains_key(&format!("{m}.weight")))
        .map(str::to_string)
        .collect();
    for m in ["embed", "head"] {
        if by_name.contains_key(&format!("{m}.weight")) {
            modules.push(m.to_string());
        }
    }
    let mut work = Vec::new();
    let mut consumed = std::collections::HashSet::new();
    let mut stacks: BTreeMap<(usize, String), Vec<(usize, String)>> = BTreeMap::new();
    for m in &modules {
        consumed.insert(format!("{m}.weight"));
        consumed.insert(format!("{m}.scale"));
        // layers.N.ffn.experts.E.wK → stacked per (N, wK)
        let p: Vec<&str> = m.split('.').collect();
        if p.len() == 6 && p[0] == "layers" && p[2] == "ffn" && p[3] == "experts" {
            if let (Ok(n), Ok(e)) = (p[1].parse::<usize>(), p[4].parse::<usize>()) {
                stacks
                    .entry((n, p[5].to_string()))
                    .or_default()
                    .push((e, m.clone()));
                continue;
            }
        }
        let mode = recipe.mode_for(m);
        let (part, rows, inp) = part(m)?;
        check_fit(m, mode, inp)?;
        work.push(Work::Quant {
            module: to_mlx_name(m),
            parts: vec![part],
            stacked: false,
            mode,
            rows,
            inp,
        });
    }
    for ((n, w), mut experts) in stacks {
        experts.sort();
        if experts.iter().enumerate().any(|(i, (e, _))| i != *e) {
            return Err(Error::Checkpoint(format!(
                "layer {n}: routed experts of `{w}` are not numbered 0..{}",
                experts.len()
            )));
        }
        let mut parts = Vec::with_capacity(experts.len());
        let mut dims = None;
        for (_, m) in &experts {
            let (p, rows, inp) = part(m)?;
            if dims.is_some_and(|d| d != (rows, inp)) {
                return Err(Error::tensor(
                    &p.weight.name,
                    format!("shape differs from expert 0 ({:?})", dims),
                ));
            }
            dims = Some((rows, inp));
            parts.push(p);
        }
        let (rows, inp) = dims.unwrap_or((0, 0));
        let mode = recipe.mode_for(&experts[0].1);
        check_fit(&experts[0].1, mode, inp)?;
        let proj = match w.as_str() {
            "w1" => "gate_proj",
            "w3" => "up_proj",
            _ => "down_proj",
        };
        work.push(Work::Quant {
            module: format!("model.layers.{n}.ffn.switch_mlp.{proj}"),
            parts,
            stacked: true,
            mode,
            rows,
            inp,
        });
    }
    for (k, t) in &by_name {
        if !consumed.contains(k) {
            work.push(Work::Copy {
                src: (*t).clone(),
                out: to_mlx_name(k),
            });
        }
    }
    work.sort_by_key(|w| match w {
        Work::Copy { src, .. } => order_key(&src.name),
        Work::Quant { parts, .. } => order_key(&parts[0].weight.name),
    });
    Ok(work)
}

/// The `quantization` section for the output: routed experts' mode as the default, every other
/// quantized module that differs as an override (keyed by mlx-lm module path).
fn quant_section(work: &[Work], recipe: &Recipe) -> MlxQuantConfig {
    let mut overrides = BTreeMap::new();
    for w in work {
        if let Work::Quant { module, mode, .. } = w {
            if *mode != recipe.routed {
                overrides.insert(module.clone(), Some(*mode));
            }
        }
    }
    MlxQuantConfig {
        default: recipe.routed,
        overrides,
    }
}

/// Converts; `progress(done, total)` is called with input bytes processed.
pub fn convert(opts: &Options, progress: &mut dyn FnMut(u64, u64)) -> Result<Report> {
    let config_path = opts.model.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let src = Source::open(&opts.model)?;
    let work = plan(&src, &config, &opts.recipe)?;

    if opts.out.exists() {
        return Err(Error::Checkpoint(format!(
            "{} already exists; remove it or pick another --out",
            opts.out.display()
        )));
    }
    let partial = partial_dir(&opts.out)?;
    if partial.exists() {
        // A previous conversion into the same OUT was interrupted: start over.
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;

    // Shards: consecutive work units up to max_shard_bytes.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut acc = 0u64;
    for (i, w) in work.iter().enumerate() {
        let b: u64 = w.entries().iter().map(Entry::bytes).sum();
        if acc > 0 && acc + b > opts.max_shard_bytes {
            shards.push(vec![]);
            acc = 0;
        }
        acc += b;
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
    }
    let n = shards.len();
    let ledger = Ledger::default();
    // Never hold more than one input shard's worth at once, whatever the chunk setting.
    let chunk = opts
        .chunk_bytes
        .min(src.largest_shard().max(1 << 16))
        .max(1);
    let total: u64 = work.iter().map(Work::in_bytes).sum();
    let mut done = 0u64;
    progress(0, total);
    let mut weight_map = BTreeMap::new();
    let mut report = Report {
        out_shards: n,
        out_tensors: 0,
        out_bytes: 0,
        in_bytes: total,
        largest_input_shard: src.largest_shard(),
        peak_buffer_bytes: 0,
        bytes_by_component: BTreeMap::new(),
        quantized_weights: 0,
    };
    for (si, units) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", si + 1);
        let entries: Vec<Entry> = units.iter().flat_map(|&i| work[i].entries()).collect();
        for e in &entries {
            weight_map.insert(e.name.clone(), file.clone());
            let comp = match e.name.rsplit('.').next() {
                Some("scales") => "scales",
                Some("biases") => "biases",
                _ if e.dtype == DType::U32 => "quantized weights",
                _ => "unquantized tensors",
            };
            *report.bytes_by_component.entry(comp).or_default() += e.bytes();
            report.out_tensors += 1;
        }
        let writer = ShardWriter::create(&partial.join(&file), entries)?;
        report.out_bytes += writer.data_bytes;
        for &i in units {
            let w = &work[i];
            if let Work::Quant {
                parts, rows, inp, ..
            } = w
            {
                report.quantized_weights += (parts.len() * rows * inp) as u64;
            }
            run(w, &src, &writer, &ledger, chunk, &mut |b| {
                done += b;
                progress(done, total);
            })?;
        }
        writer.finish()?;
    }

    // Index and config last: a directory without them is not a checkpoint.
    let index = serde_json::json!({
        "metadata": {"total_size": report.out_bytes},
        "weight_map": weight_map,
    });
    write_json(&partial.join("model.safetensors.index.json"), &index)?;
    copy_side_files(&opts.model, &partial)?;
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: config_path.clone(),
        source: e,
    })?;
    let q = quant_section(&work, &opts.recipe).to_json();
    if let Some(obj) = cfg.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert("quantization".into(), q.clone());
        obj.insert("quantization_config".into(), q);
    }
    write_json(&partial.join("config.json"), &cfg)?;
    std::fs::rename(&partial, &opts.out).map_err(|e| Error::io(&opts.out, e))?;
    report.peak_buffer_bytes = ledger.peak();
    Ok(report)
}

/// `OUT.partial`, beside OUT.
pub fn partial_dir(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| {
        Error::Checkpoint(format!("--out {} has no directory name", out.display()))
    })?;
    Ok(out.with_file_name(format!("{}.partial", name.to_string_lossy())))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Tokenizer and other small files travel with the weights.
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let p = e.map_err(|e| Error::io(from, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_string());
        let Some(name) = name else { continue };
        let skip = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == "config.json"
            || !p.is_file();
        if !skip {
            std::fs::copy(&p, to.join(&name)).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Produces one work unit's output in row chunks, writing each piece as it is made.
fn run(
    w: &Work,
    src: &Source,
    out: &ShardWriter,
    ledger: &Ledger,
    chunk: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    match w {
        Work::Copy { src: t, out: name } => {
            let mut at = 0;
            while at < t.len {
                let n = chunk.min(t.len - at);
                let buf = src.read(t, at, n, ledger)?;
                out.write(name, at, buf.as_ref())?;
                at += n;
                progress(n);
            }
            Ok(())
        }
        Work::Quant {
            module,
            parts,
            mode,
            rows,
            inp,
            ..
        } => {
            let groups = inp / mode.group();
            let prow = mode.packed_cols(*inp) * 4;
            let srow = groups
                * if matches!(mode, QuantMode::Affine { .. }) {
                    2
                } else {
                    1
                };
            for (e, p) in parts.iter().enumerate() {
                let in_row = p.weight.len / *rows as u64;
                let out_row = (prow + 2 * srow) as u64;
                let per = ((chunk / (in_row + out_row)).max(1) as usize).min(*rows);
                let table = match (p.format, &p.scale) {
                    (SrcFormat::Fp8 { .. }, Some(s)) => Some(src.read(s, 0, s.len, ledger)?),
                    _ => None,
                };
                let mut r0 = 0;
                while r0 < *rows {
                    let nr = per.min(rows - r0);
                    let piece = quantize_rows(p, table.as_ref(), src, ledger, *mode, *inp, r0, nr)?;
                    let base = e * rows;
                    out.write(
                        &format!("{module}.weight"),
                        ((base + r0) * prow) as u64,
                        piece.packed.as_ref(),
                    )?;
                    out.write(
                        &format!("{module}.scales"),
                        ((base + r0) * srow) as u64,
                        piece.scales.as_ref(),
                    )?;
                    if let Some(b) = &piece.biases {
                        out.write(
                            &format!("{module}.biases"),
                            ((base + r0) * srow) as u64,
                            b.as_ref(),
                        )?;
                    }
                    progress(nr as u64 * in_row);
                    r0 += nr;
                }
                progress(p.scale.as_ref().map_or(0, |s| s.len));
            }
            Ok(())
        }
    }
}

/// Quantized rows `[r0, r0+nr)` of one part.
struct Piece {
    packed: Buf,
    scales: Buf,
    biases: Option<Buf>,
}

#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    p: &Part,
    fp8_table: Option<&Buf>,
    src: &Source,
    ledger: &Ledger,
    mode: QuantMode,
    inp: usize,
    r0: usize,
    nr: usize,
) -> Result<Piece> {
    let rows = p.weight.shape[0];
    let in_row = p.weight.len as usize / rows;
    let w = src.read(
        &p.weight,
        (r0 * in_row) as u64,
        (nr * in_row) as u64,
        ledger,
    )?;
    let groups32 = inp / 32;
    // Exact conversions: the official FP4 bytes are mxfp4; FP8 codes are mxfp8 codes.
    match (p.format, mode, &p.scale) {
        (SrcFormat::Fp4, QuantMode::Mxfp4, Some(s)) => {
            let scales = src.read(s, (r0 * groups32) as u64, (nr * groups32) as u64, ledger)?;
            return Ok(Piece {
                packed: w,
                scales,
                biases: None,
            });
        }
        (SrcFormat::Fp8 { block: [bo, bi] }, QuantMode::Mxfp8, _) if bi % 32 == 0 => {
            let t = fp8_table.map(|t| t.as_ref()).unwrap_or(&[]);
            let cols = inp.div_ceil(bi);
            let mut sc = ledger.alloc(nr * groups32);
            for (r, row) in sc.as_mut().chunks_mut(groups32.max(1)).enumerate() {
                let br = (r0 + r) / bo;
                for (g, s) in row.iter_mut().enumerate() {
                    *s = t[br * cols + g * 32 / bi];
                }
            }
            return Ok(Piece {
                packed: w,
                scales: sc,
                biases: None,
            });
        }
        _ => {}
    }
    let fp4_scales = match (p.format, &p.scale) {
        (SrcFormat::Fp4, Some(s)) => {
            Some(src.read(s, (r0 * groups32) as u64, (nr * groups32) as u64, ledger)?)
        }
        _ => None,
    };
    let fp8_scales: Vec<f32> = fp8_table
        .map(|t| t.as_ref().iter().map(|&u| e8m0_to_f32(u)).collect())
        .unwrap_or_default();
    let groups = inp / mode.group();
    let prow = mode.packed_cols(inp) * 4;
    let srow = groups
        * if matches!(mode, QuantMode::Affine { .. }) {
            2
        } else {
            1
        };
    let mut packed = ledger.alloc(nr * prow);
    let mut scales = ledger.alloc(nr * srow);
    let mut biases = matches!(mode, QuantMode::Affine { .. }).then(|| ledger.alloc(nr * srow));
    let dtype = p.weight.dtype;
    let decode_row = |r: usize, out: &mut [f32]| {
        let b = &w.as_ref()[r * in_row..(r + 1) * in_row];
        let row = match (p.format, dtype) {
            (SrcFormat::Fp8 { block: [bo, bi] }, _) => {
                let cols = inp.div_ceil(bi);
                let br = (r0 + r) / bo;
                Row::Fp8 {
                    codes: b,
                    scales: &fp8_scales[br * cols..(br + 1) * cols],
                    block: bi,
                }
            }
            (SrcFormat::Fp4, _) => Row::Fp4 {
                packed: b,
                scales: fp4_scales
                    .as_ref()
                    .map(|s| &s.as_ref()[r * groups32..(r + 1) * groups32])
                    .unwrap_or(&[]),
            },
            (SrcFormat::Float, DType::F32) => Row::F32(b),
            (SrcFormat::Float, DType::F16) => Row::F16(b),
            (SrcFormat::Float, _) => Row::Bf16(b),
        };
        kernels::dequant(row, out);
    };
    let bias_rows: Vec<Option<&mut [u8]>> = match biases.as_mut() {
        Some(b) => b.as_mut().chunks_mut(srow).map(Some).collect(),
        None => (0..nr).map(|_| None).collect(),
    };
    packed
        .as_mut()
        .par_chunks_mut(prow)
        .zip(scales.as_mut().par_chunks_mut(srow))
        .zip(bias_rows)
        .enumerate()
        .for_each(|(r, ((pk, sc), bs))| {
            let mut x = vec![0f32; inp];
            decode_row(r, &mut x);
            let mut out = Vec::with_capacity(prow);
            let mut sbytes = Vec::with_capacity(srow);
            match mode {
                QuantMode::Affine { bits, group } => {
                    let mut codes = vec![0u8; group];
                    let mut bb = Vec::with_capacity(srow);
                    for g in x.chunks(group) {
                        let (s, b) = affine::quantize_group(g, bits, &mut codes);
                        affine::pack_codes(&codes, bits, &mut out);
                        sbytes.extend_from_slice(&f32_to_bf16(s).to_le_bytes());
                        bb.extend_from_slice(&f32_to_bf16(b).to_le_bytes());
                    }
                    if let Some(bs) = bs {
                        bs.copy_from_slice(&bb);
                    }
                }
                QuantMode::Mxfp4 => mx::quantize_mxfp4_row(&x, &mut out, &mut sbytes),
                QuantMode::Mxfp8 => mx::quantize_mxfp8_row(&x, &mut out, &mut sbytes),
            }
            pk.copy_from_slice(&out);
            sc.copy_from_slice(&sbytes);
        });
    drop(w);
    Ok(Piece {
        packed,
        scales,
        biases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlx_names_round_trip() {
        use crate::checkpoint::names::{to_official, KeyStyle};
        for k in [
            "embed.weight",
            "embed.scales",
            "head.biases",
            "norm.weight",
            "hc_head_fn",
            "layers.2.hc_attn_base",
            "layers.2.hc_ffn_scale",
            "layers.2.attn.wq_a.scales",
            "layers.2.attn.compressor.ape",
            "layers.2.attn.indexer.compressor.norm.weight",
            "layers.2.ffn.gate.bias",
            "layers.2.ffn.gate.tid2eid",
            "layers.2.ffn.shared_experts.w3.weight",
        ] {
            let m = to_mlx_name(k);
            assert!(m.starts_with("model.") || m.starts_with("lm_head."), "{m}");
            assert_eq!(to_official(&m, KeyStyle::Mlx).as_deref(), Some(k), "{m}");
        }
    }
}
