//! One decode token's FFN half in two launches or one (`kernels/moe_ffn.cu`): the router, the
//! shared expert (FP8) and the routed experts (FP4) streamed by the same bulk-copy blocks, the
//! routing found inside the first launch while the shared expert's rows stream.

use crate::gpu::Gpu;
use crate::ops::{
    moe_bulk_planes, moe_bulk_tile_bytes, MoeArgs, MB_MAX_SMEM, MB_MAX_STAGES, MB_THREADS,
};
use crate::weights::{Fmt, GpuLinear, LinearDesc};
use crate::Result;
use cudarc::driver::DeviceRepr;

/// The default of [`FfnArgs::shared_pre`] (`DSV4_CUDA_FFN_SHARED_PRE` overrides it): on an
/// H100, alone, 2 beat 0, 1 and 4 by ~1 µs per token (docs/PERFORMANCE.md, stop 27).
pub const SHARED_PRE: u32 = 2;

/// `FfnArgs` of `kernels/moe_ffn.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FfnArgs {
    /// The router `[E, D]` (BF16).
    pub gate: LinearDesc,
    /// The shared expert (FP8): gate, up `[Is, D]`, down `[D, Is]`.
    pub sg: LinearDesc,
    pub su: LinearDesc,
    pub sd: LinearDesc,
    /// The router's input `[D]`.
    pub hr: u64,
    /// `[E]` f32 scratch: the router's scores.
    pub scores: u64,
    /// [`FFN_SYNC_WORDS`] u32, zero before the first launch (the grid barrier's count and
    /// generation, then the one-launch and claimed-tile counters).
    pub sync: u64,
    /// The top-k keys, or 0: hash routing through `tid2eid[ids[0]]`.
    pub bias: u64,
    pub tid2eid: u64,
    pub ids: u64,
    pub route_scale: f32,
    /// Shared-expert stages each block requests before its router rows are in and it has
    /// arrived at the grid barrier ([`SHARED_PRE`] by default).
    pub shared_pre: u32,
    /// Nonzero: up's routed tiles go to whichever block has a free ring slot first (a counter
    /// in `sync`), instead of an equal run per block (the two-launch path only).
    pub dyn_tiles: u32,
    pub pad: u32,
    /// The routing out, `[k]` each (the same buffers as [`MoeArgs::picks`] and `rw`).
    pub picks: u64,
    pub rw: u64,
    /// The shared expert's hidden row `[Is]` and output `[D]`.
    pub sh: u64,
    pub sout: u64,
}

unsafe impl DeviceRepr for FfnArgs {}

/// The inputs per thread of a shared-expert tile (`FFN_CH` 16-input chunks over 256 threads).
const FFN_MAX_K: usize = 2 * 16 * 256;
/// Consumer warps per block (the kernels' `W`).
const FFN_WARPS: usize = 8;

/// The shared-memory layout of the two launches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FfnLaunch {
    pub blocks: u32,
    pub up_stages: i32,
    pub up_stage_bytes: i32,
    pub up_smem: u32,
    pub down_stages: i32,
    pub down_stage_bytes: i32,
    pub down_planes: i32,
    pub down_smem: u32,
    /// The whole half in one launch (`moe_ffn_bulk`), where its stages fit.
    pub one: Option<OneLaunch>,
}

/// The shared-memory layout of `moe_ffn_bulk`: stages that hold any tile of both halves, then
/// room for up's input plane or down's `planes` pair planes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneLaunch {
    pub stages: i32,
    pub stage_bytes: i32,
    pub planes: i32,
    pub smem: u32,
}

/// How [`ffn_bulk`] launches the half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnPath {
    /// Up then down; `early`: up may launch while the kernel before it runs (its shared-expert
    /// stream and router rows start there, and its blocks sit beside that kernel's), else only
    /// once that kernel has finished.
    Two { early: bool },
    /// `moe_ffn_bulk`, launched early; two early launches where its stages do not fit.
    One,
}

/// The word of [`FfnArgs::sync`] that counts claimed routed tiles ([`FfnArgs::dyn_tiles`];
/// `FFN_TILE_COUNTER` in `kernels/moe_ffn.cu` must equal it): after the grid barrier's two,
/// then (one launch) the shared hidden row's and one per pick (up to 32).
pub const FFN_TILE_COUNTER: usize = 3 + 32;
/// `u32` counters the kernels keep in [`FfnArgs::sync`].
pub const FFN_SYNC_WORDS: usize = FFN_TILE_COUNTER + 1;

fn fp8_tile_bytes(k: usize) -> usize {
    8 * k
}

/// One input's B plane and group factors in shared memory (the kernels' `ffn_plane_bytes`).
fn plane_bytes(k: usize) -> usize {
    k * 4 + k / 8
}

