//! The model's weights on the GPU, uploaded byte for byte in their stored formats (FP8 e4m3 +
//! block scales, packed FP4 e2m1 + e8m0, BF16/F16/F32); small vectors as f32.

use crate::gpu::{DevBuf, Gpu};
use crate::Result;
use cudarc::driver::DeviceRepr;
use dsv4_core::config::{AttnKind, MlpKind};
use dsv4_core::cpu::linear::{Format, Linear};
use dsv4_core::model::weights::{
    AttentionWeights, CompressorWeights, Expert, HcWeights, LayerWeights, ModelWeights, Router,
};

/// Format codes shared with `kernels/common.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Fmt {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
    Fp8 = 3,
    Fp4 = 4,
    /// MLX affine and mxfp8: decoded element by element (no 16-byte kernel path yet).
    Affine = 5,
    Mxfp8 = 6,
}

impl Fmt {
    /// The kernel instantiation that serves this format (MLX formats take the element-wise
    /// path of any instantiation; the format itself travels in the descriptor).
    pub fn name(self) -> &'static str {
        ["f32", "bf16", "f16", "fp8", "fp4", "f32", "f32"][self as usize]
    }

    /// Elements per 16-byte load in the kernels.
    pub fn chunk(self) -> usize {
        [4, 8, 8, 16, 32, 4, 4][self as usize]
    }
}

/// `LinearW` of the kernels: a `[out, in]` matrix passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LinearDesc {
    pub w: u64,
    pub scales: u64,
    pub fmt: i32,
    pub out: i32,
    pub inp: i32,
    pub bo: i32,
    pub bi: i32,
    pub scale_cols: i32,
    pub biases: u64,
    pub bits: i32,
    pub group: i32,
    pub sdt: i32,
    pub pad: i32,
}

unsafe impl DeviceRepr for LinearDesc {}

/// A weight matrix on the device.
pub struct GpuLinear {
    pub desc: LinearDesc,
    pub fmt: Fmt,
    pub out: usize,
    pub inp: usize,
    /// The 16-byte kernel path applies (rows and scale blocks aligned to whole loads).
    pub vec: bool,
    /// The tensor-core GEMMs may take it: its values decode exactly to bf16 ([`tc_exact`]) and
    /// the 16-byte path applies.
    pub tc: bool,
    /// The bulk-copy kernels (`kernels/gemv_bulk.cu`) may stream it ([`bulk_ok`]).
    pub bulk: bool,
    pub stored_bytes: usize,
    _bufs: Vec<DevBuf>,
}

/// Stored bytes of a row of `inp` inputs, in the formats the bulk-copy kernels decode.
pub fn bulk_row_bytes(fmt: Fmt, inp: usize) -> Option<usize> {
    match fmt {
        Fmt::Bf16 => Some(inp * 2),
        Fmt::Fp8 => Some(inp),
        Fmt::Fp4 => Some(inp / 2),
        _ => None,
    }
}

/// Rows of the bulk-copy kernels are read in slices of 4096, 2048 or 1024 bytes
/// (`kernels/gemv_bulk.cu`): rows must be whole multiples of the smallest.
pub const BULK_MIN_SLICE: usize = 1024;

/// Whether the bulk-copy kernels can stream `d`: a format they decode, rows of whole
/// [`BULK_MIN_SLICE`]s, and each slice's scale bytes copyable as 16-byte aligned runs (FP8:
/// 128-wide blocks whose height is a multiple of the 32-row tiles, rows of scales a multiple of
/// 4; FP4: one e8m0 per 32).
pub fn bulk_ok(d: &LinearDesc, fmt: Fmt, vec: bool) -> bool {
    let Some(row_bytes) = bulk_row_bytes(fmt, d.inp as usize) else {
        return false;
    };
    let scales_ok = match fmt {
        Fmt::Fp8 => {
            d.bi == 128 && d.bo % 32 == 0 && d.scale_cols % 4 == 0 && d.scales.is_multiple_of(16)
        }
        Fmt::Fp4 => d.scales.is_multiple_of(16),
        _ => true,
    };
    vec && row_bytes > 0
        && row_bytes.is_multiple_of(BULK_MIN_SLICE)
        && d.w.is_multiple_of(16)
        && scales_ok
}

