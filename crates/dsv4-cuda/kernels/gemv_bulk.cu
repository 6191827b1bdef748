// Weight streaming through shared memory with bulk asynchronous copies (the 1-D form of the
// Hopper tensor memory accelerator), for decode's few-token products.
//
// The register-pipelined GEMVs (linear.cu) keep one 16-byte chunk per row and lane in flight:
// about 8 KB per SM, far below what hides HBM latency, so their 8–50 MB launches stream at
// 0.9–1.5 of 4.2 TB/s. Here a producer warp keeps BULK_STAGES stages of 32 KB in flight
// (128 KB per SM) with a few large copies per stage, and costs the eight consumer warps no
// registers. The grid is one block per SM, each block a contiguous run of work items, so the
// copy stream never drains between tiles; the weights are requested before
// `griddepcontrol.wait`, so a launch's first stages load while the kernel before it finishes.
#include "linear.cuh"

#define BULK_STAGE 32768  // weight bytes per stage
#define BULK_STAGES 6  // the most stages a ring has (see BulkRing; the host's default is 4)
// Consumer warps of the SIMT kernels. Measurement builds only may change it (the host launches
// 288 threads, and the tensor-core kernels below are written for 8): tools/gpu/gemv_bulk_bench.cu.
#ifndef BULK_WARPS
#define BULK_WARPS 8
#endif
#define BULK_THREADS (32 * (BULK_WARPS + 1))  // the consumer warps + 1 producer warp
#define BULK_CONSUMERS (32 * BULK_WARPS)
// A row's K slices whose activation chunks one-token consumers hold in registers at once (1 or
// 2). Two: rows of two slices (`wo_b` at one row per warp, `wo_a` at two) stop reloading their
// chunks every stage (tools/gpu/gemv_bulk_bench.cu, H100: wo_b 15.08 -> 12.66 us, wo_a r2
// 14.90 -> 12.90). FP4 rows keep one (two spilled, and were slower).
#ifndef BULK_X_SLICES
#define BULK_X_SLICES 2
#endif
static_assert(BULK_X_SLICES == 1 || BULK_X_SLICES == 2, "BULK_X_SLICES is 1 or 2");
// Tiles per block whose sums BULK_DEFER_SUMS keeps for the end of the run (more: per tile).
#ifndef BULK_DEFER_MAX
#define BULK_DEFER_MAX 16
#endif

// A stage holds R = 8·RPW rows × KS = 4096/RPW bytes of each: a whole row when the row is KS
// bytes (then a tile's rows are one contiguous copy), else a K slice of each row, one copy per
// row. Large copies matter: 512-byte copies stream at 1.3–2.0 TB/s on an
// H200, 2 KB at 3.5–4.4, 4 KB+ at 4.5. The copy's shape is not the compute's: warp w takes
// a group of four rows (q = w mod R/4) and two of each row's 512-byte columns of lanes (u-group
// w div R/4), so each activation chunk loaded serves four rows (the x reads from L1, not the
// weights, bound these kernels); the u-groups' sums of a row are added, in order, at the end
// of each tile. Scale bytes follow the weights: FP4 an e8m0 per 32 elements per row, FP8 the
// f32 block scales of the slice (a tile's rows share a 128-row scale block).
template <int FMT, int RPW>
__host__ __device__ constexpr int bulk_aux_bytes() {
    return FMT == FMT_FP4 ? BULK_STAGE / 16 : FMT == FMT_FP8 ? (4096 / RPW) / 32 : 0;
}
template <int FMT, int RPW>
__host__ __device__ constexpr int bulk_stage_bytes() {
    return BULK_STAGE + bulk_aux_bytes<FMT, RPW>();
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(uint64_t* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
// BULK_WAIT (a measurement build): 0 `try_wait` (may suspend the warp until the phase
// completes or a time limit passes), 1 `test_wait` in a loop (never suspends), 2 `try_wait` with
// a suspend-time hint of BULK_WAIT_NS. Do the rings' hand-offs cost their consumers time?
#ifndef BULK_WAIT
#define BULK_WAIT 0
#endif
#ifndef BULK_WAIT_NS
#define BULK_WAIT_NS 20
#endif
#if BULK_WAIT == 1
#define BULK_WAIT_INSN "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;"
#elif BULK_WAIT == 2
#define BULK_WAIT_INSN "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;"
#else
#define BULK_WAIT_INSN "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;"
#endif
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n .reg .pred p;\n " BULK_WAIT_INSN "\n selp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done)
                     : "r"(smem_u32(b)), "r"(parity), "n"(BULK_WAIT_NS)
                     : "memory");
    }
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory,
// counted against the transaction bytes `bar` expects. Weights are read once per launch:
// evict-first keeps them from pushing activations and caches out of L2.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar,
                                          uint64_t policy) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], "
        "%2, [%3], %4;" ::"r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
        : "memory");
}
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// BULK_STAMPS (a measurement build, tools/gpu/gemv_bulk_bench.cu): block 0's SM clock per stage
// n < BULK_STAMP_N and warp — a consumer's [0] before its wait for the stage, [1] when it is
// there, [2] once it released it; the producer's [0] before its wait for a free slot, [1] when
// the slot is free — to see where a stage's time goes.
#ifdef BULK_STAMPS
#define BULK_STAMP_N 64
__device__ long long bulk_stamps[BULK_WARPS + 1][BULK_STAMP_N][3];
#define BULK_STAMP(n, k)                                                                        \
    do {                                                                                        \
        if (blockIdx.x == 0 && (threadIdx.x & 31) == 0 && (n) < BULK_STAMP_N)                   \
            bulk_stamps[threadIdx.x >> 5][n][k] = clock64();                                    \
    } while (0)
#else
#define BULK_STAMP(n, k) \
    do {                 \
    } while (0)
#endif

// This block's contiguous share [lo, hi) of `items` work items spread over the grid.
struct ItemRange {
    int lo, hi;
};
__device__ __forceinline__ ItemRange block_items(int items) {
    const long long b = blockIdx.x, nb = gridDim.x;
    return ItemRange{(int)(items * b / nb), (int)(items * (b + 1) / nb)};
}

