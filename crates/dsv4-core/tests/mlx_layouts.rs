//! Layout variants of mlx-community checkpoints and bad input, built from the `mlx-q4` fixture
//! by renaming/reshaping its tensors: every variant must give the same logits; every broken one
//! an error naming the tensor.

mod common;

use dsv4_core::checkpoint::names::{to_official, KeyStyle};
use dsv4_core::tensor::{DType, Storage, Tensor};
use dsv4_core::{Checkpoint, Logits, Model, ModelConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mlx-q4")
}

fn raw() -> HashMap<String, Tensor> {
    common::load_tensors(&dir().join("model.safetensors"))
}

fn config_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap()
}

fn build(t: HashMap<String, Tensor>, cfg: &serde_json::Value) -> dsv4_core::Result<Model> {
    let config = ModelConfig::from_json(cfg)?;
    let ck = Checkpoint::from_tensors(dir(), config, t.into_iter().collect(), vec![])?;
    Model::load(&ck)
}

fn logits(m: &Model) -> Vec<f32> {
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 512).collect();
    m.forward(&mut m.new_cache(), &ids, Logits::All).unwrap()
}

fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
    let len = bytes.len();
    Tensor::new(
        name.into(),
        Arc::new(PathBuf::from("synthetic")),
        dtype,
        shape,
        Arc::new(Storage::Owned(bytes)),
        0,
        len,
    )
    .unwrap()
}

/// mlx-lm's 3-D `wo_a` [G, R, in]; the community layout with official names, pre-stacked
/// `ffn.experts.w1` and per-group `wo_a.{g}`: all load to the same model.
#[test]
fn layout_variants_give_identical_logits() {
    let cfg = config_json();
    let base = logits(&build(raw(), &cfg).unwrap());
    let g = cfg["o_groups"].as_u64().unwrap() as usize;

    // 3-D wo_a
    let mut t = raw();
    for l in 0..3 {
        for s in ["weight", "scales", "biases"] {
            let k = format!("model.layers.{l}.attn.wo_a.{s}");
            let x = &t[&k];
            let r = x.shape[0] / g;
            let v = x.reshaped(vec![g, r, x.shape[1]]).unwrap();
            t.insert(k, v);
        }
    }
    assert_eq!(logits(&build(t, &cfg).unwrap()), base, "3-D wo_a");

    // Official names (`embed.scales`, `layers.N.ffn.experts.w1.*`, `hc_attn_fn`) with
    // per-group wo_a; the config's overrides are keyed the same way.
    let mut t = HashMap::new();
    for (k, v) in raw() {
        let off = to_official(&k, KeyStyle::Mlx)
            .unwrap()
            .replace(".ffn.switch_mlp.", ".ffn.experts.");
        if off.contains(".attn.wo_a.") {
            let (prefix, suffix) = off.rsplit_once('.').unwrap();
            let r = v.shape[0] / g;
            for i in 0..g {
                t.insert(
                    format!("{prefix}.{i}.{suffix}"),
                    v.slice_outer(i * r, r).unwrap(),
                );
            }
        } else {
            t.insert(off, v);
        }
    }
    let mut cfg2 = cfg.clone();
    cfg2.as_object_mut().unwrap().remove("quantization");
    cfg2.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(logits(&build(t, &cfg2).unwrap()), base, "community layout");
}

fn load_err(t: HashMap<String, Tensor>, cfg: &serde_json::Value) -> String {
    match build(t, cfg) {
        Ok(_) => panic!("loaded a broken checkpoint"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_names_the_tensor() {
    let cfg = config_json();
    let wq = "model.layers.1.attn.wq_a";

    // scales with the wrong number of rows
    let mut t = raw();
    let s = t[&format!("{wq}.scales")].slice_outer(0, 10).unwrap();
    t.insert(format!("{wq}.scales"), s);
    let e = load_err(t, &cfg);
    assert!(
        e.contains(&format!("{wq}.scales")) && e.contains("shape"),
        "{e}"
    );

    // scales implying an unsupported group size (16)
    let mut t = raw();
    let w = &t[&format!("{wq}.weight")];
    let rows = w.shape[0];
    let inp = 128;
    for s in ["scales", "biases"] {
        t.insert(
            format!("{wq}.{s}"),
            owned(
                &format!("{wq}.{s}"),
                DType::BF16,
                vec![rows, inp / 16],
                vec![0; rows * inp / 16 * 2],
            ),
        );
    }
    let e = load_err(t, &cfg);
    assert!(
        e.contains(&format!("{wq}.weight")) && e.contains("group size 16"),
        "{e}"
    );

    // packed width that means 7 bits
    let mut t = raw();
    t.insert(
        format!("{wq}.weight"),
        owned(
            &format!("{wq}.weight"),
            DType::U32,
            vec![rows, inp * 7 / 32],
            vec![0; rows * inp * 7 / 8],
        ),
    );
    let e = load_err(t, &cfg);
    assert!(
        e.contains(&format!("{wq}.weight")) && e.contains("bits 7"),
        "{e}"
    );

    // biases in another dtype than the scales
    let mut t = raw();
    let b = &t[&format!("{wq}.biases")];
    let n = b.numel();
    t.insert(
        format!("{wq}.biases"),
        owned(
            &format!("{wq}.biases"),
            DType::F32,
            b.shape.clone(),
            vec![0; n * 4],
        ),
    );
    let e = load_err(t, &cfg);
    assert!(e.contains(&format!("{wq}.biases")), "{e}");

    // the config disagrees with the tensors
    let mut cfg2 = cfg.clone();
    cfg2["quantization"][wq] = serde_json::json!({"group_size": 64, "bits": 8});
    let e = load_err(raw(), &cfg2);
    assert!(
        e.contains(&format!("{wq}.weight")) && e.contains("q8") && e.contains("q4"),
        "{e}"
    );

    // an unsupported mode in the config
    let mut cfg3 = cfg.clone();
    cfg3["quantization"]["model.layers.0.attn.wkv"] = serde_json::json!({"mode": "nvfp4"});
    let e = ModelConfig::from_json(&cfg3).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.attn.wkv") && e.contains("nvfp4"),
        "{e}"
    );
}
