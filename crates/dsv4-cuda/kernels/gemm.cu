// Multi-token products (prefill): a block computes a 64-row x 64-token tile of y = W x, the
// weight tile decoded once into shared memory (scales applied) and reused for all 64 tokens,
// each thread accumulating 4 rows x 4 tokens in registers. The MoE variants run one expert on
// up to 64 of the (token, slot) pairs routed to it.
#pragma once
#include "linear.cuh"

#define GB_M 64
#define GB_T 64
#define GB_K 32
#define GB_LD 68  // padded row of the shared tiles (keeps float4 alignment)

// Ws[k][r] = W[row0 + r, k0 + k] for a 64 x 32 tile (zeros outside the matrix).
template <int FMT>
__device__ __forceinline__ void load_w_tile(const LinearW& W, int row0, int k0, bool vec, float (*Ws)[GB_LD]) {
    constexpr int N = Chunk<FMT>::N;
    const int tid = threadIdx.x;
    const int rows = W.out - row0;
    if (vec && k0 + GB_K <= W.in) {
        constexpr int per_row = GB_K / N > 0 ? GB_K / N : 1;
        constexpr int total = GB_M * per_row;
        const size_t row_bytes = (FMT == FMT_FP4) ? (size_t)W.in / 2
                               : (size_t)W.in * (FMT == FMT_F32 ? 4 : (FMT == FMT_FP8 ? 1 : 2));
        for (int i = tid; i < total; i += blockDim.x) {
            const int r = i / per_row, c = i % per_row;
            float f[N];
            if (r < rows) {
                const int chunk = k0 / N + c;
                uint4 q = __ldg((const uint4*)(W.w + (size_t)(row0 + r) * row_bytes) + chunk);
                float s = decode_chunk<FMT>(W, row0 + r, chunk, q, f);
#pragma unroll
                for (int j = 0; j < N; j++) f[j] *= s;
            } else {
#pragma unroll
                for (int j = 0; j < N; j++) f[j] = 0.f;
            }
#pragma unroll
            for (int j = 0; j < N; j++) Ws[c * N + j][r] = f[j];
        }
    } else {
        for (int i = tid; i < GB_M * GB_K; i += blockDim.x) {
            const int r = i / GB_K, k = i % GB_K;
            Ws[k][r] = (r < rows && k0 + k < W.in) ? load_elem(W, row0 + r, k0 + k) : 0.f;
        }
    }
}

// Xs[k][t] = x_t[k0 + k] for the tile's tokens, whose rows are given by `xrow(t)` (null: none).
template <typename XRow>
__device__ __forceinline__ void load_x_tile(XRow xrow, int ntok, int k0, int K, float (*Xs)[GB_LD]) {
    for (int i = threadIdx.x; i < GB_T * GB_K; i += blockDim.x) {
        const int t = i / GB_K, k = i % GB_K;
        float v = 0.f;
        if (t < ntok && k0 + k < K) v = xrow(t)[k0 + k];
        Xs[k][t] = v;
    }
}

__device__ __forceinline__ void tile_fma(float (*Ws)[GB_LD], float (*Xs)[GB_LD], float (&acc)[4][4]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 8
    for (int k = 0; k < GB_K; k++) {
        const float4 w = *(const float4*)&Ws[k][ty * 4];
        const float4 x = *(const float4*)&Xs[k][tx * 4];
        const float wv[4] = {w.x, w.y, w.z, w.w}, xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = fmaf(wv[i], xv[j], acc[i][j]);
    }
}

struct GemmArgs {
    const float* x;
    float* y;
    int32_t ldx, ldy, M;
    int32_t xg_rows, xg_stride;  // grouped input (wo_a); a tile's rows share one group
    int32_t vec;
    int32_t terms;  // bf16 parts of x for the tensor-core kernels (gemm_tc.cu); unused here
};

template <int FMT>
__device__ void gemm_impl(const LinearW& W, const GemmArgs& a) {
    __shared__ __align__(16) float Ws[GB_K][GB_LD];
    __shared__ __align__(16) float Xs[GB_K][GB_LD];
    const int row0 = blockIdx.x * GB_M, tok0 = blockIdx.y * GB_T;
    const int ntok = min(GB_T, a.M - tok0);
    const int xoff = a.xg_rows ? (row0 / a.xg_rows) * a.xg_stride : 0;
    const float* xb = a.x + (size_t)tok0 * a.ldx + xoff;
    const int ldx = a.ldx;
    auto xrow = [&](int t) { return xb + (size_t)t * ldx; };
    float acc[4][4] = {};
    for (int k0 = 0; k0 < W.in; k0 += GB_K) {
        load_w_tile<FMT>(W, row0, k0, a.vec, Ws);
        load_x_tile(xrow, ntok, k0, W.in, Xs);
        __syncthreads();
        tile_fma(Ws, Xs, acc);
        __syncthreads();
    }
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int t = tx * 4 + j;
        if (t >= ntok) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = row0 + ty * 4 + i;
            if (r < W.out) a.y[(size_t)(tok0 + t) * a.ldy + r] = acc[i][j];
        }
    }
}