// The walk of one block over its work items: item = (tile, K split s), each split a run of
// KS-byte slices of every row of the tile. Producer and consumers step it alike. With one K
// split (most launches) and a ring of four stages, no runtime division per stage
// (BULK_WALK_S1, default 1; 0 is a measurement build with the divisions: on an H100 the
// consumers alone streamed 15% faster without them, 3.20 -> 3.77 TB/s, stop 34).
#ifndef BULK_WALK_S1
#define BULK_WALK_S1 1
#endif
struct BulkWalk {
    int item, item_end, slice, slice_end;
    int nslices, S;
    __device__ __forceinline__ BulkWalk(ItemRange r, int nslices_, int S_)
        : item(r.lo), item_end(r.hi), nslices(nslices_), S(S_) {
        enter();
    }
    __device__ __forceinline__ void enter() {
        if (item < item_end) {
#if BULK_WALK_S1
            if (S == 1) {
                slice = 0;
                slice_end = nslices;
                return;
            }
#endif
            const int s = item % S;
            slice = nslices * s / S;
            slice_end = nslices * (s + 1) / S;
        }
    }
    __device__ __forceinline__ bool done() const { return item >= item_end; }
#if BULK_WALK_S1
    __device__ __forceinline__ int tile() const { return S == 1 ? item : item / S; }
    __device__ __forceinline__ int split() const { return S == 1 ? 0 : item % S; }
#else
    __device__ __forceinline__ int tile() const { return item / S; }
    __device__ __forceinline__ int split() const { return item % S; }
#endif
    // Advances one slice; true when that finished the item.
    __device__ __forceinline__ bool advance() {
        if (++slice < slice_end) return false;
        item++;
        enter();
        return true;
    }
};

template <int FMT>
__device__ __forceinline__ int bulk_row_bytes(int in) {
    return FMT == FMT_FP4 ? in / 2 : in * (FMT == FMT_F32 ? 4 : (FMT == FMT_FP8 ? 1 : 2));
}
// Where row r of W starts, and its scale bytes (FP8: its 128-row block's scale row).
template <int FMT>
__device__ __forceinline__ const uint8_t* bulk_row(const LinearW& W, int r) {
    return W.w + (size_t)r * bulk_row_bytes<FMT>(W.in);
}
template <int FMT>
__device__ __forceinline__ const uint8_t* bulk_aux(const LinearW& W, int r) {
    if constexpr (FMT == FMT_FP8)
        return (const uint8_t*)((const float*)W.scales + (size_t)(r / W.bo) * W.scale_cols);
    else
        return (const uint8_t*)W.scales + (size_t)r * (W.in / 32);
}

// The stage ring of one launch: its barriers and the count of stages passed so far, which the
// producer and the consumers keep alike (they walk the same items), so a launch may run
// several matrices through one ring (`gemv_bulk_pair`). The ring has as many slots of
// `stride` bytes as the launch's dynamic shared memory holds, up to BULK_STAGES (the host's
// `Gpu::bulk_stages`: fewer let two bulk launches share an SM, for comparisons).
struct BulkRing {
    uint64_t* full;
    uint64_t* empty;
    int n;
    int done;    // items a consumer warp has finished: the parity of the u-group sums' buffer
    int stages;  // slots in the ring
};
// (`reserved`: bytes at the end of the dynamic shared memory that are not the ring's.)
__device__ __forceinline__ BulkRing bulk_ring_init(unsigned stride, unsigned reserved = 0) {
    __shared__ __align__(8) uint64_t full[BULK_STAGES], empty[BULK_STAGES];
    unsigned dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    const int stages = min((int)((dyn_smem - min(dyn_smem, reserved)) / stride), BULK_STAGES);
    if (stages < 2) __trap();  // the host's `bulk_smem` disagrees
    if (blockDim.x != BULK_THREADS) __trap();  // the host's BULK_THREADS disagrees (BULK_WARPS)
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; i++) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], BULK_WARPS);  // the consumer warps
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    return BulkRing{full, empty, 0, 0, stages};
}

// Stage n's slot in a ring of NS and its pass's parity (BULK_WALK_S1: the ring of 4 by shifts,
// of 6 by a constant divisor's multiply).
__device__ __forceinline__ int ring_slot(int n, int NS) {
#if BULK_WALK_S1
    if (NS == 4) return n & 3;
    if (NS == 6) return (int)((unsigned)n % 6u);
#endif
    return n % NS;
}
__device__ __forceinline__ unsigned ring_pass(int n, int NS) {
#if BULK_WALK_S1
    if (NS == 4) return (unsigned)(n >> 2);
    if (NS == 6) return (unsigned)n / 6u;
#endif
    return (unsigned)(n / NS);
}

// The consumer warps of a SIMT bulk launch meet (named barrier 1; the producer goes on).
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(BULK_CONSUMERS) : "memory");
}

// The producer warp of a launch: streams its walk's stages — R rows × KS bytes each (whole
// rows as one copy when KS is the row, else one copy per row), then their scale bytes — into
// the ring (trapping on a host slicing that does not cover the rows). The weights do not
// depend on the previous kernel, so it never waits for it. `src`
// says where a tile's rows live (`row(t, j)` / `aux(t, j)`: start and scale bytes of row j;
// `rows(t)`: how many exist, for whole-row tiles, whose missing rows are left out of the copy
// and computed from stale shared memory, never written).
template <int FMT, int R, int KS, int STRIDE, class Src>
__device__ __forceinline__ void bulk_produce(const Src& src, BulkWalk walk, BulkRing& ring) {
    constexpr int FP4_AUX = FMT == FMT_FP4 ? KS / 16 : 0;  // e8m0 bytes per row slice
    constexpr int FP8_AUX = FMT == FMT_FP8 ? KS / 32 : 0;  // f32 block scales of the slice
    static_assert(STRIDE >= R * (KS + FP4_AUX) + FP8_AUX, "stage slot too small");
    extern __shared__ __align__(128) uint8_t bulk_smem[];
    const int lane = threadIdx.x & 31;
    const int NS = ring.stages;
    if (walk.nslices * KS != src.row_bytes()) __trap();  // the host's slicing
#ifdef BULK_NO_RING  // measurement only: see gemv_bulk_steps
    return;
#endif
    const bool whole = walk.nslices == 1;
    const uint64_t policy = evict_first_policy();
    for (int& n = ring.n; !walk.done(); n++) {
        const int slot = ring_slot(n, NS), t = walk.tile(), sl = walk.slice;
        uint8_t* st = bulk_smem + slot * STRIDE;
        BULK_STAMP(n, 0);
        if (n >= NS) mbar_wait(&ring.empty[slot], (ring_pass(n, NS) - 1) & 1);
        BULK_STAMP(n, 1);
        const int rows = whole ? src.rows(t) : R;
#ifndef BULK_NO_COPY
        if (lane == 0) mbar_arrive_expect(&ring.full[slot], rows * (KS + FP4_AUX) + FP8_AUX);
#endif
        __syncwarp();
#ifdef BULK_NO_COPY  // measurement only (tools/gpu/gemv_bulk_bench.cu): the consumers' own rate
        if (lane == 0) mbar_arrive(&ring.full[slot]);
        walk.advance();
        continue;
#endif
        if (whole) {
            if (lane == 0) bulk_copy(st, src.row(t, 0), rows * KS, &ring.full[slot], policy);
            if constexpr (FMT == FMT_FP4)
                if (lane == 1) bulk_copy(st + R * KS, src.aux(t, 0), rows * FP4_AUX, &ring.full[slot], policy);
        } else {
            for (int j = lane; j < R; j += 32) {
                bulk_copy(st + j * KS, src.row(t, j) + (size_t)sl * KS, KS, &ring.full[slot], policy);
                if constexpr (FMT == FMT_FP4)
                    bulk_copy(st + R * KS + j * FP4_AUX, src.aux(t, j) + sl * FP4_AUX, FP4_AUX, &ring.full[slot],
                              policy);
            }
        }
        if constexpr (FMT == FMT_FP8)
            if (lane == 16) bulk_copy(st + R * KS, src.aux(t, 0) + sl * FP8_AUX, FP8_AUX, &ring.full[slot], policy);
        walk.advance();
    }
}

