//! `dsv4 bench --device cuda --gemm`: FP8 tensor-core GEMMs through cuBLASLt. The reference
//! rate is a plain per-tensor-scaled 8192³ FP8 GEMM; against it, DeepSeek's block-scaled GEMM
//! (weights 128×128, activations 1×128) at the Flash dense projection shapes for each prompt
//! length, and the activation quantization kernel that feeds it. Then the engine's own tile
//! kernels at 8192 tokens: the tensor-core GEMMs (x in 1 or 3 bf16 parts) against the SIMT ones
//! they replace, on the dense Flash shapes (FP8) and the routed experts (FP4). Times are
//! CUDA-event medians after warm-up.

use anyhow::{Context, Result};
use dsv4_core::{synthetic, ModelConfig};
use dsv4_cuda::blaslt::{BlasLt, Fp8Gemm, OutType, Scaling};
use dsv4_cuda::gpu::DevBuf;
use dsv4_cuda::Gpu;
use serde_json::json;

const REPS: usize = 11;

/// Median milliseconds of one call of `f` (each sample `inner` back-to-back calls between two
/// events, after 3 warm-up calls).
fn time_ms(gpu: &Gpu, inner: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    use dsv4_cuda::cudarc::driver::sys::CUevent_flags;
    for _ in 0..3 {
        f()?;
    }
    gpu.sync()?;
    let ev = || gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let (start, end) = (ev()?, ev()?);
    let mut t = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        start.record(&gpu.stream)?;
        for _ in 0..inner {
            f()?;
        }
        end.record(&gpu.stream)?;
        t.push(start.elapsed_ms(&end)? as f64 / inner as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[REPS / 2])
}

/// Device buffer of `n` random e4m3 codes (exponent field below 15: finite, |v| ≤ 240).
fn random_codes(gpu: &Gpu, n: usize, seed: u64) -> Result<DevBuf> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<u8> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8 & 0xf7
        })
        .collect();
    Ok(gpu.upload(&v)?)
}

fn tflops(m: usize, n: usize, k: usize, ms: f64) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64 / (ms * 1e-3) / 1e12
}

