// The FFN half of one decode token in two launches instead of five: `moe_ffn_up_bulk` finds the
// routing itself (the router's rows split over all blocks, each writing its experts' scores, a
// grid-wide barrier, then every block's producer warp routes the token from the scores on its
// own while the consumers work through the shared tiles), and streams the shared expert's gate
// and up rows (FP8, 128×128 block scales) first, then the routed experts' gate and up rows
// (FP4, moe_bulk.cu's tiles); `moe_ffn_down_bulk` streams the shared expert's down rows,
// then the routed ones. So the routing's latency overlaps weight bytes: as separate kernels the
// HBM idled through the router (~14 µs per layer on an H100), and the shared expert streamed
// beside it through SIMT kernels at ~1.3 TB/s.
//
// Up's grid barrier needs all its blocks resident at once: one block per SM (the host launches
// as many as the GPU has SMs, each with most of an SM's shared memory). Its dependents launch
// once every block has routed (they could not fit beside its blocks before that anyway). A
// barrier that never completes (another process's kernels holding SMs, under MPS) traps after
// seconds instead of hanging (`grid_wait`).
#define FFN_CH 2    // 16-input chunks per consumer thread of a shared-expert tile (K <= 8192)
#define FFN_RPRE 8  // router chunks per lane requested before the previous kernel is waited for
// Dynamic routed tiles: claims of FFN_CLAIM_TILES consecutive tiles, the next one in flight while
// the current one is issued (FFN_CLAIM_AHEAD 0: each claimed when its slot is free, stop 28).
#ifndef FFN_CLAIM_AHEAD
#define FFN_CLAIM_AHEAD 1
#endif
#ifndef FFN_CLAIM_TILES
#define FFN_CLAIM_TILES 1
#endif
static_assert(FFN_CLAIM_AHEAD || FFN_CLAIM_TILES == 1, "batched claims are claimed ahead");

// Stamps of every block of `moe_ffn_up_bulk` (tools/gpu/moe_ffn_bench.cu defines FFN_STAMPS):
// the global timer (ns) at entry, after the wait, at its arrival at the grid barrier, once its
// shared tiles are done, once the producer is past the barrier, once the consumers know the
// picks, when the first routed tile has arrived, at the end; then once its inputs are loaded
// (before the shared tiles) and once the producer has routed; in one launch, once the shared
// hidden row is in, once the routed ones are, at the end; last, the router's parts: warp 0's
// sum of its slice of row b, and the block's scores written (before its arrival).
#define FFN_NSTAMP 15
#ifdef FFN_STAMPS
__device__ unsigned long long ffn_stamp[FFN_NSTAMP][1024];
#define FFN_STAMP_AT(i, tid)                                                \
    if (threadIdx.x == (tid)) {                                             \
        unsigned long long t_;                                              \
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));              \
        ffn_stamp[i][blockIdx.x & 1023] = t_;                               \
    }
#else
#define FFN_STAMP_AT(i, tid)
#endif
#define FFN_STAMP(i) FFN_STAMP_AT(i, 0)

// The word of FfnArgs::sync that counts up's claimed routed tiles (FfnArgs::dyn_tiles; after the
// grid barrier's two, the shared row's and 32 pairs' counters of moe_ffn_bulk). The host's
// moe_ffn::FFN_TILE_COUNTER.
#define FFN_TILE_COUNTER 35

struct FfnArgs {
    LinearW gate;        // the router [E, D], BF16
    LinearW sg, su, sd;  // the shared expert, FP8: gate, up [Is, D]; down [D, Is]
    const float* hr;     // the router's input [D] (h; the experts read MoeArgs::x)
    float* scores;       // [E] the router's scores (route_score of its logits)
    unsigned* sync;      // [36]: the grid barrier's arrivals (zero between launches) and generation,
                         // then moe_ffn_bulk's counters and the claimed-tile count (below)
    const float* bias;   // top-k keys, or null: hash routing through tid2eid[ids[0]]
    const int* tid2eid;
    const int* ids;
    float route_scale;
    int shared_pre;      // shared stages requested before the router's arrival (below)
    int dyn_tiles;       // up's routed tiles claimed from a counter as ring slots free (two launches)
    int pad_;
    int* picks;          // [k] (MoeArgs::picks)
    float* rw;           // [k] (MoeArgs::rw)
    float* sh;           // the shared expert's hidden row [Is]
    float* sout;         // its output [D]
};