// 1 / rms of one token's `width` activations (width % 4 == 0, x 16-byte aligned) by the consumer
// warps of a block (the producer goes on), bit for bit as `rms_norm` computes it: its
// `norm_threads(width)` threads' strided float4 sums, each warp's `warp_sum`, the warps' sums in
// order. The fused norm of `gemv_bulk_norm_*`.
__device__ __forceinline__ float consumers_inv_rms(const float* x, int width, float eps) {
    __shared__ float part[32];
    const int n4 = width / 4;
    const int T = min(max((n4 + 31) / 32 * 32, 32), 1024);  // rms_norm's block (ops::norm_threads)
    // Thread j of that block (a whole warp of them per consumer warp and pass).
    for (int j = threadIdx.x; j < T; j += BULK_CONSUMERS) {
        float ss = 0.f;
        for (int i = j; i < n4; i += T) {
            const float4 v = __ldcg((const float4*)x + i);
            ss = fmaf(v.x, v.x, ss);
            ss = fmaf(v.y, v.y, ss);
            ss = fmaf(v.z, v.z, ss);
            ss = fmaf(v.w, v.w, ss);
        }
        ss = warp_sum(ss);
        if ((threadIdx.x & 31) == 0) part[j >> 5] = ss;
    }
    consumers_sync();
    float ss = 0.f;
    for (int w = 0; w < T / 32; w++) ss += part[w];
    return 1.0f / sqrtf(ss / (float)width + eps);
}