/// A shared-expert matrix the kernels can stream: FP8 with 16-byte rows, 8 rows of a tile in
/// one scale block, chunks of 16 inputs in one scale column.
fn shared_ok(w: &GpuLinear, out: usize, inp: usize) -> bool {
    let d = &w.desc;
    w.fmt == Fmt::Fp8
        && w.vec
        && w.out == out
        && w.inp == inp
        && inp.is_multiple_of(16)
        && inp <= FFN_MAX_K
        && d.bo > 0
        && d.bo % 8 == 0
        && d.bi > 0
        && d.bi % 16 == 0
        && d.w.is_multiple_of(16)
}

/// The launch layout for one token with `k` picks of experts `[i, d]` (FP4, the bulk kernels'
/// conditions checked by the caller), router `gate` and shared expert `[w1, w3, w2]`, on `sms`
/// SMs; `None` where the fused kernels cannot take them. (The model's load already limits the
/// experts to what one warp routes.)
pub fn ffn_launch(
    sms: usize,
    gate: &GpuLinear,
    shared: [&GpuLinear; 3],
    k: usize,
    d: usize,
    i: usize,
) -> Option<FfnLaunch> {
    let [w1, w3, w2] = shared;
    let is = w1.out;
    let ok = gate.fmt == Fmt::Bf16
        && gate.vec
        && gate.inp == d
        && gate.desc.w.is_multiple_of(16)
        && shared_ok(w1, is, d)
        && shared_ok(w3, is, d)
        && shared_ok(w2, d, is)
        && (w1.desc.scale_cols, w1.desc.bo, w1.desc.bi)
            == (w3.desc.scale_cols, w3.desc.bo, w3.desc.bi);
    ok.then(|| ffn_layout(sms, gate.out, k, d, i, is)).flatten()
}

/// [`ffn_launch`]'s shapes: `e` experts, `k` picks, width `d`, routed intermediate `i`, shared
/// intermediate `is`.
fn ffn_layout(sms: usize, e: usize, k: usize, d: usize, i: usize, is: usize) -> Option<FfnLaunch> {
    let nb = sms.max(1);
    // Every block holds at most one router row per consumer warp.
    if e == 0
        || e.div_ceil(nb) > FFN_WARPS
        || k == 0
        || k > 32
        || !d.is_multiple_of(256)
        || !i.is_multiple_of(256)
        || !is.is_multiple_of(8)
    {
        return None;
    }
    let up_stage = moe_bulk_tile_bytes(d)
        .max(fp8_tile_bytes(d))
        .next_multiple_of(16);
    let up_fixed = 64 + plane_bytes(d);
    let up_stages = (MB_MAX_SMEM.checked_sub(up_fixed)? / up_stage).min(MB_MAX_STAGES);
    // Down: the pairs a block's run of routed items spans (the kernel cuts them alike).
    let planes = moe_bulk_planes(nb, k, k, d / 16, false).max(1);
    let down_stage = moe_bulk_tile_bytes(i)
        .max(fp8_tile_bytes(is))
        .next_multiple_of(16);
    let down_fixed = 64 + planes * plane_bytes(i);
    let down_stages = (MB_MAX_SMEM.checked_sub(down_fixed)? / down_stage).min(MB_MAX_STAGES);
    let one_stage = up_stage.max(down_stage);
    let one_fixed = 64 + plane_bytes(d).max(planes * plane_bytes(i));
    let one = MB_MAX_SMEM
        .checked_sub(one_fixed)
        .map(|room| (room / one_stage).min(MB_MAX_STAGES))
        .filter(|&n| n >= 2)
        .map(|n| OneLaunch {
            stages: n as i32,
            stage_bytes: one_stage as i32,
            planes: planes as i32,
            smem: (n * one_stage + one_fixed) as u32,
        });
    (up_stages >= 2 && down_stages >= 2).then_some(FfnLaunch {
        blocks: nb as u32,
        up_stages: up_stages as i32,
        up_stage_bytes: up_stage as i32,
        up_smem: (up_stages * up_stage + up_fixed) as u32,
        down_stages: down_stages as i32,
        down_stage_bytes: down_stage as i32,
        down_planes: planes as i32,
        down_smem: (down_stages * down_stage + down_fixed) as u32,
        one,
    })
}

