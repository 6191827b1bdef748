//! `dsv4`: run DeepSeek-V4 checkpoints from the command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dsv4_core::{Checkpoint, Logits, Model};
use std::path::{Path, PathBuf};

mod bench;
#[cfg(feature = "cuda")]
mod bench_cuda;
#[cfg(feature = "cuda")]
mod bench_gemm;
mod convert;
mod generate;
mod serve;
#[cfg(feature = "cuda")]
mod serve_cuda;

#[derive(Parser)]
#[command(name = "dsv4", version, about = "DeepSeek-V4 inference engine")]
struct Cli {
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where and how the model runs (device and numerics profile), shared by every command that
/// runs it.
#[derive(clap::Args, Clone, Debug)]
pub struct NumericsArgs {
    /// `cpu`, or `cuda` / `cuda:N` for GPU N, or `cuda:0,1,...` for the layers split over
    /// several GPUs (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `reference` (transformers-exact f32) or `official` (DeepSeek's inference: FP8 K/V cache,
    /// Hadamard + FP4 indexer).
    #[arg(long, default_value = "reference")]
    numerics: String,
    /// With `--numerics official`: FP8-quantize activations before every FP8/FP4 GEMM.
    #[arg(long)]
    act_quant: bool,
}

impl NumericsArgs {
    pub fn profile(&self) -> Result<dsv4_core::numerics::Numerics> {
        use dsv4_core::numerics::Numerics;
        match (self.numerics.as_str(), self.act_quant) {
            ("reference", false) => Ok(Numerics::Reference),
            ("reference", true) => bail!("--act-quant needs --numerics official"),
            ("official", aq) => Ok(Numerics::Official { act_quant: aq }),
            (other, _) => bail!("--numerics must be `reference` or `official`, got `{other}`"),
        }
    }

    /// The GPU ordinals of `--device cuda[:N[,M...]]` (one per pipeline stage), or `None` for
    /// the CPU.
    pub fn cuda_ordinals(&self) -> Result<Option<Vec<usize>>> {
        let d = self.device.as_str();
        let bad = || {
            anyhow::anyhow!("--device must be `cpu`, `cuda`, `cuda:N` or `cuda:N,M,...`, got `{d}`")
        };
        match d {
            "cpu" => Ok(None),
            "cuda" => Ok(Some(vec![0])),
            _ => {
                let list = d.strip_prefix("cuda:").ok_or_else(bad)?;
                let ords = list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| bad())?;
                Ok(Some(ords))
            }
        }
    }