// The engine over the rows of one matrix: `Src` says where a tile's rows live (as
// `bulk_produce` reads them), where token m's activations are (`load(t, m, k, xv)`) and what to
// do with a row group's four sums (`finish`). Called by the producer warp (warp 8) and the
// consumer warps alike. NORM: one token's activations RMS-normed as they are loaded.
template <int FMT, int MT, int RPW, int STRIDE, bool COH, class Src, bool NORM = false>
__device__ __forceinline__ void gemv_bulk_steps(const Src& src, ItemRange mine, int nslices, int S, BulkRing& ring) {
    constexpr int W = BULK_WARPS;  // consumer warps
    constexpr int N = Chunk<FMT>::N;
    constexpr int R = 8 * RPW, KS = 4096 / RPW, CPL = KS / 512;
    static_assert(STRIDE >= bulk_stage_bytes<FMT, RPW>(), "stage slot too small");
    extern __shared__ __align__(128) uint8_t bulk_smem[];
    uint64_t* full = ring.full;
    uint64_t* empty = ring.empty;
#ifdef BULK_NO_RING
    (void)full;
    (void)empty;
#endif
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int NS = ring.stages;
    BulkWalk walk(mine, nslices, S);
    if (warp == W) {
        bulk_produce<FMT, R, KS, STRIDE>(src, walk, ring);
        return;
    }
    constexpr int G = R / 4, UG = W / G, UPW = CPL / UG;  // row groups, u-groups, u's per warp
    static_assert(W % G == 0 && CPL % UG == 0 && UPW >= 1, "warps do not tile the stage");
    const int q = warp % G, ug = warp / G;
#ifdef BULK_NO_MATH  // measurement only (tools/gpu/gemv_bulk_bench.cu): the stream's own rate
    constexpr int UPW_RUN = 0;
#else
    constexpr int UPW_RUN = UPW;
#endif
    __shared__ float red[2][W][4 * MT];  // u-group sums, by item parity (across calls: ring.done)
    // Row group q's sums over the u-groups of one tile's per-warp sums r, in u order.
    auto u_group_sums = [&](const float (&r)[W][4 * MT], float (&out)[4][MT]) {
#pragma unroll
        for (int k = 0; k < 4; k++)
#pragma unroll
            for (int m = 0; m < MT; m++) {
                float v = r[q][k * MT + m];
                for (int g = 1; g < UG; g++) v += r[q + g * G][k * MT + m];
                out[k][m] = v;
            }
    };
    // BULK_DEFER_SUMS (a measurement build; no faster on an H100, stop 29): with one K split,
    // the per-warp sums of a block's tiles wait in shared memory for the end of its run
    // instead of the warps meeting per tile.
#ifdef BULK_DEFER_SUMS
    constexpr int DMAX = UG > 1 ? BULK_DEFER_MAX : 1;
#else
    constexpr int DMAX = 1;
#endif
    __shared__ float dsum[DMAX][W][4 * MT];
    const bool defer = DMAX > 1 && S == 1 && mine.hi - mine.lo <= DMAX;
    int ndone = 0;
    // A walk before this one in the launch (gemv_bulk_multi's jobs) may have ended without
    // u-groups, so without the barrier per item that keeps a buffer's readers ahead of its
    // next writers: meet once before writing any.
    if constexpr (UG > 1) consumers_sync();
    float acc[4][MT];
#pragma unroll
    for (int k = 0; k < 4; k++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[k][m] = 0.f;
    // One token: a warp's activation chunks depend only on the tile's input group and the K
    // slice, so they stay in registers from tile to tile (reloaded when the group changes, or
    // the slice when a row has more slices than BULK_X_SLICES). Read from L1 per stage
    // instead, their latency was most of the consumers' stalls, and the consumers alone
    // streamed no faster than the copies (tools/gpu/gemv_bulk_bench.cu).
#ifdef BULK_X_LOADS  // measurement only: the loads per stage
    constexpr bool XREG = false;
#else
    constexpr bool XREG = MT == 1;
#endif
    constexpr int XSL = XREG && FMT != FMT_FP4 ? BULK_X_SLICES : 1;
    // A fused RMS norm (NORM: one token, whole rows): x read as x · (1 / rms) · xnorm.
    static_assert(!NORM || XREG, "the fused norm applies to held activations");
    float xr = 1.f;
    if constexpr (NORM) xr = consumers_inv_rms(src.x(0, 0), src.W.in, src.a.xnorm_eps);
    float xc[XSL][XREG ? UPW : 1][1][N];  // [held slice][u][token][element]
    const bool every_slice = nslices <= XSL;  // all of a row's slices held at once
    const float* xkey = nullptr;
    int skey = -1;
    // The stage's weights and scales of u-th of the warp (its four rows' 16 bytes each), then
    // their products with the chunks in xv.
    auto stage_load = [&](const uint8_t* st, int uu, uint4 (&qv)[4], float (&sc)[4]) {
        const int u = UPW * ug + uu;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int j = 4 * q + k;
            qv[k] = *(const uint4*)(st + j * KS + u * 512 + lane * 16);
            if constexpr (FMT == FMT_FP8)
                sc[k] = ((const float*)(st + BULK_STAGE))[u * 4 + (lane >> 3)];
            else if constexpr (FMT == FMT_FP4)
                sc[k] = e8m0_to_f32(st[BULK_STAGE + j * (KS / 16) + u * 32 + lane]) * 16384.0f;
            else
                sc[k] = 1.f;
        }
    };
    auto stage_math = [&](const uint4 (&qv)[4], const float (&sc)[4], const float (&xv)[MT][N]) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float f[N];
            decode_vals<FMT>(qv[k], f);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < N; e++) d = fmaf(f[e], xv[m][e], d);
                acc[k][m] = fmaf(d, sc[k], acc[k][m]);
            }
        }
    };
    // A tile's end: the warps' sums of its rows (and, with u-groups, their meeting), then the
    // Src's `finish`. (Run one stage late, behind the next stage's math, it was no faster: stop
    // 34's BULK_PIPE_END.)
    auto tile_end = [&](float (&a)[4][MT], int t, int split) {
#pragma unroll
        for (int k = 0; k < 4; k++)
#pragma unroll
            for (int m = 0; m < MT; m++) a[k][m] = warp_sum(a[k][m]);
        bool finish_now = true;
        if constexpr (UG > 1) {
            if (defer) {
                // Kept for the end of the walk: no meeting of the warps per tile.
                if (lane == 0)
#pragma unroll
                    for (int k = 0; k < 4; k++)
#pragma unroll
                        for (int m = 0; m < MT; m++) dsum[ndone][warp][k * MT + m] = a[k][m];
                ndone++;
                finish_now = false;
            } else {
                // The u-groups' sums of each row, added in u order by u-group 0.
                float (&r)[W][4 * MT] = red[ring.done & 1];
                if (lane == 0)
#pragma unroll
                    for (int k = 0; k < 4; k++)
#pragma unroll
                        for (int m = 0; m < MT; m++) r[warp][k * MT + m] = a[k][m];
                consumers_sync();
                if (ug == 0) u_group_sums(r, a);
            }
        }
        if (finish_now && ug == 0) src.finish(t, split, q, a);
        ring.done++;
    };
    for (int& n = ring.n; !walk.done(); n++) {
        const int slot = ring_slot(n, NS);
        const int t = walk.tile();
        const uint8_t* st = bulk_smem + slot * STRIDE;
        if constexpr (XREG) {
            const float* xp = src.x(t, 0);
            const int sk = every_slice ? 0 : walk.slice;
            if (xp != xkey || sk != skey) {
                xkey = xp;
                skey = sk;
#pragma unroll
                for (int h = 0; h < XSL; h++) {
                    const int sl = every_slice ? h : walk.slice;
                    if (every_slice ? h < nslices : h == 0)
#pragma unroll
                        for (int uu = 0; uu < UPW; uu++) {
                            const int off = (sl * (KS / 16) + (UPW * ug + uu) * 32 + lane) * N;
                            load_x<N, COH>(xp + off, xc[h][uu][0]);
                            if constexpr (NORM) {
                                // (rms_norm's order: x · r, then · w.)
                                float wv[N];
                                load_x<N, false>(src.a.xnorm + off, wv);
#pragma unroll
                                for (int e = 0; e < N; e++) xc[h][uu][0][e] = (xc[h][uu][0][e] * xr) * wv[e];
                            }
                        }
                }
            }
        }
        BULK_STAMP(n, 0);
        // BULK_NO_RING (measurement only, tools/gpu/gemv_bulk_bench.cu): the consumers read the
        // slots as they are, with no wait and no release, and the producer does nothing — the
        // consumers' rate without the ring's hand-offs (against -DBULK_NO_COPY, with them).
#ifndef BULK_NO_RING
        mbar_wait(&full[slot], ring_pass(n, NS) & 1);
#endif
        BULK_STAMP(n, 1);
        // BULK_LDS_AHEAD (a measurement build): every u's weights loaded before any u's math, so
        // all of a warp's shared loads of the stage are in flight at once.
#ifdef BULK_LDS_AHEAD
        constexpr int AHEAD = UPW_RUN > 0 ? UPW_RUN : 1;
#else
        constexpr int AHEAD = 1;
#endif
        uint4 qv[AHEAD][4];
        float sc[AHEAD][4];
#pragma unroll
        for (int uu = 0; uu < UPW_RUN; uu++) {
            if (AHEAD == 1) {
                stage_load(st, uu, qv[0], sc[0]);
            } else if (uu == 0) {
#pragma unroll
                for (int v = 0; v < AHEAD; v++) stage_load(st, v, qv[v], sc[v]);
            }
            const int a = AHEAD == 1 ? 0 : uu;
            if constexpr (XREG) {
                // The held slice, by a branch (an index into xc would put it in local memory).
                const int h = every_slice ? walk.slice : 0;
                if (XSL == 1 || h == 0) {
                    stage_math(qv[a], sc[a], xc[0][uu]);
                } else {
                    stage_math(qv[a], sc[a], xc[XSL - 1][uu]);
                }
            } else {
                const int c = walk.slice * (KS / 16) + (UPW * ug + uu) * 32 + lane;  // chunk of the row
                float xv[MT][N];
#pragma unroll
                for (int m = 0; m < MT; m++) src.template load<N, COH>(t, m, c * N, xv[m]);
                stage_math(qv[a], sc[a], xv);
            }
        }
        __syncwarp();
#ifndef BULK_NO_RING
        if (lane == 0) mbar_arrive(&empty[slot]);
#endif
        BULK_STAMP(n, 2);
        const int split = walk.split();
        if (walk.advance()) {
            tile_end(acc, t, split);
#pragma unroll
            for (int k = 0; k < 4; k++)
#pragma unroll
                for (int m = 0; m < MT; m++) acc[k][m] = 0.f;
        }
    }
    if constexpr (DMAX > 1) {
        // The deferred tiles' sums, in the same order (bit for bit the per-tile path's), once
        // every warp's are in (the next walk's first meeting keeps them until read).
        if (defer && ndone > 0) {
            consumers_sync();
            if (ug == 0)
                for (int i = 0; i < ndone; i++) {
                    u_group_sums(dsum[i], acc);
                    src.finish(mine.lo + i, 0, q, acc);
                }
        }
    }
}

