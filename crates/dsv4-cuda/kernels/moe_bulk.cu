// The routed experts of one decode token (FP4 weights) with the weights streamed through shared
// memory by bulk copies (gemv_bulk.cu's producer) and multiplied on the tensor cores
// (moe_tc.cu's step). The per-pair tensor-core kernels keep each warp's own loads in flight
// and, at one token, give the SMs too few warps to hide their latency (Nsight: 33% of DRAM
// busy, 1.7 TB/s); here a producer warp per SM keeps several whole tiles in flight and the
// consumer warps only read shared memory.
//
// Work: items (pair, tile) in pair order, a contiguous run per block (one block per SM). A tile
// is 16 rows of the pair's expert — 8 gate + 8 up rows for `up` (SwiGLU at the end), 16 rows
// of `down` — and one stage holds a whole tile: its rows (K / 2 bytes each) then their e8m0
// scale bytes (K / 32 each), laid out as `MbStage` says. The 8 consumer warps split a tile's
// 256-input steps, and their sums of each row are added in warp order. The down projection's weights do not depend on
// the kernel before (only on the routing, two kernels back: `moe_up_bulk` lets it launch only
// once its own wait is over), so they start streaming while the up projection finishes.
#include "linear.cuh"

#define MB_MAX_STAGES 8

// Stamps of one block's producer and first consumer warp (tools/gpu/moe_bulk_bench.cu defines
// MB_STAMPS): the SM clock at entry, once the planes are ready, when the producer requests item
// n and when the consumers see it arrive (n < MB_NSTAMP), and at the end.
#define MB_NSTAMP 16
#ifdef MB_STAMPS
__device__ long long mb_stamp_req[MB_NSTAMP], mb_stamp_got[MB_NSTAMP], mb_stamp_misc[4];
__device__ int mb_stamp_block;
__device__ __forceinline__ long long mb_clock() {
    long long c;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c));
    return c;
}
#define MB_STAMP(arr, i)                                                            \
    if (blockIdx.x == mb_stamp_block && (threadIdx.x & 31) == 0 && (i) < MB_NSTAMP) \
        arr[i] = mb_clock();
// Every block's global-timer entry and end (ns), per launch: launch r of the bench passes
// picks = mb_span_base + 8 r, and its spans go to slot r % 4.
__device__ unsigned long long mb_span[4][2][1024];
__device__ const int* mb_span_base;
#define MB_SPAN(a, which)                                                             \
    {                                                                                 \
        unsigned long long t_;                                                        \
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                        \
        mb_span[((a).picks - mb_span_base) / 8 % 4][which][blockIdx.x & 1023] = t_;   \
    }
#else
#define MB_STAMP(arr, i)
#define MB_SPAN(a, which)
#endif

// A stage's layout: two blocks of 8 weight rows (K / 2 bytes each; up: the gate rows, then the
// up rows; down: the tile's first 8 rows, then the next 8), then the blocks' e8m0 scale rows
// (K / 32 bytes each) alike; each second block starts 16 bytes past the first's end. MMA row m
// of a warp is row m / 2 of block m % 2, so the rows a quarter-warp reads at once (m, m + 1)
// fall in different banks: with the blocks back to back, every row sat on the same banks
// (rows are 1–2 KB long) and each load took two wavefronts.
struct MbStage {
    int rowb, srow;
    __host__ __device__ constexpr explicit MbStage(int K) : rowb(K / 2), srow(K / 32) {}
    __host__ __device__ constexpr int block(int b) const { return b * (8 * rowb + 16); }
    __host__ __device__ constexpr int scale_block(int b) const { return 16 * rowb + 32 + b * (8 * srow + 16); }
    __host__ __device__ constexpr int bytes() const { return scale_block(1) + 8 * srow; }
};
// Stage bytes of a tile of 16 rows of K inputs (shared memory), and the bytes copied into it.
__host__ __device__ constexpr int moe_bulk_tile_bytes(int K) { return MbStage(K).bytes(); }
__host__ __device__ constexpr int moe_bulk_tile_tx(int K) { return 16 * (K / 2 + K / 32); }

