//! `dsv4 serve`: the OpenAI-compatible HTTP server (see the dsv4-server crate).

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv4_core::tokenizer::Tokenizer;
use dsv4_core::{synthetic, Checkpoint, Model};
use dsv4_server::{Backend, CpuBackend, EngineConfig, ServerConfig};
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory. Default: the built-in demo model (random weights, real tokenizer).
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json to use instead of the checkpoint's (default: the checkpoint's, else the
    /// embedded DeepSeek-V4 tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Address to listen on (loopback by default: pass 0.0.0.0 to accept remote clients).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "DSV4_API_KEY")]
    api_key: Option<String>,
    /// The model id clients pass as `model` (default: the directory name, or `dsv4-demo`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Sequences allowed to wait; beyond that requests get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Tokens per batched forward step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Prefix-cache memory in MiB (0 disables it).
    #[arg(long, default_value_t = 2048)]
    prefix_cache_mb: usize,
    /// Prefix-cache snapshot spacing in tokens (rounded up to a multiple of every compression
    /// ratio).
    #[arg(long, default_value_t = 64)]
    prefix_block: usize,
    /// Use the faster fused kernel when a step holds a single token. Outputs then depend in
    /// their last bits on whether a request ran alone or batched (greedy text can differ).
    #[arg(long)]
    no_batch_invariant: bool,
    #[command(flatten)]
    numerics: crate::NumericsArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let ordinals = a.numerics.cuda_ordinals()?;
    if ordinals.is_some() && !cfg!(feature = "cuda") {
        bail!(
            "this dsv4 was built without CUDA support; rebuild with \
             `cargo build --release -p dsv4-cli --features cuda`"
        );
    }
    if a.max_running == 0 || a.max_batch_tokens == 0 {
        bail!("--max-running and --max-batch-tokens must be at least 1");
    }
    let (ck, default_tok, default_name) = match &a.model {
        Some(dir) => {
            let ck = Checkpoint::open(dir)?;
            let tj = dir.join("tokenizer.json");
            let name = dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "dsv4".into());
            (ck, tj.exists().then_some(tj), name)
        }
        None => {
            eprintln!(
                "dsv4: no --model given: serving the built-in DEMO model (RANDOM weights, real \
                 tokenizer; its output is meaningless)."
            );
            (
                synthetic::checkpoint(synthetic::demo_config(), 0x5eed)?,
                None,
                "dsv4-demo".to_owned(),
            )
        }
    };
    let mut model = Model::load(&ck)?;
    model.numerics = a.numerics.profile()?;
    let tok = match a.tokenizer.as_ref().or(default_tok.as_ref()) {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::embedded()?,
    };
    dsv4_core::chat::check_tokenizer(&tok)?;
    // Snapshots must sit where every compressor's window is closed, so resuming from one needs
    // no partial window: round the spacing up to a multiple of every ratio.
    let block = model
        .config
        .attn_kinds
        .iter()
        .filter_map(|k| k.ratio())
        .fold(a.prefix_block.max(1), lcm);
    let config = ServerConfig {
        model_name: a.served_model_name.unwrap_or(default_name),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        engine: EngineConfig {
            max_running: a.max_running,
            max_waiting: a.max_waiting,
            max_batch_tokens: a.max_batch_tokens,
            prefix_block: block,
            prefix_cache_bytes: a.prefix_cache_mb << 20,
        },
    };
    let addr = format!("{}:{}", a.host, a.port);
    match ordinals {
        None => {
            let backend = CpuBackend::with_invariance(model, !a.no_batch_invariant);
            serve_on(backend, tok, config, &addr, "the CPU".into())
        }
        Some(n) => serve_cuda(model, &n, tok, config, &addr),
    }
}

/// The model on GPU `n`, or split by layers over the GPUs `n`; its CPU copy dropped once
/// uploaded.
#[cfg(feature = "cuda")]
fn serve_cuda(
    model: Model,
    n: &[usize],
    tok: Tokenizer,
    config: ServerConfig,
    addr: &str,
) -> Result<()> {
    use crate::serve_cuda::CudaBackend;
    let cfg = model.config.clone();
    if let [one] = n {
        let gpu = dsv4_cuda::CudaModel::from_model(&model, *one)
            .with_context(|| format!("cuda:{one}"))?;
        let where_ = format!("cuda:{one} {}", gpu.gpu.name);
        drop(model);
        return serve_on(CudaBackend::new(gpu, cfg), tok, config, addr, where_);
    }
    let p = dsv4_cuda::Pipeline::new(&model, n)
        .with_context(|| format!("a pipeline over cuda:{n:?}"))?;
    let where_ = dsv4_core::Engine::device(&p);
    drop(model);
    serve_on(CudaBackend::new(p, cfg), tok, config, addr, where_)
}

#[cfg(not(feature = "cuda"))]
fn serve_cuda(_: Model, _: &[usize], _: Tokenizer, _: ServerConfig, _: &str) -> Result<()> {
    unreachable!("checked before loading")
}

/// Runs the HTTP server on `addr` until it is stopped.
fn serve_on<B: Backend>(
    backend: B,
    tok: Tokenizer,
    config: ServerConfig,
    addr: &str,
    device: String,
) -> Result<()> {
    let name = config.model_name.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = dsv4_server::app(backend, tok, config)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "dsv4: serving `{name}` on {device} at http://{} (OpenAI API under /v1)",
            listener.local_addr()?
        );
        dsv4_server::serve(listener, app).await?;
        Ok(())
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}