/// Whether every weight of `l`, scale applied, is exactly a normal bf16 number (or zero), so
/// that `kernels/gemm_tc.cu` may decode its tiles to bf16 (multiplying code and scale as bf16):
/// BF16 itself; FP8 e4m3 (at most 4 significant bits, magnitudes 2^-9..448) times
/// power-of-two f32 block scales 2^-117..2^15 (the decode carries 2^112 times the scale as a
/// bf16); FP4 e2m1 (magnitudes 0.5..6) times e8m0 scales 2^-125..2^125. Any other scale (a
/// non-power-of-two f32 block scale, as some checkpoints store) leaves the matrix to the SIMT
/// kernels.
pub fn tc_exact(l: &Linear) -> bool {
    match &l.format {
        Format::Bf16 => true,
        Format::Fp8 { scales, .. } => scales.iter().all(|&s| {
            let b = s.to_bits() & 0x7fff_ffff;
            b == 0 || (b & 0x7f_ffff == 0 && (10..=142).contains(&(b >> 23)))
        }),
        Format::Fp4 { scales } | Format::Mxfp4 { scales } => {
            scales.bytes().iter().all(|u| (2..=252).contains(u))
        }
        _ => false,
    }
}

impl GpuLinear {
    pub fn upload(gpu: &Gpu, l: &Linear) -> Result<Self> {
        let w = gpu.upload(l.weight_bytes())?;
        let mut affine = None;
        let (fmt, scales, bo, bi, cols) = match &l.format {
            Format::F32 => (Fmt::F32, None, 1, 1, 0),
            Format::Bf16 => (Fmt::Bf16, None, 1, 1, 0),
            Format::F16 => (Fmt::F16, None, 1, 1, 0),
            Format::Fp8 {
                scales,
                block_out,
                block_in,
            } => (
                Fmt::Fp8,
                Some(gpu.upload(scales)?),
                *block_out,
                *block_in,
                l.inp.div_ceil(*block_in),
            ),
            // MLX's mxfp4 is the release's FP4 byte for byte (e2m1 + e8m0 per 32).
            Format::Fp4 { scales } | Format::Mxfp4 { scales } => {
                (Fmt::Fp4, Some(gpu.upload(scales.bytes())?), 1, 1, 0)
            }
            Format::Affine {
                bits,
                group,
                scales,
                biases,
            } => {
                affine = Some((*bits, *group, scales.dtype, gpu.upload(biases.bytes())?));
                (Fmt::Affine, Some(gpu.upload(scales.bytes())?), 1, 1, 0)
            }
            Format::Mxfp8 { scales } => (Fmt::Mxfp8, Some(gpu.upload(scales.bytes())?), 1, 1, 0),
        };
        let vec = l.inp.is_multiple_of(fmt.chunk())
            && (fmt != Fmt::Fp8 || bi % 16 == 0)
            && !matches!(fmt, Fmt::Affine | Fmt::Mxfp8);
        let (bits, group, sdt, biases) = match affine {
            Some((bits, group, dt, b)) => {
                let sdt = match dt {
                    dsv4_core::tensor::DType::F32 => 0,
                    dsv4_core::tensor::DType::BF16 => 1,
                    _ => 2,
                };
                (bits as i32, group as i32, sdt, Some(b))
            }
            None => (0, 1, 0, None),
        };
        let desc = LinearDesc {
            w: w.ptr,
            scales: scales.as_ref().map_or(0, |s| s.ptr),
            fmt: fmt as i32,
            out: l.out as i32,
            inp: l.inp as i32,
            bo: bo as i32,
            bi: bi as i32,
            scale_cols: cols as i32,
            biases: biases.as_ref().map_or(0, |b| b.ptr),
            bits,
            group,
            sdt,
            pad: 0,
        };
        let mut bufs = vec![w];
        bufs.extend(scales);
        bufs.extend(biases);
        Ok(GpuLinear {
            desc,
            fmt,
            out: l.out,
            inp: l.inp,
            vec,
            tc: vec && tc_exact(l),
            bulk: bulk_ok(&desc, fmt, vec),
            stored_bytes: l.stored_bytes(),
            _bufs: bufs,
        })
    }
}