pub fn run(ordinal: usize, prompts: &[usize], json_out: bool) -> Result<()> {
    let gpu = Gpu::open(ordinal).with_context(|| format!("cuda:{ordinal}"))?;
    let lt = BlasLt::new(gpu.clone())?;
    let c = ModelConfig::from_json(&synthetic::flash_config_json())?;

    // Peak: 8192³, per-tensor scales (none: 1.0), bf16 out.
    let s = 8192;
    let (a, b) = (random_codes(&gpu, s * s, 1)?, random_codes(&gpu, s * s, 2)?);
    let d = gpu.alloc(s * s * 4)?;
    let plain = |out, scaling, fast_accum, w_scale, x_scale| Fp8Gemm {
        m: s,
        n: s,
        k: s,
        w: a.ptr,
        w_scale,
        x: b.ptr,
        x_scale,
        d: d.ptr,
        ldd: s,
        out,
        scaling,
        fast_accum,
    };
    let mut peak = Vec::new();
    for fast in [false, true] {
        let g = plain(OutType::Bf16, Scaling::Tensor, fast, 0, 0);
        let ms = time_ms(&gpu, 5, &mut || Ok(lt.gemm(&g)?))?;
        peak.push((fast, tflops(s, s, s, ms), ms));
    }
    let best = peak.iter().map(|p| p.1).fold(0f64, f64::max);
    // Block-scaled at the same size, for scale.
    let sw = gpu.upload(&vec![1f32 / 64.0; (s / 128) * (s / 128)])?;
    let sx = gpu.upload(&vec![1f32 / 16.0; (s / 128) * s])?;
    let g = plain(OutType::Bf16, Scaling::Block, false, sw.ptr, sx.ptr);
    let block_cube_ms =
        time_ms(&gpu, 5, &mut || Ok(lt.gemm(&g)?)).context("block-scaled FP8 GEMM 8192³")?;
    drop((a, b, d, sw, sx));

    let shapes = [
        ("attn.wq_a", c.q_lora_rank, c.hidden_size),
        ("attn.wkv", c.head_dim, c.hidden_size),
        ("attn.wq_b", c.num_heads * c.head_dim, c.q_lora_rank),
        (
            "indexer.wq_b",
            c.index_n_heads * c.index_head_dim,
            c.q_lora_rank,
        ),
        ("attn.wo_b", c.hidden_size, c.o_groups * c.o_lora_rank),
        ("shared.w1/w3", c.moe_intermediate_size, c.hidden_size),
        ("shared.w2", c.hidden_size, c.moe_intermediate_size),
    ];
    let mut rows = Vec::new();
    for &m in prompts {
        let mp = m.next_multiple_of(dsv4_cuda::blaslt::M_ALIGN);
        for &(name, n, k) in &shapes {
            let w = random_codes(&gpu, n * k, 3)?;
            let ws = gpu.upload(&vec![1f32 / 64.0; n.div_ceil(128) * (k / 128)])?;
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let xd = gpu.upload(&x)?;
            let (codes, scales) = (gpu.alloc(mp * k)?, gpu.alloc(k / 128 * mp * 4)?);
            let q_ms = time_ms(&gpu, 10, &mut || {
                Ok(dsv4_cuda::quant::act_quant_fp8(
                    &gpu, xd.ptr, k, m, k, codes.ptr, scales.ptr, mp, k,
                )?)
            })?;
            let y = gpu.alloc(mp * n * 4)?;
            let mut r = json!({"tokens": m, "projection": name, "n": n, "k": k,
                "act_quant_ms": q_ms,
                "act_quant_gb_s": (m * k * 5) as f64 / (q_ms * 1e-3) / 1e9});
            for out in [OutType::F32, OutType::Bf16] {
                let g = Fp8Gemm {
                    m: mp,
                    n,
                    k,
                    w: w.ptr,
                    w_scale: ws.ptr,
                    x: codes.ptr,
                    x_scale: scales.ptr,
                    d: y.ptr,
                    ldd: n,
                    out,
                    scaling: Scaling::Block,
                    fast_accum: false,
                };
                let ms = time_ms(&gpu, 5, &mut || Ok(lt.gemm(&g)?))?;
                let t = tflops(m, n, k, ms);
                let key = if out == OutType::F32 { "f32" } else { "bf16" };
                r[format!("{key}_ms")] = json!(ms);
                r[format!("{key}_tflops")] = json!(t);
                r[format!("{key}_pct_peak")] = json!(100.0 * t / best);
            }
            rows.push(r);
        }
    }

    let tiles = tile_kernels(&gpu, &c)?;

    let out = json!({
        "device": format!("cuda:{ordinal} {}", gpu.name),
        "peak": peak.iter().map(|(f, t, ms)| json!({"shape": [s, s, s], "fast_accum": f,
            "tflops": t, "ms": ms})).collect::<Vec<_>>(),
        "peak_tflops": best,
        "block_scaled_8192_cubed_tflops": tflops(s, s, s, block_cube_ms),
        "shapes": rows,
        "tile_kernels": tiles,
    });
    if json_out {
        println!("{out}");
        return Ok(());
    }
    println!("device: cuda:{ordinal} {}", gpu.name);
    for (f, t, ms) in &peak {
        println!(
            "FP8 8192³ per-tensor scale, bf16 out, fast_accum={f}: {t:.0} TFLOP/s ({ms:.3} ms)"
        );
    }
    println!(
        "FP8 8192³ block-scaled (1x128 · 128x128), bf16 out: {:.0} TFLOP/s = {:.0}% of peak {best:.0}",
        tflops(s, s, s, block_cube_ms),
        100.0 * tflops(s, s, s, block_cube_ms) / best
    );
    println!();
    println!("| tokens | projection | N | K | f32 out TFLOP/s | % peak | bf16 out TFLOP/s | % peak | act_quant µs | act_quant GB/s |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0}% | {:.0} | {:.0}% | {:.1} | {:.0} |",
            r["tokens"],
            r["projection"].as_str().unwrap_or(""),
            r["n"],
            r["k"],
            r["f32_tflops"].as_f64().unwrap_or(0.0),
            r["f32_pct_peak"].as_f64().unwrap_or(0.0),
            r["bf16_tflops"].as_f64().unwrap_or(0.0),
            r["bf16_pct_peak"].as_f64().unwrap_or(0.0),
            r["act_quant_ms"].as_f64().unwrap_or(0.0) * 1e3,
            r["act_quant_gb_s"].as_f64().unwrap_or(0.0),
        );
    }
    println!();
    println!("Tile kernels at {TILE_TOKENS} tokens (TFLOP/s; TC = tensor cores, x in 1 or 3 bf16 parts):");
    println!(
        "(TC columns: tokens (MoE: pairs) per block × inputs per K step; 64×32 is the MoE \
         shape; x split once, as the model does, or in every block with DSV4_CUDA_TC_XS=0 \
         (64×32 is the dense default when split once))"
    );
    let cols: Vec<String> = [1u8, 3]
        .iter()
        .flat_map(|&t| TC_SHAPES.map(|(n, k)| tc_key(t, n, k)))
        .collect();
    let head: Vec<String> = [1, 3]
        .iter()
        .flat_map(|t| {
            TC_SHAPES.map(|(n, k)| format!("{t} part{} {n}×{k}", if *t > 1 { "s" } else { "" }))
        })
        .collect();
    println!(
        "| GEMM | format | N × K | SIMT | {} | best 1 part / SIMT |",
        head.join(" | ")
    );
    println!(
        "| --- | --- | --- | ---: |{} ---: |",
        " ---: |".repeat(cols.len())
    );
    for r in &tiles {
        let f = |k: &str| r[k].as_f64();
        let cells: Vec<String> = cols
            .iter()
            .map(|c| f(&format!("{c}_tflops")).map_or("-".into(), |v| format!("{v:.1}")))
            .collect();
        let best = TC_SHAPES
            .iter()
            .filter_map(|&(n, k)| f(&format!("{}_tflops", tc_key(1, n, k))))
            .fold(0f64, f64::max);
        println!(
            "| {} | {} | {} × {} | {:.1} | {} | {:.1}x |",
            r["gemm"].as_str().unwrap_or(""),
            r["format"].as_str().unwrap_or(""),
            r["n"],
            r["k"],
            f("simt_tflops").unwrap_or(0.0),
            cells.join(" | "),
            best / f("simt_tflops").unwrap_or(0.0).max(1e-9),
        );
    }
    Ok(())
}