// Producer warp: the bulk copies of routed tile `tile` of expert e (inputs K) into stage st,
// counted against `full`.
template <bool UP>
__device__ __forceinline__ void mb_issue_fp4(const MoeArgs& a, int e, int tile, int K, uint8_t* st, uint64_t* full,
                                             uint64_t policy) {
    const int lane = threadIdx.x & 31;
#ifdef MB_NO_COPY  // measurement only (moe_ffn_bench, moe_bulk_bench): the consumers' own rate
    if (lane == 0) mbar_arrive(full);
    __syncwarp();
    return;
#endif
    if (lane == 0) mbar_arrive_expect(full, moe_bulk_tile_tx(K));
    __syncwarp();
    // Lanes 0 and 1 copy the two row blocks, lanes 2 and 3 their scales.
    const MbStage L(K);
    if (lane < 4) {
        const int blk = lane & 1;
        const LinearW& W = UP ? (blk == 0 ? a.w1[e] : a.w3[e]) : a.w2[e];
        const size_t r0 = UP ? (size_t)tile * 8 : (size_t)tile * 16 + 8 * blk;  // W's first row
        if (lane < 2)
            bulk_copy(st + L.block(blk), W.w + r0 * L.rowb, 8 * L.rowb, full, policy);
        else
            bulk_copy(st + L.scale_block(blk), (const uint8_t*)W.scales + r0 * L.srow, 8 * L.srow, full, policy);
    }
}

// B fragments a consumer warp keeps in registers from tile to tile: its steps' share of one
// input's B plane and group factors (`moe_tc_step`'s shared-memory reads, which were 8 of a
// step's 12 loads and, with the lanes of other columns reading the zero block, most of its
// shared-memory wavefronts). Loaded again when the input changes; warps with more than
// MB_SPW steps read shared memory per step instead.
#define MB_SPW 2
struct MbFrags {
    // The plane they hold, by address only: one MbFrags per run over planes whose contents do
    // not change (a phase that refills the same memory, as down's planes after up's in
    // moe_ffn_bulk, takes a fresh one).
    const uint4* key = nullptr;
    uint4 b[MB_SPW][2][4];       // [step][scale group][word]
    float x[MB_SPW][2][2];       // [step][scale group][column pair]
    __device__ __forceinline__ void load(const uint4* plane, const float* gsc, int s0, int s1) {
        const MoeTcLane ln;
#pragma unroll
        for (int u = 0; u < MB_SPW; u++) {
            if (s0 + u >= s1) break;
#pragma unroll
            for (int ng = 0; ng < 2; ng++) {
                const uint4* bp = plane + (ln.group(s0 + u, ng) * 2 + ln.part) * 4;
#pragma unroll
                for (int i = 0; i < 4; i++) b[u][ng][i] = ln.active ? bp[i] : make_uint4(0u, 0u, 0u, 0u);
                x[u][ng][0] = gsc[ln.acc_group(s0 + u, ng)];
                x[u][ng][1] = gsc[ln.acc_group(s0 + u, ng) + 2];
            }
        }
        key = plane;
    }
};

// Consumer warps: routed tile `tile` of pair p from its (arrived) stage st, its input's B plane
// and group factors; the stage is released to `empty` once read. The warps split the tile's
// 256-input steps; their sums of each row, in `r`, are added in warp order by warp 0, which
// writes the outputs (up: SwiGLU into a.h; down: a.out). `fr`: the warp's B fragments, kept by
// the caller's loop over tiles (one per run of a plane region: its key is the plane's address).
template <bool UP, int W>
__device__ __forceinline__ void mb_consume_fp4(const MoeArgs& a, const uint8_t* st, uint64_t* empty, int K,
                                               const uint4* zero, const uint4* plane, const float* gsc,
                                               float (&r)[W][16], int p, int tile, MbFrags& fr) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const MbStage L(K);
    const int steps = K / 256;
    const int s0 = warp * steps / W, s1 = (warp + 1) * steps / W;
    float acc[1][4] = {};
    // The lane's loads of step s: 32 bytes of MMA rows g and g + 8 (two scale groups) and
    // their scale words; MMA row m is row m / 2 of block m % 2 (MbStage).
    const uint8_t* rows = st + L.block(g & 1) + (g >> 1) * L.rowb;
    const uint8_t* scales = st + L.scale_block(g & 1) + (g >> 1) * L.srow;
    auto step_loads = [&](int s) {
        MoeTcStep q;
#pragma unroll
        for (int ng = 0; ng < 2; ng++) {
            q.q[0][ng] = *(const uint4*)(rows + s * 128 + 32 * t + 16 * ng);
            q.q[1][ng] = *(const uint4*)(rows + 4 * L.rowb + s * 128 + 32 * t + 16 * ng);
        }
        const uint8_t* sc = scales + s * 8 + 4 * (t & 1);
        q.s[0] = *(const uint32_t*)sc;
        q.s[1] = *(const uint32_t*)(sc + 4 * L.srow);
        return q;
    };