// A shared-expert stage: 8 FP8 rows (up: 4 gate rows then the same 4 up rows; down: 8 rows).
// Their f32 block scales are read from global memory (a few per thread, cached), before the
// stage is waited for: scale rows of any width, no bulk-copy alignment needed.
__host__ __device__ constexpr int ffn_fp8_tile_bytes(int K) { return 8 * K; }

// Producer warp: the copies of shared tile `tile` into stage st.
template <bool UP>
__device__ __forceinline__ void ffn_issue_fp8(const FfnArgs& f, int tile, uint8_t* st, uint64_t* full,
                                              uint64_t policy) {
    const int lane = threadIdx.x & 31;
    const LinearW& W = UP ? (lane == 0 || lane == 2 ? f.sg : f.su) : f.sd;
    const int K = W.in;
    if (lane == 0) mbar_arrive_expect(full, ffn_fp8_tile_bytes(K));
    __syncwarp();
    const size_t r0 = (size_t)tile * (UP ? 4 : 8);
    if (UP) {
        if (lane < 2) bulk_copy(st + lane * 4 * K, W.w + r0 * K, 4 * K, full, policy);
    } else {
        if (lane == 0) bulk_copy(st, W.w + r0 * K, 8 * K, full, policy);
    }
}

// This consumer thread's block scales of shared tile `tile` (see ffn_consume_fp8): of its
// chunks' columns, for the gate rows (s0) and the up rows (s1; down: the same rows).
template <bool UP>
__device__ __forceinline__ void ffn_scales(const FfnArgs& f, int tile, int W32, float (&s0)[FFN_CH],
                                           float (&s1)[FFN_CH]) {
    const LinearW& A = UP ? f.sg : f.sd;
    const LinearW& B = UP ? f.su : f.sd;
    const int r0 = tile * (UP ? 4 : 8);
#pragma unroll
    for (int m = 0; m < FFN_CH; m++) {
        const int c = threadIdx.x + W32 * m;
        const int col = c < A.in / 16 ? c * 16 / A.bi : 0;
        s0[m] = __ldg((const float*)A.scales + (size_t)(r0 / A.bo) * A.scale_cols + col);
        s1[m] = __ldg((const float*)B.scales + (size_t)(r0 / B.bo) * B.scale_cols + col);
    }
}

// Consumer warps: shared tile `tile` from its (arrived) stage st and the thread's scales (see
// ffn_scales), the input in xv (thread i's chunks i, i + 32W, ...; width K); the stage is
// released once read. Warp sums are added in warp order by warp 0, which writes the outputs (up: SwiGLU into
// f.sh; down: f.sout).
template <bool UP, int W>
__device__ __forceinline__ void ffn_consume_fp8(const FfnArgs& f, float lim, const uint8_t* st, uint64_t* empty,
                                                int K, const float (&sa)[FFN_CH], const float (&sb)[FFN_CH],
                                                const float (&xv)[FFN_CH][16], float (&r)[W][16], int tile) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float acc[8] = {};
#pragma unroll
    for (int m = 0; m < FFN_CH; m++) {
        const int c = threadIdx.x + 32 * W * m;
        if (c < K / 16) {
            const float s0 = sa[m], s1 = sb[m];
#pragma unroll
            for (int row = 0; row < 8; row++) {
                float v[16];
                decode_vals<FMT_FP8>(*(const uint4*)(st + (size_t)row * K + c * 16), v);
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < 16; j++) d = fmaf(v[j], xv[m][j], d);
                acc[row] = fmaf(d, row < 4 ? s0 : s1, acc[row]);
            }
        }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty);
    // Row j's warp sum lands in the lanes with lane % 8 == j: three transposed rounds, then
    // the two lane bits left.
    transposed_round<4>(acc, lane);
    transposed_round<2>(acc, lane);
    transposed_round<1>(acc, lane);
    float y = acc[0];
    y += __shfl_xor_sync(0xffffffffu, y, 8);
    y += __shfl_xor_sync(0xffffffffu, y, 16);
    if (lane < 8) r[warp][lane] = y;
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    if (warp == 0 && lane < (UP ? 4 : 8)) {
        float u = 0.f, v = 0.f;
#pragma unroll
        for (int w = 0; w < W; w++) {
            u += r[w][lane];
            if (UP) v += r[w][lane + 4];
        }
        if (UP)
            f.sh[(size_t)tile * 4 + lane] = swiglu_clamped(u, v, lim);
        else
            f.sout[(size_t)tile * 8 + lane] = u;
    }
}

