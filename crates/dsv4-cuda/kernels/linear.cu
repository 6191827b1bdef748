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
};

template <int FMT, int MT>
__device__ void gemv_impl(const LinearW& W, const GemvArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ri = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp * 4;
    const bool active = ri < a.nrows;
    const int nr = min(4, a.nrows - ri);
    const int m0 = blockIdx.z * MT;
    const int M = min(MT, a.M - m0);
    const int s = blockIdx.y;
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
    unsigned int* ctr = a.counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(ctr, 1u) == (unsigned)(a.S - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < GEMV_ROWS_PER_BLOCK * M; idx += blockDim.x) {
        const int i = idx % GEMV_ROWS_PER_BLOCK, m = idx / GEMV_ROWS_PER_BLOCK;
        const int r = blockIdx.x * GEMV_ROWS_PER_BLOCK + i;
        if (r >= a.nrows) continue;
        float v = 0.f;
        for (int k = 0; k < a.S; k++) v += __ldcg(a.partial + ((size_t)k * a.M + m0 + m) * a.nrows + r);
        a.y[(size_t)(m0 + m) * a.ldy + r] = v;
    }
    if (threadIdx.x == 0) *ctr = 0;
}

#define GEMV(FMT, NAME, MT)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) gemv_##NAME##_##MT(LinearW W, GemvArgs a) { \
        pdl_launch(); /* waits inside, once its first weights are requested */               \
        gemv_impl<FMT, MT>(W, a);                                                            \
    }
#define GEMV_ALL(FMT, NAME) GEMV(FMT, NAME, 1) GEMV(FMT, NAME, 2) GEMV(FMT, NAME, 4) GEMV(FMT, NAME, 8)
GEMV_ALL(FMT_F32, f32)
GEMV_ALL(FMT_BF16, bf16)
GEMV_ALL(FMT_F16, f16)
GEMV_ALL(FMT_FP8, fp8)
GEMV_ALL(FMT_FP4, fp4)
