// Mixture of experts: the router (sqrt-softplus scores, hash or biased top-k picks, normalized
// scaled weights) and the routed experts over "tiles" — one expert and up to 8 of the
// (token, slot) pairs routed to it — so every selected expert's weights stream once per tile
// and the whole layer is three launches however many experts are picked.
#include "linear.cuh"

__device__ __forceinline__ float softplusf_(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// One warp per token. picks/rw: [T, k]. bias == null: hash routing through tid2eid [vocab, k].
extern "C" __global__ void moe_route(const float* logits, int E, int k, const float* bias,
                                     const int* tid2eid, const int* ids, float route_scale,
                                     int* picks, float* rw) {
    extern __shared__ float sm[];  // s[E], key[E]
    float* s = sm;
    float* key = sm + E;
    const int t = blockIdx.x, lane = threadIdx.x;
    for (int e = lane; e < E; e += 32) {
        s[e] = sqrtf(softplusf_(logits[(size_t)t * E + e]));
        key[e] = bias ? s[e] + bias[e] : 0.f;
    }
    __syncwarp();
    int* pk = picks + (size_t)t * k;
    for (int j = 0; j < k; j++) {
        if (!bias) {
            if (lane == 0) pk[j] = tid2eid[(size_t)ids[t] * k + j];
            continue;
        }
        float best = -INFINITY;
        int bi = E;
        for (int e = lane; e < E; e += 32) {
            if (key[e] > best) { best = key[e]; bi = e; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
        }
        if (lane == 0) { pk[j] = bi; key[bi] = -INFINITY; }
        __syncwarp();
    }
    __syncwarp();
    if (lane == 0) {
        float sum = 0.f;
        for (int j = 0; j < k; j++) sum += s[pk[j]];
        sum += 1e-20f;
        for (int j = 0; j < k; j++) rw[(size_t)t * k + j] = s[pk[j]] / sum * route_scale;
    }
}

struct MoeArgs {
    const LinearW* w1;        // [E] gate
    const LinearW* w3;        // [E] up
    const LinearW* w2;        // [E] down
    const int* picks;         // [T * k]
    const float* rw;          // [T * k]
    const int* tile_expert;   // [ntile], or null: tile i is pair i alone
    const int* tile_pairs;    // [ntile, 8]
    const int* tile_n;        // [ntile]
    const float* x;           // [T, D]
    float* h;                 // [T * k, I]
    float* out;               // [T * k, D]
    int32_t k, D, I, vec, rw_inside;
    float lim;                // NaN: no clamp
};

__device__ __forceinline__ int tile_info(const MoeArgs& a, int tile, int (&pairs)[8]) {
    if (!a.tile_expert) {
        pairs[0] = tile;
        return 1;
    }
    int n = a.tile_n[tile];
    for (int j = 0; j < 8; j++) pairs[j] = j < n ? a.tile_pairs[tile * 8 + j] : a.tile_pairs[tile * 8];
    return n;
}

template <int FMT, int MT>
__device__ void moe_up_impl(const MoeArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int tile = blockIdx.x;
    int pairs[8];
    const int M = min(tile_info(a, tile, pairs), MT);
    const int e = a.tile_expert ? a.tile_expert[tile] : a.picks[tile];
    const LinearW W1 = a.w1[e], W3 = a.w3[e];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * 16 + warp * 2;
    if (r >= a.I) return;
    const int nr = r + 1 < a.I ? 2 : 1;
    const float* xm[MT];
#pragma unroll
    for (int j = 0; j < MT; j++) xm[j] = a.x + (size_t)(pairs[j < M ? j : 0] / a.k) * a.D;
    const int nch = a.vec ? a.D / N : 0;
    // Gate and up rows together: four rows' loads in flight per lane.
    const LinearW* ws[4] = {&W1, &W1, &W3, &W3};
    const int r1 = nr > 1 ? r + 1 : r;
    const int rows[4] = {r, r1, r, r1};
    float acc[4][MT];
#pragma unroll
    for (int j = 0; j < MT; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = 0.f;
    warp_dot_rows<FMT, MT, 4>(ws, rows, xm, M, 0, 0, nch, true, nch * N, acc);
    float g[2][MT], u[2][MT];
#pragma unroll
    for (int j = 0; j < MT; j++) {
        g[0][j] = acc[0][j];
        g[1][j] = acc[1][j];
        u[0][j] = acc[2][j];
        u[1][j] = acc[3][j];
    }
    if (lane == 0) {
        for (int j = 0; j < M; j++) {
            for (int i = 0; i < nr; i++) {
                float gv = g[i][j], uv = u[i][j];
                if (!isnan(a.lim)) { gv = fminf(gv, a.lim); uv = fminf(fmaxf(uv, -a.lim), a.lim); }
                float v = gv / (1.0f + expf(-gv)) * uv;
                if (a.rw_inside) v *= a.rw[pairs[j]];
                a.h[(size_t)pairs[j] * a.I + r + i] = v;
            }
        }
    }
}

template <int FMT, int MT>
__device__ void moe_down_impl(const MoeArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int tile = blockIdx.x;
    int pairs[8];
    const int M = min(tile_info(a, tile, pairs), MT);
    const int e = a.tile_expert ? a.tile_expert[tile] : a.picks[tile];
    const LinearW W2 = a.w2[e];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * 32 + warp * 4;
    if (r >= a.D) return;
    const int nr = min(4, a.D - r);
    const float* xm[MT];
#pragma unroll
    for (int j = 0; j < MT; j++) xm[j] = a.h + (size_t)pairs[j < M ? j : 0] * a.I;
    const int nch = a.vec ? a.I / N : 0;
    float acc[4][MT];
#pragma unroll
    for (int j = 0; j < MT; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = 0.f;
    const LinearW* ws[4] = {&W2, &W2, &W2, &W2};
    const int rows[4] = {r, r + min(1, nr - 1), r + min(2, nr - 1), r + min(3, nr - 1)};
    warp_dot_rows<FMT, MT, 4>(ws, rows, xm, M, 0, 0, nch, true, nch * N, acc);
    if (lane == 0) {
        for (int j = 0; j < M; j++)
            for (int i = 0; i < nr; i++) a.out[(size_t)pairs[j] * a.D + r + i] = acc[i][j];
    }
}

#define MOE(FMT, NAME, MT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) moe_up_##NAME##_##MT(MoeArgs a) { moe_up_impl<FMT, MT>(a); } \
    extern "C" __global__ void __launch_bounds__(256) moe_down_##NAME##_##MT(MoeArgs a) { moe_down_impl<FMT, MT>(a); }
#define MOE_ALL(FMT, NAME) MOE(FMT, NAME, 1)
MOE_ALL(FMT_F32, f32)
MOE_ALL(FMT_BF16, bf16)
MOE_ALL(FMT_F16, f16)
MOE_ALL(FMT_FP8, fp8)
MOE_ALL(FMT_FP4, fp4)

// y[t, :] += sum_j scale_j * out[t * k + j, :], j ascending (scale_j = rw, or 1 when the
// routing weight was applied inside).
extern "C" __global__ void moe_combine(float* y, const float* out, const float* rw, int k, int D,
                                       int T, int rw_inside) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * D) return;
    int t = idx / D, d = idx % D;
    float v = y[idx];
    for (int j = 0; j < k; j++) {
        float w = rw_inside ? 1.f : rw[(size_t)t * k + j];
        v = fmaf(w, out[((size_t)t * k + j) * D + d], v);
    }
    y[idx] = v;
}