#ifdef MB_NO_MATH  // measurement only (moe_ffn_bench, moe_bulk_bench): the stream's own rate
    constexpr bool math = false;
#else
    constexpr bool math = true;
#endif
    if (math && s1 - s0 <= MB_SPW) {
        if (fr.key != plane) fr.load(plane, gsc, s0, s1);
#pragma unroll
        for (int u = 0; u < MB_SPW; u++) {
            if (s0 + u >= s1) break;
            moe_tc_step_with<1>(
                step_loads(s0 + u), 1, acc, [&](int, int ng, int i) { return fr.b[u][ng][i]; },
                [&](int, int ng, int h) { return fr.x[u][ng][h]; });
        }
    } else if (math) {
        for (int s = s0; s < s1; s++) moe_tc_step<1>(step_loads(s), s, zero, plane, K / 4, gsc, K / 32, 1, acc);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty);
    float ya[1], yb[1];
    moe_tc_quad_sums<1>(acc, ya, yb);
    if (t == 0) {
        r[warp][g] = ya[0];
        r[warp][g + 8] = yb[0];
    }
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    if (warp == 0 && lane < (UP ? 8 : 16)) {
        // Output row o is row o % 8 of block o / 8: MMA row 2 (o % 8) + o / 8 (up: gate row
        // `lane` is MMA row 2·lane, its up row the next).
        const int m = UP ? 2 * lane : 2 * (lane & 7) + (lane >> 3);
        float u = 0.f, v = 0.f;
#pragma unroll
        for (int w = 0; w < W; w++) {
            u += r[w][m];
            if (UP) v += r[w][m + 1];
        }
        if (UP) {
            float y = swiglu_clamped(u, v, a.lim);
            if (a.rw_inside) y *= a.rw[p];
            a.h[(size_t)p * a.I + tile * 8 + lane] = y;
        } else {
            a.out[(size_t)p * a.D + tile * 16 + lane] = u;
        }
    }
}

