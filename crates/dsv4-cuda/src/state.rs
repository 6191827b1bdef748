//! One sequence's state on the GPU, per layer: the window ring of K=V rows, and for compressed
//! layers each compressor's emitted entries (grown by doubling) plus the projected rows it
//! still needs (the open window, and for CSA the previous window's rows for the overlap).

use crate::gpu::{DevBuf, Gpu};
use crate::weights::{GpuCompressor, GpuWeights};
use crate::Result;

pub struct CompState {
    /// Emitted entries `[cap, dim]`, `n` of them valid.
    pub entries: DevBuf,
    pub cap: usize,
    pub n: usize,
    pub dim: usize,
    /// Projected kv / gate rows of positions `tail_start..tail_start + tail_len`, `[2·ratio, width]`.
    pub tail_kv: DevBuf,
    pub tail_gate: DevBuf,
    pub tail_start: usize,
    pub tail_len: usize,
}

impl CompState {
    fn new(gpu: &Gpu, c: &GpuCompressor) -> Result<Self> {
        let width = c.wkv.out;
        let cap = 64;
        Ok(CompState {
            entries: gpu.alloc(cap * c.dim * 4)?,
            cap,
            n: 0,
            dim: c.dim,
            tail_kv: gpu.alloc(2 * c.ratio * width * 4)?,
            tail_gate: gpu.alloc(2 * c.ratio * width * 4)?,
            tail_start: 0,
            tail_len: 0,
        })
    }

    /// Makes room for `need` entries, keeping the valid ones.
    pub fn reserve(&mut self, gpu: &Gpu, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let cap = need.max(2 * self.cap);
        let fresh = gpu.alloc(cap * self.dim * 4)?;
        gpu.dtod(fresh.ptr, self.entries.ptr, self.n * self.dim * 4)?;
        self.entries = fresh;
        self.cap = cap;
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.entries.bytes + self.tail_kv.bytes + self.tail_gate.bytes
    }
}

pub struct LayerState {
    /// `[window, head_dim]`: position p lives in slot p % window.
    pub ring: DevBuf,
    pub comp: Option<CompState>,
    pub index: Option<CompState>,
}

/// The whole state of one sequence on the GPU.
pub struct GpuSeq {
    pub pos: usize,
    pub layers: Vec<LayerState>,
    /// Which GPU model created it (a state only runs on its own model).
    pub owner: usize,
}

impl GpuSeq {
    pub fn new(
        gpu: &Gpu,
        w: &GpuWeights,
        window: usize,
        head_dim: usize,
        owner: usize,
    ) -> Result<Self> {
        let layers = w
            .layers
            .iter()
            .map(|l| -> Result<LayerState> {
                Ok(LayerState {
                    ring: gpu.alloc_zeros(window * head_dim * 4)?,
                    comp: l
                        .attn
                        .compressor
                        .as_ref()
                        .map(|c| CompState::new(gpu, c))
                        .transpose()?,
                    index: l
                        .attn
                        .indexer
                        .as_ref()
                        .map(|i| CompState::new(gpu, &i.compressor))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuSeq {
            pos: 0,
            layers,
            owner,
        })
    }

    /// Device bytes held by this sequence.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.ring.bytes
                    + l.comp.as_ref().map_or(0, |c| c.bytes())
                    + l.index.as_ref().map_or(0, |c| c.bytes())
            })
            .sum()
    }
}
