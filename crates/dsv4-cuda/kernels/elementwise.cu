// Row norms, rotary embeddings, embeddings and the hyper-connection mixing, in the CPU
// reference's f32 arithmetic and order wherever the order is observable.
#include "common.cuh"

// Sum of squares of one row, float4 loads when the row allows them.
__device__ __forceinline__ float row_sumsq(const float* row, int width, float* sh) {
    float ss = 0.f;
    if ((width & 3) == 0 && ((uintptr_t)row & 15) == 0) {
        const float4* r4 = (const float4*)row;
        for (int i = threadIdx.x; i < width / 4; i += blockDim.x) {
            float4 v = r4[i];
            ss = fmaf(v.x, v.x, ss);
            ss = fmaf(v.y, v.y, ss);
            ss = fmaf(v.z, v.z, ss);
            ss = fmaf(v.w, v.w, ss);
        }
    } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x) ss = fmaf(row[i], row[i], ss);
    }
    return block_sum(ss, sh);
}

// row <- row / sqrt(mean(row^2) + eps) (* w when given), by the whole block.
__device__ __forceinline__ void norm_row(float* row, const float* w, int width, float eps, float* sh) {
    float ss = row_sumsq(row, width, sh);
    float r = 1.0f / sqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = row[i] * r;
        row[i] = w ? v * w[i] : v;
    }
}

// x[row] <- x[row] / sqrt(mean(x[row]^2) + eps) (* w when given); one block per row.
extern "C" __global__ void rms_norm(float* x, const float* w, int width, float eps) {
    pdl_entry();
    __shared__ float sh[32];
    norm_row(x + (size_t)blockIdx.x * width, w, width, eps, sh);
}

// out[row] = 1 / sqrt(mean(x[row]^2) + eps); one block per row.
extern "C" __global__ void inv_rms(const float* x, float* out, int width, float eps) {
    pdl_entry();
    __shared__ float sh[32];
    float ss = row_sumsq(x + (size_t)blockIdx.x * width, width, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = 1.0f / sqrtf(ss / (float)width + eps);
}

// Rotates the trailing 2*half channels of rows of width `width` in interleaved pairs. Row i
// belongs to token i / rows_per_token at position positions[token] when given (a batch of
// sequences), else pos0 + token * pos_step. The angle is the
// f32 product pos * inv_freq, its cos/sin taken in double (as the CPU reference).
// Rotates the `half` interleaved pairs of `tail` by position p, the threads of x striding.
__device__ __forceinline__ void rope_tail(float* tail, int half, float p, const float* inv_freq, float factor,
                                          int inverse) {
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double a = (double)(p * inv_freq[j]);
        float c = (float)cos(a) * factor, s = (float)sin(a) * factor;
        if (inverse) s = -s;
        float u = tail[2 * j], v = tail[2 * j + 1];
        tail[2 * j] = u * c - v * s;
        tail[2 * j + 1] = v * c + u * s;
    }
}

extern "C" __global__ void rope(float* x, int rows, int width, int rows_per_token, int half,
                                const float* inv_freq, float factor, int pos0, int pos_step,
                                int inverse, const int* positions) {
    pdl_entry();
    int i = blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= rows) return;
    int tok = i / rows_per_token;
    float p = (float)(positions ? positions[tok] : pos0 + tok * pos_step);
    rope_tail(x + (size_t)i * width + (width - 2 * half), half, p, inv_freq, factor, inverse);
}

// rms_norm then rope (not inverse) of the same rows, in one launch: one block per row, the
// same arithmetic as the two kernels (the row's normalized tail is re-read after a barrier).
// Two sets of rows of one width and RoPE table (the queries' heads and the key rows): blocks
// below rows1 take row b of x (weight w, rows_per_token rows per position), the rest row
// b - rows1 of x2 (w2, rpt2).
extern "C" __global__ void rms_norm_rope(float* x, const float* w, int rows1, int rows_per_token, float* x2,
                                         const float* w2, int rpt2, int width, float eps, int half,
                                         const float* inv_freq, float factor, int pos0, int pos_step,
                                         const int* positions) {
    pdl_entry();
    __shared__ float sh[32];
    const bool first = (int)blockIdx.x < rows1;
    const int b = first ? blockIdx.x : blockIdx.x - rows1;
    float* row = (first ? x : x2) + (size_t)b * width;
    norm_row(row, first ? w : w2, width, eps, sh);
    __syncthreads();
    const int tok = b / (first ? rows_per_token : rpt2);
    const float p = (float)(positions ? positions[tok] : pos0 + tok * pos_step);
    rope_tail(row + (width - 2 * half), half, p, inv_freq, factor, 0);
}