// One matrix through the ring of a launch of its own (NORM: with its input's RMS norm fused).
template <int FMT, int MT, int RPW, class Src, bool NORM = false>
__device__ __forceinline__ void gemv_bulk_run(const Src& src, int items, int nslices, int S) {
    constexpr int STAGE = bulk_stage_bytes<FMT, RPW>();
    BulkRing ring = bulk_ring_init(STAGE);
    // The producer needs no wait (weights do not depend on the previous kernel); the
    // consumers' activations are the previous kernel's output.
    if (threadIdx.x < BULK_CONSUMERS) pdl_wait();
    gemv_bulk_steps<FMT, MT, RPW, STAGE, false, Src, NORM>(src, block_items(items), nslices, S, ring);
}

// Dense: all rows of one matrix for M ≤ MT tokens (one token chunk), K split S ways (partials
// summed, in split order, by the warp that finishes its rows' last split). Tile t holds rows
// t·R + j; group q's are t·R + 4q + k.
template <int FMT, int MT, int RPW>
struct DenseSrc {
    static constexpr int R = 8 * RPW;
    const LinearW& W;
    const GemvArgs& a;
    __device__ __forceinline__ int row_of(int t, int j) const { return a.row0 + min(t * R + j, a.nrows - 1); }
    __device__ __forceinline__ const uint8_t* row(int t, int j) const { return bulk_row<FMT>(W, row_of(t, j)); }
    __device__ __forceinline__ const uint8_t* aux(int t, int j) const { return bulk_aux<FMT>(W, row_of(t, j)); }
    __device__ __forceinline__ int rows(int t) const { return min(R, a.nrows - t * R); }
    __device__ __forceinline__ int tiles() const { return (a.nrows + R - 1) / R; }
    __device__ __forceinline__ int row_bytes() const { return bulk_row_bytes<FMT>(W.in); }
    // Token m's activations (past the last token: the last again, computed and not written;
    // grouped inputs: one group per tile, checked by the host).
    __device__ __forceinline__ const float* x(int t, int m) const {
        const int off = a.xg_rows ? ((a.row0 + t * R) / a.xg_rows) * a.xg_stride : 0;
        return a.x + (size_t)min(m, a.M - 1) * a.ldx + off;
    }
    // Activations k.. of token m for tile t, as the product reads them.
    template <int N, bool COH>
    __device__ __forceinline__ void load(int t, int m, int k, float (&xv)[N]) const {
        load_x<N, COH>(x(t, m) + k, xv);
    }
    __device__ __forceinline__ void finish(int t, int s, int q, float (&acc)[4][MT]) const {
        const int lane = threadIdx.x & 31;
        const int r0 = t * R + 4 * q;
        const int nr = min(4, a.nrows - r0);
        if (nr <= 0) return;
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= a.M) break;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if (k >= nr) break;
                    if (a.S == 1) a.y[(size_t)m * a.ldy + r0 + k] = acc[k][m];
                    else a.partial[((size_t)s * a.M + m) * a.nrows + r0 + k] = acc[k][m];
                }
            }
        }
        if (a.S > 1) warp_split_k_last(a, r0 / 4, r0, nr, a.M);
    }
};

