// y[m, r] = W[r, :] · x[m, :] for a range of rows, M tokens, optional split over K (partials
// summed by the last block to finish, in split order, so results never depend on scheduling).
#include "linear.cuh"

#define GEMV_ROWS_PER_BLOCK 32  // 8 warps x 4 rows

struct GemvArgs {
    const float* x;
    float* y;
    float* partial;    // [S, M, nrows] when S > 1
    unsigned int* counters;  // per (row block, token chunk), zero between launches
    int32_t row0, nrows;
    int32_t ldx, ldy, M, S;
    int32_t xg_rows;   // rows per input group (0: one input for all rows)
    int32_t xg_stride; // input offset between groups
    int32_t vec;       // 16-byte path allowed (alignment checked by the host)
    int32_t pad_;
    // One token's RMS norm, fused into the product's activation loads (`gemv_bulk_norm_*` only;
    // null elsewhere): x is read as x / rms(x) * xnorm, with rms over the row's `in` values.
    const float* xnorm;
    float xnorm_eps;
    int32_t pad2_;
};
static_assert(sizeof(GemvArgs) == 88, "GemvArgs: the layout of ops::GemvArgs");

// Split K, one warp per group g of four rows (r0.., nr of them) for M tokens, once its
// partials are written and fenced: the warp whose split arrives last sums the S partials, in
// split order, into y and resets the group's counter for the next launch.
__device__ __forceinline__ void warp_split_k_last(const GemvArgs& a, int g, int r0, int nr, int M) {
    const int lane = threadIdx.x & 31;
    int last = 0;
    if (lane == 0) {
        __threadfence();
        last = atomicAdd(a.counters + g, 1u) == (unsigned)(a.S - 1);
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    if (lane < 4 * M) {
        const int k = lane & 3, m = lane >> 2;
        if (k < nr) {
            float v = 0.f;
            for (int i = 0; i < a.S; i++) v += __ldcg(a.partial + ((size_t)i * a.M + m) * a.nrows + r0 + k);
            a.y[(size_t)m * a.ldy + r0 + k] = v;
        }
    }
    if (lane == 0) a.counters[g] = 0;
}

// Block (bx, s, bz) of a grid with gx row blocks: rows bx·32.., K split s, token chunk bz.
template <int FMT, int MT>
__device__ void gemv_impl(const LinearW& W, const GemvArgs& a, int bx, int s, int bz, int gx) {
    constexpr int N = Chunk<FMT>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ri = bx * GEMV_ROWS_PER_BLOCK + warp * 4;
    const bool active = ri < a.nrows;
    const int nr = min(4, a.nrows - ri);
    const int m0 = bz * MT;
    const int M = min(MT, a.M - m0);
    if (active) {
        const int r0 = a.row0 + ri;
        const float* xm[MT];
#pragma unroll
        for (int m = 0; m < MT; m++) xm[m] = a.x + (size_t)(m0 + (m < M ? m : 0)) * a.ldx;
        const int xoff = a.xg_rows ? (r0 / a.xg_rows) * a.xg_stride : 0;
        const int nch = a.vec ? W.in / N : 0;
        const int c0 = (int)((long long)nch * s / a.S), c1 = (int)((long long)nch * (s + 1) / a.S);
        float acc[4][MT];
#pragma unroll
        for (int m = 0; m < MT; m++) acc[0][m] = acc[1][m] = acc[2][m] = acc[3][m] = 0.f;
        // Rows past the end repeat the last valid row (computed, not written).
        const LinearW* ws[4] = {&W, &W, &W, &W};
        const int rows[4] = {r0, r0 + min(1, nr - 1), r0 + min(2, nr - 1), r0 + min(3, nr - 1)};
        warp_dot_rows<FMT, MT, 4>(ws, rows, xm, M, xoff, c0, c1, s == a.S - 1, nch * N, acc);
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        if (i >= nr) break;
                        float v = acc[i][m];
                        if (a.S == 1) a.y[(size_t)(m0 + m) * a.ldy + ri + i] = v;
                        else a.partial[((size_t)s * a.M + m0 + m) * a.nrows + ri + i] = v;
                    }
                }
            }
            // Partials visible device-wide before this block is counted (by each writer).
            if (a.S > 1) __threadfence();
        }
    }
    pdl_wait();  // warps without rows (and tiny matrices) still order after the previous kernel
    if (a.S == 1) return;
    // Split K: the last block of this (row block, token chunk) to finish sums the partials in
    // split order (deterministic) and resets the counter for the next launch.
    __shared__ int last;
    __syncthreads();
    unsigned int* ctr = a.counters + bz * gx + bx;
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(ctr, 1u) == (unsigned)(a.S - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < GEMV_ROWS_PER_BLOCK * M; idx += blockDim.x) {
        const int i = idx % GEMV_ROWS_PER_BLOCK, m = idx / GEMV_ROWS_PER_BLOCK;
        const int r = bx * GEMV_ROWS_PER_BLOCK + i;
        if (r >= a.nrows) continue;
        float v = 0.f;
        for (int k = 0; k < a.S; k++) v += __ldcg(a.partial + ((size_t)k * a.M + m0 + m) * a.nrows + r);
        a.y[(size_t)(m0 + m) * a.ldy + r] = v;
    }
    if (threadIdx.x == 0) *ctr = 0;
}

