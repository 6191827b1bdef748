// Attention of new queries over the sliding window (cached ring + this call's rows) and the
// compressed entries (all visible ones, or the indexer's selection), with per-head sinks;
// the compressors' window pooling; the lightning indexer's scores and exact top-k.
#include "common.cuh"
#include <cub/block/block_scan.cuh>

struct AttnArgs {
    const float* q;        // [T, H, dh]
    const float* kv_new;   // [T, dh]
    const float* ring;     // [win, dh], positions < pos0
    const float* entries;  // [*, dh]
    const int* sel;        // [T, sel_cap] selected entries (CSA) or null (all visible)
    const int* nsel;       // [T]
    const float* sinks;    // [H]
    float* out;            // [T, H, dh]
    int32_t T, H, dh, win, pos0, ratio, n_entries, sel_cap;
    float scale;
};

__device__ __forceinline__ const float* attn_key(const AttnArgs& a, int t, int p, int lo, int nwin, int j) {
    if (j < nwin) {
        int qp = lo + j;
        return qp >= a.pos0 ? a.kv_new + (size_t)(qp - a.pos0) * a.dh
                            : a.ring + (size_t)(qp % a.win) * a.dh;
    }
    int e = j - nwin;
    if (a.sel) e = a.sel[(size_t)t * a.sel_cap + e];
    return a.entries + (size_t)e * a.dh;
}

#define ATT_KEYS 32       // keys staged per step (one per lane for the softmax)
#define ATT_HEADS 8       // heads per block (one per warp)
#define ATT_DMAX 512      // largest head_dim the registers hold

// Flash-decoding attention, split over key chunks. Block (t, split, head group): the keys of
// token t (window, then compressed/selected entries) are staged 32 at a time in shared memory
// and shared by the block's 8 heads (one warp each; K=V is one shared head). Each warp keeps an
// online softmax (max, sum, output) and writes its partial for `attn_combine`.
extern "C" __global__ void __launch_bounds__(256) attention_partial(AttnArgs a, float* part, int nsplit) {
    extern __shared__ float keys[];  // [ATT_KEYS, dh]
    const int t = blockIdx.x, split = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.z * ATT_HEADS + warp;
    const int p = a.pos0 + t;
    const int lo = max(0, p - a.win + 1);
    const int nwin = p - lo + 1;
    int ncomp = 0;
    if (a.ratio > 0) ncomp = a.sel ? a.nsel[t] : min((p + 1) / a.ratio, a.n_entries);
    const int nk = nwin + ncomp;
    const int nchunks = (nk + ATT_KEYS - 1) / ATT_KEYS;
    const int dh = a.dh;
    constexpr int PER = ATT_DMAX / 32;
    float q[PER], acc[PER];
    const bool head_ok = h < a.H;
    const float* qp = a.q + ((size_t)t * a.H + (head_ok ? h : 0)) * dh;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int c = lane + 32 * i;
        q[i] = (c < dh) ? qp[c] * a.scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int ch = split; ch < nchunks; ch += nsplit) {
        const int j0 = ch * ATT_KEYS;
        const int nj = min(ATT_KEYS, nk - j0);
        __syncthreads();
        for (int r = warp; r < nj; r += 8) {
            const float* k = attn_key(a, t, p, lo, nwin, j0 + r);
            for (int c = lane * 4; c < dh; c += 128) *(float4*)(keys + r * dh + c) = *(const float4*)(k + c);
        }
        __syncthreads();
        // Lane j ends up holding the score of key j.
        float sj = -INFINITY;
        for (int j = 0; j < nj; j++) {
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                int c = lane + 32 * i;
                if (c < dh) d = fmaf(q[i], keys[j * dh + c], d);
            }
            d = warp_sum(d);
            if (lane == j) sj = d;
        }
        float mc = warp_max(sj);
        float mn = fmaxf(m, mc);
        float pj = (lane < nj) ? expf(sj - mn) : 0.f;
        float corr = expf(m - mn);  // 0 on the first chunk (m = -inf)
        l = l * corr + warp_sum(pj);
#pragma unroll
        for (int i = 0; i < PER; i++) acc[i] *= corr;
        for (int j = 0; j < nj; j++) {
            float pb = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
            for (int i = 0; i < PER; i++) {
                int c = lane + 32 * i;
                if (c < dh) acc[i] = fmaf(pb, keys[j * dh + c], acc[i]);
            }
        }
        m = mn;
    }
    if (!head_ok) return;
    float* out = part + (((size_t)t * nsplit + split) * a.H + h) * (dh + 2);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int c = lane + 32 * i;
        if (c < dh) out[c] = acc[i];
    }
    if (lane == 0) { out[dh] = m; out[dh + 1] = l; }
}

// Merges the splits of one (token, head) with the head's sink: out = sum acc / (sum l + sink).
extern "C" __global__ void attn_combine(const float* part, const float* sinks, float* out, int H, int dh, int nsplit) {
    const int t = blockIdx.x, h = blockIdx.y;
    const float* base = part + ((size_t)t * nsplit * H + h) * (dh + 2);
    const size_t stride = (size_t)H * (dh + 2);
    const float sink = sinks[h];
    float M = sink;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, base[s * stride + dh]);
    float den = expf(sink - M);
    for (int s = 0; s < nsplit; s++) den += base[s * stride + dh + 1] * expf(base[s * stride + dh] - M);
    const float inv = 1.0f / den;
    float* o = out + ((size_t)t * H + h) * dh;
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < nsplit; s++) v += base[s * stride + c] * expf(base[s * stride + dh] - M);
        o[c] = v * inv;
    }
}