// The two halves of a grid-wide barrier, each for one thread per block (thread 0). bar[0]
// counts arrivals (reset by the last), bar[1] counts passes. grid_arrive (after the block's
// outputs) returns the pass count that grid_wait waits past, so a block may work between the
// two. Blocks must never outnumber what can be resident at once.
// A release/acquire fence at GPU scope: what a counter's writer needs before its atomic and its
// reader after seeing it. (__threadfence is the sequentially consistent fence.sc.gpu, which
// moe_ffn_bench measured as costly beside bulk copies in flight; FFN_SC_FENCE puts it back.)
__device__ __forceinline__ void gpu_fence() {
#ifdef FFN_SC_FENCE
    __threadfence();
#else
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned grid_arrive(unsigned* bar) {
    volatile unsigned* gen = bar + 1;
    const unsigned g = *gen;
    gpu_fence();  // this block's outputs before its arrival
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {
        atomicExch(bar, 0u);
        gpu_fence();
        atomicAdd(bar + 1, 1u);
    }
    return g;
}
__device__ __forceinline__ void grid_wait(unsigned* bar, unsigned g) {
    volatile unsigned* gen = bar + 1;
    // Another grid-barrier launch holding the other SMs (two models driven from two threads on
    // one GPU, or another process under MPS) could keep blocks from ever arriving: after
    // ~seconds, fail the launch rather than hang.
    for (unsigned spins = 0; *gen == g; spins++) {
        if (spins > (1u << 26)) __trap();
        __nanosleep(32);
    }
    gpu_fence();
}

// Every block of a launch past this point before any goes on: the consumer warps only (the
// producer streams on into the next matrix). Blocks never outnumber SMs and one fits per SM,
// so all become resident once the kernels before them (which never wait on them) finish.
__device__ __forceinline__ void grid_barrier_consumers(unsigned* bar) {
    consumers_sync();
    if (threadIdx.x == 0) grid_wait(bar, grid_arrive(bar));
    consumers_sync();
}

// Two dependent products in one launch (wo_a then wo_b of a decode step): y1 = W1·y0 after
// y0 = W0·x, each all rows of its matrix. One ring streams both matrices, so
// W1's first stages load while W0's last rows are computed and the blocks wait for each other,
// where two launches would pay a launch boundary and a pipeline fill.
template <int F0, int R0, int F1, int R1, int MT>
__device__ __forceinline__ void gemv_bulk_pair_impl(const LinearW& W0, const GemvArgs& a0, int ns0, const LinearW& W1,
                                                    const GemvArgs& a1, int ns1, unsigned* bar) {
    constexpr int S0 = bulk_stage_bytes<F0, R0>(), S1 = bulk_stage_bytes<F1, R1>();
    constexpr int STRIDE = S0 > S1 ? S0 : S1;
    BulkRing ring = bulk_ring_init(STRIDE);
    const DenseSrc<F0, MT, R0> s0{W0, a0};
    const DenseSrc<F1, MT, R1> s1{W1, a1};
    if (threadIdx.x < BULK_CONSUMERS) pdl_wait();
    gemv_bulk_steps<F0, MT, R0, STRIDE, false>(s0, block_items(s0.tiles() * a0.S), ns0, a0.S, ring);
    // (W0's split-K partials are summed, and their counters reset, before the barrier: W1
    // reuses the workspace.)
    if (threadIdx.x < BULK_CONSUMERS) grid_barrier_consumers(bar);
    gemv_bulk_steps<F1, MT, R1, STRIDE, true>(s1, block_items(s1.tiles() * a1.S), ns1, a1.S, ring);
}

#define GEMV_BULK_PAIR(F0, N0, R0, F1, N1, R1, MT)                                                          \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                                            \
        gemv_bulk_pair_##N0##_r##R0##_##N1##_r##R1##_##MT(LinearW W0, GemvArgs a0, int ns0, LinearW W1,     \
                                                           GemvArgs a1, int ns1, unsigned* bar) {           \
        pdl_launch(); /* every block is resident before a dependent can take an SM */                       \
        gemv_bulk_pair_impl<F0, R0, F1, R1, MT>(W0, a0, ns0, W1, a1, ns1, bar);                             \
    }
// wo_a (rows of 4 KB: Flash and Pro) then wo_b (8 or 16 KB rows), FP8 as released or BF16.
GEMV_BULK_PAIR(FMT_FP8, fp8, 1, FMT_FP8, fp8, 1, 1)
GEMV_BULK_PAIR(FMT_FP8, fp8, 1, FMT_FP8, fp8, 1, 2)
GEMV_BULK_PAIR(FMT_BF16, bf16, 1, FMT_BF16, bf16, 1, 1)
GEMV_BULK_PAIR(FMT_BF16, bf16, 1, FMT_BF16, bf16, 1, 2)

// Several products of one step's activations in one launch (a decode step's projections of
// h: 2–7 matrices, 6–28 MB). Their work items are laid end to end and split evenly over the
// grid, so each block streams one contiguous run across matrix boundaries through one ring,
// and all of it is requested before the wait: a small layer's whole share (6 MB is 45 KB per
// SM) is in shared memory before the kernel that writes h has finished.
#define BULK_MULTI_MAX 8
struct BulkJob {
    LinearW W;
    GemvArgs a;
    int32_t nslices, rpw;
    int32_t items;  // tiles × K splits
    int32_t pad_;
};
struct BulkMulti {
    int32_t n, pad_;
    BulkJob j[BULK_MULTI_MAX];
};

template <int FMT, int MT, int RPW, int STRIDE>
__device__ __forceinline__ void bulk_multi_job(const BulkJob& b, ItemRange r, BulkRing& ring) {
    const DenseSrc<FMT, MT, RPW> src{b.W, b.a};
    gemv_bulk_steps<FMT, MT, RPW, STRIDE, false>(src, r, b.nslices, b.a.S, ring);
}

template <int MT>
__device__ __forceinline__ void gemv_bulk_multi_impl(const BulkMulti& g) {
    constexpr int STRIDE = bulk_stage_bytes<FMT_FP8, 1>();  // the largest FP8 or BF16 stage
    BulkRing ring = bulk_ring_init(STRIDE);
    if (threadIdx.x < BULK_CONSUMERS) pdl_wait();
    int total = 0;
    for (int j = 0; j < g.n; j++) total += g.j[j].items;
    const ItemRange mine = block_items(total);
    for (int j = 0, off = 0; j < g.n; off += g.j[j].items, j++) {
        const BulkJob& b = g.j[j];
        const ItemRange r{max(mine.lo - off, 0), min(mine.hi - off, b.items)};
        if (r.lo >= r.hi) continue;
        switch (b.W.fmt * 8 + b.rpw) {
            case FMT_FP8 * 8 + 1: bulk_multi_job<FMT_FP8, MT, 1, STRIDE>(b, r, ring); break;
            case FMT_FP8 * 8 + 2: bulk_multi_job<FMT_FP8, MT, 2, STRIDE>(b, r, ring); break;
            case FMT_FP8 * 8 + 4: bulk_multi_job<FMT_FP8, MT, 4, STRIDE>(b, r, ring); break;
            case FMT_BF16 * 8 + 1: bulk_multi_job<FMT_BF16, MT, 1, STRIDE>(b, r, ring); break;
            case FMT_BF16 * 8 + 2: bulk_multi_job<FMT_BF16, MT, 2, STRIDE>(b, r, ring); break;
            case FMT_BF16 * 8 + 4: bulk_multi_job<FMT_BF16, MT, 4, STRIDE>(b, r, ring); break;
            default: __trap();  // the host's plan: FP8 and BF16 only
        }
    }
}

#define GEMV_BULK_MULTI(NAME, MT)                                                             \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                             \
        gemv_bulk_multi_##NAME(const __grid_constant__ BulkMulti g) {                         \
        pdl_launch();                                                                         \
        gemv_bulk_multi_impl<MT>(g);                                                          \
    }
GEMV_BULK_MULTI(1, 1)
GEMV_BULK_MULTI(2, 2)

