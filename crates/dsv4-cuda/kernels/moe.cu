// Mixture of experts: the router (sqrt-softplus scores, hash or biased top-k picks, normalized
// scaled weights), the routed experts per (token, slot) pair with gate+up+SwiGLU in one pass,
// and the weighted combine — a few launches however many experts are picked.
#include "linear.cuh"

__device__ __forceinline__ float softplusf_(float x) { return x > 20.f ? x : log1pf(expf(x)); }
// An expert's routing score from its router logit: sqrt(softplus(logit)).
__device__ __forceinline__ float route_score(float logit) { return sqrtf(softplusf_(logit)); }

// One warp per token. picks/rw: [T, k]. bias == null: hash routing through tid2eid [vocab, k].
// Lane l holds the scores and keys of experts l, l + 32, ... in registers (E <= 32 · ROUTE_PL and
// k <= 32: the host checks), so a round of the top-k is a register scan and two warp reductions.
#define ROUTE_PL 16
// The router's keys (the bias, or 0) of lane `lane`'s experts lane, lane + 32, ...: weights, so
// they load before the previous kernel is waited for.
__device__ __forceinline__ void route_keys(const float* bias, int E, int lane, float (&key)[ROUTE_PL]) {
#pragma unroll
    for (int m = 0; m < ROUTE_PL; m++) {
        const int e = lane + 32 * m;
        key[m] = (bias && e < E) ? __ldg(bias + e) : 0.f;
    }
}