// Softmax pooling of complete compressor windows w0..w0+nw-1 into entries out[w - w0]. Rows of
// ext (kv, gate; width = (overlap ? 2 : 1) * d) hold positions ext_start... Slot s of a window
// adds ape[s, :] to the gate. With overlap, the previous window's first halves join (w > 0).
extern "C" __global__ void comp_pool(const float* kv, const float* gate, const float* ape, int width,
                                     int d, int m, int overlap, int ext_start, int w0, float* out) {
    const int w = w0 + blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    const int half = overlap ? d : 0;
    const bool prev = overlap && w > 0;
    // Slot i: the previous window's A-half (i < m, with overlap) or this window's (B-)half.
    auto slot = [&](int i, float& lg, float& v) {
        const bool a_half = prev && i < m;
        const int s = a_half ? i : (prev ? i - m : i);
        const size_t row = (size_t)((a_half ? w - 1 : w) * m + s - ext_start);
        const int ch = a_half ? c : half + c;
        lg = gate[row * width + ch] + ape[(size_t)s * width + ch];
        v = kv[row * width + ch];
    };
    const int n = prev ? 2 * m : m;
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) { float g, v; slot(i, g, v); mx = fmaxf(mx, g); }
    float den = 0.f, num = 0.f;
    for (int i = 0; i < n; i++) {
        float g, v;
        slot(i, g, v);
        float p = expf(g - mx);
        den += p;
        num += p * v;
    }
    out[(size_t)blockIdx.x * d + c] = num / den;
}

// scores[t, e] = sum_h hw[t, h] * wscale * relu(q[t, h] . k[e]) * dscale for the entries
// visible to token t (e < min((pos0 + t + 1) / m, n)); -inf beyond. q rows live in shared
// memory (padded against bank conflicts); one warp per entry, lanes over heads.
extern "C" __global__ void indexer_scores(const float* q, const float* hw, const float* keys, int hi,
                                          int di, int pos0, int m, int n, float wscale, float dscale,
                                          float* scores, int ld_scores) {
    extern __shared__ float sq[];  // [hi, di + 1]
    const int t = blockIdx.y;
    const int stride = di + 1;
    for (int i = threadIdx.x; i < hi * di; i += blockDim.x)
        sq[(i / di) * stride + i % di] = q[(size_t)t * hi * di + i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int valid = min((pos0 + t + 1) / m, n);
    const int e = blockIdx.x * nw + warp;
    if (e >= n) return;
    float score = -INFINITY;
    if (e < valid) {
        const float* k = keys + (size_t)e * di;
        float part = 0.f;
        for (int h = lane; h < hi; h += 32) {
            const float* qh = sq + h * stride;
            float dot = 0.f;
            for (int c = 0; c < di; c++) dot = fmaf(qh[c], __ldg(k + c), dot);
            part += hw[(size_t)t * hi + h] * wscale * fmaxf(dot, 0.f) * dscale;
        }
        score = warp_sum(part);
    }
    if (lane == 0) scores[(size_t)t * ld_scores + e] = score;
}

__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TOPK_THREADS 1024

// Per token: the k best-scoring visible entries (ties -> lower index), ascending, into
// sel[t, :], their count into nsel[t]. Exact radix select on the scores' order keys.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_select(const float* scores, int ld_scores, int pos0, int m, int n, int k, int* sel, int sel_cap, int* nsel) {
    typedef cub::BlockScan<int, TOPK_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need;
    const int t = blockIdx.x;
    const float* sc = scores + (size_t)t * ld_scores;
    const int valid = min((pos0 + t + 1) / m, n);
    int* out = sel + (size_t)t * sel_cap;
    if (valid <= k) {
        for (int i = threadIdx.x; i < valid; i += blockDim.x) out[i] = i;
        if (threadIdx.x == 0) nsel[t] = valid;
        return;
    }
    uint32_t prefix = 0, mask = 0;
    int need = k;  // how many of the keys matching `prefix` are still to be taken
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < valid; i += blockDim.x) {
            uint32_t u = order_key(sc[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xff], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, dsel = 0;
            for (int dg = 255; dg >= 0; dg--) {
                if (cum + hist[dg] >= need) { dsel = dg; break; }
                cum += hist[dg];
            }
            s_prefix = prefix | ((uint32_t)dsel << shift);
            s_need = need - cum;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    // prefix is the k-th largest key; take every larger key and the first `need` equal ones.
    int taken = 0, eq_seen = 0;
    for (int base = 0; base < valid; base += blockDim.x) {
        int i = base + threadIdx.x;
        uint32_t u = i < valid ? order_key(sc[i]) : 0;
        int gt = (i < valid && u > prefix) ? 1 : 0;
        int eq = (i < valid && u == prefix) ? 1 : 0;
        int eq_before, eq_total;
        Scan(scan_tmp).ExclusiveSum(eq, eq_before, eq_total);
        __syncthreads();
        int take = gt | (eq && eq_seen + eq_before < need);
        int pos, total;
        Scan(scan_tmp).ExclusiveSum(take, pos, total);
        __syncthreads();
        if (take) out[taken + pos] = i;
        taken += total;
        eq_seen += eq_total;
    }
    if (threadIdx.x == 0) nsel[t] = k;
}