// x[t, s, :] = E[ids[t], :] for each of the n streams.
extern "C" __global__ void embed(LinearW E, const int* ids, float* x, int n) {
    pdl_entry();
    int t = blockIdx.x;
    int id = ids[t];
    int d = E.in;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float v = load_elem(E, id, k);
        for (int s = 0; s < n; s++) x[((size_t)t * n + s) * d + k] = v;
    }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// A stream's `pre` weight from its raw mix row m (scaled by the stream rms r): the one formula
// of the warp mix and of the cluster boundary, which finds `pre` without the Sinkhorn.
__device__ __forceinline__ float hc_pre_value(float m, float r, float scale, float base, float eps) {
    return sigmoidf_((m * r) * scale + base) + eps;
}

// Sinkhorn mix of one token from its raw mix rows m (scaled by the stream rms r), called by one
// whole warp: pre [n], post [n], comb [n, n] of token t (row softmax + eps, one column
// normalization, then iters-1 row/column rounds; lane i*n+j holds comb[i][j]; sums in the CPU's
// order: j or i ascending, then + eps). NT > 0 fixes n at compile time (the release models' 4),
// so the sums' shuffles unroll and issue together; NT = 0 takes any n.
template <int NT>
__device__ __forceinline__ void hc_mix_warp_n(const float* m, float r, const float* base, const float* scale,
                                              float* pre, float* post, float* comb, int n_rt, int iters,
                                              float eps, int t) {
    const int n = NT > 0 ? NT : n_rt;
    const int lane = threadIdx.x & 31;
    if (lane < n) {
        pre[t * n + lane] = hc_pre_value(m[lane], r, scale[0], base[lane], eps);
        post[t * n + lane] = 2.0f * sigmoidf_((m[n + lane] * r) * scale[1] + base[n + lane]);
    }
    const int nn = n * n;
    const bool on = lane < nn;
    const int i = on ? lane / n : 0, j = on ? lane % n : 0;
    float c = on ? (m[2 * n + lane] * r) * scale[2] + base[2 * n + lane] : 0.f;
    float mx = -INFINITY;
    for (int k = 0; k < n; k++) mx = fmaxf(mx, __shfl_sync(0xffffffffu, c, i * n + k));
    c = on ? expf(c - mx) : 0.f;
    float s = 0.f;
    for (int k = 0; k < n; k++) s += __shfl_sync(0xffffffffu, c, i * n + k);
    c = c / s + eps;
    const int rounds = iters > 0 ? iters : 1;
    for (int it = 0; it < rounds; it++) {
        if (it > 0) {
            float rs = 0.f;
            for (int k = 0; k < n; k++) rs += __shfl_sync(0xffffffffu, c, i * n + k);
            c /= rs + eps;
        }
        float cs = 0.f;
        for (int k = 0; k < n; k++) cs += __shfl_sync(0xffffffffu, c, k * n + j);
        c /= cs + eps;
    }
    if (on) comb[(size_t)t * nn + lane] = c;
}

__device__ __forceinline__ void hc_mix_warp(const float* m, float r, const float* base, const float* scale,
                                            float* pre, float* post, float* comb, int n, int iters,
                                            float eps, int t) {
    if (n == 4)
        hc_mix_warp_n<4>(m, r, base, scale, pre, post, comb, n, iters, eps, t);
    else
        hc_mix_warp_n<0>(m, r, base, scale, pre, post, comb, n, iters, eps, t);
}

