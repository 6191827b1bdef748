//! mlx-community layouts against transformers: each `tests/fixtures/mlx-*` checkpoint holds the
//! `mlx-src` model quantized by MLX itself (tools/make_mlx_fixtures.py) in mlx-lm names; its
//! reference logits come from transformers on the dequantized weights, so the engine, computing
//! directly on the quantized formats, must match them to f32 accuracy. The error against the
//! unquantized model is printed (docs/QUANTIZATION.md records it).

mod common;

use common::{argmax, row_errors};
use dsv4_core::quant::QuantMode;
use dsv4_core::{Checkpoint, Logits, Model};
use std::path::PathBuf;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// One-call logits of a fixture's model on the reference prompt, with the reference.
fn run(name: &str) -> (Vec<f32>, Vec<f32>, usize) {
    let dir = fixture_dir(name);
    let ck = Checkpoint::open(&dir).expect("open fixture");
    let model = Model::load(&ck).expect("load fixture");
    let reft = common::load_tensors(&dir.join("reference.safetensors"));
    let ids: Vec<u32> = reft["ids"]
        .to_i64()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let mut cache = model.new_cache();
    let got = model.forward(&mut cache, &ids, Logits::All).unwrap();
    (got, reft["logits"].to_f32().unwrap(), ck.config.vocab_size)
}

/// Exact against the reference on the dequantized weights: row error ≤ 1e-4 and the same
/// argmax. Returns (mean row error vs unquantized, top-1 agreement vs unquantized).
fn check(name: &str, expect_mode: QuantMode) -> (f32, f32) {
    let dir = fixture_dir(name);
    let ck = Checkpoint::open(&dir).unwrap();
    let w = dsv4_core::model::weights::ModelWeights::load(&ck).unwrap();
    assert_eq!(
        w.layers[0].moe.experts[0].w1.format.mlx_mode(),
        Some(expect_mode),
        "{name}: routed expert format"
    );
    let (got, want, v) = run(name);
    let errs = row_errors(&got, &want, v);
    let worst = errs.iter().fold(0f32, |m, &e| m.max(e));
    for (r, e) in errs.iter().enumerate() {
        assert!(*e <= 1e-4, "{name}: row {r} relative error {e:.3e}");
        assert_eq!(
            argmax(&got[r * v..(r + 1) * v]),
            argmax(&want[r * v..(r + 1) * v]),
            "{name}: row {r} argmax"
        );
    }
    let reft = common::load_tensors(&dir.join("reference.safetensors"));
    let full = reft["logits_unquantized"].to_f32().unwrap();
    let vs = row_errors(&got, &full, v);
    let rows = vs.len();
    let top1 = (0..rows)
        .filter(|&r| argmax(&got[r * v..(r + 1) * v]) == argmax(&full[r * v..(r + 1) * v]))
        .count() as f32
        / rows as f32;
    let mean = vs.iter().sum::<f32>() / rows as f32;
    eprintln!(
        "{name}: vs dequantized reference worst {worst:.2e}; vs unquantized mean row rel err {mean:.4}, max {:.4}, top-1 {:.1}%",
        vs.iter().fold(0f32, |m, &e| m.max(e)),
        top1 * 100.0
    );
    (mean, top1)
}

#[test]
fn mlx_q4_matches_reference() {
    check("mlx-q4", QuantMode::Affine { bits: 4, group: 64 });
}

#[test]
fn mlx_q8_matches_reference() {
    let (err, top1) = check("mlx-q8", QuantMode::Affine { bits: 8, group: 64 });
    // 8-bit is close to the unquantized model even on this tiny random one.
    assert!(err < 0.05 && top1 > 0.9, "{err} {top1}");
}

#[test]
fn mlx_q3_group32_matches_reference() {
    check("mlx-q3g32", QuantMode::Affine { bits: 3, group: 32 });
}

#[test]
fn mlx_mxfp4_matches_reference() {
    check("mlx-mxfp4", QuantMode::Mxfp4);
}

#[test]
fn mlx_mxfp8_matches_reference() {
    check("mlx-mxfp8", QuantMode::Mxfp8);
}

/// Mixed: attention, shared experts, embedding and head at 8 bits (per-module overrides in the
/// config), routed experts mxfp4.
#[test]
fn mlx_mixed_matches_reference() {
    let ck = Checkpoint::open(&fixture_dir("mlx-mixed")).unwrap();
    let w = dsv4_core::model::weights::ModelWeights::load(&ck).unwrap();
    let q8 = Some(QuantMode::Affine { bits: 8, group: 64 });
    assert_eq!(w.layers[1].attn.wq_a.format.mlx_mode(), q8);
    assert_eq!(w.embed.format.mlx_mode(), q8);
    assert_eq!(w.head.format.mlx_mode(), q8);
    check("mlx-mixed", QuantMode::Mxfp4);
}