const TILE_TOKENS: usize = 8192;

/// Tensor-core kernel shapes timed: (tokens per block, inputs per K step).
const TC_SHAPES: [(usize, usize); 4] = [(128, 64), (128, 32), (64, 64), (64, 32)];

/// JSON key of a tensor-core timing: parts of x, tokens per block, inputs per K step.
fn tc_key(terms: u8, tokens: usize, bk: usize) -> String {
    format!("tc{terms}_{tokens}x{bk}")
}

/// The tile kernels (`ops::gemm_simt`, `ops::gemm_tc`, `ops::moe_experts_gemm`) at
/// [`TILE_TOKENS`] tokens: Flash's wq_b, wo_b and shared-expert w1 in FP8, and its routed
/// experts in FP4 (gate+up then down; 6 of 256 experts per token, pairs grouped by expert into
/// tiles as the model does; 16 distinct weight sets cycled over the 256 experts, 200 MB, so
/// the weights do not sit in L2).
fn tile_kernels(gpu: &Gpu, c: &ModelConfig) -> Result<Vec<serde_json::Value>> {
    use dsv4_cuda::ops::{self, LinIn, MoeGemmArgs, MOE_TILE_PAIRS};
    use dsv4_cuda::weights::{Fmt, GpuLinear, LinearDesc};
    use synthetic::MatrixFormat as F;
    let m = TILE_TOKENS;
    let mut rows = Vec::new();
    let dense = [
        ("attn.wq_b", c.num_heads * c.head_dim, c.q_lora_rank),
        ("attn.wo_b", c.hidden_size, c.o_groups * c.o_lora_rank),
        ("shared.w1", c.moe_intermediate_size, c.hidden_size),
    ];
    for (name, n, k) in dense {
        let l = synthetic::random_linear(F::Fp8, n, k, 21)?;
        let w = GpuLinear::upload(gpu, &l)?;
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        // One part is meant for bf16-valued inputs: FP8-rounded ones, as the official profile.
        let xq = dsv4_core::numerics::gemm_input(&x, k, true);
        let (xd, xqd) = (gpu.upload(&x)?, gpu.upload(&xq)?);
        let y = gpu.alloc(m * n * 4)?;
        let inp = |x: u64, terms| LinIn {
            terms,
            ..LinIn::rows(x, k, m)
        };
        let simt = time_ms(gpu, 1, &mut || {
            Ok(ops::gemm_simt(gpu, &w, &inp(xd.ptr, 3), y.ptr, n)?)
        })?;
        let mut r = json!({"gemm": name, "format": "fp8", "n": n, "k": k, "tokens": m,
            "tc": w.tc, "simt_ms": simt, "simt_tflops": tflops(m, n, k, simt)});
        if w.tc {
            for (terms, xp) in [(1u8, xqd.ptr), (3, xd.ptr)] {
                for (tokens, bk) in TC_SHAPES {
                    let ms = time_ms(gpu, 2, &mut || {
                        Ok(ops::gemm_tc_shape(
                            gpu,
                            &w,
                            &inp(xp, terms),
                            y.ptr,
                            n,
                            tokens,
                            bk,
                        )?)
                    })?;
                    let key = tc_key(terms, tokens, bk);
                    r[format!("{key}_ms")] = json!(ms);
                    r[format!("{key}_tflops")] = json!(tflops(m, n, k, ms));
                }
            }
        }
        rows.push(r);
    }

    // Routed experts.
    let (d, inter, ne, topk) = (
        c.hidden_size,
        c.moe_intermediate_size,
        c.n_routed_experts,
        c.num_experts_per_tok,
    );
    let sets: Vec<[GpuLinear; 3]> = (0..16u64)
        .map(|i| -> Result<[GpuLinear; 3]> {
            let up = |s| -> Result<GpuLinear> {
                Ok(GpuLinear::upload(
                    gpu,
                    &synthetic::random_linear(F::Fp4, inter, d, s)?,
                )?)
            };
            let down = synthetic::random_linear(F::Fp4, d, inter, 100 + i)?;
            Ok([up(200 + i)?, up(300 + i)?, GpuLinear::upload(gpu, &down)?])
        })
        .collect::<Result<_>>()?;
    let tc = sets.iter().flatten().all(|w| w.tc);
    let table = |j: usize| -> Result<DevBuf> {
        let v: Vec<LinearDesc> = (0..ne).map(|e| sets[e % sets.len()][j].desc).collect();
        Ok(gpu.upload(&v)?)
    };
    let (w1, w3, w2) = (table(0)?, table(1)?, table(2)?);
    // topk distinct pseudo-random experts per token, grouped as CudaModel::moe does.
    let pairs = m * topk;
    let mut by_expert: Vec<Vec<i32>> = vec![Vec::new(); ne];
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for t in 0..m {
        let mut picked = Vec::with_capacity(topk);
        while picked.len() < topk {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let e = (s >> 33) as usize % ne;
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        for (j, &e) in picked.iter().enumerate() {
            by_expert[e].push((t * topk + j) as i32);
        }
    }
    let tiles = ops::MoeTiles::new(&by_expert);
    let ntile = tiles.expert.len();
    let (te, tn, tp) = (
        gpu.upload(&tiles.expert)?,
        gpu.upload(&tiles.count)?,
        gpu.upload(&tiles.pairs)?,
    );
    let x: Vec<f32> = (0..m * d)
        .map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let x = gpu.upload(&dsv4_core::numerics::gemm_input(&x, d, true))?;
    let (h, out) = (gpu.alloc(pairs * inter * 4)?, gpu.alloc(pairs * d * 4)?);
    let a = MoeGemmArgs {
        w1: w1.ptr,
        w3: w3.ptr,
        w2: w2.ptr,
        tile_expert: te.ptr,
        tile_pairs: tp.ptr,
        tile_n: tn.ptr,
        x: x.ptr,
        h: h.ptr,
        out: out.ptr,
        k: topk as i32,
        d: d as i32,
        i: inter as i32,
        vec: 1,
        lim: c.swiglu_limit.unwrap_or(f32::NAN),
        rw: 0,
        rw_inside: 0,
        terms: 3,
    };
    // Gate + up (2·inter rows) and down: 3 products of pairs × inter × d.
    let flops = |ms: f64| tflops(pairs, 3 * inter, d, ms);
    let simt = time_ms(gpu, 1, &mut || {
        Ok(ops::moe_experts_gemm(
            gpu,
            Fmt::Fp4,
            false,
            3,
            &a,
            ntile,
            pairs,
            None,
        )?)
    })?;
    let mut r = json!({"gemm": format!("experts ({ne}, {topk}/token, {ntile} tiles)"),
        "format": "fp4", "n": 3 * inter, "k": d, "tokens": m, "pairs": pairs, "tc": tc,
        "simt_ms": simt, "simt_tflops": flops(simt)});
    if tc {
        for terms in [1u8, 3] {
            for bk in [64, 32] {
                let ms = time_ms(gpu, 1, &mut || {
                    Ok(ops::moe_experts_gemm_tc(
                        gpu,
                        Fmt::Fp4,
                        terms,
                        bk,
                        &a,
                        ntile,
                        pairs,
                        None,
                    )?)
                })?;
                let key = tc_key(terms, MOE_TILE_PAIRS, bk);
                r[format!("{key}_ms")] = json!(ms);
                r[format!("{key}_tflops")] = json!(flops(ms));
            }
        }
    }
    rows.push(r);
    Ok(rows)
}