// One warp per token: the mix of its raw rows mu (fn·x) and stream rms (hc_mix_warp).
extern "C" __global__ void hc_mix(const float* mu, const float* rinv, const float* base,
                                  const float* scale, float* pre, float* post, float* comb, int n,
                                  int iters, float eps, int T) {
    pdl_entry();
    const int t = blockIdx.x;
    hc_mix_warp(mu + (size_t)t * (2 + n) * n, rinv[t], base, scale, pre, post, comb, n, iters, eps, t);
}

#define HC_MAX_ROWS 32  // (2 + n) · n mix rows (n <= 4)
#define HC_THREADS 256
#define HC_COLS 64      // columns per block: one thread per (stream, column)
#define HC_PRE_COLS 4096  // columns whose streams hc_boundary's tail loads before the mix

struct HcArgs {
    float* x;              // [T, n, d] streams
    const float* f;        // [T, d] output of the block that just ran, or null (no post step)
    const float* eout;     // [T, k, d] routed experts' outputs still to add into f, or null
    const float* rw;       // [T, k] their routing weights (unused with rw_inside)
    const float* fn;       // [(2 + n) n, n d] f32 mix weights of the next block
    const float* base;
    const float* scale;
    const float* norm_w;   // [d] RMS-norm weight of the next block's input
    float* partial;        // [T, S, rows + 1]
    float* pre;            // [T, n]
    float* post;           // [T, n]: read (previous block's) then written (next block's)
    float* comb;           // [T, n, n]: likewise
    float* h;              // [T, d] the next block's normalized input
    unsigned* count;       // [T] blocks done per token; zero between launches
    float* mu;             // [T, (2 + n) n] or null: where the mix rows go when the Sinkhorn
    float* rinv;           // [T]                     is left to hc_mix (post and comb only)
    int32_t n, d, iters, S, k, rw_inside;
    float hc_eps, norm_eps;
};
static_assert(sizeof(HcArgs) == 160, "HcArgs: the layout of ops::HcArgs");

// Stream i's value of column j of token t after the post-mix of the block that ran
// (x <- post·f + combᵀ·x, f plus the routed experts' weighted outputs when eout is given), or
// its current value when there is no post step. Reads every stream's old value of column j.
__device__ __forceinline__ float hc_post_cell(const HcArgs& a, const float* x, int t, int i, int j) {
    const int n = a.n, d = a.d;
    if (!a.f) return x[(size_t)i * d + j];
    float xs[4];
#pragma unroll
    for (int k = 0; k < 4; k++) xs[k] = k < n ? x[(size_t)k * d + j] : 0.f;
    float fv = a.f[(size_t)t * d + j];
    if (a.eout) {
        for (int q = 0; q < a.k; q++) {
            const float wq = a.rw_inside ? 1.f : a.rw[(size_t)t * a.k + q];
            fv = fmaf(wq, a.eout[((size_t)t * a.k + q) * d + j], fv);
        }
    }
    const float* c = a.comb + (size_t)t * n * n;
    float o = a.post[t * n + i] * fv;
#pragma unroll
    for (int k = 0; k < 4; k++)
        if (k < n) o = fmaf(c[k * n + i], xs[k], o);
    return o;
}

// Four columns of the collapse Σ_k pre[k]·x_k (k < n <= 4, in k order).
__device__ __forceinline__ float4 hc_collapse4(const float4 (&xs)[4], const float* pre, int n) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (k >= n) break;
        o.x = fmaf(pre[k], xs[k].x, o.x);
        o.y = fmaf(pre[k], xs[k].y, o.y);
        o.z = fmaf(pre[k], xs[k].z, o.z);
        o.w = fmaf(pre[k], xs[k].w, o.w);
    }
    return o;
}
// ss plus the four columns' squares (x, y, z, w in order).
__device__ __forceinline__ float hc_sumsq4(float4 o, float ss) {
    return fmaf(o.w, o.w, fmaf(o.z, o.z, fmaf(o.y, o.y, fmaf(o.x, o.x, ss))));
}
// The four columns RMS-normed (rn) and weighted (g).
__device__ __forceinline__ float4 hc_scale4(float4 o, float rn, float4 g) {
    return make_float4(o.x * rn * g.x, o.y * rn * g.y, o.z * rn * g.z, o.w * rn * g.w);
}

