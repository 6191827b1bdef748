//! `dsv4 bench --device cuda`: a synthetic DeepSeek-V4 (Flash or Pro shapes, official FP8/FP4
//! formats) on the GPU — as many layers as fit — measuring prefill and decode against the
//! device's measured copy bandwidth; markdown table, CSV and JSON. `--device cuda:0,1,...`
//! splits the layers over several GPUs (a [`Pipeline`]), so the whole model can fit.

use anyhow::{bail, Context, Result};
use dsv4_core::config::{AttnKind, MlpKind};
use dsv4_core::{synthetic, Logits, Model, ModelConfig};
use dsv4_cuda::weights::Ends;
use dsv4_cuda::{split_layers, BatchItem, CudaModel, Gpu, GpuSeq, PipeItem, PipeSeq, Pipeline};
use serde_json::{json, Value};
use std::time::Instant;

pub struct CudaBench {
    /// One GPU, or the stages of a pipeline in order.
    pub ordinals: Vec<usize>,
    pub preset: String,
    pub layers: Option<usize>,
    pub prompts: Vec<usize>,
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub decode: usize,
    pub csv: Option<std::path::PathBuf>,
    pub json: bool,
    pub profile: bool,
    /// The arithmetic (`--numerics official [--act-quant]` adds DeepSeek's roundings and, for
    /// prefill, the FP8 tensor-core GEMMs).
    pub numerics: dsv4_core::numerics::Numerics,
}

/// Official-style config of a preset with `layers` layers.
fn preset(name: &str, layers: usize) -> Result<Value> {
    let mut j = synthetic::flash_config_json();
    match name {
        "flash" => {
            j["compress_ratios"] = json!(synthetic::flash_schedule(layers));
        }
        "pro" => {
            let over = json!({"hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536,
                "o_groups": 16, "index_topk": 1024, "n_routed_experts": 384,
                "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5});
            for (k, v) in over.as_object().expect("object") {
                j[k] = v.clone();
            }
            let mut s: Vec<usize> = (0..layers)
                .map(|i| if i < 2 || i % 2 == 1 { 128 } else { 4 })
                .collect();
            s.push(0);
            j["compress_ratios"] = json!(s);
        }
        other => bail!("--synthetic must be `flash` or `pro`, got `{other}`"),
    }
    j["num_hidden_layers"] = json!(layers);
    Ok(j)
}

fn code(k: AttnKind) -> usize {
    k.ratio().unwrap_or(0)
}

/// GPU copy bandwidth (bytes read + written per second), best of 10 copies of 2 GiB.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let n = 2usize << 30;
    let (a, b) = (gpu.alloc(n)?, gpu.alloc(n)?);
    gpu.memset(a.ptr, 1, n)?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        gpu.sync()?;
        let t = Instant::now();
        gpu.dtod(b.ptr, a.ptr, n)?;
        gpu.sync()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * n as f64 / best)
}

/// Bytes the layer's weights occupy.
fn layer_bytes(m: &Model, i: usize) -> usize {
    let l = &m.weights.layers[i];
    l.dense_bytes() + l.moe.experts.len() * l.expert_bytes()
}

/// The most device bytes one sequence's caches hold in layer `i` of `m` from a fill to `ctx`
/// positions through `steps` decode steps (`dsv4_cuda::synthetic_layer_bytes`: the window ring
/// and each compressor's entries and tail rings).
fn seq_layer_bytes(m: &Model, i: usize, ctx: usize, steps: usize) -> usize {
    let c = &m.config;
    let attn = &m.weights.layers[i].attn;
    let comps = attn
        .compressor
        .iter()
        .chain(attn.indexer.iter().map(|x| &x.compressor))
        .map(|w| (w.ratio, w.dim, w.wkv.out));
    dsv4_cuda::synthetic_layer_bytes(c.sliding_window, c.head_dim, comps, ctx, steps)
}

/// What a benchmark stage needs on its GPU: each layer of the whole model's schedule (weights,
/// and the decode rows' caches), a reserve, the embedding (first stage) and the head (last).
struct LayerNeed {
    per_layer: Vec<usize>,
    reserve: usize,
    embed: usize,
    head: usize,
}