// The shared expert's input chunks of this consumer thread (see ffn_consume_fp8).
template <int W>
__device__ __forceinline__ void ffn_load_x(const float* x, int K, float (&xv)[FFN_CH][16]) {
#pragma unroll
    for (int m = 0; m < FFN_CH; m++) {
        const int c = threadIdx.x + 32 * W * m;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float4 v = c < K / 16 ? __ldcg((const float4*)(x + c * 16) + j) : make_float4(0.f, 0.f, 0.f, 0.f);
            xv[m][4 * j] = v.x;
            xv[m][4 * j + 1] = v.y;
            xv[m][4 * j + 2] = v.z;
            xv[m][4 * j + 3] = v.w;
        }
    }
}


// This block's share [lo, hi) of n items over the grid.
__device__ __forceinline__ void ffn_range(int n, int& lo, int& hi) {
    const long long b = blockIdx.x, nb = gridDim.x;
    lo = (int)(n * b / nb);
    hi = (int)(n * (b + 1) / nb);
}

// The layout check every kernel here makes: the host's shared-memory layout must hold (after
// the stages, 64 bytes of zeros then `plane_bytes` of B planes and group factors).
__device__ __forceinline__ void ffn_check(int stages, int stage_bytes, int need_stage, int npl, int need_npl,
                                          size_t plane_bytes) {
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (stages > MB_MAX_STAGES || stage_bytes < need_stage || stage_bytes % 16 || need_npl > npl ||
        dyn < (size_t)stages * stage_bytes + 64 + plane_bytes)
        __trap();
}
__host__ __device__ constexpr int ffn_plane_bytes(int K) { return K * 4 + K / 8; }

// Producer warp, down's two runs into the ring (item count n on): the shared expert's rows
// [d0, d1), then routed items [j0, j1), pair p's expert being pick(p).
__device__ __forceinline__ void ffn_issue_down_shared(const FfnArgs& f, uint8_t* smem, int stage_bytes, int stages,
                                                      uint64_t* full, uint64_t* empty, uint64_t policy, int d0, int d1,
                                                      int& n) {
    for (int it = d0; it < d1; it++, n++) {
        const int slot = n % stages;
        if (n >= stages) mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
        ffn_issue_fp8<false>(f, it, smem + (size_t)slot * stage_bytes, &full[slot], policy);
    }
}
template <typename Pick>
__device__ __forceinline__ void ffn_issue_down_routed(const MoeArgs& a, uint8_t* smem, int stage_bytes, int stages,
                                                      uint64_t* full, uint64_t* empty, uint64_t policy, int j0, int j1,
                                                      int& n, Pick pick) {
    const int tpd = a.D / 16;
    for (int it = j0; it < j1; it++, n++) {
        const int slot = n % stages, p = it / tpd, tile = it % tpd;
        if (n >= stages) mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
        mb_issue_fp4<false>(a, pick(p), tile, a.I, smem + (size_t)slot * stage_bytes, &full[slot], policy);
    }
}

