//! One sequence's state on the GPU, per layer: the window ring of K=V rows, and for compressed
//! layers each compressor's emitted entries (grown by an eighth, `grown_cap`) plus the projected rows it
//! still needs (the open window, and for CSA the previous window's rows for the overlap), kept
//! in a ring of 2·ratio rows indexed by position so decode kernels find them without host
//! bookkeeping.

use crate::gpu::{DevBuf, Gpu};
use crate::weights::{GpuCompressor, GpuWeights};
use crate::Result;

/// Entries a compressor state holds room for when created.
const ENTRY_CAP0: usize = 64;

/// Bytes of a window ring of `window` K=V rows of `head_dim` f32.
fn ring_bytes(window: usize, head_dim: usize) -> usize {
    window * head_dim * 4
}

/// Bytes of one of a compressor's two tail rings (kv, gate): 2·ratio projected rows of `width`.
fn tail_bytes(ratio: usize, width: usize) -> usize {
    2 * ratio * width * 4
}

/// The capacity `reserve` gives a compressor state of `cap` entries that needs `need`: at
/// least an eighth more (and 256 entries), so a long sequence holds at most ~12.5% more than
/// it uses (doubling held up to twice: 32 MB more per CSA layer for a 64K sequence) while
/// decode steps still reallocate only every cap / 8 entries (every 8K tokens at 64K, ratio 4).
fn grown_cap(cap: usize, need: usize) -> usize {
    if need <= cap {
        cap
    } else {
        need.max(cap + (cap / 8).max(256))
    }
}

pub struct CompState {
    /// Emitted entries `[cap, dim]`, `n` of them valid.
    pub entries: DevBuf,
    pub cap: usize,
    pub n: usize,
    pub dim: usize,
    /// Projected kv / gate rows `[2·ratio, width]`: position p in row p % (2·ratio). The rows
    /// still needed are those of positions `tail_from(pos)..pos`.
    pub tail_kv: DevBuf,
    pub tail_gate: DevBuf,
    pub ratio: usize,
    pub overlap: bool,
}

impl CompState {
    fn new(gpu: &Gpu, c: &GpuCompressor) -> Result<Self> {
        let width = c.wkv.out;
        let cap = ENTRY_CAP0;
        Ok(CompState {
            entries: gpu.alloc(cap * c.dim * 4)?,
            cap,
            n: 0,
            dim: c.dim,
            tail_kv: gpu.alloc(tail_bytes(c.ratio, width))?,
            tail_gate: gpu.alloc(tail_bytes(c.ratio, width))?,
            ratio: c.ratio,
            overlap: c.overlap,
        })
    }

    /// First position whose projected rows a sequence of `pos` tokens still needs: the open
    /// window's, and with overlap the last complete window's as well.
    pub fn tail_from(&self, pos: usize) -> usize {
        let w = pos / self.ratio;
        let w = if self.overlap { w.saturating_sub(1) } else { w };
        w * self.ratio
    }

    /// Makes room for `need` entries, keeping the valid ones (`grown_cap`).
    pub fn reserve(&mut self, gpu: &Gpu, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let cap = grown_cap(self.cap, need);
        let fresh = gpu.alloc(cap * self.dim * 4)?;
        gpu.dtod(fresh.ptr, self.entries.ptr, self.n * self.dim * 4)?;
        self.entries = fresh;
        self.cap = cap;
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.entries.bytes + self.tail_kv.bytes + self.tail_gate.bytes
    }

    /// An independent copy: the same capacity, the valid entries and both tail rings.
    fn copy(&self, gpu: &Gpu) -> Result<Self> {
        Ok(CompState {
            entries: copy_buf(gpu, &self.entries, self.n * self.dim * 4)?,
            tail_kv: copy_buf(gpu, &self.tail_kv, self.tail_kv.bytes)?,
            tail_gate: copy_buf(gpu, &self.tail_gate, self.tail_gate.bytes)?,
            ..*self
        })
    }