/// The most layers of the schedule (a prefix of `need.per_layer`) whose stages (`split_layers`
/// over `ords`, in order) fit every GPU's free memory (`free_of`: each distinct ordinal once);
/// at least 1.
fn layers_that_fit(need: &LayerNeed, ords: &[usize], free_of: &[(usize, usize)]) -> usize {
    let fits = |l: usize| {
        let ranges = split_layers(l, ords.len());
        let last = ranges.len() - 1;
        free_of.iter().all(|&(o, free)| {
            let used: usize = ranges
                .iter()
                .zip(ords)
                .enumerate()
                .filter(|(_, (_, &so))| so == o)
                .map(|(i, (r, _))| {
                    need.per_layer[r.clone()].iter().sum::<usize>()
                        + need.reserve
                        + if i == 0 { need.embed } else { 0 }
                        + if i == last { need.head } else { 0 }
                })
                .sum();
            used <= free
        })
    };
    (1..=need.per_layer.len())
        .rev()
        .find(|&l| fits(l))
        .unwrap_or(1)
}

/// What the benchmark runs: the model on one GPU, or a pipeline of stages over several.
trait Target {
    type Seq;
    fn new_seq(&self) -> dsv4_cuda::Result<Self::Seq>;
    /// Caches holding `ctx` random entries, as if `ctx` tokens had been fed.
    fn fill(&self, seq: &mut Self::Seq, ctx: usize) -> dsv4_cuda::Result<()>;
    /// One decode step: sequence j adds token toks[j] (last-row logits).
    fn step(&self, seqs: &mut [Self::Seq], toks: &[[u32; 1]]) -> dsv4_cuda::Result<()>;
    fn prefill(&self, seq: &mut Self::Seq, ids: &[u32]) -> dsv4_cuda::Result<()>;
    /// One more decode step timed launch by launch (`--profile`, one GPU only).
    fn profile_step(
        &self,
        seqs: &mut [Self::Seq],
        cfg: &ModelConfig,
        ctx: usize,
        step_s: f64,
    ) -> Result<()>;
    /// The one-GPU model, for `--profile`.
    fn single(&self) -> Option<&CudaModel>;
    /// The GPUs it runs on, each once.
    fn gpus(&self) -> Vec<&Gpu>;
    /// Weight bytes a decode step of one token reads (k experts per layer).
    fn decode_bytes(&self, k: usize) -> usize;
}

impl Target for CudaModel {
    type Seq = GpuSeq;
    fn new_seq(&self) -> dsv4_cuda::Result<GpuSeq> {
        CudaModel::new_seq(self)
    }
    fn fill(&self, seq: &mut GpuSeq, ctx: usize) -> dsv4_cuda::Result<()> {
        seq.fill_synthetic(&self.gpu, &self.weights, ctx)
    }
    fn step(&self, seqs: &mut [GpuSeq], toks: &[[u32; 1]]) -> dsv4_cuda::Result<()> {
        self.forward_batch(&mut BatchItem::last_rows(seqs, toks))
            .map(drop)
    }
    fn prefill(&self, seq: &mut GpuSeq, ids: &[u32]) -> dsv4_cuda::Result<()> {
        self.forward(seq, ids, Logits::Last).map(drop)
    }
    fn profile_step(
        &self,
        seqs: &mut [GpuSeq],
        cfg: &ModelConfig,
        ctx: usize,
        step_s: f64,
    ) -> Result<()> {
        profile_step(self, seqs, cfg, ctx, step_s)
    }
    fn single(&self) -> Option<&CudaModel> {
        Some(self)
    }
    fn gpus(&self) -> Vec<&Gpu> {
        vec![&self.gpu]
    }
    fn decode_bytes(&self, k: usize) -> usize {
        self.weights.decode_bytes(k)
    }
}

impl Target for Pipeline {
    type Seq = PipeSeq;
    fn new_seq(&self) -> dsv4_cuda::Result<PipeSeq> {
        Pipeline::new_seq(self)
    }
    fn fill(&self, seq: &mut PipeSeq, ctx: usize) -> dsv4_cuda::Result<()> {
        for (stage, s) in self.stages().iter().zip(&mut seq.stages) {
            s.fill_synthetic(&stage.gpu, &stage.weights, ctx)?;
        }
        Ok(())
    }
    fn step(&self, seqs: &mut [PipeSeq], toks: &[[u32; 1]]) -> dsv4_cuda::Result<()> {
        self.forward_batch(&mut PipeItem::last_rows(seqs, toks))
            .map(drop)
    }
    fn prefill(&self, seq: &mut PipeSeq, ids: &[u32]) -> dsv4_cuda::Result<()> {
        self.forward(seq, ids, Logits::Last).map(drop)
    }
    fn profile_step(&self, _: &mut [PipeSeq], _: &ModelConfig, _: usize, _: f64) -> Result<()> {
        bail!("--profile times one GPU's launches; give --device cuda:N")
    }
    fn single(&self) -> Option<&CudaModel> {
        None
    }
    fn gpus(&self) -> Vec<&Gpu> {
        let mut out: Vec<&Gpu> = Vec::new();
        for st in self.stages() {
            if !out.iter().any(|g| g.ordinal == st.gpu.ordinal) {
                out.push(&st.gpu);
            }
        }
        out
    }
    fn decode_bytes(&self, k: usize) -> usize {
        self.stages()
            .iter()
            .map(|s| s.weights.decode_bytes(k))
            .sum()
    }
}