// Consumer warps, down's two runs from the ring (item count n on): the shared expert's rows
// [d0, d1) on its hidden row (in xv), then routed items [j0, j1) on the B planes and group
// factors of pairs first, first + 1, ...
template <int W>
__device__ __forceinline__ void ffn_down_shared(const MoeArgs& a, const FfnArgs& f, uint8_t* smem, int stage_bytes,
                                                int stages, uint64_t* full, uint64_t* empty, float (&red)[2][W][16],
                                                const float (&xv)[FFN_CH][16], int d0, int d1, int& n) {
    for (int it = d0; it < d1; it++, n++) {
        const int slot = n % stages;
        float sa[FFN_CH], sb[FFN_CH];
        ffn_scales<false>(f, it, 32 * W, sa, sb);
        mbar_wait(&full[slot], (n / stages) & 1);
        ffn_consume_fp8<false, W>(f, a.lim, smem + (size_t)slot * stage_bytes, &empty[slot], f.sd.in, sa, sb, xv,
                                  red[n & 1], it);
    }
}
template <int W>
__device__ __forceinline__ void ffn_down_routed(const MoeArgs& a, uint8_t* smem, int stage_bytes, int stages,
                                                uint64_t* full, uint64_t* empty, float (&red)[2][W][16],
                                                const uint4* zero, const uint4* planes, const float* gsc, int j0,
                                                int j1, int first, int& n) {
    const int K = a.I, tpd = a.D / 16;
    MbFrags fr;
    for (int it = j0; it < j1; it++, n++) {
        const int slot = n % stages, p = it / tpd, tile = it % tpd;
        mbar_wait(&full[slot], (n / stages) & 1);
        mb_consume_fp4<false, W>(a, smem + (size_t)slot * stage_bytes, &empty[slot], K, zero,
                                 planes + (size_t)(p - first) * (K / 4), gsc + (size_t)(p - first) * (K / 32),
                                 red[n & 1], p, tile, fr);
    }
}

// Warp 0 wrote outputs other blocks read (its lanes write a tile's rows): count `n` of them
// done on counter c. Called by every consumer thread.
__device__ __forceinline__ void ffn_publish(unsigned* c, unsigned n) {
    if (threadIdx.x < 32) {
        __syncwarp();
        if (threadIdx.x == 0) {
            gpu_fence();
            atomicAdd(c, n);
        }
    }
}

// Every consumer thread past this once counter c has reached `n` (see ffn_publish); traps
// after seconds, as grid_wait does.
template <int W>
__device__ __forceinline__ void ffn_await(const unsigned* c, unsigned n) {
    if (threadIdx.x == 0) {
        for (unsigned spins = 0; *(const volatile unsigned*)c < n; spins++) {
            if (spins > (1u << 26)) __trap();
            __nanosleep(32);
        }
        gpu_fence();
    }
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
}