#define GEMM(FMT, NAME) \
    extern "C" __global__ void __launch_bounds__(256) gemm_##NAME(LinearW W, GemmArgs a) { pdl_entry(); gemm_impl<FMT>(W, a); }
GEMM(FMT_F32, f32)
GEMM(FMT_BF16, bf16)
GEMM(FMT_F16, f16)
GEMM(FMT_FP8, fp8)
GEMM(FMT_FP4, fp4)

// MoE tiles of up to 64 pairs of one expert. tile_pairs: [ntile, 64].
struct MoeGemmArgs {
    const LinearW* w1;
    const LinearW* w3;
    const LinearW* w2;
    const int* tile_expert;
    const int* tile_pairs;
    const int* tile_n;
    const float* x;   // [T, D]
    float* h;         // [T * k, I]
    float* out;       // [T * k, D]
    int32_t k, D, I, vec;
    float lim;
    const float* rw;    // [T * k] routing weights, one per pair
    int32_t rw_inside;  // 1: the up kernels scale each pair's SwiGLU output by rw[pair]
    int32_t terms;      // bf16 parts of x for the tensor-core kernels (gemm_tc.cu)
};

// The tile's pairs into shared memory (padded with 0); returns the tile's pair count.
__device__ __forceinline__ int load_pairs(const MoeGemmArgs& a, int tile, int* pairs) {
    const int n = a.tile_n[tile];
    for (int i = threadIdx.x; i < GB_T; i += blockDim.x) pairs[i] = i < n ? a.tile_pairs[tile * GB_T + i] : 0;
    __syncthreads();
    return n;
}

template <int FMT>
__device__ void moe_up_gemm_impl(const MoeGemmArgs& a) {
    __shared__ __align__(16) float W1s[GB_K][GB_LD];
    __shared__ __align__(16) float W3s[GB_K][GB_LD];
    __shared__ __align__(16) float Xs[GB_K][GB_LD];
    __shared__ int pairs[GB_T];
    const int tile = blockIdx.x, row0 = blockIdx.y * GB_M;
    const int e = a.tile_expert[tile], n = load_pairs(a, tile, pairs);
    const LinearW W1 = a.w1[e], W3 = a.w3[e];
    auto xrow = [&](int t) { return a.x + (size_t)(pairs[t] / a.k) * a.D; };
    float g[4][4] = {}, u[4][4] = {};
    for (int k0 = 0; k0 < a.D; k0 += GB_K) {
        load_w_tile<FMT>(W1, row0, k0, a.vec, W1s);
        load_w_tile<FMT>(W3, row0, k0, a.vec, W3s);
        load_x_tile(xrow, n, k0, a.D, Xs);
        __syncthreads();
        tile_fma(W1s, Xs, g);
        tile_fma(W3s, Xs, u);
        __syncthreads();
    }
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int j = 0; j < 4; j++) {
        const int t = tx * 4 + j;
        if (t >= n) continue;
        for (int i = 0; i < 4; i++) {
            const int r = row0 + ty * 4 + i;
            if (r >= a.I) continue;
            float hv = swiglu_clamped(g[i][j], u[i][j], a.lim);
            if (a.rw_inside) hv *= a.rw[pairs[t]];
            a.h[(size_t)pairs[t] * a.I + r] = hv;
        }
    }
}

template <int FMT>
__device__ void moe_down_gemm_impl(const MoeGemmArgs& a) {
    __shared__ __align__(16) float Ws[GB_K][GB_LD];
    __shared__ __align__(16) float Xs[GB_K][GB_LD];
    __shared__ int pairs[GB_T];
    const int tile = blockIdx.x, row0 = blockIdx.y * GB_M;
    const int e = a.tile_expert[tile], n = load_pairs(a, tile, pairs);
    const LinearW W2 = a.w2[e];
    auto xrow = [&](int t) { return a.h + (size_t)pairs[t] * a.I; };
    float acc[4][4] = {};
    for (int k0 = 0; k0 < a.I; k0 += GB_K) {
        load_w_tile<FMT>(W2, row0, k0, a.vec, Ws);
        load_x_tile(xrow, n, k0, a.I, Xs);
        __syncthreads();
        tile_fma(Ws, Xs, acc);
        __syncthreads();
    }
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int j = 0; j < 4; j++) {
        const int t = tx * 4 + j;
        if (t >= n) continue;
        for (int i = 0; i < 4; i++) {
            const int r = row0 + ty * 4 + i;
            if (r < a.D) a.out[(size_t)pairs[t] * a.D + r] = acc[i][j];
        }
    }
}

#define MOE_GEMM(FMT, NAME)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_up_gemm_##NAME(MoeGemmArgs a) { pdl_entry(); moe_up_gemm_impl<FMT>(a); } \
    extern "C" __global__ void __launch_bounds__(256) moe_down_gemm_##NAME(MoeGemmArgs a) { pdl_entry(); moe_down_gemm_impl<FMT>(a); }