// A pass over `pairs` (token, slot) pairs. `stages` whole-tile stages are in flight; `npl`
// activation planes (tokens for up, pairs for down) fit in shared memory after them — at least
// as many as the inputs a block's run of items spans (the host's count).
template <bool UP, int MB_WARPS>  // consumer warps
__device__ void moe_bulk_impl(const MoeArgs& a, int pairs, int stages, int npl) {
    extern __shared__ __align__(128) uint8_t mb_smem[];
    __shared__ __align__(8) uint64_t full[MB_MAX_STAGES], empty[MB_MAX_STAGES];
    __shared__ float red[2][MB_WARPS][16];  // warps' row sums, by item parity
    const int K = UP ? a.D : a.I;
    const int tpp = UP ? a.I / 8 : a.D / 16;  // tiles per pair
    const int items = pairs * tpp;
    const long long b = blockIdx.x, nb = gridDim.x;
    const int i0 = (int)(items * b / nb), i1 = (int)(items * (b + 1) / nb);
    const int tile_bytes = moe_bulk_tile_bytes(K);
    const int plane_u4 = K / 4;  // B-plane uint4s per input (moe_tc_prep)
    // Input index (token for up, pair for down) of item it.
    auto input_of = [&](int it) { return UP ? (it / tpp) / a.k : it / tpp; };
    const int first = i0 < i1 ? input_of(i0) : 0, last = i0 < i1 ? input_of(i1 - 1) : -1;
    uint4* zero = (uint4*)(mb_smem + (size_t)stages * tile_bytes);
    uint4* planes = zero + 4;
    float* gsc = (float*)(planes + (size_t)npl * plane_u4);
    unsigned dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    if (stages > MB_MAX_STAGES || last - first + 1 > npl ||
        dyn_smem < (size_t)stages * tile_bytes + 64 + (size_t)npl * (K * 4 + K / 8))
        __trap();  // the host's layout disagrees
    const int warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) MB_STAMP(mb_stamp_misc, 0);
    if (threadIdx.x == 0) MB_SPAN(a, 0);
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; i++) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], MB_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == MB_WARPS) {
        // Producer. The picks: up waited for them at entry (moe_route, two kernels back at
        // most); down's were final before up's wait returned (see above).
        const uint64_t policy = evict_first_policy();
        for (int it = i0, n = 0; it < i1; it++, n++) {
            const int slot = n % stages, p = it / tpp, tile = it % tpp;
            if (n >= stages) mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
            mb_issue_fp4<UP>(a, __ldcg(a.picks + p), tile, K, mb_smem + (size_t)slot * tile_bytes, &full[slot],
                             policy);
            MB_STAMP(mb_stamp_req, n);  // (lane 0: once its copy is issued)
        }
        return;
    }
    pdl_wait();  // the activations are the previous kernel's output
    if (UP) pdl_launch();  // down reads the picks before its wait: they are final now
    // The activation planes of the inputs this block's items read.
    if (threadIdx.x < 16) ((uint32_t*)zero)[threadIdx.x] = 0u;
    for (int in = first; in <= last; in++) {
        const float* x = UP ? a.x + (size_t)in * a.D : a.h + (size_t)in * a.I;
        moe_tc_prep(x, K, planes + (size_t)(in - first) * plane_u4, gsc + (size_t)(in - first) * (K / 32),
                    32 * MB_WARPS);
    }
    asm volatile("bar.sync 1, %0;" ::"r"(32 * MB_WARPS) : "memory");
    if (threadIdx.x == 0) MB_STAMP(mb_stamp_misc, 1);
    MbFrags fr;
    for (int it = i0, n = 0; it < i1; it++, n++) {
        const int slot = n % stages, p = it / tpp, tile = it % tpp;
        const uint8_t* st = mb_smem + (size_t)slot * tile_bytes;
        const int pl = input_of(it) - first;
        mbar_wait(&full[slot], (n / stages) & 1);
        if (warp == 0) MB_STAMP(mb_stamp_got, n);
        mb_consume_fp4<UP, MB_WARPS>(a, st, &empty[slot], K, zero, planes + (size_t)pl * plane_u4,
                                     gsc + (size_t)pl * (K / 32), red[n & 1], p, tile, fr);
    }
    if (threadIdx.x == 0) MB_STAMP(mb_stamp_misc, 2);
    if (threadIdx.x == 0) MB_SPAN(a, 1);
}

// Up waits before anything and lets its dependents launch only after that (inside): down reads
// the picks before its own wait. 8 consumer warps and the producer (16 consumer warps measured
// slower: 1.71–1.75 against 1.66 ms per 8-layer step, H200).
#define MOE_BULK(W, SFX)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * (W + 1), 1)                             \
        moe_up_bulk_fp4##SFX(MoeArgs a, int pairs, int stages, int npl) {                     \
        pdl_wait();                                                                           \
        moe_bulk_impl<true, W>(a, pairs, stages, npl);                                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * (W + 1), 1)                             \
        moe_down_bulk_fp4##SFX(MoeArgs a, int pairs, int stages, int npl) {                   \
        pdl_launch();                                                                         \
        moe_bulk_impl<false, W>(a, pairs, stages, npl);                                       \
    }
MOE_BULK(8, )