// Up, or with ALL the whole FFN half in one launch (`moe_ffn_bulk`): after its routed gate/up
// tiles a block goes on to shared then routed down tiles, whose weights its producer streams
// while the last gate/up tiles are consumed; each down tile waits for the hidden rows it reads,
// counted in f.sync[2] (the shared expert's) and f.sync[3 + p] (pair p's) as blocks write them.
template <int W, bool ALL>
__device__ void moe_ffn_up_impl(const MoeArgs& a, const FfnArgs& f, int stages, int stage_bytes, int npl) {
    extern __shared__ __align__(128) uint8_t mb_smem[];
    __shared__ __align__(8) uint64_t full[MB_MAX_STAGES], empty[MB_MAX_STAGES], picked, rdone;
    __shared__ float red[2][W][16];
    __shared__ float rpart[W];
    __shared__ int picks_s[32];
    __shared__ float rw_s[32];
    __shared__ unsigned gen0;
    __shared__ int item_s[ALL ? 1 : MB_MAX_STAGES];  // with dyn_tiles: each slot's routed tile, -1: none left
    const int K = a.D, tpp = a.I / 8, Is = f.sg.out;
    const bool dyn = !ALL && f.dyn_tiles;
    const int nb = gridDim.x, b = blockIdx.x;
    int s0, s1, i0, i1;
    ffn_range(Is / 4, s0, s1);
    ffn_range(a.k * tpp, i0, i1);  // one token: pairs = k
    // With ALL: down's shared rows [d0, d1) and routed items [j0, j1), on pairs first..last.
    const int I = a.I, tpd = a.D / 16;
    int d0 = 0, d1 = 0, j0 = 0, j1 = 0;
    if (ALL) {
        ffn_range(a.D / 8, d0, d1);
        ffn_range(a.k * tpd, j0, j1);
    }
    const int first = j0 < j1 ? j0 / tpd : 0, last = j0 < j1 ? (j1 - 1) / tpd : -1;
    unsigned* cnt = f.sync + 2;
    {
        const int up_stage = max(moe_bulk_tile_bytes(K), ffn_fp8_tile_bytes(K));
        const int dn_stage = max(moe_bulk_tile_bytes(I), ffn_fp8_tile_bytes(f.sd.in));
        ffn_check(stages, stage_bytes, ALL ? max(up_stage, dn_stage) : up_stage, ALL ? npl : 1,
                  ALL ? last - first + 1 : 1,
                  ALL ? max(ffn_plane_bytes(K), npl * ffn_plane_bytes(I)) : ffn_plane_bytes(K));
    }
    uint4* zero = (uint4*)(mb_smem + (size_t)stages * stage_bytes);
    uint4* plane = zero + 4;
    float* gsc = (float*)(plane + K / 4);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; i++) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], W);
        }
        mbar_init(&picked, 1);
        mbar_init(&rdone, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    FFN_STAMP(0);
    const int E = f.gate.out;
    if (warp == W) {
        // Producer: the shared expert's tiles need nothing from the previous kernel. Then this
        // warp routes the token (while the consumers work through the shared tiles) and
        // streams the routed tiles it picked.
        float key[ROUTE_PL];
        route_keys(f.bias, E, lane, key);
        const uint64_t policy = evict_first_policy();
        int n = 0, it = s0;
        // The shared tiles, as many as the ring holds before the routing (the rest after it,
        // as slots free). FfnArgs::shared_pre stages go out at once, the rest after the
        // block's router rows are in and it has arrived at the grid barrier: requested
        // together, those loads and the arrival queue behind the copies (moe_ffn_bench, stop
        // 27: 2 beat 0, 1 and 4 by ~1 µs per token; in a decode step the kernel may start beside
        // the boundary before it, where more can go out early: DSV4_CUDA_FFN_SHARED_PRE).
        for (; it < s1 && n < stages; it++, n++) {
            if (n == f.shared_pre) mbar_wait(&rdone, 0);
            ffn_issue_fp8<true>(f, it, mb_smem + (size_t)n * stage_bytes, &full[n], policy);
        }
        mbar_wait(&rdone, 0);  // gen0 is set
        if (lane == 0) grid_wait(f.sync, gen0);
        __syncwarp();
        FFN_STAMP_AT(4, 32 * W);
        route_token<true>(f.scores, E, a.k, f.bias, f.tid2eid, f.bias ? 0 : f.ids[0], f.route_scale, picks_s, rw_s,
                          key);
        __syncwarp();
        // Block 0 publishes the routing (down and the combine read it after their waits).
        if (b == 0 && lane < a.k) {
            f.picks[lane] = picks_s[lane];
            f.rw[lane] = rw_s[lane];
        }
        if (lane == 0) mbar_arrive(&picked);
        FFN_STAMP_AT(9, 32 * W);
        for (; it < s1; it++, n++) {
            const int slot = n % stages;
            mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
            ffn_issue_fp8<true>(f, it, mb_smem + (size_t)slot * stage_bytes, &full[slot], policy);
        }
        if (dyn) {
            // Each tile goes to the first block with a free slot (the counter was cleared before
            // the grid barrier), so blocks whose copies come slower take fewer; a slot holding
            // -1 (arrived on without bytes) tells the consumers that none are left.
            // FFN_CLAIM_AHEAD: the next claim is requested as soon as the current one is known,
            // so its round trip to L2 (long behind the weight stream) overlaps the current
            // claim's waits and copies instead of following them. No claim follows one that
            // starts past the end (with batches, one past a batch that straddles it is dropped).
            unsigned* const counter = &f.sync[FFN_TILE_COUNTER];
            const int total = a.k * tpp;
            unsigned ahead = 0;
            if (FFN_CLAIM_AHEAD && lane == 0) ahead = atomicAdd(counter, (unsigned)FFN_CLAIM_TILES);
            int next = 0, left = 0;  // the current claim's next tile and its tiles left
            for (;; n++) {
                const int slot = n % stages;
                if (n >= stages) mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
                if (left == 0) {
                    int c = 0;
                    if (lane == 0) c = (int)(FFN_CLAIM_AHEAD ? ahead : atomicAdd(counter, 1u));
                    next = __shfl_sync(0xffffffffu, c, 0);
                    left = FFN_CLAIM_TILES;
                    if (FFN_CLAIM_AHEAD && lane == 0 && next < total)
                        ahead = atomicAdd(counter, (unsigned)FFN_CLAIM_TILES);
                }
                const int claim = next++;
                left--;
                if (claim >= total) {
                    if (lane == 0) {
                        item_s[slot] = -1;
                        mbar_arrive(&full[slot]);
                    }
                    break;
                }
                if (lane == 0) item_s[slot] = claim;  // before lane 0's arrival in mb_issue_fp4
                mb_issue_fp4<true>(a, picks_s[claim / tpp], claim % tpp, K, mb_smem + (size_t)slot * stage_bytes,
                                   &full[slot], policy);
            }
            return;
        }
        for (int it = i0; it < i1; it++, n++) {
            const int slot = n % stages, p = it / tpp, tile = it % tpp;
            if (n >= stages) mbar_wait(&empty[slot], ((n / stages) - 1) & 1);
            mb_issue_fp4<true>(a, picks_s[p], tile, K, mb_smem + (size_t)slot * stage_bytes, &full[slot], policy);
        }
        if (ALL) {
            ffn_issue_down_shared(f, mb_smem, stage_bytes, stages, full, empty, policy, d0, d1, n);
            ffn_issue_down_routed(a, mb_smem, stage_bytes, stages, full, empty, policy, j0, j1, n,
                                  [&](int p) { return picks_s[p]; });
        }
        return;
    }
    // The router: this block's rows b, b + nb, ... (R of them), each split over S warps.
    const LinearW& G = f.gate;
    const int nchr = G.in / 8;
    const int R = (E + nb - 1) / nb, S = W / R;
    const int j = warp / S, sl = warp % S, row = b + nb * j;
    const bool mine = j < R && row < E;
    const int c0 = sl * nchr / S, c1 = (sl + 1) * nchr / S;
    const uint4* grow = (const uint4*)(G.w + (size_t)(mine ? row : 0) * G.in * 2);
    uint4 q[FFN_RPRE];
#pragma unroll
    for (int i = 0; i < FFN_RPRE; i++) {
        const int c = c0 + lane + 32 * i;
        if (mine && c < c1) q[i] = __ldg(grow + c);
    }
    // The first shared tile's scales too (weights; each tile loads the next one's).
    float sa[FFN_CH], sb[FFN_CH];
    if (s0 < s1) ffn_scales<true>(f, s0, 32 * W, sa, sb);
    pdl_wait();
    FFN_STAMP(1);
    {
        float acc = 0.f;
        auto chunk = [&](uint4 w, int c) {
            float v[8];
            decode_vals<FMT_BF16>(w, v);
            const float4 xa = __ldcg((const float4*)(f.hr + c * 8)), xb = __ldcg((const float4*)(f.hr + c * 8) + 1);
            const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
            for (int e = 0; e < 8; e++) acc = fmaf(v[e], xv[e], acc);
        };
        if (mine) {
#pragma unroll
            for (int i = 0; i < FFN_RPRE; i++) {
                const int c = c0 + lane + 32 * i;
                if (c < c1) chunk(q[i], c);
            }
            for (int c = c0 + lane + 32 * FFN_RPRE; c < c1; c += 32) chunk(__ldg(grow + c), c);
        }
        acc = warp_sum(acc);
        if (lane == 0) rpart[warp] = acc;
    }
    FFN_STAMP(13);
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    if (threadIdx.x < R && b + nb * (int)threadIdx.x < E) {
        float v = 0.f;
        for (int s = 0; s < S; s++) v += rpart[threadIdx.x * S + s];
        f.scores[b + nb * threadIdx.x] = route_score(v);
    }
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    FFN_STAMP(14);
    if (threadIdx.x == 0) {
        // (Block 0 clears the hidden rows' counters: every count comes after the barrier, and
        // every reader of the last launch's counts has finished before this kernel's wait.)
        if (ALL && b == 0)
            for (int i = 0; i < a.k + 1; i++) cnt[i] = 0u;
        if (dyn && b == 0) f.sync[FFN_TILE_COUNTER] = 0u;
        gen0 = grid_arrive(f.sync);  // the producer waits past it (gemv_bulk.cu)
        // Only now the rest of the shared stream: the arrival's generation read and fence wait
        // behind every request ahead of them, and with all stages requested at once they took
        // ~4 µs (moe_ffn_bench's "scores out" to "arrived", stop 27).
        mbar_arrive(&rdone);
    }
    FFN_STAMP(2);
    // Meanwhile: the shared expert's tiles, and the routed experts' B plane.
    float xv[FFN_CH][16];
    ffn_load_x<W>(a.x, K, xv);
    if (threadIdx.x < 16) ((uint32_t*)zero)[threadIdx.x] = 0u;
    moe_tc_prep(a.x, K, plane, gsc, 32 * W);
    // Every warp reads the whole plane: the shared tiles' barriers order its writes before the
    // routed tiles' reads, and a block without shared tiles (more blocks than they have) meets
    // here instead.
    if (s0 >= s1) asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    FFN_STAMP(8);
    int n = 0;
    for (int it = s0; it < s1; it++, n++) {
        const int slot = n % stages;
        float na[FFN_CH], nb[FFN_CH];
        if (it + 1 < s1) ffn_scales<true>(f, it + 1, 32 * W, na, nb);
        mbar_wait(&full[slot], (n / stages) & 1);
        ffn_consume_fp8<true, W>(f, a.lim, mb_smem + (size_t)slot * stage_bytes, &empty[slot], K, sa, sb, xv,
                                 red[n & 1], it);
#pragma unroll
        for (int m = 0; m < FFN_CH; m++) {
            sa[m] = na[m];
            sb[m] = nb[m];
        }
    }
    FFN_STAMP(3);
    // The producer routed past the grid barrier: the counters' reset is before every count.
    mbar_wait(&picked, 0);
    if (ALL && warp == 0 && s0 < s1) ffn_publish(&cnt[0], s1 - s0);
    pdl_launch();
    FFN_STAMP(5);
    MbFrags fr;  // up's plane: read once into every consumer warp's registers
    if (dyn) {
        for (bool first_tile = true;; n++, first_tile = false) {
            const int slot = n % stages;
            mbar_wait(&full[slot], (n / stages) & 1);
            const int it = item_s[slot];
            if (it < 0) break;
            if (first_tile) FFN_STAMP(6);
            mb_consume_fp4<true, W>(a, mb_smem + (size_t)slot * stage_bytes, &empty[slot], K, zero, plane, gsc,
                                    red[n & 1], it / tpp, it % tpp, fr);
        }
        FFN_STAMP(7);
        return;
    }
    for (int it = i0; it < i1; it++, n++) {
        const int slot = n % stages, p = it / tpp, tile = it % tpp;
        mbar_wait(&full[slot], (n / stages) & 1);
        if (it == i0) FFN_STAMP(6);
        mb_consume_fp4<true, W>(a, mb_smem + (size_t)slot * stage_bytes, &empty[slot], K, zero, plane, gsc,
                                red[n & 1], p, tile, fr);
        if (ALL && (it + 1 == i1 || (it + 1) / tpp != p)) ffn_publish(&cnt[1 + p], it + 1 - max(i0, p * tpp));
    }
    FFN_STAMP(7);
    if (!ALL) return;
    // Down: the shared expert's rows, then the routed ones (the B planes replace up's).
    if (d0 < d1) {
        ffn_await<W>(&cnt[0], Is / 4);
        ffn_load_x<W>(f.sh, f.sd.in, xv);
    }
    FFN_STAMP(10);
    ffn_down_shared<W>(a, f, mb_smem, stage_bytes, stages, full, empty, red, xv, d0, d1, n);
    float* gsd = (float*)(plane + (size_t)npl * (I / 4));
    for (int in = first; in <= last; in++) {
        ffn_await<W>(&cnt[1 + in], tpp);
        moe_tc_prep(a.h + (size_t)in * I, I, plane + (size_t)(in - first) * (I / 4), gsd + (size_t)(in - first) * (I / 32),
                    32 * W);
    }
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    FFN_STAMP(11);
    ffn_down_routed<W>(a, mb_smem, stage_bytes, stages, full, empty, red, zero, plane, gsd, j0, j1, first, n);
    FFN_STAMP(12);
}