// A hyper-connection boundary of a few tokens (decode) in one launch. Block (s, t) owns HC_COLS
// columns of all n streams of token t, one thread per (stream, column):
// - the routed experts' weighted outputs added into f (as moe_combine), when given;
// - hc_post of the block that ran (x <- post·f + combᵀ·x), when f is given;
// - this slice's part of the next block's mix rows (fn·x) and of the stream sum of squares.
// The last block of token t to finish (a counter) sums the slices' parts (in an order fixed by
// the slice count alone, whichever block is last), runs the
// Sinkhorn mix (pre, post, comb), and writes the collapse with pre, RMS-normed, into h.
extern "C" __global__ void __launch_bounds__(HC_THREADS) hc_boundary(HcArgs a) {
    pdl_launch();
    __shared__ float red[HC_THREADS / 32][32];
    __shared__ float mix[HC_MAX_ROWS + 1];
    __shared__ float sh[32];
    __shared__ float pre_s[4];
    __shared__ int is_last;
    const int sl = blockIdx.x, t = blockIdx.y;
    const int n = a.n, d = a.d, rows = (2 + n) * n;
    const int i = threadIdx.x / HC_COLS, j = sl * HC_COLS + threadIdx.x % HC_COLS;
    const bool on = i < n && j < d;
    const size_t col = (size_t)i * d + j;
    // The mix weights do not depend on earlier kernels: they load while those finish.
    float w[HC_MAX_ROWS - 1];
#pragma unroll
    for (int r = 0; r < HC_MAX_ROWS - 1; r++)
        w[r] = (on && r < rows) ? __ldg(a.fn + (size_t)r * n * d + col) : 0.f;
    pdl_wait();
    float* x = a.x + (size_t)t * n * d;
    const float v = on ? hc_post_cell(a, x, t, i, j) : 0.f;
    if (a.f) {
        __syncthreads();  // all old values read before any is replaced
        if (on) x[col] = v;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Lane r of each warp ends with the warp's sum of mix row r (row HC_MAX_ROWS - 1 holds the
    // sum of squares), one transposed reduction for all rows.
    float p[32];
#pragma unroll
    for (int r = 0; r < HC_MAX_ROWS - 1; r++) p[r] = (on && r < rows) ? w[r] * v : 0.f;
    p[HC_MAX_ROWS - 1] = v * v;
    red[warp][lane] = warp_sum_transposed(p);
    __syncthreads();
    float* tp = a.partial + (size_t)t * a.S * (rows + 1);
    if (threadIdx.x < 32) {
        const int r = threadIdx.x;
        float q = 0.f;
        for (int k = 0; k < HC_THREADS / 32; k++) q += red[k][r];
        const int slot = r == HC_MAX_ROWS - 1 ? rows : r;
        if (r < rows || r == HC_MAX_ROWS - 1) tp[(size_t)sl * (rows + 1) + slot] = q;
    }
#ifdef HC_ONE_FENCE
    // (A measurement for tools/gpu/hc_tail.cu: the cooperative-groups grid-sync pattern. The
    // block barrier orders every thread's writes before thread 0's release fence, which is
    // cumulative; thread 0's acquire fence after seeing the last count orders the last block's
    // reads after the barrier below. One fence per block instead of one per thread.)
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        is_last = atomicInc(a.count + t, gridDim.x - 1) == gridDim.x - 1;
        if (is_last) asm volatile("fence.acq_rel.gpu;" ::: "memory");
    }
    __syncthreads();
    if (!is_last) return;
#else
    __threadfence();  // every thread's streams and parts before the count
    __syncthreads();
    // atomicInc wraps the count back to zero on the last block: ready for the next launch.
    if (threadIdx.x == 0) is_last = atomicInc(a.count + t, gridDim.x - 1) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    // The last block: every other block's parts and streams are visible (read past L1).
    __threadfence();
#endif
    // The streams of the first HC_PRE_COLS columns load while the mix is found: float4 u of
    // each stream (columns 4 (u·HC_THREADS + tid)...; the host keeps d % 4 == 0, n <= 4).
    constexpr int U = HC_PRE_COLS / (4 * HC_THREADS);
    float4 xv[U][4];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = 4 * (u * HC_THREADS + threadIdx.x);
#pragma unroll
        for (int k = 0; k < 4; k++)
            xv[u][k] = (c < d && k < n) ? __ldcg((const float4*)(x + (size_t)k * d + c))
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float4 g4[U];  // the norm weights too
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = 4 * (u * HC_THREADS + threadIdx.x);
        g4[u] = c < d ? __ldg((const float4*)(a.norm_w + c)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // Mix row r (r <= rows) summed over the slices by warp r % 8, each lane a strided run of
    // slices: every load of the warp's rows issued before any sum.
    constexpr int RW = (HC_MAX_ROWS + HC_THREADS / 32) / (HC_THREADS / 32);  // rows per warp
    constexpr int SL = 2;  // slices per lane in one pass (64 slices for d = 4096)
    float q[RW] = {};
    for (int k0 = 0; k0 < a.S; k0 += 32 * SL) {
        float v[RW][SL];
#pragma unroll
        for (int m = 0; m < RW; m++)
#pragma unroll
            for (int u = 0; u < SL; u++) {
                const int r = warp + m * (HC_THREADS / 32), k = k0 + lane + 32 * u;
                v[m][u] = (r <= rows && k < a.S) ? __ldcg(tp + (size_t)k * (rows + 1) + r) : 0.f;
            }
#pragma unroll
        for (int m = 0; m < RW; m++)
#pragma unroll
            for (int u = 0; u < SL; u++) q[m] += v[m][u];
    }
#pragma unroll
    for (int m = 0; m < RW; m++) {
        const int r = warp + m * (HC_THREADS / 32);
        const float sum = warp_sum(q[m]);
        if (lane == 0 && r <= rows) mix[r] = sum;
    }
    __syncthreads();
    if (warp == 0) {
        const float r = 1.0f / sqrtf(mix[rows] / (float)(n * d) + a.norm_eps);
        if (a.mu) {
            // The Sinkhorn (post and comb, read at the next boundary) is hc_mix's, on a side
            // stream: here only pre, by the same formula.
            if (lane < rows) a.mu[(size_t)t * rows + lane] = mix[lane];
            if (lane == 0) a.rinv[t] = r;
            if (lane < n) pre_s[lane] = hc_pre_value(mix[lane], r, a.scale[0], a.base[lane], a.hc_eps);
        } else {
            hc_mix_warp(mix, r, a.base, a.scale, a.pre, a.post, a.comb, n, a.iters, a.hc_eps, t);
            if (lane < n) pre_s[lane] = a.pre[t * n + lane];
        }
    }
    __syncthreads();
    float* h = a.h + (size_t)t * d;
    float ss = 0.f;
    float4 o4[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        o4[u] = hc_collapse4(xv[u], pre_s, n);
        if (4 * (u * HC_THREADS + threadIdx.x) < d) ss = hc_sumsq4(o4[u], ss);
    }
    // Columns [HC_PRE_COLS, 2·HC_PRE_COLS) (wider models: Pro's 7168), loaded now with every
    // load in flight before any is used, and kept in registers until the norm (one column at
    // a time, each load waited for behind the store before it, they took ~10 µs of each of
    // Pro's boundaries on an H200). Columns past those (no release model) go through h.
    float4 ot[U];
    if (d > HC_PRE_COLS) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = HC_PRE_COLS + 4 * (u * HC_THREADS + threadIdx.x);
#pragma unroll
            for (int k = 0; k < 4; k++)
                xv[u][k] = (c < d && k < n) ? __ldcg((const float4*)(x + (size_t)k * d + c))
                                            : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            ot[u] = hc_collapse4(xv[u], pre_s, n);
            if (HC_PRE_COLS + 4 * (u * HC_THREADS + threadIdx.x) < d) ss = hc_sumsq4(ot[u], ss);
        }
    }
    for (int c = 2 * HC_PRE_COLS + threadIdx.x; c < d; c += HC_THREADS) {
        float o = 0.f;
        for (int k = 0; k < n; k++) o = fmaf(pre_s[k], __ldcg(x + (size_t)k * d + c), o);
        h[c] = o;
        ss = fmaf(o, o, ss);
    }
    const float rn = 1.0f / sqrtf(block_sum(ss, sh) / (float)d + a.norm_eps);
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = 4 * (u * HC_THREADS + threadIdx.x);
        if (c < d) *(float4*)(h + c) = hc_scale4(o4[u], rn, g4[u]);
    }
    if (d > HC_PRE_COLS) {
        float4 gt[U];  // the norm weights of those columns, all loaded before any store
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = HC_PRE_COLS + 4 * (u * HC_THREADS + threadIdx.x);
            gt[u] = c < d ? __ldg((const float4*)(a.norm_w + c)) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = HC_PRE_COLS + 4 * (u * HC_THREADS + threadIdx.x);
            if (c < d) *(float4*)(h + c) = hc_scale4(ot[u], rn, gt[u]);
        }
    }
    for (int c = 2 * HC_PRE_COLS + threadIdx.x; c < d; c += HC_THREADS) h[c] = h[c] * rn * a.norm_w[c];
}

