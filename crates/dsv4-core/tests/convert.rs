//! `dsv4 convert` against MLX itself: converting the `mlx-src` official checkpoint must give, tensor
//! for tensor and byte for byte, what `mlx.core.quantize` produced for the `mlx-*` fixtures
//! (tools/make_mlx_fixtures.py), with bounded buffers and no complete-looking partial output.

mod common;

use dsv4_core::convert::{self, recipe::Recipe, Options};
use dsv4_core::quant::config::MlxQuantConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv4-convert-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// name → (dtype, shape, bytes) over every shard of a directory.
fn all_tensors(dir: &Path) -> HashMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") || name == "reference.safetensors" {
            continue;
        }
        for (k, t) in common::load_tensors(&p) {
            out.insert(
                k,
                (
                    t.dtype.name().to_string(),
                    t.shape.clone(),
                    t.bytes().to_vec(),
                ),
            );
        }
    }
    out
}

fn quant_section(dir: &Path) -> MlxQuantConfig {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    MlxQuantConfig::from_json(&v["quantization"]).unwrap()
}

const CHUNK: u64 = 16 << 10;

fn convert_to(recipe: &str, group: usize, out: &Path) -> convert::Report {
    let opts = Options {
        model: fixture_dir("mlx-src"),
        out: out.to_path_buf(),
        recipe: Recipe::parse(recipe, group).unwrap(),
        max_shard_bytes: 400 << 10,
        chunk_bytes: CHUNK,
    };
    convert::convert(&opts, &mut |_, _| {}).unwrap()
}

#[test]
fn converter_output_equals_mlx_quantize() {
    let tmp = scratch("eq");
    for (fixture, recipe, group) in [
        ("mlx-q4", "q4", 64),
        ("mlx-q8", "q8", 64),
        ("mlx-q3g32", "q3", 32),
        ("mlx-mxfp4", "mxfp4", 64),
        ("mlx-mxfp8", "mxfp8", 64),
        ("mlx-mixed", "mixed-8-mxfp4", 64),
    ] {
        let out = tmp.join(fixture);
        let rep = convert_to(recipe, group, &out);
        assert!(
            rep.out_shards > 1,
            "{fixture}: expected several output shards"
        );
        let (got, want) = (all_tensors(&out), all_tensors(&fixture_dir(fixture)));
        let mut names: Vec<_> = want.keys().collect();
        names.sort();
        assert_eq!(got.len(), want.len(), "{fixture}: tensor count");
        for n in names {
            let g = got
                .get(n)
                .unwrap_or_else(|| panic!("{fixture}: `{n}` missing"));
            let w = &want[n];
            assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{fixture}: `{n}` dtype/shape");
            if g.2 != w.2 {
                let diff = g.2.iter().zip(&w.2).filter(|(a, b)| a != b).count();
                panic!(
                    "{fixture}: `{n}` differs from MLX in {diff} of {} bytes",
                    w.2.len()
                );
            }
        }
        assert_eq!(
            quant_section(&out),
            quant_section(&fixture_dir(fixture)),
            "{fixture}"
        );
        // Memory is bounded by the chunk, not by tensors or shards.
        assert!(
            rep.peak_buffer_bytes <= 2 * CHUNK
                && rep.peak_buffer_bytes <= 2 * rep.largest_input_shard,
            "{fixture}: peak {} bytes with chunk {CHUNK}",
            rep.peak_buffer_bytes
        );
        // The converted checkpoint loads and runs.
        let ck = dsv4_core::Checkpoint::open(&out).unwrap();
        dsv4_core::Model::load(&ck).unwrap();
        assert!(!convert::partial_dir(&out).unwrap().exists());
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A conversion that dies half way leaves no OUT, and the partial directory has neither the index
/// nor the config; an existing OUT is never overwritten.
#[test]
fn interrupted_conversion_never_looks_complete() {
    let tmp = scratch("int");
    let out = tmp.join("q4");
    let opts = Options {
        model: fixture_dir("mlx-src"),
        out: out.clone(),
        recipe: Recipe::parse("q4", 64).unwrap(),
        max_shard_bytes: 400 << 10,
        chunk_bytes: CHUNK,
    };
    let r = std::panic::catch_unwind(|| {
        convert::convert(&opts, &mut |done, total| {
            if done > total / 2 {
                panic!("killed");
            }
        })
    });
    assert!(r.is_err());
    assert!(!out.exists());
    let partial = convert::partial_dir(&out).unwrap();
    assert!(partial.exists());
    assert!(!partial.join("config.json").exists());
    assert!(!partial.join("model.safetensors.index.json").exists());
    // A rerun starts over and completes.
    convert::convert(&opts, &mut |_, _| {}).unwrap();
    assert!(out.join("config.json").exists() && !partial.exists());
    let e = convert::convert(&opts, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn group_size_that_does_not_divide_names_the_tensor() {
    let tmp = scratch("grp");
    let opts = Options {
        model: fixture_dir("official-fp8"), // hidden 160: not a multiple of 64
        out: tmp.join("x"),
        recipe: Recipe::parse("q4", 64).unwrap(),
        max_shard_bytes: 1 << 30,
        chunk_bytes: CHUNK,
    };
    let e = convert::convert(&opts, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains(".weight") && e.contains("group size 64"), "{e}");
    assert!(!tmp.join("x").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}