/// Device memory in use, summed over the GPUs.
fn used_bytes(gpus: &[&Gpu]) -> usize {
    gpus.iter()
        .filter_map(|g| g.mem_info().ok())
        .map(|(free, total)| total - free)
        .sum()
}

/// Decode steps of `b` sequences at context `ctx`: one row of the table.
#[allow(clippy::too_many_arguments)] // one row's whole setup; a struct would only rename it
fn decode_row<M: Target>(
    model: &M,
    full_layers: usize,
    cfg: &ModelConfig,
    ctx: usize,
    b: usize,
    steps_n: usize,
    bw: f64,
    weight_bytes: f64,
    profile: bool,
) -> Result<Value> {
    let layers = cfg.num_layers;
    let mut seqs = Vec::with_capacity(b);
    for _ in 0..b {
        let mut seq = model.new_seq()?;
        model.fill(&mut seq, ctx)?;
        seqs.push(seq);
    }
    let mut steps = Vec::new();
    for i in 0..steps_n + 2 {
        let toks: Vec<[u32; 1]> = (0..b)
            .map(|j| [((5 + i * 131 + j * 17) % cfg.vocab_size) as u32])
            .collect();
        let t = Instant::now();
        model.step(&mut seqs, &toks)?;
        if i >= 2 {
            steps.push(t.elapsed().as_secs_f64());
        }
    }
    steps.sort_by(f64::total_cmp);
    let med = steps[steps.len() / 2]; // (steps_n >= 1: `run` checks)
    if profile {
        model.profile_step(&mut seqs, cfg, ctx, med)?;
    }
    // Cache bytes a step reads per sequence: window rows, visible/selected entries, indexer keys.
    let mut cache_bytes = 0usize;
    for kind in &cfg.attn_kinds {
        let win = cfg.sliding_window.min(ctx + 1);
        let ents = match kind {
            AttnKind::Sliding => 0,
            AttnKind::Compressed { ratio, sparse } => {
                let n = (ctx + 1) / ratio;
                if *sparse {
                    cache_bytes += n * cfg.index_head_dim * 4;
                    n.min(cfg.index_topk)
                } else {
                    n
                }
            }
        };
        cache_bytes += (win + ents) * cfg.head_dim * 4;
    }
    // Weights once per step (batch 1: exactly; larger batches read more experts, so this is a
    // lower bound), caches once per sequence.
    let bytes = weight_bytes + (b * cache_bytes) as f64;
    let frac = bytes / med / bw;
    eprintln!(
        "decode @ {ctx} x{b}: {:.2} ms/step, {:.0} tok/s",
        med * 1e3,
        b as f64 / med
    );
    Ok(
        json!({"phase": "decode", "tokens": b, "context": ctx, "seconds": med,
        "tok_s": b as f64 / med, "ms_per_layer": 1e3 * med / layers as f64,
        "bytes_per_step": bytes, "bandwidth_fraction": frac,
        "tok_s_full_depth": b as f64 / (med * full_layers as f64 / layers as f64)}),
    )
}

/// One more decode step, timed launch by launch (graphs and PDL off), printed grouped by label.
fn profile_step(
    model: &CudaModel,
    seqs: &mut [GpuSeq],
    cfg: &ModelConfig,
    ctx: usize,
    step_s: f64,
) -> Result<()> {
    let toks: Vec<[u32; 1]> = (0..seqs.len()).map(|j| [(7 + j * 13) as u32]).collect();
    let mut items = BatchItem::last_rows(seqs, &toks);
    let gpu = &model.gpu;
    model.set_graphs(false);
    gpu.set_profile(true);
    let run = model.forward_batch(&mut items);
    let launches = gpu.take_profile();
    gpu.set_profile(false);
    model.set_graphs(true);
    run?;
    let what = format!("decode x{} @ {ctx}, {} layers", items.len(), cfg.num_layers);
    let note = format!("graph step {:.3} ms", step_s * 1e3);
    print_profile(&what, &note, &launches?, false);
    Ok(())
}

