//! The converter's view of the input checkpoint: every shard's header (names, dtypes, shapes,
//! offsets), and reads of byte ranges of one tensor at a time. Nothing is mapped or held: the
//! converter's memory is only what it reads and writes at the moment.

use super::ledger::{Buf, Ledger};
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One stored tensor of the input.
#[derive(Clone, Debug)]
pub struct SrcTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    shard: usize,
    offset: u64,
    pub len: u64,
}

/// The input checkpoint's shards.
pub struct Source {
    files: Vec<(PathBuf, Arc<File>, u64)>,
    pub tensors: HashMap<String, SrcTensor>,
}

impl Source {
    /// Reads every shard header of `dir` (index-listed or all `*.safetensors`).
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, (path, _)) in crate::checkpoint::shard_files(dir)?.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            let corrupt = |reason: String| Error::Safetensors {
                path: path.clone(),
                reason,
            };
            let mut n = [0u8; 8];
            file.read_exact_at(&mut n, 0)
                .map_err(|e| corrupt(format!("no header length: {e}")))?;
            let hlen = u64::from_le_bytes(n);
            if hlen > size.saturating_sub(8) || hlen > 100 << 20 {
                return Err(corrupt(format!(
                    "header length {hlen} does not fit the file"
                )));
            }
            let mut h = vec![0u8; hlen as usize];
            file.read_exact_at(&mut h, 8)
                .map_err(|e| corrupt(format!("short header: {e}")))?;
            let v: serde_json::Value =
                serde_json::from_slice(&h).map_err(|e| corrupt(format!("header: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| corrupt("header is not an object".into()))?;
            let base = 8 + hlen;
            for (name, meta) in obj {
                if name == "__metadata__" {
                    continue;
                }
                let t = parse_entry(name, meta, i, base, size)
                    .map_err(|r| Error::tensor(name, format!("in {}: {r}", path.display())))?;
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(Error::Checkpoint(format!(
                        "tensor `{name}` appears in more than one shard"
                    )));
                }
            }
            files.push((path, Arc::new(file), size));
        }
        Ok(Source { files, tensors })
    }

    /// Largest shard file, in bytes.
    pub fn largest_shard(&self) -> u64 {
        self.files.iter().map(|f| f.2).max().unwrap_or(0)
    }

    /// The tensor's file (for error messages).
    pub fn file_of(&self, t: &SrcTensor) -> &Path {
        &self.files[t.shard].0
    }

    /// Bytes `[start, start+n)` of a tensor's data, accounted in `ledger`.
    pub fn read(&self, t: &SrcTensor, start: u64, n: u64, ledger: &Ledger) -> Result<Buf> {
        if start + n > t.len {
            return Err(Error::tensor(&t.name, "read past the end of the tensor"));
        }
        let mut buf = ledger.alloc(n as usize);
        let (path, file, _) = &self.files[t.shard];
        file.read_exact_at(buf.as_mut(), t.offset + start)
            .map_err(|e| Error::io(path, e))?;
        Ok(buf)
    }
}

fn parse_entry(
    name: &str,
    meta: &serde_json::Value,
    shard: usize,
    base: u64,
    size: u64,
) -> std::result::Result<SrcTensor, String> {
    let dtype_s = meta["dtype"].as_str().ok_or("no dtype")?;
    let dtype = match dtype_s {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F8_E4M3" => DType::F8E4M3,
        "F8_E8M0" => DType::F8E8M0,
        "I8" => DType::I8,
        "U8" => DType::U8,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U32" => DType::U32,
        other => return Err(format!("unsupported dtype {other}")),
    };
    let shape: Vec<usize> = meta["shape"]
        .as_array()
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or("bad shape"))
        .collect::<std::result::Result<_, _>>()?;
    let offs = meta["data_offsets"].as_array().ok_or("no data_offsets")?;
    let (a, b) = match (
        offs.first().and_then(|x| x.as_u64()),
        offs.get(1).and_then(|x| x.as_u64()),
    ) {
        (Some(a), Some(b)) if a <= b => (a, b),
        _ => return Err("bad data_offsets".into()),
    };
    let want = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    if b - a != want || base + b > size {
        return Err(format!(
            "{} bytes for shape {shape:?} {dtype_s} (expected {want}), or past the end of the file",
            b - a
        ));
    }
    Ok(SrcTensor {
        name: name.to_string(),
        dtype,
        shape,
        shard,
        offset: base + a,
        len: b - a,
    })
}
