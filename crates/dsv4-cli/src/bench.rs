//! `dsv4 bench`: prefill and decode throughput, peak memory, and the decode step's weight
//! traffic as a fraction of measured memory bandwidth.

use anyhow::Result;
use clap::Args;
use dsv4_core::{bench, synthetic, Checkpoint, Logits, Model, ModelConfig, SeqCache, SeqInput};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Benchmark a real checkpoint instead of the synthetic model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Synthetic model: number of layers (Flash schedule: 2 sliding, then CSA/HCA alternating).
    /// Default: 6 on the CPU, as many as fit on a GPU.
    #[arg(long)]
    layers: Option<usize>,
    /// Synthetic model: routed experts per layer.
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Synthetic model: vocabulary size.
    #[arg(long, default_value_t = 129280)]
    vocab: usize,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 256)]
    prompt: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Instead of the model: single-token GEMV throughput of each weight format.
    #[arg(long)]
    kernels: bool,
    /// CUDA: the synthetic preset, `flash` or `pro` (real shapes; as many layers as fit unless
    /// --layers is given).
    #[arg(long, default_value = "flash")]
    synthetic: String,
    /// CUDA: prompt lengths to prefill.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
    prompts: Vec<usize>,
    /// CUDA: context lengths to decode at.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768,65536")]
    contexts: Vec<usize>,
    /// Batch sizes to decode at (sequences stepping together). On the CPU, sizes above 1 are
    /// measured after the single-sequence run, on copies of its cache.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// CUDA: write the table as CSV here too.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Run the model as the server does: batch-invariant (the tiled linear path even for a
    /// single token).
    #[arg(long)]
    batch_invariant: bool,
    /// CUDA: instead of the model, FP8 tensor-core GEMM rates (cuBLASLt; peak and DeepSeek's
    /// block scaling at the Flash projection shapes, one row set per --prompts length).
    #[arg(long)]
    gemm: bool,
    /// CUDA: after each decode row, time one step launch by launch (eager, no PDL) and print
    /// the kernels' times, grouped by kernel and shape, with the weight rate of GEMVs.
    #[arg(long)]
    profile: bool,
    #[command(flatten)]
    numerics: crate::NumericsArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(ordinals) = a.numerics.cuda_ordinals()? {
        return run_cuda(a, ordinals);
    }
    let threads = rayon::current_num_threads();
    eprintln!("measuring memory bandwidth ({threads} threads)...");
    let bw = bench::read_bandwidth(1 << 30, 5);
    if a.kernels {
        return kernels(bw);
    }

    let t0 = Instant::now();
    let (ck, label) = match &a.model {
        Some(dir) => (Checkpoint::open(dir)?, dir.display().to_string()),
        None => {
            let mut j = synthetic::flash_config_json();
            let layers = a.layers.unwrap_or(6);
            j["num_hidden_layers"] = json!(layers);
            j["compress_ratios"] = json!(synthetic::flash_schedule(layers));
            j["n_routed_experts"] = json!(a.experts);
            j["vocab_size"] = json!(a.vocab);
            let cfg = ModelConfig::from_json(&j)?;
            (
                synthetic::checkpoint(cfg, 1)?,
                format!(
                    "synthetic Flash shapes, {} layers, {} experts, vocab {}",
                    layers, a.experts, a.vocab
                ),
            )
        }
    };
    let mut model = Model::load(&ck)?;
    model.numerics = a.numerics.profile()?;
    model.batch_invariant = a.batch_invariant;
    let load_s = t0.elapsed().as_secs_f64();
    let c = &model.config;
    let ids: Vec<u32> = (0..a.prompt)
        .map(|i| (3 + i * 7919 % (c.vocab_size - 3)) as u32)
        .collect();

    let mut cache = model.new_cache();
    let t = Instant::now();
    let mut logits = model.forward(&mut cache, &ids, Logits::Last)?;
    let prefill_s = t.elapsed().as_secs_f64();

    let mut steps = Vec::with_capacity(a.decode);
    for _ in 0..a.decode {
        let next = argmax(&logits);
        let t = Instant::now();
        logits = model.forward(&mut cache, &[next], Logits::Last)?;
        steps.push(t.elapsed().as_secs_f64());
    }
    steps.sort_by(f64::total_cmp);
    let median = steps.get(steps.len() / 2).copied().unwrap_or(f64::NAN);
    let decode_tok_s = a.decode as f64 / steps.iter().sum::<f64>();
    let peak = bench::peak_rss_bytes(); // before the batches' cache copies
    let batched: Vec<(usize, f64)> = a
        .batch
        .iter()
        .filter(|&&b| b > 1)
        .map(|&b| Ok((b, batch_step(&model, &cache, &logits, b, a.decode)?)))
        .collect::<Result<_>>()?;
    let bytes = model.weights.decode_bytes(c.num_experts_per_tok) as f64;
    let achieved = bytes / median;
    let ckb = ck.total_bytes();
    let result = json!({
        "model": label, "threads": threads, "load_s": load_s,
        "checkpoint_bytes": ckb, "prompt_tokens": a.prompt, "decode_tokens": a.decode,
        "prefill_tok_s": a.prompt as f64 / prefill_s, "decode_tok_s": decode_tok_s,
        "decode_step_median_s": median, "decode_weight_bytes_per_token": bytes,
        "decode_bytes_per_s": achieved, "measured_bandwidth_bytes_per_s": bw,
        "bandwidth_fraction": achieved / bw, "peak_rss_bytes": peak,
        "cache_bytes": cache.bytes(),
        "numerics": format!("{:?}", model.numerics),
        "batch_decode": batched.iter().map(|&(b, step)| json!({
            "batch": b, "step_median_s": step, "tok_s": b as f64 / step,
        })).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{result}");
    } else {
        println!("model:              {label}");
        println!("threads:            {threads}");
        println!(
            "checkpoint:         {:.2} GB (load {load_s:.1} s)",
            ckb as f64 / 1e9
        );
        println!(
            "prefill:            {} tokens, {:.2} tok/s",
            a.prompt,
            a.prompt as f64 / prefill_s
        );
        println!(
            "decode:             {} tokens, {decode_tok_s:.2} tok/s (median step {:.1} ms)",
            a.decode,
            median * 1e3
        );
        for &(b, step) in &batched {
            println!(
                "decode batch {b:<5} {:.2} tok/s (median step {:.1} ms, {b} sequences)",
                b as f64 / step,
                step * 1e3
            );
        }
        println!(
            "decode traffic:     {:.1} MB/token of weights → {:.2} GB/s",
            bytes / 1e6,
            achieved / 1e9
        );
        println!(
            "memory bandwidth:   {:.2} GB/s measured → {:.0}% of it",
            bw / 1e9,
            100.0 * achieved / bw
        );
        println!("peak memory:        {:.2} GB", peak as f64 / 1e9);
        println!(
            "cache ({:?}): {:.2} MB for {} tokens = {:.1} KB/token",
            model.numerics,
            cache.bytes() as f64 / 1e6,
            cache.pos,
            cache.bytes() as f64 / cache.pos.max(1) as f64 / 1e3
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(a: BenchArgs, ordinals: Vec<usize>) -> Result<()> {
    if a.model.is_some() {
        anyhow::bail!("--device cuda benchmarks the synthetic model; drop --model");
    }
    if a.gemm {
        let [ordinal] = ordinals[..] else {
            anyhow::bail!("--gemm runs on one GPU; give --device cuda:N");
        };
        return crate::bench_gemm::run(ordinal, &a.prompts, a.json);
    }
    crate::bench_cuda::run(crate::bench_cuda::CudaBench {
        ordinals,
        preset: a.synthetic,
        layers: a.layers,
        prompts: a.prompts,
        contexts: a.contexts,
        batches: a.batch,
        decode: a.decode,
        csv: a.csv,
        json: a.json,
        profile: a.profile,
        numerics: a.numerics.profile()?,
    })
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: BenchArgs, _: Vec<usize>) -> Result<()> {
    anyhow::bail!(
        "this dsv4 was built without CUDA support; rebuild with \
         `cargo build --release -p dsv4-cli --features cuda`"
    )
}

/// Median step of `steps` decode steps of `b` sequences stepping together (`forward_batch`),
/// each a copy of `cache`. Sequence `i` starts from the `i`-th most likely token, so the
/// sequences diverge (different tokens route to different experts, as in real serving) instead
/// of repeating one sequence `b` times.
fn batch_step(
    model: &Model,
    cache: &SeqCache,
    logits: &[f32],
    b: usize,
    steps: usize,
) -> Result<f64> {
    let mut caches = vec![cache.clone(); b];
    let mut ranked: Vec<u32> = (0..logits.len() as u32).collect();
    ranked.sort_by(|&i, &j| logits[j as usize].total_cmp(&logits[i as usize]));
    let mut next: Vec<u32> = (0..b).map(|i| ranked[i % ranked.len()]).collect();
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut seqs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&ids)
            .map(|(cache, ids)| SeqInput {
                cache,
                ids,
                want: Logits::Last,
            })
            .collect();
        let t = Instant::now();
        let out = model.forward_batch(&mut seqs)?;
        times.push(t.elapsed().as_secs_f64());
        next = out.iter().map(|l| argmax(l)).collect();
    }
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(f64::NAN))
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > x[b] { i } else { b }) as u32
}