// Phase stamps of hc_boundary_cluster's first thread (tools/gpu/hc_tail.cu defines HC_STAMPS):
// the SM clock once `dep` is ready.
#define HC_NSTAMPS 10
#ifdef HC_STAMPS
__device__ long long hc_stamps[HC_NSTAMPS];
#define HC_STAMP(k, dep)                                                                  \
    if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) {                         \
        const int z_ = (dep) == 1234.5f;                                                  \
        long long c_;                                                                     \
        asm volatile("mov.u64 %0, %%clock64;" : "=l"(c_) : "r"(z_));                       \
        hc_stamps[k] = c_;                                                                \
    }
#else
#define HC_STAMP(k, dep)
#endif

#define HC_CLUSTER 16        // blocks per token of hc_boundary_cluster (ops::HC_CLUSTER)
#define HC_CL_THREADS 1024   // at most: one per stream and column of the block's d / 16 columns
#define HC_CL_ROWS 24        // (2 + n) · n mix rows, n <= 4

// hc_boundary with one thread-block cluster per token instead of a last block: block `rank`
// owns columns [rank·d/C, (rank+1)·d/C) of all streams, one thread per (stream, column), and
// the cluster's blocks trade their partial sums through distributed shared memory, so the
// token's mix rows, `pre` and the collapse's norm come out of two cluster barriers instead of
// a counter, a fence and one block re-reading every stream. `pre` needs no Sinkhorn: rank 0
// runs it (for `post` and `comb`, read at the next boundary) on a warp of its own beside the
// collapse. Sums in a fixed order: warps, then ranks, ascending.
extern "C" __global__ void __launch_bounds__(HC_CL_THREADS, 1) hc_boundary_cluster(HcArgs a) {
    pdl_launch();
    __shared__ float red[HC_CL_THREADS / 32][32];
    __shared__ float part[32];  // this block's sums of the mix rows; 31: the sum of squares
    __shared__ float mix[32];
    __shared__ float xnew[HC_CL_THREADS];
    __shared__ float ssw[HC_CL_THREADS / 32];
    __shared__ float ss_part, mix_r;
    __shared__ float pre_s[4];
    HC_STAMP(0, 0.f);
    const unsigned rank = cluster_rank();
    const int n = a.n, d = a.d, rows = (2 + n) * n, C = gridDim.x, cols = d / C;
    const int t = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nw = blockDim.x >> 5, cw = (cols + 31) >> 5;  // warps, collapse warps
    const int i = tid / cols, j = (int)rank * cols + tid % cols;
    const bool on = i < n;
    const size_t col = (size_t)i * d + j;
    float w[HC_CL_ROWS];
#pragma unroll
    for (int r = 0; r < HC_CL_ROWS; r++)
        w[r] = (on && r < rows) ? __ldg(a.fn + (size_t)r * n * d + col) : 0.f;
    const float g = tid < cols ? __ldg(a.norm_w + j) : 0.f;
    HC_STAMP(1, w[HC_CL_ROWS - 1] + g);
    pdl_wait();
    HC_STAMP(2, 0.f);
    float* x = a.x + (size_t)t * n * d;
    const float v = on ? hc_post_cell(a, x, t, i, j) : 0.f;
    xnew[tid] = v;
    HC_STAMP(3, v);
    float p[32];
#pragma unroll
    for (int r = 0; r < 31; r++) p[r] = r < HC_CL_ROWS ? w[r] * v : 0.f;
    p[31] = v * v;
    red[warp][lane] = warp_sum_transposed(p);
    __syncthreads();
    if (warp == 0) {
        float q = 0.f;
        for (int k = 0; k < nw; k++) q += red[k][lane];
        part[lane] = q;
    }
    HC_STAMP(4, part[0]);
    cluster_arrive();
    cluster_wait();  // 1: every block's parts; every old stream value read
    HC_STAMP(5, 0.f);
    if (a.f && on) x[col] = v;
    if (warp == 0) {
        const float m = cluster_sum<HC_CLUSTER>(&part[lane], C);
        mix[lane] = m;
        const float rr = 1.0f / sqrtf(__shfl_sync(0xffffffffu, m, 31) / (float)(n * d) + a.norm_eps);
        if (lane < n) pre_s[lane] = hc_pre_value(m, rr, a.scale[0], a.base[lane], a.hc_eps);
        if (lane == 0) mix_r = rr;
        if (a.mu && rank == 0) {  // the Sinkhorn left to hc_mix (see hc_boundary)
            if (lane < rows) a.mu[(size_t)t * rows + lane] = m;
            if (lane == 0) a.rinv[t] = rr;
        }
    }
    __syncthreads();
    HC_STAMP(6, 0.f);
    // The Sinkhorn's warp: rank 0's first warp past the collapse (after it, in one-warp blocks;
    // none when hc_mix runs it).
    const int skw = a.mu ? -2 : nw > cw ? cw : -1;
    if (rank == 0 && warp == skw) {
        cluster_arrive();  // 2: it gives the others nothing
        hc_mix_warp(mix, mix_r, a.base, a.scale, a.pre, a.post, a.comb, n, a.iters, a.hc_eps, t);
        cluster_wait();
    } else {
        float o = 0.f;
        if (warp < cw) {
            if (tid < cols) {
#pragma unroll
                for (int k = 0; k < 4; k++)
                    if (k < n) o = fmaf(pre_s[k], xnew[k * cols + tid], o);
            }
            const float s = warp_sum(o * o);
            if (lane == 0) ssw[warp] = s;
            asm volatile("bar.sync 1, %0;" ::"r"(32 * cw) : "memory");
            if (tid == 0) {
                float q = 0.f;
                for (int k = 0; k < cw; k++) q += ssw[k];
                ss_part = q;
            }
        }
        cluster_arrive();
        cluster_wait();  // 2: every block's sum of squares of the collapse
        HC_STAMP(7, 0.f);
        if (tid < cols) {
            const float ss = cluster_sum<HC_CLUSTER>(&ss_part, C);
            const float rn = 1.0f / sqrtf(ss / (float)d + a.norm_eps);
            a.h[(size_t)t * d + j] = o * rn * g;
            HC_STAMP(8, rn);
        }
    }
    if (skw == -1 && rank == 0 && warp == 0)
        hc_mix_warp(mix, mix_r, a.base, a.scale, a.pre, a.post, a.comb, n, a.iters, a.hc_eps, t);
    cluster_arrive();
    cluster_wait();  // 3: no block leaves while another may still read its shared memory
    HC_STAMP(9, 0.f);
}

