//! Opening a checkpoint directory: `config.json` plus sharded (`model.safetensors.index.json`) or
//! single-file safetensors, memory-mapped. Tensors are indexed under official key names.

pub mod names;

use crate::config::{AttnKind, ModelConfig};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};
use names::KeyStyle;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An opened checkpoint: its config and every tensor, not yet interpreted.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub style: KeyStyle,
    /// Official key → tensor.
    tensors: HashMap<String, Tensor>,
    /// Shard files, in order, with their sizes.
    pub files: Vec<(PathBuf, u64)>,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and maps every shard, validating each shard's header.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_progress(dir, |_, _, _, _| {})
    }

    /// [`open`](Self::open), calling `progress(i, n, shard, bytes_so_far)` after each shard.
    pub fn open_with_progress(
        dir: &Path,
        mut progress: impl FnMut(usize, usize, &Path, u64),
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = shard_files(dir)?;
        let mut raw: Vec<(String, Tensor)> = Vec::new();
        let mut sizes = Vec::new();
        let mut done = 0u64;
        for (i, (path, expected)) in files.iter().enumerate() {
            let (tensors, size) = map_shard(path)?;
            done += size;
            progress(i, files.len(), path, done);
            if let Some(expected) = expected {
                for name in expected {
                    if !tensors.iter().any(|(n, _)| n == name) {
                        return Err(Error::Checkpoint(format!(
                            "{}: tensor `{name}` listed in model.safetensors.index.json is missing",
                            path.display()
                        )));
                    }
                }
            }
            sizes.push((path.clone(), size));
            raw.extend(tensors);
        }
        Self::from_tensors(dir.to_path_buf(), config, raw, sizes)
    }

    /// Builds a checkpoint from tensors already in memory (synthetic models, tests).
    pub fn from_tensors(
        dir: PathBuf,
        config: ModelConfig,
        raw: Vec<(String, Tensor)>,
        files: Vec<(PathBuf, u64)>,
    ) -> Result<Self> {
        let style = names::detect_style(raw.iter().map(|(n, _)| n.as_str()));
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let key = names::to_official(&name, style);
            let Some(key) = key else { continue };
            if names::is_ignored(&key) {
                continue;
            }
            if let Some(prev) = tensors.insert(key.clone(), t) {
                return Err(Error::Checkpoint(format!(
                    "tensor `{name}` appears twice (also in {})",
                    prev.file().display()
                )));
            }
        }
        let mut config = config;
        // The official `compress_ratios` can only say "4 = sparse"; a layer at another rate that
        // ships indexer weights was built as compressed-sparse attention.
        for (i, kind) in config.attn_kinds.iter_mut().enumerate() {
            if let AttnKind::Compressed {
                ratio,
                sparse: false,
            } = *kind
            {
                if tensors.contains_key(&format!("layers.{i}.attn.indexer.wq_b.weight")) {
                    *kind = AttnKind::Compressed {
                        ratio,
                        sparse: true,
                    };
                }
            }
        }
        Ok(Checkpoint {
            dir,
            config,
            style,
            tensors,
            files,
        })
    }

    /// The tensor stored under an official key, if present.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// A required tensor: missing → error naming it.
    pub fn require(&self, key: &str) -> Result<&Tensor> {
        self.get(key).ok_or_else(|| {
            Error::tensor(
                key,
                format!(
                    "missing from the checkpoint in {} ({} key names)",
                    self.dir.display(),
                    self.style.label()
                ),
            )
        })
    }

    /// Total bytes of all shard files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }

    /// All tensors, sorted by key (for `inspect`).
    pub fn sorted(&self) -> BTreeMap<&str, &Tensor> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }
}

/// The shard list: from the index when present (with the tensor names each shard must hold),
/// else `model.safetensors`, else every `*.safetensors` in the directory.
pub(crate) fn shard_files(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.clone(),
            source: e,
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::Checkpoint(format!("{}: no `weight_map` object", index.display()))
            })?;
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: weight_map[{name}] is not a file name",
                    index.display()
                ))
            })?;
            by_file
                .entry(file.to_string())
                .or_default()
                .push(name.clone());
        }
        let mut out = Vec::new();
        for (file, names) in by_file {
            let path = dir.join(&file);
            if !path.exists() {
                return Err(Error::Checkpoint(format!(
                    "shard {} listed in {} is missing ({} tensors)",
                    path.display(),
                    index.display(),
                    names.len()
                )));
            }
            out.push((path, Some(names)));
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![(single, None)]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(Error::Checkpoint(format!(
            "no .safetensors files in {}",
            dir.display()
        )));
    }
    Ok(all.into_iter().map(|p| (p, None)).collect())
}

/// Maps one shard and lists its tensors. A truncated or corrupt file is an error naming it.
fn map_shard(path: &Path) -> Result<(Vec<(String, Tensor)>, u64)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is not
    // truncated or rewritten while the model runs.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let size = mmap.len() as u64;
    let storage = Arc::new(Storage::Mmap(mmap));
    let file_name = Arc::new(path.to_path_buf());
    let bytes = storage.bytes();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let base = bytes.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        let dtype = DType::from_safetensors(view.dtype())
            .map_err(|reason| Error::tensor(name, format!("in {}: {reason}", path.display())))?;
        let data = view.data();
        let offset = data.as_ptr() as usize - base;
        let t = Tensor::new(
            name.to_string(),
            file_name.clone(),
            dtype,
            view.shape().to_vec(),
            storage.clone(),
            offset,
            data.len(),
        )?;
        out.push((name.to_string(), t));
    }
    Ok((out, size))
}
