//! A safetensors file written in place: the header is computed from the tensors' dtypes and
//! shapes before any data exists, then each tensor's bytes are written at their offset as they
//! are produced (in any order, in pieces), so nothing is ever held whole in memory.

use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A tensor to be written: name, dtype, shape.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// An open output shard with its data layout fixed.
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    /// Name → (absolute file offset of the data, byte length).
    spans: HashMap<String, (u64, u64)>,
    pub data_bytes: u64,
}

impl ShardWriter {
    /// Creates `path` and writes its header. Tensors are laid out by element size, largest first,
    /// so every tensor starts aligned to its element size.
    pub fn create(path: &Path, mut entries: Vec<Entry>) -> Result<Self> {
        entries.sort_by(|a, b| {
            b.dtype
                .size()
                .cmp(&a.dtype.size())
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({"format": "mlx", "producer": "dsv4 convert"}),
        );
        let mut off = 0u64;
        let mut rel = Vec::with_capacity(entries.len());
        for e in &entries {
            let n = e.bytes();
            header.insert(
                e.name.clone(),
                serde_json::json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [off, off + n]}),
            );
            rel.push((e.name.clone(), off, n));
            off += n;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
            .map_err(|e| Error::Checkpoint(format!("header of {}: {e}", path.display())))?;
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let base = 8 + h.len() as u64;
        file.write_all_at(&(h.len() as u64).to_le_bytes(), 0)
            .and_then(|_| file.write_all_at(&h, 8))
            .and_then(|_| file.set_len(base + off))
            .map_err(|e| Error::io(path, e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            file,
            spans: rel
                .into_iter()
                .map(|(n, o, len)| (n, (base + o, len)))
                .collect(),
            data_bytes: off,
        })
    }

    /// Writes `bytes` at byte `at` of tensor `name`'s data.
    pub fn write(&self, name: &str, at: u64, bytes: &[u8]) -> Result<()> {
        let &(start, len) = self.spans.get(name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: no tensor `{name}` planned",
                self.path.display()
            ))
        })?;
        if at + bytes.len() as u64 > len {
            return Err(Error::Checkpoint(format!(
                "{}: write past the end of `{name}` ({} + {} > {len})",
                self.path.display(),
                at,
                bytes.len()
            )));
        }
        self.file
            .write_all_at(bytes, start + at)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_file_safetensors_reads_back() {
        let dir = std::env::temp_dir().join(format!("dsv4-stw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.safetensors");
        let w = ShardWriter::create(
            &p,
            vec![
                Entry {
                    name: "b".into(),
                    dtype: DType::U8,
                    shape: vec![3],
                },
                Entry {
                    name: "a".into(),
                    dtype: DType::U32,
                    shape: vec![2, 1],
                },
            ],
        )
        .unwrap();
        w.write("b", 1, &[5, 6]).unwrap();
        w.write("b", 0, &[4]).unwrap();
        w.write("a", 0, &[1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        assert!(w.write("b", 2, &[0, 0]).is_err());
        w.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &[4, 5, 6]);
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 1]);
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 0, 0, 0, 2, 0, 0, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
