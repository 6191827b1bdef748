//! The official numerics profile (NUMERICS.md) against its references in tests/fixtures-official
//! (tools/make_official_fixtures.py: transformers 5.23 in f32 with DeepSeek's roundings patched
//! in, cross-checked by an independent float64 implementation): golden rounding vectors, and the
//! model's logits on every chunking path.

use dsv4_core::numerics::{self, Numerics};
mod common;

use common::{argmax, row_errors, run_chunks as run};
use dsv4_core::tensor::Tensor;
use dsv4_core::{Checkpoint, Logits, Model};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures-official")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn golden_roundings() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("roundings.json")).unwrap())
            .unwrap();
    type Quant = fn(&[f32], usize) -> (Vec<u8>, Vec<u8>);
    let sets: [(&str, Quant); 3] = [
        ("e4m3_block64", numerics::fp8_quantize),
        ("e4m3_block128_act_quant_partial", numerics::fp8_quantize),
        ("e2m1_block32", numerics::fp4_quantize),
    ];
    for (key, quant) in sets {
        let block = g[key]["block"].as_u64().unwrap() as usize;
        for c in g[key]["cases"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap_or("?");
            let x = floats(&c["x"]);
            let (codes, scales) = quant(&x, block);
            assert_eq!(scales, bytes(&c["scale_e8m0"]), "{key}/{name} scales");
            assert_eq!(codes, bytes(&c["codes"]), "{key}/{name} codes");
            let mut y = x.clone();
            if key.starts_with("e2m1") {
                numerics::fp4_round_trip(&mut y, block);
            } else {
                numerics::fp8_round_trip(&mut y, block);
            }
            assert_eq!(y, floats(&c["y"]), "{key}/{name} values");
        }
    }
    for c in g["hadamard"]["cases"].as_array().unwrap() {
        let mut y = floats(&c["x"]);
        numerics::hadamard(&mut y);
        for (a, b) in y.iter().zip(floats(&c["y"])) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "hadamard n={}: {a} vs {b}",
                c["n"]
            );
        }
    }
    for c in g["indexer_qat_hadamard128_fp4"]["cases"]
        .as_array()
        .unwrap()
    {
        let mut y = floats(&c["x"]);
        numerics::hadamard(&mut y);
        let (codes, scales) = numerics::fp4_quantize(&y, 32);
        assert_eq!(scales, bytes(&c["scale_e8m0"]));
        assert_eq!(codes, bytes(&c["codes"]));
    }
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    common::load_tensors(&dir().join(name).join("reference.safetensors"))
}

fn check(name: &str) {
    let ck = Checkpoint::open(&dir().join(name)).unwrap();
    let mut model = Model::load(&ck).unwrap();
    let r = reference(name);
    let ids: Vec<u32> = r["ids"]
        .to_i64()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let t = ids.len();
    let vocab = model.config.vocab_size;
    let strict = |what: &str, got: &[f32], want_key: &str, argmax_key: &str| {
        let want = r[want_key].to_f32().unwrap();
        let am = r[argmax_key].to_i64().unwrap();
        let errs = row_errors(got, &want, vocab);
        let worst = errs.iter().cloned().fold(0f32, f32::max);
        eprintln!("{name} {what}: worst row relative error {worst:.2e}");
        for (i, e) in errs.iter().enumerate() {
            assert!(*e <= 1e-4, "{name} {what}: row {i} relative error {e:.2e}");
            assert_eq!(
                argmax(&got[i * vocab..(i + 1) * vocab]) as i64,
                am[i],
                "{name} {what}: row {i} argmax"
            );
        }
    };

    // The reference profile of the same checkpoint.
    strict(
        "reference profile",
        &run(&model, &ids, &[t]),
        "logits_reference_profile",
        "argmax_reference_profile",
    );

    model.numerics = Numerics::Official { act_quant: false };
    strict(
        "official one call",
        &run(&model, &ids, &[t]),
        "logits",
        "argmax",
    );
    let chunks: Vec<usize> = r["chunks"]
        .to_i64()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let chunked = run(&model, &ids, &chunks);
    strict("official chunks", &chunked, "logits_chunked", "argmax");
    strict("official chunks vs one call", &chunked, "logits", "argmax");
    let p = r["decode_prefill"].to_i64().unwrap()[0] as usize;
    let mut dec = vec![p];
    dec.extend(std::iter::repeat_n(1, t - p));
    strict(
        "official decode",
        &run(&model, &ids, &dec),
        "logits_decode",
        "argmax",
    );
    strict(
        "official token by token",
        &run(&model, &ids, &vec![1; t]),
        "logits",
        "argmax",
    );

    // Activation quantization amplifies summation-order noise into rounding flips (the fixture
    // script measured its own f32 and f64 runs diverging after ~50 rows): a smoke test — the
    // leading rows agree closely, and the rest stay near.
    model.numerics = Numerics::Official { act_quant: true };
    let errs = row_errors(
        &run(&model, &ids, &[t]),
        &r["logits_act_quant"].to_f32().unwrap(),
        vocab,
    );
    let lead = errs.iter().take_while(|&&e| e <= 1e-4).count();
    let mean = errs.iter().sum::<f32>() / t as f32;
    eprintln!("{name} act-quant: first {lead} rows within 1e-4, mean row error {mean:.2e}");
    assert!(
        lead >= 20,
        "{name} act-quant: only {lead} leading rows agree"
    );
    assert!(mean <= 5e-2, "{name} act-quant: mean row error {mean:.2e}");
}

#[test]
fn official_profile_fp8_layout() {
    check("official-fp8");
}

#[test]
fn official_profile_bf16_layout() {
    check("hf-bf16");
}

/// Compact caches: FP8 K/V rows and FP4 indexer keys take a fraction of the f32 bytes.
#[test]
fn official_cache_is_compact() {
    let ck = Checkpoint::open(&dir().join("official-fp8")).unwrap();
    let mut model = Model::load(&ck).unwrap();
    let ids: Vec<u32> = (0..120).map(|i| (i * 7 % 500) as u32).collect();
    let mut c = model.new_cache();
    model.forward(&mut c, &ids, Logits::None).unwrap();
    let f32_bytes = c.bytes();
    model.numerics = Numerics::Official { act_quant: false };
    let mut c = model.new_cache();
    model.forward(&mut c, &ids, Logits::None).unwrap();
    // Rows here are 128 FP8 nope channels + 2 scales + 64 f32 rotary channels (386 B vs 768 B);
    // the open-window projection buffers stay f32 in both profiles.
    eprintln!(
        "cache for 120 tokens: reference {f32_bytes} B, official {} B",
        c.bytes()
    );
    assert!(
        c.bytes() * 10 < f32_bytes * 6,
        "official {} vs reference {}",
        c.bytes(),
        f32_bytes
    );
}