// One token: three blocks per SM (≤ 85 registers) keep more weight loads in flight (H200,
// 8-layer decode step 2.33 → 2.29 ms); with more tokens the accumulators spill, so two.
#define GEMV(FMT, NAME, MT)                                                                  \
    extern "C" __global__ void __launch_bounds__(256, MT == 1 ? 3 : 1)                       \
        gemv_##NAME##_##MT(LinearW W, GemvArgs a) {                                          \
        pdl_launch(); /* waits inside, once its first weights are requested */               \
        gemv_impl<FMT, MT>(W, a, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x);             \
    }
#define GEMV_ALL(FMT, NAME) GEMV(FMT, NAME, 1) GEMV(FMT, NAME, 2) GEMV(FMT, NAME, 4) GEMV(FMT, NAME, 8)
GEMV_ALL(FMT_F32, f32)
GEMV_ALL(FMT_BF16, bf16)
GEMV_ALL(FMT_F16, f16)
GEMV_ALL(FMT_FP8, fp8)
GEMV_ALL(FMT_FP4, fp4)

// Several GEMVs of the same token count in one launch (matrices that read the same activations
// in a decode step: one launch instead of several short ones, whose ramp-up and drain dominate
// at a few MB each). Job j owns the grid's blocks [end[j-1], end[j]), laid out as its own
// (row block, K split, token chunk) grid; each job has its own split-K workspace and counters.
#define GEMV_MULTI_MAX 8
struct GemvJob {
    LinearW W;
    GemvArgs a;
    int32_t end;  // one past this job's last block of the launch grid
    int32_t gx;   // its row blocks
};
struct GemvMulti {
    int32_t n, pad_;
    GemvJob j[GEMV_MULTI_MAX];
};

template <int MT>
__device__ void gemv_multi_impl(const GemvMulti& g) {
    int j = 0;
    while (j + 1 < g.n && (int)blockIdx.x >= g.j[j].end) j++;
    const GemvJob& job = g.j[j];
    const int local = blockIdx.x - (j ? g.j[j - 1].end : 0);
    const int bx = local % job.gx, rest = local / job.gx;
    const int s = rest % job.a.S, bz = rest / job.a.S;
    switch (job.W.fmt) {
        case FMT_F32: gemv_impl<FMT_F32, MT>(job.W, job.a, bx, s, bz, job.gx); break;
        case FMT_BF16: gemv_impl<FMT_BF16, MT>(job.W, job.a, bx, s, bz, job.gx); break;
        case FMT_F16: gemv_impl<FMT_F16, MT>(job.W, job.a, bx, s, bz, job.gx); break;
        case FMT_FP8: gemv_impl<FMT_FP8, MT>(job.W, job.a, bx, s, bz, job.gx); break;
        default: gemv_impl<FMT_FP4, MT>(job.W, job.a, bx, s, bz, job.gx); break;
    }
}

#define GEMV_MULTI(MT)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) gemv_multi_##MT(GemvMulti g) {        \
        pdl_launch(); /* waits inside, once its first weights are requested */              \
        gemv_multi_impl<MT>(g);                                                             \
    }
GEMV_MULTI(1)
GEMV_MULTI(2)
GEMV_MULTI(4)
GEMV_MULTI(8)

