//! `dsv4 convert`: official FP8/FP4 → MLX-quantized checkpoint, with a progress bar.

use anyhow::{Context, Result};
use dsv4_core::convert::{self, recipe::Recipe, Options};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The official checkpoint directory (FP8 + FP4, deepseek-ai names).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist; written as OUT.partial and renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// q2, q3, q4, q5, q6, q8 (MLX affine), mxfp4, mxfp8, or mixed-DENSE-ROUTED (e.g. mixed-8-4,
    /// mixed-8-mxfp4: attention, shared experts, embedding and head at DENSE; routed experts at
    /// ROUTED).
    #[arg(long)]
    quant: String,
    /// Affine group size (32, 64 or 128).
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Output shard size in GB (a tensor is never split).
    #[arg(long, default_value_t = 5.0)]
    shard_size_gb: f64,
    /// Bytes processed at once, in MB (input + output; capped to the largest input shard).
    #[arg(long, default_value_t = 256)]
    chunk_mb: u64,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let recipe = Recipe::parse(&a.quant, a.group_size)?;
    let opts = Options {
        model: a.model.clone(),
        out: a.out.clone(),
        recipe,
        max_shard_bytes: (a.shard_size_gb * 1e9) as u64,
        chunk_bytes: a.chunk_mb << 20,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .context("progress template")?,
    );
    let t = std::time::Instant::now();
    let rep = convert::convert(&opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("converting {}", a.model.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} shards, {} tensors, {:.3} GB from {:.3} GB) in {:.1}s",
        a.out.display(),
        rep.out_shards,
        rep.out_tensors,
        rep.out_bytes as f64 / 1e9,
        rep.in_bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    for (k, b) in &rep.bytes_by_component {
        eprintln!("  {k:<20} {:>14} B", b);
    }
    eprintln!(
        "memory: peak buffers {:.1} MB (largest input shard {:.1} MB), peak RSS {:.1} MB",
        rep.peak_buffer_bytes as f64 / 1e6,
        rep.largest_input_shard as f64 / 1e6,
        dsv4_core::bench::peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}