#define GEMV_BULK(FMT, NAME, MT, RPW)                                                        \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                            \
        gemv_bulk_##NAME##_##MT##_r##RPW(LinearW W, GemvArgs a, int nslices) {               \
        pdl_launch();                                                                        \
        const DenseSrc<FMT, MT, RPW> src{W, a};                                              \
        gemv_bulk_run<FMT, MT, RPW>(src, src.tiles() * a.S, nslices, a.S);                   \
    }
#define GEMV_BULK_R(FMT, NAME, MT) GEMV_BULK(FMT, NAME, MT, 1) GEMV_BULK(FMT, NAME, MT, 2) GEMV_BULK(FMT, NAME, MT, 4)
// One or two tokens (more would read each token's activations from L1 once per row group).
#define GEMV_BULK_ALL(FMT, NAME) GEMV_BULK_R(FMT, NAME, 1) GEMV_BULK_R(FMT, NAME, 2)
GEMV_BULK_ALL(FMT_BF16, bf16)
GEMV_BULK_ALL(FMT_FP8, fp8)
GEMV_BULK_ALL(FMT_FP4, fp4)

// One token through a matrix whose input is RMS-normed first (a decode step's query latent
// before wq_b and the indexer's wq_b): the norm in the product's activation loads, one launch
// less in the step's chain (a.xnorm: the norm's weights).
#define GEMV_BULK_NORM(FMT, NAME, RPW)                                                       \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                            \
        gemv_bulk_norm_##NAME##_1_r##RPW(LinearW W, GemvArgs a, int nslices) {               \
        pdl_launch();                                                                        \
        if (a.xnorm == nullptr || a.M != 1 || a.xg_rows != 0) __trap(); /* the host's plan */ \
        const DenseSrc<FMT, 1, RPW> src{W, a};                                               \
        gemv_bulk_run<FMT, 1, RPW, DenseSrc<FMT, 1, RPW>, true>(src, src.tiles() * a.S, nslices, a.S); \
    }
#define GEMV_BULK_NORM_R(FMT, NAME) GEMV_BULK_NORM(FMT, NAME, 1) GEMV_BULK_NORM(FMT, NAME, 2) GEMV_BULK_NORM(FMT, NAME, 4)
GEMV_BULK_NORM_R(FMT_BF16, bf16)
GEMV_BULK_NORM_R(FMT_FP8, fp8)

// Decode batches of 3–32 tokens on the tensor cores, through the same producer and ring. The
// SIMT consumers above read every token's activations once per four rows, which at 8 tokens
// made the products compute-bound (0.4–0.5 TB/s). Here the tokens are the rows of the MMA
// (m16n8k16: A = 16 tokens × 16 inputs of the activations, split into `terms` bf16 parts as
// gemm_tc.cu splits them; B = 8 weight rows decoded to bf16 with their scale applied, exactly,
// as gemm_tc.cu decodes its tiles: the host takes this path only where `GpuLinear::tc` says
// that is exact). A stage is 32 rows × KS bytes (2 KB slices, or whole 1 KB rows); each of the
// 8 consumer warps takes an eighth of the stage's inputs for all 32 rows, so each activation
// fragment serves four MMAs. The inputs of an MMA step are permuted (the four a lane holds are
// adjacent in memory, in both operands), which leaves the dot products unchanged.
#define BTC_ROWS 32