// A float key as an unsigned integer of the same order (NaN → -inf, -0 → +0), so a warp's
// largest key is one `redux.sync`; 0 sits below every key (-inf maps to 0x007fffff). Bit tests,
// not float operations, so no math flag can fold the NaN and -0 cases away.
__device__ __forceinline__ unsigned route_order(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN → -inf
    if (u == 0x80000000u) u = 0u;                          // -0 → +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// op over the lane's ROUTE_PL registers as a tree (depth 4, not a chain of 15); t is clobbered.
template <typename T, typename Op>
__device__ __forceinline__ T route_tree(T (&t)[ROUTE_PL], Op op) {
    static_assert(ROUTE_PL == 16, "a tree of four levels");
#pragma unroll
    for (int m = 0; m < 8; m++) t[m] = op(t[m], t[m + 8]);
#pragma unroll
    for (int m = 0; m < 4; m++) t[m] = op(t[m], t[m + 4]);
#pragma unroll
    for (int m = 0; m < 2; m++) t[m] = op(t[m], t[m + 2]);
    return op(t[0], t[1]);
}

// One token's routing by one whole warp from its E router values `v` (read through L2: another
// block of the caller may have written them): the scores (`v` itself when SCORED, else
// route_score of the logits), biased top-k (ties → lower id) or the hash table's picks for token
// id `id`, then the normalized, scaled weights of its k picks. Every load is issued before the
// first use, and each round of the top-k is a max-tree over the lane's registers and two
// `redux.sync` (the key, then the lowest id holding it): the serial chain of one warp is this
// kernel's critical path.
template <bool SCORED>
__device__ __forceinline__ void route_token(const float* v, int E, int k, const float* bias, const int* tid2eid,
                                            int id, float route_scale, int* picks, float* rw,
                                            const float (&key)[ROUTE_PL]) {
    const int lane = threadIdx.x & 31;
    float s[ROUTE_PL];
#pragma unroll
    for (int m = 0; m < ROUTE_PL; m++) {
        const int e = lane + 32 * m;
        s[m] = e < E ? __ldcg(v + e) : 0.f;
    }
    if (!SCORED) {
#pragma unroll
        for (int m = 0; m < ROUTE_PL; m++) s[m] = route_score(s[m]);
    }
    int my_pick = 0;
    if (!bias) {
        // Lane j < k takes the table's j-th pick.
        if (lane < k) my_pick = tid2eid[(size_t)id * k + lane];
    } else {
        unsigned ku[ROUTE_PL];
#pragma unroll
        for (int m = 0; m < ROUTE_PL; m++) ku[m] = lane + 32 * m < E ? route_order(s[m] + key[m]) : 0u;
        for (int j = 0; j < k; j++) {
            unsigned t[ROUTE_PL];
#pragma unroll
            for (int m = 0; m < ROUTE_PL; m++) t[m] = ku[m];
            const unsigned best =
                __reduce_max_sync(0xffffffffu, route_tree(t, [](unsigned x, unsigned y) { return max(x, y); }));
            int c[ROUTE_PL];
#pragma unroll
            for (int m = 0; m < ROUTE_PL; m++) c[m] = ku[m] == best ? lane + 32 * m : INT_MAX;
            // Every expert below E holds a key above 0 until picked, so bi < E (k <= E).
            const int bi = __reduce_min_sync(0xffffffffu, route_tree(c, [](int x, int y) { return min(x, y); }));
            // The winner drops out (selects over every register: an index into the array
            // would put it in local memory).
#pragma unroll
            for (int m = 0; m < ROUTE_PL; m++) ku[m] = lane + 32 * m == bi ? 0u : ku[m];
            if (lane == j) my_pick = bi;
        }
    }
    // Each pick's score from the lane that holds it.
    const bool ok = my_pick >= 0 && my_pick < E;
    const int src = ok ? my_pick & 31 : 0, reg = ok ? my_pick >> 5 : -1;
    float my_s = 0.f;
#pragma unroll
    for (int m = 0; m < ROUTE_PL; m++) {
        const float o = __shfl_sync(0xffffffffu, s[m], src);
        if (m == reg) my_s = o;
    }
    float sum = 0.f;
    for (int j = 0; j < k; j++) sum += __shfl_sync(0xffffffffu, my_s, j);
    sum += 1e-20f;
    if (lane < k) {
        picks[lane] = my_pick;
        rw[lane] = my_s / sum * route_scale;
    }
}

extern "C" __global__ void moe_route(const float* logits, int E, int k, const float* bias,
                                     const int* tid2eid, const int* ids, float route_scale,
                                     int* picks, float* rw) {
    pdl_launch();
    const int t = blockIdx.x, lane = threadIdx.x;
    float key[ROUTE_PL];
    route_keys(bias, E, lane, key);
    pdl_wait();
    route_token<false>(logits + (size_t)t * E, E, k, bias, tid2eid, ids[t], route_scale, picks + (size_t)t * k,
                       rw + (size_t)t * k, key);
}

// The router of a decode step's few tokens (T <= RR_TOKENS, BF16 gate with rows of whole
// 16-byte chunks) in one launch instead of a GEMV and `moe_route`: a warp per gate row, its
// first RR_PRE chunks per lane requested before the previous kernel is waited for; x (the
// normed h, [T, d]) is then copied into shared memory (T·d floats of dynamic shared memory)
// with all of a thread's loads in flight at once, read from there by the dot products (each
// block reads x from L2 once; the step time measured the same as per-chunk loads); the block
// that finishes last (an atomic count, reset for the next launch) routes the tokens, a warp
// each, from the scores the blocks wrote (each warp turns its logit into its score, so the
// routing warp's serial tail has no transcendentals).
#define RR_WARPS 4
#define RR_TOKENS 4
#define RR_PRE 16
extern "C" __global__ void __launch_bounds__(RR_WARPS * 32)
    moe_router_route(LinearW G, const float* x, int T, float* scores, unsigned* count, int k, const float* bias,
                     const int* tid2eid, const int* ids, float route_scale, int* picks, float* rw) {
    pdl_launch();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int E = G.out, d = G.in, nch = d / 8;
    const int r = blockIdx.x * RR_WARPS + warp;
    const uint4* row = (const uint4*)(G.w + (size_t)min(r, E - 1) * d * 2);
    uint4 wv[RR_PRE];
#pragma unroll
    for (int i = 0; i < RR_PRE; i++) {
        const int c = lane + 32 * i;
        if (c < nch) wv[i] = __ldg(row + c);
    }
    // The routing's keys too (weights), in the warps that would route if this block is last.
    float key[ROUTE_PL];
    if (warp < T) route_keys(bias, E, lane, key);
    pdl_wait();
    extern __shared__ float4 xs4[];  // [T, d / 4]
    {
        const int n4 = T * d / 4;
        constexpr int U = 8;  // loads in flight per thread before the first store
        for (int i0 = threadIdx.x; i0 < n4; i0 += U * RR_WARPS * 32) {
            float4 v[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = i0 + u * RR_WARPS * 32;
                if (i < n4) v[u] = __ldcg((const float4*)x + i);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = i0 + u * RR_WARPS * 32;
                if (i < n4) xs4[i] = v[u];
            }
        }
    }
    __syncthreads();
    float acc[RR_TOKENS];
#pragma unroll
    for (int m = 0; m < RR_TOKENS; m++) acc[m] = 0.f;
    auto chunk = [&](uint4 q, int c) {
        float f[8];
        decode_vals<FMT_BF16>(q, f);
#pragma unroll
        for (int m = 0; m < RR_TOKENS; m++) {
            if (m >= T) break;
            const float4 a = xs4[(m * d + c * 8) / 4], b = xs4[(m * d + c * 8) / 4 + 1];
            const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int e = 0; e < 8; e++) acc[m] = fmaf(f[e], xv[e], acc[m]);
        }
    };
#pragma unroll
    for (int i = 0; i < RR_PRE; i++) {
        const int c = lane + 32 * i;
        if (c < nch) chunk(wv[i], c);
    }
    for (int c = lane + 32 * RR_PRE; c < nch; c += 32) chunk(__ldg(row + c), c);
#pragma unroll
    for (int m = 0; m < RR_TOKENS; m++) acc[m] = warp_sum(acc[m]);
    if (lane == 0 && r < E)
        for (int m = 0; m < T; m++) scores[(size_t)m * E + r] = route_score(acc[m]);
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (warp < T) {
        route_token<true>(scores + (size_t)warp * E, E, k, bias, tid2eid, ids[warp], route_scale,
                          picks + (size_t)warp * k, rw + (size_t)warp * k, key);
    }
    if (threadIdx.x == 0) *count = 0;
}