// h[t, d] = sum_i pre[t, i] * x[t, i, d].
extern "C" __global__ void hc_collapse(const float* x, const float* pre, float* h, int n, int d, int T) {
    pdl_entry();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    int t = idx / d, k = idx % d;
    float o = 0.f;
    for (int i = 0; i < n; i++) o = fmaf(pre[t * n + i], x[((size_t)t * n + i) * d + k], o);
    h[idx] = o;
}

// x[t, k, :] = post[t, k] * f[t, :] + sum_j comb[t, j, k] * x[t, j, :], in place (n <= 16).
// NT > 0: n fixed at compile time (the release models' 4), so xs and out stay in registers;
// NT = 0 takes any n <= 16 with rolled loops (fewer registers for the kernel as a whole).
template <int NT>
__device__ __forceinline__ void hc_post_n(const float* f, float* x, const float* post, const float* comb,
                                          int n_rt, int d, size_t idx) {
    constexpr int NM = NT > 0 ? NT : 16;
    const int n = NT > 0 ? NT : n_rt;
    int t = idx / d, e = idx % d;
    float xs[NM], out[NM];
#pragma unroll(NT > 0 ? NM : 1)
    for (int j = 0; j < n; j++) xs[j] = x[((size_t)t * n + j) * d + e];
    float fv = f[idx];
    const float* c = comb + (size_t)t * n * n;
#pragma unroll(NT > 0 ? NM : 1)
    for (int k = 0; k < n; k++) {
        float o = post[t * n + k] * fv;
#pragma unroll(NT > 0 ? NM : 1)
        for (int j = 0; j < n; j++) o = fmaf(c[j * n + k], xs[j], o);
        out[k] = o;
    }
#pragma unroll(NT > 0 ? NM : 1)
    for (int k = 0; k < n; k++) x[((size_t)t * n + k) * d + e] = out[k];
}

