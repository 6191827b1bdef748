// y[m, r] = W[r, :] · x[m, :] for a range of rows, M tokens, optional split over K (partials
// reduced by `gemv_reduce` in a fixed order, so results never depend on scheduling).
#include "linear.cuh"

#define GEMV_ROWS_PER_BLOCK 16  // 8 warps x 2 rows

struct GemvArgs {
    const float* x;
    float* y;
    float* partial;    // [S, M, nrows] when S > 1
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
    const int ri = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp * 2;
    if (ri >= a.nrows) return;
    const int r0 = a.row0 + ri;
    const int nr = (ri + 1 < a.nrows) ? 2 : 1;
    const int m0 = blockIdx.z * MT;
    const int M = min(MT, a.M - m0);
    const float* xm[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) xm[m] = a.x + (size_t)(m0 + (m < M ? m : 0)) * a.ldx;
    const int xoff = a.xg_rows ? (r0 / a.xg_rows) * a.xg_stride : 0;
    const int nch = a.vec ? W.in / N : 0;
    const int s = blockIdx.y;
    const int c0 = (int)((long long)nch * s / a.S), c1 = (int)((long long)nch * (s + 1) / a.S);
    float acc[2][MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[0][m] = acc[1][m] = 0.f;
    warp_dot2<FMT, MT>(W, r0, nr, xm, M, xoff, c0, c1, s == a.S - 1, nch * N, acc);
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m < M) {
                for (int i = 0; i < nr; i++) {
                    float v = acc[i][m];
                    if (a.S == 1) a.y[(size_t)(m0 + m) * a.ldy + ri + i] = v;
                    else a.partial[((size_t)s * a.M + m0 + m) * a.nrows + ri + i] = v;
                }
            }
        }
    }
}

#define GEMV(FMT, NAME, MT)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) gemv_##NAME##_##MT(LinearW W, GemvArgs a) { \
        gemv_impl<FMT, MT>(W, a);                                                            \
    }
#define GEMV_ALL(FMT, NAME) GEMV(FMT, NAME, 1) GEMV(FMT, NAME, 2) GEMV(FMT, NAME, 4) GEMV(FMT, NAME, 8)
GEMV_ALL(FMT_F32, f32)
GEMV_ALL(FMT_BF16, bf16)
GEMV_ALL(FMT_F16, f16)
GEMV_ALL(FMT_FP8, fp8)
GEMV_ALL(FMT_FP4, fp4)

// y[m * ldy + i] = sum over s of partial[s, m, i], s ascending.
extern "C" __global__ void gemv_reduce(const float* partial, float* y, int S, int M, int nrows, int ldy) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int m = blockIdx.y;
    if (i >= nrows) return;
    float v = 0.f;
    for (int s = 0; s < S; s++) v += partial[((size_t)s * M + m) * nrows + i];
    y[(size_t)m * ldy + i] = v;
}