/// One prefill of `ids`, timed launch by launch (cuBLASLt's GEMMs are not launches of ours:
/// they show as the gap between the summed launches and the wall time).
fn profile_prefill(model: &CudaModel, ids: &[u32], layers: usize) -> Result<()> {
    let gpu = &model.gpu;
    let mut seq = model.new_seq()?;
    gpu.set_profile(true);
    let t = Instant::now();
    let run = model.forward(&mut seq, ids, Logits::Last);
    let wall = t.elapsed().as_secs_f64();
    let launches = gpu.take_profile();
    gpu.set_profile(false);
    run?;
    let what = format!("prefill {} tokens, {layers} layers", ids.len());
    let note = format!("wall {:.1} ms while profiled", wall * 1e3);
    print_profile(&what, &note, &launches?, true);
    Ok(())
}

/// Launches grouped by label, longest first, with the weight rate of those that stream weights.
/// `by_kernel` groups launches by kernel name alone (prefill: the MoE tiles vary per call).
fn print_profile(
    what: &str,
    note: &str,
    launches: &[dsv4_cuda::gpu::ProfiledLaunch],
    by_kernel: bool,
) {
    let mut groups: Vec<(String, usize, usize, f64)> = Vec::new();
    for l in launches {
        let label = match l.label.split_once(" (") {
            Some((name, _)) if by_kernel => name,
            _ => &l.label,
        };
        match groups.iter_mut().find(|g| g.0 == label) {
            Some(g) => {
                g.1 += 1;
                g.2 += l.bytes;
                g.3 += l.ms;
            }
            None => groups.push((label.to_string(), 1, l.bytes, l.ms)),
        }
    }
    groups.sort_by(|a, b| b.3.total_cmp(&a.3));
    let total: f64 = launches.iter().map(|l| l.ms).sum();
    let gemv: f64 = launches.iter().filter(|l| l.bytes > 0).map(|l| l.ms).sum();
    let gemv_bytes: usize = launches.iter().map(|l| l.bytes).sum();
    println!(
        "\nprofile: {what}: {} launches, {:.3} ms summed ({note}); weight-streaming launches \
         {:.3} ms at {:.0} GB/s",
        launches.len(),
        total,
        gemv,
        gemv_bytes as f64 / (gemv * 1e-3) / 1e9
    );
    println!("| launch | count | total ms | share | us each | GB/s |");
    println!("|---|---|---|---|---|---|");
    for (label, n, bytes, ms) in &groups {
        let rate = if *bytes > 0 {
            format!("{:.0}", *bytes as f64 / (ms * 1e-3) / 1e9)
        } else {
            String::new()
        };
        println!(
            "| {label} | {n} | {ms:.3} | {:.1}% | {:.1} | {rate} |",
            100.0 * ms / total,
            1e3 * ms / *n as f64
        );
    }
}

