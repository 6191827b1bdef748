//! Helpers shared by the fixture tests: reading reference tensors, running a prompt in chunks,
//! comparing logits row by row.
#![allow(dead_code)] // each test binary uses a subset

use dsv4_core::tensor::{DType, Storage, Tensor};
use dsv4_core::{Logits, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every tensor of a safetensors file, by name.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let base = bytes.as_ptr() as usize;
    let spans: Vec<(String, DType, Vec<usize>, usize, usize)> = st
        .iter()
        .map(|(n, v)| {
            let dtype = DType::from_safetensors(v.dtype()).expect("dtype");
            (
                n.to_string(),
                dtype,
                v.shape().to_vec(),
                v.data().as_ptr() as usize - base,
                v.data().len(),
            )
        })
        .collect();
    let storage = Arc::new(Storage::Owned(bytes.clone()));
    let file = Arc::new(path.to_path_buf());
    spans
        .into_iter()
        .map(|(n, dtype, shape, off, len)| {
            let t = Tensor::new(
                n.clone(),
                file.clone(),
                dtype,
                shape,
                storage.clone(),
                off,
                len,
            )
            .unwrap();
            (n, t)
        })
        .collect()
}

/// Runs the ids through a fresh cache in calls of the given sizes; `[T, vocab]` logits.
pub fn run_chunks(model: &Model, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    assert_eq!(chunks.iter().sum::<usize>(), ids.len());
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut s = 0;
    for &c in chunks {
        out.extend(
            model
                .forward(&mut cache, &ids[s..s + c], Logits::All)
                .unwrap(),
        );
        s += c;
    }
    out
}

/// Per-row relative errors over the full vocabulary (max abs diff / max abs reference).
pub fn row_errors(got: &[f32], want: &[f32], vocab: usize) -> Vec<f32> {
    got.chunks(vocab)
        .zip(want.chunks(vocab))
        .map(|(g, w)| {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
        })
        .collect()
}

/// Index of the largest value (ties → lowest index).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > row[b] { i } else { b })
}

/// `tests/fixtures/<name>`; `DSV4_FIXTURES` overrides the folder (a test binary run on another
/// machine, e.g. the GPU tests).
pub fn fixture_dir(name: &str) -> PathBuf {
    std::env::var_os("DSV4_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
        .join(name)
}

/// The reference tensors of a fixture.
pub struct Reference {
    pub t: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        Reference {
            t: load_tensors(&fixture_dir(name).join("reference.safetensors")),
        }
    }
    pub fn ints(&self, k: &str) -> Vec<i64> {
        self.t[k].to_i64().unwrap()
    }
    pub fn floats(&self, k: &str) -> Vec<f32> {
        self.t[k].to_f32().unwrap()
    }
    pub fn ids(&self, k: &str) -> Vec<u32> {
        self.ints(k).into_iter().map(|x| x as u32).collect()
    }
    /// Reference logits (`name` or `name_sub`) and the vocabulary columns they cover.
    pub fn logits(&self, name: &str, vocab: usize) -> (Vec<f32>, Vec<usize>) {
        if let Some(t) = self.t.get(name) {
            return (t.to_f32().unwrap(), (0..vocab).collect());
        }
        let cols = self
            .ints("logit_cols")
            .into_iter()
            .map(|x| x as usize)
            .collect();
        (self.floats(&format!("{name}_sub")), cols)
    }
}