    /// Random contents for a sequence at position `pos` (benchmarks: decode cost depends on
    /// the number of entries, not on their values).
    fn fill_synthetic(
        &mut self,
        gpu: &Gpu,
        c: &GpuCompressor,
        pos: usize,
        seed: u64,
    ) -> Result<()> {
        let m = c.ratio;
        let n = pos / m;
        self.reserve(gpu, synthetic_cap(n))?;
        fill(gpu, self.entries.ptr, n * self.dim, seed)?;
        self.n = n;
        fill(gpu, self.tail_kv.ptr, self.tail_kv.bytes / 4, seed + 1)?;
        fill(gpu, self.tail_gate.ptr, self.tail_gate.bytes / 4, seed + 2)
    }
}

/// Entries a synthetically filled compressor state reserves for `n` valid ones: room for the
/// decode steps a benchmark times after the fill (pos / 8 more tokens) without a growth of
/// `reserve` inside them (a new buffer and a copy of every entry during a timed step).
pub fn synthetic_cap(n: usize) -> usize {
    n + n / 8 + 64
}

/// The most device bytes one layer of a sequence holds at once from `fill_synthetic(pos)`
/// through `steps` tokens fed after it: the window ring and, per compressor `(ratio, dim,
/// width)` (width: its projected rows' `wkv` outputs), both tail rings and the entries
/// `synthetic_cap` reserves, or, where the steps outgrow those, `reserve`'s grown buffer with
/// the old one beside it during the copy. For sizing a benchmark before its upload.
pub fn synthetic_layer_bytes(
    window: usize,
    head_dim: usize,
    comps: impl IntoIterator<Item = (usize, usize, usize)>,
    pos: usize,
    steps: usize,
) -> usize {
    ring_bytes(window, head_dim)
        + comps
            .into_iter()
            .map(|(ratio, dim, width)| {
                let filled = grown_cap(ENTRY_CAP0, synthetic_cap(pos / ratio));
                let last = grown_cap(filled, (pos + steps) / ratio);
                let entries = if last > filled { filled + last } else { filled };
                entries * dim * 4 + 2 * tail_bytes(ratio, width)
            })
            .sum::<usize>()
}

/// A buffer of `b`'s size holding a copy of its first `bytes` (stream-ordered).
fn copy_buf(gpu: &Gpu, b: &DevBuf, bytes: usize) -> Result<DevBuf> {
    let fresh = gpu.alloc(b.bytes)?;
    gpu.dtod(fresh.ptr, b.ptr, bytes)?;
    Ok(fresh)
}

fn fill(gpu: &Gpu, ptr: u64, n: usize, seed: u64) -> Result<()> {
    let (lo, hi) = (-1f32, 1f32);
    crate::ops::elementwise(gpu, "fill_uniform", n, &[&ptr, &n, &seed, &lo, &hi])
}

/// `SeqLayer` of `kernels/attention.cu`: one sequence's caches in one layer, as the decode
/// kernels find them per token.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqLayerPtrs {
    pub ring: u64,
    pub c_entries: u64,
    pub c_tail_kv: u64,
    pub c_tail_gate: u64,
    pub i_entries: u64,
    pub i_tail_kv: u64,
    pub i_tail_gate: u64,
}

pub struct LayerState {
    /// `[window, head_dim]`: position p lives in slot p % window.
    pub ring: DevBuf,
    pub comp: Option<CompState>,
    pub index: Option<CompState>,
}

impl LayerState {
    pub fn ptrs(&self) -> SeqLayerPtrs {
        let (ce, ck, cg) = self.comp.as_ref().map_or((0, 0, 0), |c| {
            (c.entries.ptr, c.tail_kv.ptr, c.tail_gate.ptr)
        });
        let (ie, ik, ig) = self.index.as_ref().map_or((0, 0, 0), |c| {
            (c.entries.ptr, c.tail_kv.ptr, c.tail_gate.ptr)
        });
        SeqLayerPtrs {
            ring: self.ring.ptr,
            c_entries: ce,
            c_tail_kv: ck,
            c_tail_gate: cg,
            i_entries: ie,
            i_tail_kv: ik,
            i_tail_gate: ig,
        }
    }
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
                    ring: gpu.alloc_zeros(ring_bytes(window, head_dim))?,
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