/// A small f32 vector on the device.
pub struct GpuVec {
    pub buf: DevBuf,
    pub len: usize,
}

impl GpuVec {
    pub fn upload(gpu: &Gpu, v: &[f32]) -> Result<Self> {
        Ok(GpuVec {
            buf: gpu.upload(v)?,
            len: v.len(),
        })
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
}

pub struct GpuHc {
    pub fn_: GpuLinear,
    pub base: GpuVec,
    pub scale: GpuVec,
}

impl GpuHc {
    fn upload(gpu: &Gpu, h: &HcWeights) -> Result<Self> {
        Ok(GpuHc {
            fn_: GpuLinear::upload(gpu, &h.fn_)?,
            base: GpuVec::upload(gpu, &h.base)?,
            scale: GpuVec::upload(gpu, &h.scale)?,
        })
    }
}

pub struct GpuCompressor {
    pub ratio: usize,
    pub overlap: bool,
    pub dim: usize,
    pub wkv: GpuLinear,
    pub wgate: GpuLinear,
    pub ape: GpuVec,
    pub norm: GpuVec,
}

impl GpuCompressor {
    fn upload(gpu: &Gpu, c: &CompressorWeights) -> Result<Self> {
        Ok(GpuCompressor {
            ratio: c.ratio,
            overlap: c.overlap,
            dim: c.dim,
            wkv: GpuLinear::upload(gpu, &c.wkv)?,
            wgate: GpuLinear::upload(gpu, &c.wgate)?,
            ape: GpuVec::upload(gpu, &c.ape)?,
            norm: GpuVec::upload(gpu, &c.norm)?,
        })
    }
}

pub struct GpuIndexer {
    pub compressor: GpuCompressor,
    pub wq_b: GpuLinear,
    pub weights_proj: GpuLinear,
}

pub struct GpuAttention {
    pub wq_a: GpuLinear,
    pub q_norm: GpuVec,
    pub wq_b: GpuLinear,
    pub wkv: GpuLinear,
    pub kv_norm: GpuVec,
    pub wo_a: GpuLinear,
    pub wo_b: GpuLinear,
    pub sinks: GpuVec,
    pub compressor: Option<GpuCompressor>,
    pub indexer: Option<GpuIndexer>,
}

impl GpuAttention {
    fn upload(gpu: &Gpu, a: &AttentionWeights) -> Result<Self> {
        Ok(GpuAttention {
            wq_a: GpuLinear::upload(gpu, &a.wq_a)?,
            q_norm: GpuVec::upload(gpu, &a.q_norm)?,
            wq_b: GpuLinear::upload(gpu, &a.wq_b)?,
            wkv: GpuLinear::upload(gpu, &a.wkv)?,
            kv_norm: GpuVec::upload(gpu, &a.kv_norm)?,
            wo_a: GpuLinear::upload(gpu, &a.wo_a)?,
            wo_b: GpuLinear::upload(gpu, &a.wo_b)?,
            sinks: GpuVec::upload(gpu, &a.sinks)?,
            compressor: a
                .compressor
                .as_ref()
                .map(|c| GpuCompressor::upload(gpu, c))
                .transpose()?,
            indexer: a
                .indexer
                .as_ref()
                .map(|i| -> Result<GpuIndexer> {
                    Ok(GpuIndexer {
                        compressor: GpuCompressor::upload(gpu, &i.compressor)?,
                        wq_b: GpuLinear::upload(gpu, &i.wq_b)?,
                        weights_proj: GpuLinear::upload(gpu, &i.weights_proj)?,
                    })
                })
                .transpose()?,
        })
    }
}

pub struct GpuExpert {
    pub w1: GpuLinear,
    pub w3: GpuLinear,
    pub w2: GpuLinear,
}

impl GpuExpert {
    fn upload(gpu: &Gpu, e: &Expert) -> Result<Self> {
        Ok(GpuExpert {
            w1: GpuLinear::upload(gpu, &e.w1)?,
            w3: GpuLinear::upload(gpu, &e.w3)?,
            w2: GpuLinear::upload(gpu, &e.w2)?,
        })
    }
}

pub enum GpuRouter {
    Hash { tid2eid: DevBuf },
    TopK { bias: GpuVec },
}

pub struct GpuMoe {
    pub gate: GpuLinear,
    pub router: GpuRouter,
    pub experts: Vec<GpuExpert>,
    /// Device tables of the experts' descriptors (`[E]` each) for the tile kernels.
    pub w1_table: DevBuf,
    pub w3_table: DevBuf,
    pub w2_table: DevBuf,
    /// All experts share one format and the 16-byte path applies to all.
    pub fmt: Fmt,
    pub vec: bool,
    /// The tensor-core tile kernels may take every routed expert ([`GpuLinear::tc`]).
    pub tc: bool,
    /// Every routed expert's weights and scales start 16-byte aligned, so whole tiles of their
    /// rows may be bulk-copied (`kernels/moe_bulk.cu`).
    pub bulk: bool,
    pub shared: Option<GpuExpert>,
    /// The shared expert's [w1, w3, w2] descriptors, so one token's shared expert can run
    /// through the routed-expert kernels (gate, up and SwiGLU in one pass).
    pub shared_table: Option<DevBuf>,
}

pub struct GpuLayer {
    pub kind: AttnKind,
    /// Stored bytes every token reads, and of one routed expert (from the host layer).
    pub dense_bytes: usize,
    pub expert_bytes: usize,
    pub mlp: MlpKind,
    pub attn_norm: GpuVec,
    pub ffn_norm: GpuVec,
    pub hc_attn: GpuHc,
    pub hc_ffn: GpuHc,
    pub attn: GpuAttention,
    pub moe: GpuMoe,
}

impl GpuLayer {
    pub fn upload(gpu: &Gpu, l: &LayerWeights, mlp: MlpKind) -> Result<Self> {
        let experts = l
            .moe
            .experts
            .iter()
            .map(|e| GpuExpert::upload(gpu, e))
            .collect::<Result<Vec<_>>>()?;
        let fmt = experts.first().map_or(Fmt::F32, |e| e.w1.fmt);
        if experts
            .iter()
            .any(|e| e.w1.fmt != fmt || e.w3.fmt != fmt || e.w2.fmt != fmt)
        {
            return Err(crate::Error::Unsupported(
                "routed experts of one layer in different formats".into(),
            ));
        }
        let vec = experts.iter().all(|e| e.w1.vec && e.w3.vec && e.w2.vec);
        let tc = experts.iter().all(|e| e.w1.tc && e.w3.tc && e.w2.tc);
        let bulk = experts.iter().all(|e| {
            [&e.w1, &e.w3, &e.w2]
                .iter()
                .all(|l| l.desc.w.is_multiple_of(16) && l.desc.scales.is_multiple_of(16))
        });
        let table = |f: fn(&GpuExpert) -> &GpuLinear| -> Result<DevBuf> {
            let descs: Vec<LinearDesc> = experts.iter().map(|e| f(e).desc).collect();
            gpu.upload(&descs)
        };
        let router = match &l.moe.router {
            Router::Hash { tid2eid } => GpuRouter::Hash {
                tid2eid: gpu.upload(tid2eid)?,
            },
            Router::TopK { bias } => GpuRouter::TopK {
                bias: GpuVec::upload(gpu, bias)?,
            },
        };
        let shared = l
            .moe
            .shared
            .as_ref()
            .map(|e| GpuExpert::upload(gpu, e))
            .transpose()?;
        let shared_table = match &shared {
            Some(e) => Some(gpu.upload(&[e.w1.desc, e.w3.desc, e.w2.desc])?),
            None => None,
        };
        Ok(GpuLayer {
            kind: l.kind,
            dense_bytes: l.dense_bytes(),
            expert_bytes: l.expert_bytes(),
            mlp,
            attn_norm: GpuVec::upload(gpu, &l.attn_norm)?,
            ffn_norm: GpuVec::upload(gpu, &l.ffn_norm)?,
            hc_attn: GpuHc::upload(gpu, &l.hc_attn)?,
            hc_ffn: GpuHc::upload(gpu, &l.hc_ffn)?,
            attn: GpuAttention::upload(gpu, &l.attn)?,
            moe: GpuMoe {
                gate: GpuLinear::upload(gpu, &l.moe.gate)?,
                router,
                w1_table: table(|e| &e.w1)?,
                w3_table: table(|e| &e.w3)?,
                w2_table: table(|e| &e.w2)?,
                experts,
                fmt,
                vec,
                tc,
                bulk,
                shared,
                shared_table,
            },
        })
    }
}

/// Every weight of the model on one GPU.
pub struct GpuWeights {
    /// The token embedding: on the first GPU of a pipeline only.
    pub embed: Option<GpuLinear>,
    /// Hyper-head, final norm and vocabulary projection: on the last GPU only.
    pub head: Option<GpuHead>,
    pub layers: Vec<GpuLayer>,
}

pub struct GpuHead {
    pub head: GpuLinear,
    pub norm: GpuVec,
    pub hc_head: GpuHc,
}

/// Which ends of the model a GPU holds besides its layers (a pipeline splits the layers over
/// several GPUs: the embedding goes on the first, the head on the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends {
    pub embed: bool,
    pub head: bool,
}