    /// Puts a loaded model on the chosen device.
    pub fn engine(&self, model: Model) -> Result<Box<dyn dsv4_core::Engine>> {
        match self.cuda_ordinals()? {
            None => Ok(Box::new(model)),
            Some(n) => cuda_engine(&model, &n),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(model: &Model, ordinals: &[usize]) -> Result<Box<dyn dsv4_core::Engine>> {
    if let [n] = ordinals {
        let m = dsv4_cuda::CudaModel::from_model(model, *n).with_context(|| format!("cuda:{n}"))?;
        return Ok(Box::new(m));
    }
    let p = dsv4_cuda::Pipeline::new(model, ordinals)
        .with_context(|| format!("a pipeline over cuda:{ordinals:?}"))?;
    Ok(Box::new(p))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_: &Model, _: &[usize]) -> Result<Box<dyn dsv4_core::Engine>> {
    bail!(
        "this dsv4 was built without CUDA support; rebuild with \
         `cargo build --release -p dsv4-cli --features cuda`"
    )
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the logits of every position of a token sequence as a float32 [T, vocab] .npy file.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Feed the ids through the cache in calls of these sizes (must sum to the number of ids).
        #[arg(long, value_delimiter = ',')]
        chunks: Option<Vec<usize>>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        numerics: NumericsArgs,
    },
    /// Print the config, the layer schedule, tensor formats and sizes of a checkpoint.
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
    /// Measure prefill and decode speed, peak memory, and decode weight traffic against the
    /// machine's measured memory bandwidth. Without --model: a synthetic model with
    /// DeepSeek-V4-Flash layer shapes and random weights in the official FP8/FP4 formats.
    Bench(bench::BenchArgs),
    /// Generate a continuation, streamed to stdout (chat-formatted by default).
    Generate(generate::GenerateArgs),
    /// Interactive chat that keeps the cache across turns (reads stdin; works piped too).
    Chat(generate::ChatArgs),
    /// Convert the official FP8/FP4 checkpoint to an MLX-quantized one (mlx-community layout),
    /// streaming with bounded memory; the output appears only when complete.
    Convert(convert::ConvertArgs),
    /// OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models,
    /// /health, /metrics; streaming, continuous batching, prefix cache.
    Serve(serve::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let threads = match cli.threads {
        Some(n) => dsv4_core::init_threads(n).map_err(anyhow::Error::msg),
        None => Ok(()),
    };
    if let Err(e) = threads.and_then(|()| run(cli.cmd)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Logits {
            model,
            ids,
            chunks,
            out,
            numerics,
        } => logits(&model, &ids, chunks, &out, &numerics),
        Cmd::Inspect { model } => inspect(&model),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Generate(args) => generate::run_generate(args),
        Cmd::Chat(args) => generate::run_chat(args),
        Cmd::Convert(args) => convert::run(args),
        Cmd::Serve(args) => serve::run(args),
    }
}

fn load(dir: &Path, numerics: &NumericsArgs) -> Result<Box<dyn dsv4_core::Engine>> {
    let profile = numerics.profile()?;
    numerics.cuda_ordinals()?;
    let ck = Checkpoint::open(dir)?;
    let mut model = Model::load(&ck)?;
    model.numerics = profile;
    numerics.engine(model)
}

fn logits(
    dir: &Path,
    ids: &[u32],
    chunks: Option<Vec<usize>>,
    out: &Path,
    numerics: &NumericsArgs,
) -> Result<()> {
    let chunks = chunks.unwrap_or_else(|| vec![ids.len()]);
    if chunks.iter().sum::<usize>() != ids.len() || chunks.contains(&0) {
        bail!(
            "--chunks {:?} must be positive sizes summing to the number of ids ({})",
            chunks,
            ids.len()
        );
    }
    let model = load(dir, numerics)?;
    let vocab = model.config().vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("input: token id {bad} is out of range (vocabulary size {vocab})");
    }
    let mut state = model.new_state()?;
    let mut all = Vec::with_capacity(ids.len() * vocab);
    let mut start = 0;
    for c in chunks {
        all.extend(model.forward(&mut state, &ids[start..start + c], Logits::All)?);
        start += c;
    }
    write_npy(out, &all, &[ids.len() as u64, vocab as u64])
}

fn write_npy(path: &Path, data: &[f32], shape: &[u64]) -> Result<()> {
    use npyz::WriterBuilder;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(())
}

fn inspect(dir: &Path) -> Result<()> {
    let ck = Checkpoint::open(dir)?;
    let c = &ck.config;
    println!(
        "checkpoint: {} ({} files, {:.3} GB, {} key names)",
        dir.display(),
        ck.files.len(),
        ck.total_bytes() as f64 / 1e9,
        ck.style.label()
    );
    println!(
        "model: vocab {} hidden {} layers {} heads {} head_dim {} rope_dim {} q_lora {} o_groups {} o_lora {} window {}",
        c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.head_dim, c.rope_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank, c.sliding_window
    );
    println!(
        "moe: {} routed experts, top-{}, intermediate {}, {} shared, scaling {}, swiglu_limit {:?}",
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
        c.n_shared_experts,
        c.routed_scaling_factor,
        c.swiglu_limit
    );
    println!(
        "indexer: {} heads x {} dims, top-{}; hc: mult {} sinkhorn {}",
        c.index_n_heads, c.index_head_dim, c.index_topk, c.hc_mult, c.hc_sinkhorn_iters
    );
    println!(
        "rope: main {:?}\n      compress {:?}",
        c.rope_main, c.rope_compress
    );
    if let Some(q) = &c.quant {
        println!(
            "quantization: {} {} scales {} blocks {:?} experts {:?}",
            q.method, q.fmt, q.scale_fmt, q.block, q.expert_dtype
        );
    }
    if let Some(q) = &c.mlx_quant {
        println!(
            "mlx quantization: default {}, {} per-module overrides",
            q.default.label(),
            q.overrides.len()
        );
    }
    println!("layers:");
    for i in 0..c.num_layers {
        println!(
            "  {i:>3}: attn {:<8} mlp {:?}",
            c.attn_kinds[i].label(),
            c.mlp_kinds[i]
        );
    }
    let model = Model::load(&ck)?;
    println!(
        "decode weight traffic: {:.3} MB/token",
        model.weights.decode_bytes(c.num_experts_per_tok) as f64 / 1e6
    );
    print_formats(&model.weights.linears());
    println!("tensors:");
    let mut by_dtype: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for (name, t) in ck.sorted() {
        println!(
            "  {name:<60} {:<8} {:?} {} B",
            t.dtype.name(),
            t.shape,
            t.bytes().len()
        );
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.bytes().len();
    }
    for (d, (n, b)) in by_dtype {
        println!("  total {d:<8} {n:>6} tensors {:>14} B", b);
    }
    Ok(())
}

/// Per weight format: matrices, weights, stored bytes per component, and bits per weight.
fn print_formats(linears: &[(String, &dsv4_core::cpu::linear::Linear)]) {
    #[derive(Default)]
    struct Acc {
        matrices: usize,
        weights: u64,
        codes: u64,
        scales: u64,
        biases: u64,
    }
    let mut by: std::collections::BTreeMap<String, Acc> = Default::default();
    for (_, l) in linears {
        let a = by.entry(l.format.label()).or_default();
        let (w, s, b) = l.component_bytes();
        a.matrices += 1;
        a.weights += (l.out * l.inp) as u64;
        a.codes += w as u64;
        a.scales += s as u64;
        a.biases += b as u64;
    }
    println!("weight formats (matrices; bits/weight includes scales and biases):");
    println!(
        "  {:<28} {:>8} {:>14} {:>14} {:>12} {:>12} {:>9}",
        "format", "matrices", "weights", "codes B", "scales B", "biases B", "bits/w"
    );
    for (f, a) in by {
        let total = a.codes + a.scales + a.biases;
        println!(
            "  {f:<28} {:>8} {:>14} {:>14} {:>12} {:>12} {:>9.3}",
            a.matrices,
            a.weights,
            a.codes,
            a.scales,
            a.biases,
            total as f64 * 8.0 / a.weights.max(1) as f64
        );
    }
}

#[cfg(test)]
mod tests {
    /// clap checks argument definitions only for the subcommand being parsed; check them all.
    #[test]
    fn every_subcommand_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