template <int W>
__device__ void moe_ffn_down_impl(const MoeArgs& a, const FfnArgs& f, int stages, int stage_bytes, int npl) {
    extern __shared__ __align__(128) uint8_t mb_smem[];
    __shared__ __align__(8) uint64_t full[MB_MAX_STAGES], empty[MB_MAX_STAGES];
    __shared__ float red[2][W][16];
    const int K = a.I, tpp = a.D / 16, Ks = f.sd.in;
    int s0, s1, i0, i1;
    ffn_range(a.D / 8, s0, s1);
    ffn_range(a.k * tpp, i0, i1);
    const int first = i0 < i1 ? i0 / tpp : 0, last = i0 < i1 ? (i1 - 1) / tpp : -1;
    ffn_check(stages, stage_bytes, max(moe_bulk_tile_bytes(K), ffn_fp8_tile_bytes(Ks)), npl, last - first + 1,
              (size_t)npl * ffn_plane_bytes(K));
    uint4* zero = (uint4*)(mb_smem + (size_t)stages * stage_bytes);
    uint4* planes = zero + 4;
    float* gsc = (float*)(planes + (size_t)npl * (K / 4));
    const int warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; i++) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], W);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == W) {
        // Producer: the shared expert's rows depend on nothing; the routed ones wait for up to
        // finish (the picks are up's output).
        const uint64_t policy = evict_first_policy();
        int n = 0;
        ffn_issue_down_shared(f, mb_smem, stage_bytes, stages, full, empty, policy, s0, s1, n);
        pdl_wait();
        ffn_issue_down_routed(a, mb_smem, stage_bytes, stages, full, empty, policy, i0, i1, n,
                              [&](int p) { return __ldcg(a.picks + p); });
        return;
    }
    pdl_wait();  // the hidden rows are up's output
    float xv[FFN_CH][16];
    ffn_load_x<W>(f.sh, Ks, xv);
    if (threadIdx.x < 16) ((uint32_t*)zero)[threadIdx.x] = 0u;
    for (int in = first; in <= last; in++)
        moe_tc_prep(a.h + (size_t)in * a.I, K, planes + (size_t)(in - first) * (K / 4),
                    gsc + (size_t)(in - first) * (K / 32), 32 * W);
    asm volatile("bar.sync 1, %0;" ::"r"(32 * W) : "memory");
    int n = 0;
    ffn_down_shared<W>(a, f, mb_smem, stage_bytes, stages, full, empty, red, xv, s0, s1, n);
    ffn_down_routed<W>(a, mb_smem, stage_bytes, stages, full, empty, red, zero, planes, gsc, i0, i1, first, n);
}

// Up waits and lets its dependents launch inside (see the top); down lets them launch at once,
// as moe_down_bulk_fp4 does.
extern "C" __global__ void __launch_bounds__(32 * (8 + 1), 1)
    moe_ffn_up_bulk(MoeArgs a, FfnArgs f, int stages, int stage_bytes) {
    pdl_inside();
    moe_ffn_up_impl<8, false>(a, f, stages, stage_bytes, 1);
}
// The whole FFN half (see moe_ffn_up_impl): f.sync holds 3 + k counters.
extern "C" __global__ void __launch_bounds__(32 * (8 + 1), 1)
    moe_ffn_bulk(MoeArgs a, FfnArgs f, int stages, int stage_bytes, int npl) {
    pdl_inside();
    moe_ffn_up_impl<8, true>(a, f, stages, stage_bytes, npl);
}
extern "C" __global__ void __launch_bounds__(32 * (8 + 1), 1)
    moe_ffn_down_bulk(MoeArgs a, FfnArgs f, int stages, int stage_bytes, int npl) {
    pdl_launch();
    moe_ffn_down_impl<8>(a, f, stages, stage_bytes, npl);
}