impl Ends {
    pub const BOTH: Ends = Ends {
        embed: true,
        head: true,
    };
}

impl GpuWeights {
    /// Uploads `w`; GPU layer `i` takes host layer `src[i]` (a synthetic model may repeat a few
    /// host layers to reach a real depth).
    pub fn upload(
        gpu: &Gpu,
        w: &ModelWeights,
        mlp_kinds: &[MlpKind],
        src: &[usize],
        ends: Ends,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(src.len());
        for (i, &s) in src.iter().enumerate() {
            layers.push(GpuLayer::upload(gpu, &w.layers[s], mlp_kinds[s])?);
            progress(i + 1, src.len());
        }
        let embed = if ends.embed {
            Some(GpuLinear::upload(gpu, &w.embed)?)
        } else {
            None
        };
        let head = if ends.head {
            Some(GpuHead {
                head: GpuLinear::upload(gpu, &w.head)?,
                norm: GpuVec::upload(gpu, &w.norm)?,
                hc_head: GpuHc::upload(gpu, &w.hc_head)?,
            })
        } else {
            None
        };
        Ok(GpuWeights {
            embed,
            head,
            layers,
        })
    }

    /// Weight bytes one decode step reads with `k` routed experts per token: every dense matrix,
    /// `k` experts and the shared one per layer, the head (the embedding reads one row).
    pub fn decode_bytes(&self, k: usize) -> usize {
        self.head
            .as_ref()
            .map_or(0, |h| h.head.stored_bytes + h.hc_head.fn_.stored_bytes)
            + self
                .layers
                .iter()
                .map(|l| l.dense_bytes + k * l.expert_bytes)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::tc_exact;
    use dsv4_core::cpu::linear::Format;
    use dsv4_core::synthetic::{self, MatrixFormat as F};

    /// The synthetic checkpoints' formats decode exactly to bf16; an FP8 block scale that is not
    /// a power of two, or one so large that 2^112 times it leaves f32, does not.
    #[test]
    fn tensor_core_decode_exactness() {
        for fmt in [F::Fp8, F::Fp4, F::Bf16] {
            let l = synthetic::random_linear(fmt, 256, 256, 1).unwrap();
            assert!(tc_exact(&l), "{fmt:?}");
        }
        for bad in [1.5f32, 3.0e-3, 65536.0] {
            let mut l = synthetic::random_linear(F::Fp8, 256, 256, 1).unwrap();
            if let Format::Fp8 { scales, .. } = &mut l.format {
                scales[1] = bad;
            }
            assert!(!tc_exact(&l), "scale {bad}");
        }
        let mut l = synthetic::random_linear(F::Fp8, 256, 256, 1).unwrap();
        if let Format::Fp8 { scales, .. } = &mut l.format {
            scales[0] = 0.0;
            scales[1] = -0.25;
        }
        assert!(tc_exact(&l));
    }
}