/// GEMV (one token) over ~512 MB of weights per format (memory-bound), and over a ~1 MB
/// matrix that stays in cache (the kernel's compute ceiling); best of several runs.
fn kernels(bw: f64) -> Result<()> {
    use synthetic::MatrixFormat as F;
    println!("memory bandwidth: {:.2} GB/s", bw / 1e9);
    use dsv4_core::quant::QuantMode as Q;
    for (f, out) in [
        (F::Bf16, 65536),
        (F::Fp8, 131072),
        (F::Fp4, 262144),
        (F::Mlx(Q::Affine { bits: 4, group: 64 }), 262144),
        (F::Mlx(Q::Affine { bits: 8, group: 64 }), 131072),
        (F::Mlx(Q::Affine { bits: 3, group: 64 }), 262144),
        (F::Mlx(Q::Affine { bits: 6, group: 64 }), 131072),
        (F::Mlx(Q::Mxfp4), 262144),
        (F::Mlx(Q::Mxfp8), 131072),
    ] {
        let inp = 4096;
        let big = gemv_rate(&synthetic::random_linear(f, out, inp, 3)?, 5);
        let small = gemv_rate(&synthetic::random_linear(f, out / 512, inp, 4)?, 200);
        println!(
            "{:<14} [{out} x {inp}]: {:>6.2} GB/s ({:>3.0}% of bandwidth); in cache: {:>6.2} GB/s",
            match f {
                F::Mlx(m) => m.label(),
                f => format!("{f:?}"),
            },
            big / 1e9,
            100.0 * big / bw,
            small / 1e9,
        );
    }
    Ok(())
}

/// Best stored-bytes-per-second of `reps` single-token forwards.
fn gemv_rate(w: &dsv4_core::cpu::linear::Linear, reps: usize) -> f64 {
    let x: Vec<f32> = (0..w.inp).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let mut y = vec![0f32; w.out];
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        w.forward(&x, 1, &mut y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    w.stored_bytes() as f64 / best
}