// One token, long-lived warps: the grid is sized to the GPU, and warp w takes a contiguous run
// of tasks (row group g of 4 rows, K split s), so consecutive tasks are consecutive rows. The
// next chunk's loads are issued before the current one is used, across task boundaries too,
// so a warp's load stream does not drain between row groups (short-lived blocks spent much of
// each launch ramping up and draining). Split-K partials are summed, in split order, by the
// warp that finishes a row group's last split.
template <int FMT>
__device__ void gemv_stream_impl(const LinearW& W, const GemvArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int lane = threadIdx.x & 31;
    const int nw = gridDim.x * (blockDim.x >> 5);
    const int w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int G = (a.nrows + 3) / 4, S = a.S, nch = W.in / N;
    const long long T = (long long)G * S;
    const int t0 = (int)(T * w / nw), t1 = (int)(T * (w + 1) / nw);
    const size_t row_bytes = (FMT == FMT_FP4) ? (size_t)W.in / 2
                           : (size_t)W.in * (FMT == FMT_F32 ? 4 : (FMT == FMT_FP8 ? 1 : 2));
    const float* x = a.x;
    // Task state: rows of group g (clamped to the last row), chunk range [c0, c1), lane's chunk c.
    auto setup = [&](int tau, int& g, int& c0, int& c1, const uint4* (&p)[4], RowScale<FMT> (&rs)[4]) {
        g = tau / S;
        const int s = tau % S;
        c0 = (int)((long long)nch * s / S);
        c1 = (int)((long long)nch * (s + 1) / S);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = a.row0 + min(4 * g + i, a.nrows - 1);
            p[i] = (const uint4*)(W.w + (size_t)r * row_bytes);
            rs[i] = RowScale<FMT>(W, r);
        }
    };
    if (t0 >= t1) {
        pdl_wait();
        return;
    }
    int tau = t0, g, c0, c1;
    const uint4* p[4];
    RowScale<FMT> rs[4];
    setup(tau, g, c0, c1, p, rs);
    int cb = c0;  // this iteration's first chunk (lane 0's)
    uint4 q[4];
#pragma unroll
    for (int i = 0; i < 4; i++) q[i] = cb + lane < c1 ? __ldg(p[i] + cb + lane) : make_uint4(0, 0, 0, 0);
    pdl_wait();  // x is the previous kernel's output; the first weights are already requested
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    while (true) {
        // Where the next iteration reads: further along this task, or the start of the next.
        int ntau = tau, ng = g, nc0 = c0, nc1 = c1, ncb = cb + 32;
        const uint4* np[4] = {p[0], p[1], p[2], p[3]};
        RowScale<FMT> nrs[4] = {rs[0], rs[1], rs[2], rs[3]};
        if (ncb >= c1) {
            ntau = tau + 1;
            if (ntau < t1) {
                setup(ntau, ng, nc0, nc1, np, nrs);
                ncb = nc0;
            }
        }
        const bool more = ntau < t1;
        uint4 nq[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            nq[i] = more && ncb + lane < nc1 ? __ldg(np[i] + ncb + lane) : make_uint4(0, 0, 0, 0);
        const int c = cb + lane;
        if (c < c1) {
            const int xoff = a.xg_rows ? ((a.row0 + 4 * g) / a.xg_rows) * a.xg_stride : 0;
            float xv[N];
            load_x<N>(x + xoff + c * N, xv);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float f[N];
                decode_vals<FMT>(q[i], f);
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) d = fmaf(f[j], xv[j], d);
                acc[i] = fmaf(d, rs[i].at(c), acc[i]);
            }
        }
        if (ntau != tau) {
            // Task done: its 4 row sums, written or kept as a partial.
            const int s = tau % S;
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] = warp_sum(acc[i]);
            const int nr = min(4, a.nrows - 4 * g);
            if (lane == 0) {
                for (int i = 0; i < nr; i++) {
                    if (S == 1) a.y[4 * g + i] = acc[i];
                    else a.partial[(size_t)s * a.nrows + 4 * g + i] = acc[i];
                }
            }
            if (S > 1) warp_split_k_last(a, g, 4 * g, nr, 1);  // one token: a.M == 1, ldy unused
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] = 0.f;
        }
        if (!more) break;
        tau = ntau;
        g = ng;
        c0 = nc0;
        c1 = nc1;
        cb = ncb;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            p[i] = np[i];
            rs[i] = nrs[i];
            q[i] = nq[i];
        }
    }
}

#define GEMV_STREAM(FMT, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) gemv_stream_##NAME(LinearW W, GemvArgs a) { \
        pdl_launch(); /* waits inside, once its first weights are requested */                  \
        gemv_stream_impl<FMT>(W, a);                                                            \
    }
GEMV_STREAM(FMT_F32, f32)
GEMV_STREAM(FMT_BF16, bf16)
GEMV_STREAM(FMT_F16, f16)
GEMV_STREAM(FMT_FP8, fp8)
GEMV_STREAM(FMT_FP4, fp4)