extern "C" __global__ void hc_post(const float* f, float* x, const float* post, const float* comb,
                                   int n, int d, int T) {
    pdl_entry();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    if (n == 4)
        hc_post_n<4>(f, x, post, comb, n, d, idx);
    else
        hc_post_n<0>(f, x, post, comb, n, d, idx);
}

// The hyper-head: y[t, :] = sum_i (sigmoid(mu_i * r * scale + base_i) + eps) * x[t, i, :].
extern "C" __global__ void hc_head(const float* x, const float* mu, const float* rinv,
                                   const float* base, const float* scale, float* y, int n, int d,
                                   float eps, int T) {
    pdl_entry();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    int t = idx / d, k = idx % d;
    float o = 0.f;
    for (int i = 0; i < n; i++) {
        float p = sigmoidf_((mu[t * n + i] * rinv[t]) * scale[0] + base[i]) + eps;
        o = fmaf(p, x[((size_t)t * n + i) * d + k], o);
    }
    y[idx] = o;
}

// g <- silu(min(g, lim)) * clamp(u, -lim, lim) (no clamp when lim is NaN), then * rw[row]
// when given.
extern "C" __global__ void swiglu(float* g, const float* u, int width, size_t total, float lim,
                                  const float* rw) {
    pdl_entry();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    float v = swiglu_clamped(g[idx], u[idx], lim);
    if (rw) v *= rw[idx / width];
    g[idx] = v;
}

// dst[i, :] = src[i, :] for rows of `width` floats with their own strides.
extern "C" __global__ void copy_rows(const float* src, int lds, float* dst, int ldd, int width, int rows) {
    pdl_entry();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * width) return;
    int i = idx / width, k = idx % width;
    dst[(size_t)i * ldd + k] = src[(size_t)i * lds + k];
}

// Writes the new K=V rows of positions >= max(pos0, pos0 + T - win) into the window ring.
extern "C" __global__ void ring_store(const float* kv, float* ring, int dh, int win, int pos0, int T) {
    pdl_entry();
    int t = blockIdx.x;
    if (t < T - win) return;
    int slot = (pos0 + t) % win;
    for (int k = threadIdx.x; k < dh; k += blockDim.x) ring[(size_t)slot * dh + k] = kv[(size_t)t * dh + k];
}

// p[i] = lo + (hi - lo) * u(i), u a hash of (seed, i) in [0, 1): synthetic cache contents.
extern "C" __global__ void fill_uniform(float* p, size_t n, unsigned long long seed, float lo, float hi) {
    pdl_entry();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = lo + (hi - lo) * (float)(z >> 40) * (1.0f / 16777216.0f);
}