    /// Makes this a sequence of `pos` tokens with random cache contents (benchmarks).
    pub fn fill_synthetic(&mut self, gpu: &Gpu, w: &GpuWeights, pos: usize) -> Result<()> {
        for (i, (ls, lw)) in self.layers.iter_mut().zip(&w.layers).enumerate() {
            let seed = 1000 * i as u64;
            fill(gpu, ls.ring.ptr, ls.ring.bytes / 4, seed)?;
            if let (Some(cs), Some(cw)) = (ls.comp.as_mut(), lw.attn.compressor.as_ref()) {
                cs.fill_synthetic(gpu, cw, pos, seed + 10)?;
            }
            if let (Some(is), Some(ix)) = (ls.index.as_mut(), lw.attn.indexer.as_ref()) {
                is.fill_synthetic(gpu, &ix.compressor, pos, seed + 20)?;
            }
        }
        self.pos = pos;
        gpu.sync()
    }

    /// An independent copy of this sequence's caches (stream-ordered device copies), for a
    /// prefix-cache snapshot or a sequence resumed from one.
    pub fn copy(&self, gpu: &Gpu) -> Result<GpuSeq> {
        let layers = self
            .layers
            .iter()
            .map(|l| -> Result<LayerState> {
                Ok(LayerState {
                    ring: copy_buf(gpu, &l.ring, l.ring.bytes)?,
                    comp: l.comp.as_ref().map(|c| c.copy(gpu)).transpose()?,
                    index: l.index.as_ref().map(|c| c.copy(gpu)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuSeq {
            pos: self.pos,
            layers,
            owner: self.owner,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fill's headroom holds the entries of pos / 8 more tokens at every ratio, so a
    /// benchmark's decode steps after it never reach `reserve`'s growth.
    #[test]
    fn synthetic_cap_holds_an_eighth_more_tokens() {
        for ratio in [4usize, 128] {
            for pos in [0usize, 1, 100, 4095, 65536, 1 << 20] {
                let cap = synthetic_cap(pos / ratio);
                assert!(
                    cap >= (pos + pos / 8 + 1) / ratio,
                    "ratio {ratio} pos {pos}"
                );
            }
        }
        // The layer sum: the ring, then entries and two tail rings per compressor.
        let csa = synthetic_layer_bytes(128, 512, [(4, 512, 1024), (4, 128, 256)], 65536, 18);
        let cap = 16384 + 2048 + 64;
        assert_eq!(
            csa,
            128 * 512 * 4 + cap * (512 + 128) * 4 + 2 * 2 * 4 * (1024 + 256) * 4
        );
        assert_eq!(
            synthetic_layer_bytes(128, 512, [], 65536, 18),
            128 * 512 * 4
        );
        // Steps past the headroom: the grown entries (an eighth more) with the old ones beside.
        let grown = synthetic_layer_bytes(0, 0, [(4, 512, 1024)], 65536, 10_000);
        assert_eq!(
            grown,
            (cap + cap + cap / 8) * 512 * 4 + 2 * 2 * 4 * 1024 * 4
        );
        // The growth: what is needed, at least an eighth (and 256 entries) more.
        assert_eq!(grown_cap(64, 65), 320);
        assert_eq!(grown_cap(16384, 16385), 18432);
        assert_eq!(grown_cap(16384, 30000), 30000);
        assert_eq!(grown_cap(100, 100), 100);
        // Nothing valid yet: the initial 64 entries.
        assert_eq!(
            synthetic_layer_bytes(8, 16, [(128, 16, 16)], 0, 0),
            8 * 16 * 4 + 64 * 16 * 4 + 2 * 2 * 128 * 16 * 4
        );
    }
}