/// The prefill rows, then the decode rows of every context and batch size; with the peak
/// device memory in use and the weight bytes a decode step reads.
fn measure<M: Target>(
    model: &M,
    a: &CudaBench,
    cfg: &ModelConfig,
    full_layers: usize,
    bw: f64,
) -> Result<(Vec<Value>, usize, f64)> {
    let layers = cfg.num_layers;
    let gpus = model.gpus();
    let mut peak_used = used_bytes(&gpus);
    let weight_bytes = model.decode_bytes(cfg.num_experts_per_tok) as f64;
    let mut rows = Vec::new();
    let ids_for = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| (3 + i * 7919 % (cfg.vocab_size - 3)) as u32)
            .collect()
    };
    for &p in a.prompts.iter().filter(|&&p| p > 0) {
        let ids = ids_for(p);
        let mut seq = model.new_seq()?;
        // Warm-up over the chunk shapes the timed call will use (cuBLASLt times its
        // candidate kernels once per shape).
        model.prefill(&mut seq, &ids[..p.min(4096)])?;
        let mut seq2 = model.new_seq()?;
        let t = Instant::now();
        model.prefill(&mut seq2, &ids)?;
        let s = t.elapsed().as_secs_f64();
        peak_used = peak_used.max(used_bytes(&gpus));
        drop(seq);
        rows.push(
            json!({"phase": "prefill", "tokens": p, "context": p, "seconds": s,
            "tok_s": p as f64 / s, "ms_per_layer": 1e3 * s / layers as f64}),
        );
        eprintln!("prefill {p}: {:.0} tok/s", p as f64 / s);
        let profiled = *a.prompts.iter().filter(|&&q| q <= 8192).max().unwrap_or(&0);
        if let (true, true, Some(m)) = (a.profile, p == profiled, model.single()) {
            profile_prefill(m, &ids, layers)?;
        }
    }
    // Decode at each context and batch size, the caches filled with random entries of the
    // right count; a batch is B sequences each adding one token per step. Batch-major, so that
    // each batch size's context sweep runs under the same memory state (the larger batches'
    // caches, allocated and freed, leave the GPU full); rows are listed context-major.
    let first_decode = rows.len();
    for &b in &a.batches {
        for &ctx in &a.contexts {
            let row = match decode_row(
                model,
                full_layers,
                cfg,
                ctx,
                b.max(1),
                a.decode,
                bw,
                weight_bytes,
                a.profile,
            ) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("decode @ {ctx} x{b}: {e}");
                    json!({"phase": "decode", "tokens": b, "context": ctx, "error": e.to_string()})
                }
            };
            peak_used = peak_used.max(used_bytes(&gpus));
            rows.push(row);
        }
    }
    let pos = |ctx: usize| a.contexts.iter().position(|&c| c == ctx);
    rows[first_decode..].sort_by_key(|r| pos(r["context"].as_u64().unwrap_or(0) as usize));
    Ok((rows, peak_used, weight_bytes))
}