template <int MU>
__device__ __forceinline__ void zero_acc(float (&acc)[MU][4][4]) {
#pragma unroll
    for (int u = 0; u < MU; u++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[u][j][i] = 0.f;
}

template <int FMT, int KS, int MG, int STRIDE, class Src>
__device__ __forceinline__ void gemv_bulk_tc_consume(const Src& src, const GemvArgs& a, BulkWalk walk, BulkRing& ring,
                                                     int terms) {
    static_assert(FMT == FMT_FP8 || FMT == FMT_BF16, "FP8 or BF16 weights");
    static_assert(MG == 1 || MG == 2 || MG == 4, "8, 16 or 32 tokens");
    constexpr int ES = FMT == FMT_FP8 ? 1 : 2;  // bytes per weight
    constexpr int KE = KS / ES;                 // inputs of a row slice
    constexpr int KW = KE / 8;                  // ... per consumer warp
    constexpr int EPL = 16 / ES;                // inputs in a lane's 16 bytes of a row
    constexpr int CHE = 4 * EPL;                // inputs of a chunk (the four lanes of a row)
    constexpr int NCH = KW / CHE;               // chunks per warp and stage
    constexpr int SPC = EPL / 4;                // MMA steps (16 inputs) per chunk
    constexpr int MU = (MG + 1) / 2;            // 16-token MMA row blocks
    constexpr int MT = 8 * MG;                  // tokens
    static_assert(NCH >= 1 && KW % CHE == 0, "slice split");
    extern __shared__ __align__(128) uint8_t bulk_smem[];
    __shared__ float red[4][MT][BTC_ROWS + 1];  // warp pairs' sums: token × row
    static_assert(sizeof(red) + 1024 <= 18 * 1024, "the host's BTC_MAX_SMEM reserve");
    __shared__ int last_split;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int NS = ring.stages;
    float acc[MU][4][4];  // token block u, row group j: tokens 16u + g, +8 × rows 8j + 2 t4, +1
    zero_acc(acc);
    for (int& n = ring.n; !walk.done(); n++) {
        const int slot = ring_slot(n, NS), t = walk.tile(), sl = walk.slice;
        const uint8_t* st = bulk_smem + slot * STRIDE;
        mbar_wait(&ring.full[slot], ring_pass(n, NS) & 1);
#pragma unroll
        for (int c = 0; c < NCH; c++) {
            const int e = warp * KW + c * CHE + t4 * EPL;  // the lane's first input in the slice
            uint32_t scb = 0;  // FP8: the slice's block scale, as the decoded words take it
            if constexpr (FMT == FMT_FP8) scb = fp8_scale_bf16x2(((const float*)(st + BTC_ROWS * KS))[e >> 7]);
            uint4 wq[4];  // row 8j + g, the lane's 16 bytes
#pragma unroll
            for (int j = 0; j < 4; j++) wq[j] = *(const uint4*)(st + (8 * j + g) * KS + e * ES);
            float xv[MG][EPL];  // tokens 8h + g, inputs e..
#pragma unroll
            for (int h = 0; h < MG; h++) {
                if (8 * h + g < a.M) {
                    load_x<EPL, false>(src.x(t, 8 * h + g) + (size_t)sl * KE + e, xv[h]);
                } else {
#pragma unroll
                    for (int i = 0; i < EPL; i++) xv[h][i] = 0.f;
                }
            }
#pragma unroll
            for (int s = 0; s < SPC; s++) {
                uint32_t b0[4], b1[4];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const uint32_t w[4] = {wq[j].x, wq[j].y, wq[j].z, wq[j].w};
                    if constexpr (FMT == FMT_FP8) {
                        uint32_t lo, hi;
                        e4m3x4_to_bf16(w[s], lo, hi);
                        b0[j] = mul_bf16x2(lo, scb);
                        b1[j] = mul_bf16x2(hi, scb);
                    } else {
                        b0[j] = w[2 * s];
                        b1[j] = w[2 * s + 1];
                    }
                }
#pragma unroll
                for (int u = 0; u < MU; u++) {
                    uint2 pa[3], pb[3] = {};
                    float qa[4] = {xv[2 * u][4 * s], xv[2 * u][4 * s + 1], xv[2 * u][4 * s + 2], xv[2 * u][4 * s + 3]};
                    tc_split4(qa, terms, pa);
                    if (2 * u + 1 < MG) {
                        float qb[4] = {xv[2 * u + 1][4 * s], xv[2 * u + 1][4 * s + 1], xv[2 * u + 1][4 * s + 2],
                                       xv[2 * u + 1][4 * s + 3]};
                        tc_split4(qb, terms, pb);
                    }
#pragma unroll
                    for (int term = 0; term < 3; term++) {
                        if (term >= terms) break;
                        const uint32_t A[4] = {pa[term].x, pb[term].x, pa[term].y, pb[term].y};
#pragma unroll
                        for (int j = 0; j < 4; j++) mma_bf16(acc[u][j], A, b0[j], b1[j]);
                    }
                }
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&ring.empty[slot]);
        const int split = walk.split();
        if (!walk.advance()) continue;
        // Item (tile t, K split) done: the warps' sums of each (token, row) — warps w and w + 4
        // first, then the four pairs in order — into y or this split's partials.
        for (int pass = 0; pass < 2; pass++) {
            if ((warp >> 2) == 1 - pass) {
                float (&r)[MT][BTC_ROWS + 1] = red[warp & 3];
#pragma unroll
                for (int u = 0; u < MU; u++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            const int m = 16 * u + g + 8 * (i >> 1), row = 8 * j + 2 * t4 + (i & 1);
                            if (m < MT) r[m][row] = pass ? r[m][row] + acc[u][j][i] : acc[u][j][i];
                        }
            }
            asm volatile("bar.sync 1, 256;" ::: "memory");
        }
        zero_acc(acc);
        for (int i = threadIdx.x; i < MT * BTC_ROWS; i += 256) {
            const int m = i / BTC_ROWS, r = i % BTC_ROWS, row = t * BTC_ROWS + r;
            if (m < a.M && row < a.nrows) {
                const float v = ((red[0][m][r] + red[1][m][r]) + red[2][m][r]) + red[3][m][r];
                if (a.S == 1)
                    a.y[(size_t)m * a.ldy + row] = v;
                else
                    a.partial[((size_t)split * a.M + m) * a.nrows + row] = v;
            }
        }
        if (a.S > 1) {
            // The block that writes a tile's last split sums the splits, in split order, and
            // resets the tile's counter for the next launch.
            __threadfence();
            asm volatile("bar.sync 1, 256;" ::: "memory");
            if (threadIdx.x == 0) last_split = atomicAdd(a.counters + t, 1u) == (unsigned)(a.S - 1);
            asm volatile("bar.sync 1, 256;" ::: "memory");
            if (last_split) {
                __threadfence();
                for (int i = threadIdx.x; i < MT * BTC_ROWS; i += 256) {
                    const int m = i / BTC_ROWS, row = t * BTC_ROWS + i % BTC_ROWS;
                    if (m < a.M && row < a.nrows) {
                        float v = 0.f;
                        for (int q = 0; q < a.S; q++) v += __ldcg(a.partial + ((size_t)q * a.M + m) * a.nrows + row);
                        a.y[(size_t)m * a.ldy + row] = v;
                    }
                }
                if (threadIdx.x == 0) a.counters[t] = 0;
            }
        }
        asm volatile("bar.sync 1, 256;" ::: "memory");  // red and last_split free again
    }
}

// All rows of one matrix for 3–32 tokens (up to 8·MG), K split a.S ways.
template <int FMT, int KS, int MG>
__device__ __forceinline__ void gemv_bulk_tc_run(const LinearW& W, const GemvArgs& a, int nslices, int terms) {
    constexpr int STRIDE = BTC_ROWS * KS + (FMT == FMT_FP8 ? KS / 32 : 0);
    BulkRing ring = bulk_ring_init(STRIDE);
    const DenseSrc<FMT, 1, BTC_ROWS / 8> src{W, a};
    const BulkWalk walk(block_items(src.tiles() * a.S), nslices, a.S);
    if (a.M > 8 * MG) __trap();  // the host's plan
    if (BULK_WARPS != 8) __trap();  // a measurement build of the SIMT kernels' warps
    if (threadIdx.x >= 256) {
        bulk_produce<FMT, BTC_ROWS, KS, STRIDE>(src, walk, ring);
        return;
    }
    pdl_wait();  // the activations are the previous kernel's output
    gemv_bulk_tc_consume<FMT, KS, MG, STRIDE>(src, a, walk, ring, terms);
}

#define GEMV_BULK_TC(FMT, NAME, KS, MG)                                                            \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                                  \
        gemv_bulk_tc_##NAME##_k##KS##_m##MG(LinearW W, GemvArgs a, int nslices, int terms) {       \
        pdl_launch();                                                                              \
        gemv_bulk_tc_run<FMT, KS, MG>(W, a, nslices, terms);                                       \
    }
#define GEMV_BULK_TC_M(FMT, NAME, KS) GEMV_BULK_TC(FMT, NAME, KS, 1) GEMV_BULK_TC(FMT, NAME, KS, 2) GEMV_BULK_TC(FMT, NAME, KS, 4)
GEMV_BULK_TC_M(FMT_FP8, fp8, 2048)
GEMV_BULK_TC_M(FMT_FP8, fp8, 1024)
GEMV_BULK_TC_M(FMT_BF16, bf16, 2048)
GEMV_BULK_TC_M(FMT_BF16, bf16, 1024)