MOE_GEMM(FMT_F32, f32)
MOE_GEMM(FMT_BF16, bf16)
MOE_GEMM(FMT_F16, f16)
MOE_GEMM(FMT_FP8, fp8)
MOE_GEMM(FMT_FP4, fp4)

// y = W x for many tokens and few f32 rows (R <= 24: the hyper-connection `fn` rows, 24 × 16384
// at prefill's 2048 tokens: the activations are ~134 MB, the rows 1.5 MB). Block (s, g) takes
// K slice s (GN_KS inputs) of every row, held in registers (thread tid: inputs s·GN_KS + tid +
// 256 j), and walks token group g: per token each thread's GN_KPT products per row, the warp's
// sums by one transposed reduction (lane r: row r), the eight warps' in order through shared
// memory every GN_TPR tokens. Slice s's sums go to partial[s][token][row], added in slice
// order by gemm_f32_narrow_sum: a token's result depends on nothing but its own inputs.
#define GN_THREADS 256
#define GN_KPT 4
#define GN_KS (GN_THREADS * GN_KPT)
#define GN_ROWS 24
#define GN_TPR 4  // tokens per round of the warps' meeting
extern "C" __global__ void __launch_bounds__(GN_THREADS, 1)
    gemm_f32_narrow(LinearW W, GemmArgs a, float* partial, int tokens_per_block) {
    pdl_launch();
    __shared__ float red[GN_TPR][GN_THREADS / 32][GN_ROWS];
    if (W.out > GN_ROWS || blockDim.x != GN_THREADS) __trap();  // (the host's gate)
    const int R = W.out, K = W.in, s = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kb = s * GN_KS + threadIdx.x;
    // The rows do not depend on the kernel before: they load while it finishes.
    const float* wf = (const float*)W.w;
    float w[GN_KPT][GN_ROWS];
#pragma unroll
    for (int j = 0; j < GN_KPT; j++)
#pragma unroll
        for (int r = 0; r < GN_ROWS; r++) {
            const int k = kb + GN_THREADS * j;
            w[j][r] = (r < R && k < K) ? __ldg(wf + (size_t)r * K + k) : 0.f;
        }
    pdl_wait();
    const int t0 = blockIdx.y * tokens_per_block, t1 = min(a.M, t0 + tokens_per_block);
    auto load = [&](int t, float (&xv)[GN_KPT]) {
#pragma unroll
        for (int j = 0; j < GN_KPT; j++) {
            const int k = kb + GN_THREADS * j;
            xv[j] = (t < t1 && k < K) ? __ldcs(a.x + (size_t)t * a.ldx + k) : 0.f;
        }
    };
    // Each round's activations load during the round before (one block per SM: its eight
    // warps alone hide the loads' latency).
    float xv[GN_TPR][GN_KPT];
#pragma unroll
    for (int u = 0; u < GN_TPR; u++) load(t0 + u, xv[u]);
    for (int tr = t0; tr < t1; tr += GN_TPR) {
        float xn[GN_TPR][GN_KPT];
#pragma unroll
        for (int u = 0; u < GN_TPR; u++) load(tr + GN_TPR + u, xn[u]);
#pragma unroll
        for (int u = 0; u < GN_TPR; u++) {
            float p[32];
#pragma unroll
            for (int r = 0; r < 32; r++) {
                float q = 0.f;
                if (r < GN_ROWS)
#pragma unroll
                    for (int j = 0; j < GN_KPT; j++) q = fmaf(w[j][r], xv[u][j], q);
                p[r] = q;
            }
            const float v = warp_sum_transposed(p);
            if (lane < GN_ROWS) red[u][warp][lane] = v;
        }
        __syncthreads();
        if (threadIdx.x < GN_TPR * GN_ROWS) {
            const int u = threadIdx.x / GN_ROWS, r = threadIdx.x % GN_ROWS, t = tr + u;
            float q = 0.f;
#pragma unroll
            for (int k = 0; k < GN_THREADS / 32; k++) q += red[u][k][r];
            if (t < t1 && r < R) partial[((size_t)s * a.M + t) * R + r] = q;
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < GN_TPR; u++)
#pragma unroll
            for (int j = 0; j < GN_KPT; j++) xv[u][j] = xn[u][j];
    }
}

// y[t][r] = Σ_s partial[s][t][r] over gemm_f32_narrow's `slices`, in slice order.
extern "C" __global__ void gemm_f32_narrow_sum(const float* partial, GemmArgs a, int rows, int slices) {
    pdl_entry();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.M * rows) return;
    const int t = i / rows, r = i % rows;
    float q = 0.f;
    for (int s = 0; s < slices; s++) q += partial[(size_t)s * a.M * rows + i];
    a.y[(size_t)t * a.ldy + r] = q;
}