pub fn run(a: CudaBench) -> Result<()> {
    let ords = a.ordinals.clone();
    let Some(&first) = ords.first() else {
        bail!("no GPU given");
    };
    if a.profile && ords.len() > 1 {
        bail!("--profile times one GPU's launches; give --device cuda:N");
    }
    if a.decode == 0 && !a.contexts.is_empty() && !a.batches.is_empty() {
        bail!("--decode must be at least 1 (steps timed per decode row)");
    }
    let gpu = Gpu::open(first)?;
    eprintln!("measuring {} copy bandwidth...", gpu.name);
    let bw = copy_bandwidth(&gpu)?;
    // Free memory of every GPU, each once (an ordinal may repeat).
    let mut distinct = ords.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut free_of = Vec::with_capacity(distinct.len());
    let mut total = 0usize;
    for &o in &distinct {
        let (free, all) = if o == first {
            gpu.mem_info()?
        } else {
            Gpu::open(o)?.mem_info()?
        };
        free_of.push((o, free));
        total += all;
    }
    let full_layers = if a.preset == "pro" { 61 } else { 43 };

    // Host: one layer of each distinct (attention kind, MoE kind) of the target schedule.
    let target_cfg = ModelConfig::from_json(&preset(&a.preset, full_layers)?)?;
    let mut kinds: Vec<(AttnKind, MlpKind)> = Vec::new();
    for (k, m) in target_cfg.attn_kinds.iter().zip(&target_cfg.mlp_kinds) {
        if !kinds.contains(&(*k, *m)) {
            kinds.push((*k, *m));
        }
    }
    let mut hj = preset(&a.preset, kinds.len())?;
    let mut sched: Vec<usize> = kinds.iter().map(|(k, _)| code(*k)).collect();
    sched.push(0);
    hj["compress_ratios"] = json!(sched);
    hj["num_hash_layers"] = json!(kinds.iter().filter(|(_, m)| *m == MlpKind::Hash).count());
    let host_cfg = ModelConfig::from_json(&hj)?;
    eprintln!(
        "generating {} distinct random layers on the host...",
        kinds.len()
    );
    let t = Instant::now();
    let ck = synthetic::checkpoint(host_cfg, 1)?;
    let mut host = Model::load(&ck)?;
    host.numerics = a.numerics;
    let gen_s = t.elapsed().as_secs_f64();

    // As many layers as fit: each layer's weights (its kind's) and the decode rows' caches in
    // it (the largest batch at the longest context, each sequence holding what
    // `fill_synthetic` reserves there).
    let per_layer = (0..kinds.len())
        .map(|i| layer_bytes(&host, i))
        .max()
        .unwrap_or(1);
    let (embed_b, head_b) = (
        host.weights.embed.stored_bytes(),
        host.weights.head.stored_bytes(),
    );
    // A decode row feeds its two warm-up steps, the timed ones and, with --profile, one more.
    let steps = a.decode + 3;
    let batch_max = if a.contexts.is_empty() {
        0
    } else {
        a.batches.iter().map(|&b| b.max(1)).max().unwrap_or(0)
    };
    let kind_of = |k: &AttnKind, m: &MlpKind| {
        kinds
            .iter()
            .position(|x| x == &(*k, *m))
            .expect("collected above")
    };
    let layer_need: Vec<(usize, usize)> = target_cfg
        .attn_kinds
        .iter()
        .zip(&target_cfg.mlp_kinds)
        .map(|(k, m)| {
            let i = kind_of(k, m);
            let cache = a
                .contexts
                .iter()
                .map(|&ctx| seq_layer_bytes(&host, i, ctx, steps))
                .max()
                .unwrap_or(0);
            (layer_bytes(&host, i), batch_max * cache)
        })
        .collect();
    let cache_per_layer = layer_need.iter().map(|&(_, c)| c).max().unwrap_or(0);
    let need = LayerNeed {
        per_layer: layer_need.iter().map(|&(w, c)| w + c).collect(),
        // Activations, scratch and the prefill rows' sequences.
        reserve: 10usize << 30,
        embed: embed_b,
        head: head_b,
    };
    let layers = match a.layers {
        Some(l) => l.max(1),
        None => layers_that_fit(&need, &ords, &free_of),
    };
    if layers < ords.len() {
        bail!(
            "{layers} layers cannot be split over {} GPUs; list at most {layers}",
            ords.len()
        );
    }
    let cfg = ModelConfig::from_json(&preset(&a.preset, layers)?)?;
    let src: Vec<usize> = cfg
        .attn_kinds
        .iter()
        .zip(&cfg.mlp_kinds)
        .map(|(k, m)| kind_of(k, m))
        .collect();
    eprintln!(
        "uploading {layers} layers ({:.1} GB each; the decode rows' caches up to {:.2} GB per \
         layer) to {} (cuda:{})...",
        per_layer as f64 / 1e9,
        cache_per_layer as f64 / 1e9,
        gpu.name,
        ords.iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let t = Instant::now();
    // One stage per listed GPU, each a contiguous run of layers.
    let ranges = split_layers(layers, ords.len());
    let last = ranges.len() - 1;
    let mut stages = Vec::with_capacity(ranges.len());
    for (i, (r, &o)) in ranges.iter().zip(&ords).enumerate() {
        let c = dsv4_cuda::model::part_config(&cfg, r.clone())?;
        let ends = Ends {
            embed: i == 0,
            head: i == last,
        };
        let stage = CudaModel::from_model_layers(&host, o, c, &src[r.clone()], ends, |j, n| {
            eprint!("\r  cuda:{o}: layer {j}/{n}");
        })
        .with_context(|| format!("uploading the synthetic model's layers {r:?} to cuda:{o}"))?;
        eprintln!();
        stages.push(stage);
    }
    let upload_s = t.elapsed().as_secs_f64();
    drop(host);
    drop(ck);
    let (rows, peak_used, weight_bytes) = if stages.len() == 1 {
        let model = stages.pop().expect("one stage");
        measure(&model, &a, &cfg, full_layers, bw)?
    } else {
        let pipe = Pipeline::from_stages(stages, cfg.clone())?;
        measure(&pipe, &a, &cfg, full_layers, bw)?
    };

    let devices = ords
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let result = json!({
        "device": format!("cuda:{devices} {}", gpu.name), "preset": a.preset,
        "layers": layers, "full_layers": full_layers, "copy_bandwidth_bytes_per_s": bw,
        "gpu_total_bytes": total, "peak_gpu_used_bytes": peak_used,
        "host_generate_s": gen_s, "upload_s": upload_s,
        "decode_weight_bytes_per_step": weight_bytes, "rows": rows,
    });
    if let Some(path) = &a.csv {
        let mut s =
            String::from("phase,tokens,context,seconds,tok_s,ms_per_layer,bandwidth_fraction\n");
        for r in &rows {
            s += &format!(
                "{},{},{},{:.6},{:.3},{:.4},{}\n",
                r["phase"].as_str().unwrap_or(""),
                r["tokens"],
                r["context"],
                r["seconds"].as_f64().unwrap_or(0.0),
                r["tok_s"].as_f64().unwrap_or(0.0),
                r["ms_per_layer"].as_f64().unwrap_or(0.0),
                r["bandwidth_fraction"]
                    .as_f64()
                    .map_or(String::new(), |f| format!("{f:.4}")),
            );
        }
        std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{result}");
        return Ok(());
    }
    println!(
        "{} · synthetic {} shapes, {layers} of {full_layers} layers (official FP8/FP4 formats) · \
         numerics {:?} · copy bandwidth {:.0} GB/s · peak GPU memory {:.1} GB of {:.1}",
        if ords.len() > 1 {
            format!("{} (cuda:{devices}, layers split in order)", gpu.name)
        } else {
            gpu.name.clone()
        },
        a.preset,
        a.numerics,
        bw / 1e9,
        peak_used as f64 / 1e9,
        total as f64 / 1e9
    );
    println!(
        "decode weight traffic: {:.2} GB/step ({layers} layers)",
        weight_bytes / 1e9
    );
    println!();
    println!(
        "| phase | tokens (decode: batch) | context | ms | tok/s | ms/layer | {full_layers}-layer tok/s | bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        if let Some(e) = r["error"].as_str() {
            println!(
                "| {} | {} | {} | {e} | | | | |",
                r["phase"].as_str().unwrap_or(""),
                r["tokens"],
                r["context"]
            );
            continue;
        }
        let s = r["seconds"].as_f64().unwrap_or(0.0);
        let tokens = r["tokens"].as_f64().unwrap_or(0.0);
        let equiv = tokens / (s * full_layers as f64 / layers as f64);
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.3} | {:.1} | {} |",
            r["phase"].as_str().unwrap_or(""),
            r["tokens"],
            r["context"],
            s * 1e3,
            r["tok_s"].as_f64().unwrap_or(0.0),
            r["ms_per_layer"].as_f64().unwrap_or(0.0),
            equiv,
            r["bandwidth_fraction"]
                .as_f64()
                .map_or("—".into(), |f| format!("{:.0}%", 100.0 * f)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: usize = 1 << 30;

    fn need(per_layer: usize) -> LayerNeed {
        LayerNeed {
            per_layer: vec![per_layer * GB; 43],
            reserve: 10 * GB,
            embed: GB,
            head: 2 * GB,
        }
    }

    /// One GPU: as many layers as its free memory holds beside the reserve, the embedding and
    /// the head; the decode rows' caches per layer take layers away; never more than the model
    /// has, never fewer than one.
    #[test]
    fn layers_fit_one_gpu() {
        let free = [(0usize, 80 * GB)];
        assert_eq!(layers_that_fit(&need(4), &[0], &free), 16); // (80 - 13) / 4
        assert_eq!(layers_that_fit(&need(5), &[0], &free), 13); // the caches: 1 GB a layer
        assert_eq!(layers_that_fit(&need(1), &[0], &free), 43);
        assert_eq!(layers_that_fit(&need(100), &[0], &free), 1);
    }

    /// Stages over GPUs: the first holds the embedding, the last the head, and stages listed
    /// on one ordinal share its memory.
    #[test]
    fn layers_fit_stages() {
        let two = [(0usize, 80 * GB), (1, 80 * GB)];
        // 34 layers: 17 + 17, the first stage 68 + 11 GB, the second 68 + 12 (80: full); 35
        // would give the second 18.
        assert_eq!(layers_that_fit(&need(4), &[0, 1], &two), 34);
        // Both stages on GPU 0: one stage's worth, less a second reserve.
        let one = [(0usize, 80 * GB)];
        assert_eq!(layers_that_fit(&need(4), &[0, 0], &one), 14); // (80 - 23) / 4
    }

    /// Layers of unequal needs (a schedule's kinds): the prefix that fits, not the mean.
    #[test]
    fn layers_fit_a_schedule() {
        let free = [(0usize, 35 * GB)];
        let mut n = need(0);
        n.per_layer = [2usize, 2, 6, 1, 6, 1, 6, 1]
            .iter()
            .map(|g| g * GB)
            .collect();
        // 13 GB fixed: 2 + 2 + 6 + 1 + 6 + 1 = 18 fits the other 22, the seventh layer's 6 not.
        assert_eq!(layers_that_fit(&n, &[0], &free), 6);
    }
}