/// The FFN half of one token: routing into `f.picks`/`f.rw` (the buffers `a` names too: down
/// reads them there), the routed experts' rows into `a.h`/`a.out` (`a.rw_inside` must be 0)
/// and the shared expert into `f.sout`, as [`ffn_launch`] laid out; `f.sync` holds
/// [`FFN_SYNC_WORDS`] counters, zero before the first launch.
pub fn ffn_bulk(gpu: &Gpu, l: &FfnLaunch, a: &MoeArgs, f: &FfnArgs, path: FfnPath) -> Result<()> {
    if f.picks != a.picks || f.rw != a.rw || a.rw_inside != 0 {
        return Err(crate::Error::Unsupported(
            "fused FFN: the routing buffers must be the experts' (and rw_inside 0)".into(),
        ));
    }
    let k = a.k.max(0) as usize;
    let (d, i) = (a.d as usize, a.i as usize);
    let up_bytes =
        k * 2 * i * (d / 2 + d / 32) + 2 * (f.sg.out as usize) * d + 2 * d * (f.gate.out as usize);
    let down_bytes = k * d * (i / 2 + i / 32) + d * (f.sd.inp as usize);
    let early = match (path, l.one) {
        (FfnPath::Two { early }, _) => early,
        (FfnPath::One, None) => true,
        (FfnPath::One, Some(o)) => {
            gpu.tag(|| {
                (
                    format!("moe_ffn_bulk x{k} s{}", o.stages),
                    up_bytes + down_bytes,
                )
            });
            return gpu.launch(
                "moe_ffn_bulk",
                (l.blocks, 1, 1),
                (MB_THREADS, 1, 1),
                o.smem,
                &[a, f, &o.stages, &o.stage_bytes, &o.planes],
            );
        }
    };
    gpu.tag(|| (format!("moe_ffn_up_bulk x{k} s{}", l.up_stages), up_bytes));
    let launch = if early {
        Gpu::launch
    } else {
        Gpu::launch_after
    };
    launch(
        gpu,
        "moe_ffn_up_bulk",
        (l.blocks, 1, 1),
        (MB_THREADS, 1, 1),
        l.up_smem,
        &[a, f, &l.up_stages, &l.up_stage_bytes],
    )?;
    gpu.tag(|| {
        (
            format!("moe_ffn_down_bulk x{k} s{}", l.down_stages),
            down_bytes,
        )
    });
    gpu.launch(
        "moe_ffn_down_bulk",
        (l.blocks, 1, 1),
        (MB_THREADS, 1, 1),
        l.down_smem,
        &[a, f, &l.down_stages, &l.down_stage_bytes, &l.down_planes],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels count claimed tiles in the word the host allocates for them.
    #[test]
    fn tile_counter_matches_the_kernels() {
        let src = include_str!("../kernels/moe_ffn.cu");
        let want = format!("#define FFN_TILE_COUNTER {FFN_TILE_COUNTER}\n");
        assert!(
            src.contains(&want),
            "kernels/moe_ffn.cu must define {want:?}"
        );
    }

    /// Flash's shapes on an H100 (132 SMs): six up stages of an FP4 tile (the FP8 tile is
    /// smaller), and eight down stages; 132 blocks cut 6 pairs of 256 down tiles at pair
    /// boundaries (every 22 blocks), so each block reads one pair's plane, while 100 blocks
    /// would need two.
    #[test]
    fn flash_layout_on_an_h100() {
        let l = ffn_layout(132, 256, 6, 4096, 2048, 2048).unwrap();
        assert_eq!((l.blocks, l.up_stages, l.up_stage_bytes), (132, 6, 34864));
        assert_eq!(l.up_smem as usize, 6 * 34864 + 64 + 4096 * 4 + 512);
        assert!(l.up_smem as usize <= MB_MAX_SMEM);
        assert_eq!(
            (l.down_stages, l.down_stage_bytes, l.down_planes),
            (8, 17456, 1)
        );
        assert_eq!(l.down_smem as usize, 8 * 17456 + 64 + 2048 * 4 + 256);
        // One launch: six stages of the up tile, room for up's plane or down's (the same).
        let o = l.one.unwrap();
        assert_eq!((o.stages, o.stage_bytes, o.planes), (6, 34864, 1));
        assert_eq!(o.smem as usize, 6 * 34864 + 64 + 4096 * 4 + 512);
        let l = ffn_layout(100, 256, 6, 4096, 2048, 2048).unwrap();
        assert_eq!(l.down_planes, 2);
        assert_eq!(
            l.one.unwrap().smem as usize,
            6 * 34864 + 64 + 4096 * 4 + 512
        );
    }

    /// A wide shared expert sets the stage size; shapes the kernels cannot cut are refused.
    #[test]
    fn layout_limits() {
        let l = ffn_layout(132, 16, 6, 512, 256, 1024).unwrap();
        assert_eq!(l.down_stage_bytes as usize, fp8_tile_bytes(1024));
        assert_eq!(l.down_planes, 1);
        // More router rows per block than consumer warps, no picks, widths off the 256 grid.
        assert!(ffn_layout(132, 8 * 132 + 1, 6, 4096, 2048, 2048).is_none());
        // Wide up tiles and two down planes: two launches fit, one does not (ffn_bulk then
        // launches two).
        let l = ffn_layout(100, 256, 6, 10240, 8192, 2048).unwrap();
        assert_eq!((l.up_stages, l.down_stages, l.down_planes), (2, 2, 2));
        assert_eq!(l.one, None);
        assert!(ffn_layout(132, 256, 0, 4096, 2048, 2048).is_none());
        assert!(ffn_layout(132, 256, 6, 4000, 2048, 2048).is_none());
        assert!(ffn_layout(132, 256, 6, 4096, 2048, 2044).is_none());
    }
}