// The routed experts of a few tokens (decode): block x is one (token, slot) pair, which streams
// its expert's rows once. Prefill groups pairs by expert instead (`moe_*_gemm`, gemm.cu).
struct MoeArgs {
    const LinearW* w1;        // [E] gate
    const LinearW* w3;        // [E] up
    const LinearW* w2;        // [E] down
    const int* picks;         // [T * k]
    const float* rw;          // [T * k]
    const float* x;           // [T, D]
    float* h;                 // [T * k, I]
    float* out;               // [T * k, D]
    int32_t k, D, I, vec, rw_inside;
    float lim;                // NaN: no clamp
};

template <int FMT>
__device__ void moe_up_impl(const MoeArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int pair = blockIdx.x;
    const int e = a.picks[pair];
    const LinearW W1 = a.w1[e], W3 = a.w3[e];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * 16 + warp * 2;
    if (r >= a.I) return;
    const int nr = r + 1 < a.I ? 2 : 1;
    const float* xm[1] = {a.x + (size_t)(pair / a.k) * a.D};
    const int nch = a.vec ? a.D / N : 0;
    // Gate and up rows together: four rows' loads in flight per lane.
    const LinearW* ws[4] = {&W1, &W1, &W3, &W3};
    const int r1 = nr > 1 ? r + 1 : r;
    const int rows[4] = {r, r1, r, r1};
    float acc[4][1] = {};
    warp_dot_rows<FMT, 1, 4>(ws, rows, xm, 1, 0, 0, nch, true, nch * N, acc);
    if (lane == 0) {
        for (int i = 0; i < nr; i++) {
            float v = swiglu_clamped(acc[i][0], acc[2 + i][0], a.lim);
            if (a.rw_inside) v *= a.rw[pair];
            a.h[(size_t)pair * a.I + r + i] = v;
        }
    }
}

template <int FMT>
__device__ void moe_down_impl(const MoeArgs& a) {
    constexpr int N = Chunk<FMT>::N;
    const int pair = blockIdx.x;
    const LinearW W2 = a.w2[a.picks[pair]];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * 32 + warp * 4;
    if (r >= a.D) return;
    const int nr = min(4, a.D - r);
    const float* xm[1] = {a.h + (size_t)pair * a.I};
    const int nch = a.vec ? a.I / N : 0;
    float acc[4][1] = {};
    const LinearW* ws[4] = {&W2, &W2, &W2, &W2};
    const int rows[4] = {r, r + min(1, nr - 1), r + min(2, nr - 1), r + min(3, nr - 1)};
    warp_dot_rows<FMT, 1, 4>(ws, rows, xm, 1, 0, 0, nch, true, nch * N, acc);
    if (lane == 0) {
        for (int i = 0; i < nr; i++) a.out[(size_t)pair * a.D + r + i] = acc[i][0];
    }
}

#define MOE(FMT, NAME)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) moe_up_##NAME(MoeArgs a) { pdl_entry(); moe_up_impl<FMT>(a); }     \
    extern "C" __global__ void __launch_bounds__(256) moe_down_##NAME(MoeArgs a) { pdl_entry(); moe_down_impl<FMT>(a); }
MOE(FMT_F32, f32)
MOE(FMT_BF16, bf16)
MOE(FMT_F16, f16)
MOE(FMT_FP8, fp8)
MOE(FMT_FP4, fp4)

// y[t, :] += sum_j scale_j * out[t * k + j, :], j ascending (scale_j = rw, or 1 when the
// routing weight was applied inside).
extern "C" __global__ void moe_combine(float* y, const float* out, const float* rw, int k, int D,
                                       int T, int rw_inside) {
    pdl_entry();
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
