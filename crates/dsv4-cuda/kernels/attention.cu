// Attention of new queries over the sliding window (cached ring + this call's rows) and the
// compressed entries (all visible ones, or the indexer's selection), with per-head sinks;
// the compressors' window pooling; the lightning indexer's scores and exact top-k.
#include "quant.cuh"

// One sequence's caches in one layer, for kernels where every token of the batch is its own
// sequence (decode steps: the per-token table lets one launch, and a CUDA graph, serve them
// all). Compressor tails are rings of 2·ratio rows: position p lives in row p % (2·ratio).
struct SeqLayer {
    float* ring;                          // [win, dh]
    float* c_entries;                     // main compressor entries
    float* c_tail_kv; float* c_tail_gate;
    float* i_entries;                     // indexer compressor entries
    float* i_tail_kv; float* i_tail_gate;
};

struct AttnArgs {
    const float* q;        // [T, H, dh]
    const float* kv_new;   // [T, dh]
    const float* ring;     // [win, dh], positions < pos0
    const float* entries;  // [*, dh]
    const int* sel;        // [T, sel_cap] selected entries (CSA) or null (all visible)
    const int* nsel;       // [T]
    const float* sinks;    // [H]
    float* out;            // [T, H, dh]
    const SeqLayer* seqs;  // per-token caches (decode steps), or null: one sequence
    const int* positions;  // [T] with `seqs`
    int32_t T, H, dh, win, pos0, ratio, n_entries, sel_cap;
    float scale;
};
static_assert(sizeof(AttnArgs) == 120, "AttnArgs: the layout of ops::AttnArgs");

// The caches token t attends to: the call's sequence, or its own (`seqs`).
struct AttnView {
    const float* ring;
    const float* entries;
    const float* kv_new;  // the row of the sequence's first new token
    int pos0;             // that token's position
    int p;                // token t's position
};

__device__ __forceinline__ AttnView attn_view(const AttnArgs& a, int t) {
    AttnView v;
    if (a.seqs) {
        v.ring = a.seqs[t].ring;
        v.entries = a.seqs[t].c_entries;
        v.kv_new = a.kv_new + (size_t)t * a.dh;
        v.pos0 = v.p = a.positions[t];
    } else {
        v.ring = a.ring;
        v.entries = a.entries;
        v.kv_new = a.kv_new;
        v.pos0 = a.pos0;
        v.p = a.pos0 + t;
    }
    return v;
}

__device__ __forceinline__ const float* attn_key(const AttnArgs& a, const AttnView& v, int t, int lo, int nwin, int j) {
    if (j < nwin) {
        int qp = lo + j;
        return qp >= v.pos0 ? v.kv_new + (size_t)(qp - v.pos0) * a.dh
                            : v.ring + (size_t)(qp % a.win) * a.dh;
    }
    int e = j - nwin;
    if (a.sel) e = a.sel[(size_t)t * a.sel_cap + e];
    return v.entries + (size_t)e * a.dh;
}

// The keys token t attends to: its window [lo, p] (nwin rows) then its compressed entries
// (all visible ones, or its selection), nk in all.
struct AttnKeys {
    int lo, nwin, nk;
};
__device__ __forceinline__ AttnKeys attn_keys(const AttnArgs& a, const AttnView& v, int t) {
    AttnKeys k;
    k.lo = max(0, v.p - a.win + 1);
    k.nwin = v.p - k.lo + 1;
    int ncomp = 0;
    if (a.ratio > 0) ncomp = a.sel ? a.nsel[t] : min((v.p + 1) / a.ratio, a.n_entries);
    k.nk = k.nwin + ncomp;
    return k;
}

#define ATT_KEYS 32       // keys staged per step (one per lane for the softmax)
#define ATT_HEADS 8       // heads per block (one per warp)
#define ATT_DMAX 512      // largest head_dim the registers hold

// Flash-decoding attention, split over key chunks. Block (t, split, head group): the keys of
// token t (window, then compressed/selected entries) are staged 32 at a time in shared memory
// and shared by the block's 8 heads (one warp each; K=V is one shared head). Each warp keeps an
// online softmax (max, sum, output) and writes its partial for `attn_combine`.
// DH: the head dim at compile time (the release's 512: no per-channel bounds checks), or 0.
// b: the block (t, split, head group); keys: its [ATT_KEYS, dh] floats of shared memory; sync:
// how its 256 threads meet.
template <int DH, class Sync>
__device__ __forceinline__ void attention_partial_impl(const AttnArgs& a, float* part, int nsplit, VBlock b,
                                                       float* keys, Sync sync) {
    const int t = b.x, split = b.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = b.z * ATT_HEADS + warp;
    const AttnView view = attn_view(a, t);
    const AttnKeys ak = attn_keys(a, view, t);
    const int lo = ak.lo, nwin = ak.nwin, nk = ak.nk;
    const int nchunks = (nk + ATT_KEYS - 1) / ATT_KEYS;
    const int dh = DH ? DH : a.dh;
    constexpr int PER = ATT_DMAX / 32;
    const bool head_ok = h < a.H;
    if (split >= nchunks) {
        // No keys here (a short context under a context-sized split count): only the empty
        // max and sum, which give this split weight 0 in `attn_combine` (its output unread).
        if (head_ok && lane == 0) {
            float* out = part + (((size_t)t * nsplit + split) * a.H + h) * (dh + 2);
            out[dh] = -INFINITY;
            out[dh + 1] = 0.f;
        }
        return;
    }
    float q[PER], acc[PER];
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
        sync();
        // All of the chunk's rows in flight at once (a lane's copies do not wait on each other).
        for (int r = warp; r < nj; r += 8) {
            const float* k = attn_key(a, view, t, lo, nwin, j0 + r);
            for (int c = lane * 4; c < dh; c += 128) cp_async16(keys + r * dh + c, k + c);
        }
        cp_async_wait_all();
        sync();
        // Lane j ends up holding the score of key j: per-lane partial dots of all 32 keys,
        // then one transposed warp reduction.
        float part_dot[ATT_KEYS];
#pragma unroll
        for (int j = 0; j < ATT_KEYS; j++) {
            float d = 0.f;
            if (j < nj) {
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    int c = lane + 32 * i;
                    if (c < dh) d = fmaf(q[i], keys[j * dh + c], d);
                }
            }
            part_dot[j] = d;
        }
        float sj = warp_sum_transposed(part_dot);
        if (lane >= nj) sj = -INFINITY;
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

extern "C" __global__ void __launch_bounds__(256) attention_partial(AttnArgs a, float* part, int nsplit) {
    pdl_entry();
    extern __shared__ float keys[];  // [ATT_KEYS, dh]
    if (a.dh == ATT_DMAX) attention_partial_impl<ATT_DMAX>(a, part, nsplit, launch_block(), keys, BlockSync{});
    else attention_partial_impl<0>(a, part, nsplit, launch_block(), keys, BlockSync{});
}

// Merges the splits of one (token, head) with the head's sink: out = sum acc / (sum l + sink),
// then, with inv_freq, the inverse RoPE of the head's trailing 2·half channels at the token's
// position (as `rope` with inverse set: the same arithmetic). Block (t, h, column block): the
// split weights are computed once into shared memory, then each thread merges one column; a
// rotated pair (c, c ^ 1) sits in adjacent lanes.
#define COMBINE_MAX_SPLITS 256
// b: the block (t, h, column block) of `nthreads` threads; sync: how they meet. COH: the
// partials were written by other blocks of the same launch (read past L1).
template <bool COH, class Sync>
__device__ __forceinline__ void attn_combine_impl(const float* part, const float* sinks, float* out, int H, int dh,
                                                  int nsplit, const float* inv_freq, int half, float factor,
                                                  const int* positions, VBlock b, int nthreads, Sync sync) {
    __shared__ float wts[COMBINE_MAX_SPLITS];
    __shared__ float s_inv;
    const int t = b.x, h = b.y;
    const float* base = part + ((size_t)t * nsplit * H + h) * (dh + 2);
    const size_t stride = (size_t)H * (dh + 2);
    auto ld = [&](size_t i) { return COH ? __ldcg(base + i) : base[i]; };
    if (threadIdx.x < 32) {
        const float sink = sinks[h];
        float M = sink;
        for (int s = threadIdx.x; s < nsplit; s += 32) M = fmaxf(M, ld(s * stride + dh));
        M = warp_max(M);
        float den = 0.f;
        for (int s = threadIdx.x; s < nsplit; s += 32) {
            const float w = expf(ld(s * stride + dh) - M);
            wts[s] = w;
            den += ld(s * stride + dh + 1) * w;
        }
        den = warp_sum(den) + expf(sink - M);
        if (threadIdx.x == 0) s_inv = 1.0f / den;
    }
    sync();
    const int c = b.z * nthreads + threadIdx.x;
    float v = 0.f;
    if (c < dh) {
        // A split of weight 0 adds nothing (and an empty one's output was never written).
        for (int s = 0; s < nsplit; s++)
            if (wts[s] != 0.f) v += ld(s * stride + c) * wts[s];
        v *= s_inv;
    }
    const int tail = dh - 2 * half;
    if (inv_freq && b.z * nthreads + nthreads > tail) {  // block-uniform
        const float other = __shfl_xor_sync(0xffffffffu, v, 1);
        if (c >= tail && c < dh) {
            const int j = (c - tail) >> 1;
            const double a = (double)((float)positions[t] * inv_freq[j]);
            const float cs = (float)cos(a) * factor, sn = -((float)sin(a) * factor);
            v = ((c - tail) & 1) == 0 ? v * cs - other * sn : v * cs + other * sn;
        }
    }
    if (c < dh) out[((size_t)t * H + h) * dh + c] = v;
}

extern "C" __global__ void attn_combine(const float* part, const float* sinks, float* out, int H, int dh,
                                        int nsplit, const float* inv_freq, int half, float factor,
                                        const int* positions) {
    pdl_entry();
    attn_combine_impl<false>(part, sinks, out, H, dh, nsplit, inv_freq, half, factor, positions, launch_block(),
                             (int)blockDim.x, BlockSync{});
}

// Softmax pooling of complete compressor windows w0..w0+nw-1 into entries out[w - w0]. Rows of
// ext (kv, gate; width = (overlap ? 2 : 1) * d) hold positions ext_start... Slot s of a window
// adds ape[s, :] to the gate. With overlap, the previous window's first halves join (w > 0).
extern "C" __global__ void comp_pool(const float* kv, const float* gate, const float* ape, int width,
                                     int d, int m, int overlap, int ext_start, int w0, float* out) {
    pdl_entry();
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

// One decode step of a compressor for every token of the batch (each its own sequence, caches
// from `seqs`; `which` 0 = the main compressor, 1 = the indexer's). The token's projected kv /
// gate row joins its sequence's tail ring; when it completes window w the block pools the window
// (as comp_pool), RMS-normalizes the entry, rotates its trailing channels at position w·m and
// appends it: the whole of `compress` for one token, without host bookkeeping.
extern "C" __global__ void __launch_bounds__(256)
comp_decode(const float* kv, const float* gate, const float* ape, const float* norm_w, const SeqLayer* seqs,
            int which, const int* positions, int width, int d, int m, int overlap, float eps,
            const float* inv_freq, int half, float factor, int round_mode, float inv_sqrt) {
    pdl_entry();
    extern __shared__ __align__(16) float ent[];  // [d]
    __shared__ float sh[32];
    const int t = blockIdx.x;
    const int p = positions[t];
    const SeqLayer& sl = seqs[t];
    float* tkv = which ? sl.i_tail_kv : sl.c_tail_kv;
    float* tg = which ? sl.i_tail_gate : sl.c_tail_gate;
    float* entries = which ? sl.i_entries : sl.c_entries;
    const int ring = 2 * m;
    const size_t slot = (size_t)(p % ring) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        tkv[slot + c] = kv[(size_t)t * width + c];
        tg[slot + c] = gate[(size_t)t * width + c];
    }
    if ((p + 1) % m != 0) return;
    __syncthreads();  // the row above is read back below
    const int w = (p + 1) / m - 1;
    const int hoff = overlap ? d : 0;
    const bool prev = overlap && w > 0;
    const int n = prev ? 2 * m : m;
    float ss = 0.f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        auto slot_of = [&](int i, float& lg, float& v) {
            const bool a_half = prev && i < m;
            const int s = a_half ? i : (prev ? i - m : i);
            const size_t row = (size_t)(((a_half ? w - 1 : w) * m + s) % ring) * width;
            const int ch = a_half ? c : hoff + c;
            lg = tg[row + ch] + ape[(size_t)s * width + ch];
            v = tkv[row + ch];
        };
        float mx = -INFINITY;
        for (int i = 0; i < n; i++) { float g, v; slot_of(i, g, v); mx = fmaxf(mx, g); }
        float den = 0.f, num = 0.f;
        for (int i = 0; i < n; i++) {
            float g, v;
            slot_of(i, g, v);
            float e = expf(g - mx);
            den += e;
            num += e * v;
        }
        float v = num / den;
        ent[c] = v;
        ss = fmaf(v, v, ss);
    }
    const float r = 1.0f / sqrtf(block_sum(ss, sh) / (float)d + eps);
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) ent[c] = ent[c] * r * norm_w[c];
    __syncthreads();
    float* out = entries + (size_t)w * d;
    const int tail0 = d - 2 * half;
    const float pf = (float)(w * m);
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double ang = (double)(pf * inv_freq[j]);
        float co = (float)cos(ang) * factor, si = (float)sin(ang) * factor;
        float u = ent[tail0 + 2 * j], v = ent[tail0 + 2 * j + 1];
        ent[tail0 + 2 * j] = u * co - v * si;
        ent[tail0 + 2 * j + 1] = v * co + u * si;
    }
    // The official profile stores the entry rounded (main: FP8 nope channels; indexer: FP4 of
    // its Hadamard rotation).
    if (round_mode != ROUND_NONE) {
        __syncthreads();
        block_round_row(ent, d, 2 * half, round_mode, inv_sqrt);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) out[c] = ent[c];
}

// ring_store for decode steps: token t's K=V row into its own sequence's window ring.
extern "C" __global__ void ring_store_seqs(const float* kv, const SeqLayer* seqs, const int* positions, int dh, int win) {
    pdl_entry();
    const int t = blockIdx.x;
    float* ring = seqs[t].ring + (size_t)(positions[t] % win) * dh;
    for (int k = threadIdx.x; k < dh; k += blockDim.x) ring[k] = kv[(size_t)t * dh + k];
}

// How many of the indexer's entries token t sees: with `positions` (decode: every token its
// own sequence) all (positions[t] + 1) / m of its own, else min((pos0 + t + 1) / m, n).
__device__ __forceinline__ int entries_visible(int t, int pos0, int m, int n, const int* positions) {
    return positions ? (positions[t] + 1) / m : min((pos0 + t + 1) / m, n);
}

// The indexer's key rows of token t and how many it sees (`entries_visible`): with `seqs`
// (decode) its own table, and n becomes its count; else the shared keys.
__device__ __forceinline__ int index_visible(const float*& keys, int& n, int t, int pos0, int m,
                                             const SeqLayer* seqs, const int* positions) {
    if (seqs) {
        keys = seqs[t].i_entries;
        return n = entries_visible(t, pos0, m, n, positions);
    }
    return entries_visible(t, pos0, m, n, nullptr);
}

#define INDEX_KP 132  // a staged key row's floats: 16-byte reads of 8 rows hit 8 bank groups

// Key rows [base, base + R) of 128 floats into rows of INDEX_KP floats at dst, by asynchronous
// copies of the whole block, as one commit group; rows from `valid` on are zeros (nothing read:
// the tensor cores multiply whole 16-row tiles, whose rows past the visible are then masked).
template <int R>
__device__ __forceinline__ void index_stage_keys(float* dst, const float* keys, int base, int valid) {
    for (int i = threadIdx.x; i < R * 32; i += blockDim.x) {
        const int r = i >> 5, c = i & 31;
        const bool ok = base + r < valid;
        cp_async16_zfill(dst + r * INDEX_KP + 4 * c, keys + (ok ? (size_t)(base + r) * 128 + 4 * c : 0), ok);
    }
    cp_async_commit();
}

// Before the block scores the tile at `base` (buffer b; tiles `step` apart, `n` entries): the
// next tile's copies go out into the other buffer (or an empty group, so the wait counts alike)
// and this tile's have landed for every thread.
template <class Stage>
__device__ __forceinline__ void index_tile_ready(Stage stage, int b, int base, int step, int n) {
    if (base + step < n) stage(b ^ 1, base + step);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
}

// scores[t, e] = sum_h hw[t, h] * wscale * relu(q[t, h] . k[e]) * dscale for the entries
// visible to token t (e < min((pos0 + t + 1) / m, n)); -inf beyond, up to n. With `seqs` every
// token is its own sequence at positions[t] with its own keys, and only its visible entries are
// written. q rows live in shared memory; blocks stride over the entries, so any grid covers
// them. The release's shape (64 × 128, 256 threads) has a lane per entry (below); any other,
// a warp per entry with lanes over heads (q rows padded against bank conflicts).
extern "C" __global__ void indexer_scores(const float* q, const float* hw, const float* keys, int hi,
                                          int di, int pos0, int m, int n, float wscale, float dscale,
                                          float* scores, int ld_scores, const SeqLayer* seqs,
                                          const int* positions) {
    pdl_entry();
    extern __shared__ __align__(16) float sq[];  // [hi, di + 1] (the release shape: see below)
    const int t = blockIdx.y;
    const int stride = di + 1;
    const int valid = index_visible(keys, n, t, pos0, m, seqs, positions);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (blockIdx.x * nw >= n) return;  // a grid sized for longer contexts
    if (hi == 64 && di == 128 && nw == 8) {
        // The release's shape: lane = entry. A block takes 32 entries at a time and warp w
        // heads [8w, 8w + 8): every q read is a broadcast (all lanes one address), and a head's
        // dot is one lane's chain of FMAs (no reductions). The 32 key rows are staged by
        // asynchronous copies, the next 32's in flight while these are scored (rows padded to
        // 132 floats: a quarter-warp's 16-byte reads of 8 rows hit 8 different bank groups); the
        // warps' sums meet in shared memory, added in head order by warp 0. At 16K entries (a
        // 64K context) this advances a decode step ~18 µs on an H100, where lanes over heads
        // (q re-read per entry) took ~24; threads over 4 entries × 4 heads (8 loads per 64
        // FMAs) measured slower than either, issue-bound on their addressing.
        constexpr int KP = INDEX_KP;
        __shared__ float part[8][32];
        __shared__ float sw[64];
        if (blockIdx.x * 32 >= n) return;
        float4* s4 = (float4*)sq;   // [64 heads][32 float4]
        float* kb = sq + 64 * 128;  // two buffers of [32 rows][KP]
        const float4* q4 = (const float4*)(q + (size_t)t * 64 * 128);
        for (int i = threadIdx.x; i < 64 * 32; i += blockDim.x) cp_async16(s4 + i, q4 + i);
        if (threadIdx.x < 64) sw[threadIdx.x] = hw[(size_t)t * 64 + threadIdx.x] * wscale;
        // Rows [base, base + 32) into buffer b (the first group holds q's copies too).
        auto stage = [&](int b, int base) { index_stage_keys<32>(kb + b * 32 * KP, keys, base, valid); };
        const int step = gridDim.x * 32;
        stage(0, blockIdx.x * 32);
        const float4* qw = s4 + warp * 8 * 32;
        int b = 0;
        for (int base = blockIdx.x * 32; base < n; base += step, b ^= 1) {
            index_tile_ready(stage, b, base, step, n);
            const int e = base + lane;
            float sum = 0.f;
            if (e < valid) {
                const float* kr = kb + (b * 32 + lane) * KP;
                float acc[8] = {};
#pragma unroll 4
                for (int c = 0; c < 16; c++) {
                    const float4 k0 = *(const float4*)(kr + 8 * c), k1 = *(const float4*)(kr + 8 * c + 4);
#pragma unroll
                    for (int h = 0; h < 8; h++) {
                        const float4 x = qw[h * 32 + 2 * c], y = qw[h * 32 + 2 * c + 1];
                        float a = acc[h];
                        a = fmaf(x.x, k0.x, a);
                        a = fmaf(x.y, k0.y, a);
                        a = fmaf(x.z, k0.z, a);
                        a = fmaf(x.w, k0.w, a);
                        a = fmaf(y.x, k1.x, a);
                        a = fmaf(y.y, k1.y, a);
                        a = fmaf(y.z, k1.z, a);
                        acc[h] = fmaf(y.w, k1.w, a);
                    }
                }
#pragma unroll
                for (int h = 0; h < 8; h++) sum += sw[warp * 8 + h] * fmaxf(acc[h], 0.f) * dscale;
            }
            part[warp][lane] = sum;
            __syncthreads();
            if (warp == 0 && e < n) {
                float s = part[0][lane];
#pragma unroll
                for (int w = 1; w < 8; w++) s += part[w][lane];
                scores[(size_t)t * ld_scores + e] = e < valid ? s : -INFINITY;
            }
            __syncthreads();  // (buffer b is staged again two rounds on)
        }
        return;
    }
    for (int i = threadIdx.x; i < hi * di; i += blockDim.x)
        sq[(i / di) * stride + i % di] = q[(size_t)t * hi * di + i];
    __syncthreads();
    for (int e = blockIdx.x * nw + warp; e < n; e += gridDim.x * nw) {
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
}

// x as TF32 (round to nearest, ties away), the f32 bit pattern with its low 13 bits zero.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// x as hi + lo, two TF32 values (22 bits of x's 24; hi · hi' + hi · lo' + lo · hi' keeps a
// product to ~2^-22 of its size).
__device__ __forceinline__ void tf32_split(float x, uint32_t& hi, uint32_t& lo) {
    hi = tf32_bits(x);
    lo = tf32_bits(x - __uint_as_float(hi));
}

// d += a · b on the tensor cores: m16n8k8, TF32 in, f32 accumulate.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// An m16n8k8 A fragment split in two TF32 parts: `a` points at the lane's element (row g,
// column t4) of a row-major tile with rows `ld` floats apart (a0..a3: (g, t4), (g + 8, t4),
// (g, t4 + 4), (g + 8, t4 + 4)).
__device__ __forceinline__ void tf32_split_a(const float* a, int ld, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    tf32_split(a[0], hi[0], lo[0]);
    tf32_split(a[8 * ld], hi[1], lo[1]);
    tf32_split(a[4], hi[2], lo[2]);
    tf32_split(a[8 * ld + 4], hi[3], lo[3]);
}

// The B fragment's two values (k = t4 and t4 + 4 of column g; `b` at the first, the second
// `kstride` floats per k further), each split in two TF32 parts.
__device__ __forceinline__ void tf32_split_b(const float* b, int kstride, uint32_t& h0, uint32_t& l0, uint32_t& h1,
                                             uint32_t& l1) {
    tf32_split(b[0], h0, l0);
    tf32_split(b[4 * kstride], h1, l1);
}

// d += a · b to ~f32: the three products of the parts that matter (lo·hi, hi·lo, hi·hi, the
// small ones first).
__device__ __forceinline__ void mma_tf32x3(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                           uint32_t bh0, uint32_t bh1, uint32_t bl0, uint32_t bl1) {
    mma_tf32(d, al, bh0, bh1);
    mma_tf32(d, ah, bl0, bl1);
    mma_tf32(d, ah, bh0, bh1);
}

// `indexer_scores` for the release's 64 heads × 128 only (256 threads), on the tensor cores
// (`DSV4_CUDA_INDEX_TC=1`; off until measured on a GPU): a block scores 64 entries at a time
// as the product keys[64 × 128] · qᵀ[128 × 64 TOK] of its TOK tokens' heads, every operand
// split into two TF32 parts and multiplied three ways (hi·hi + hi·lo + lo·hi: ~f32 products;
// the sums in f32). Warp w takes entries 16 (w % 4).. and columns (token · 64 + head) 32 TOK
// (w / 4).., 4 TOK m16n8k8 tiles per k step. Keys and q rows are staged by asynchronous copies
// into rows of INDEX_KP floats (fragment reads hit 32 distinct banks), the next 64 keys' copies
// in flight while these are scored. A lane holds two entries × 2 columns per tile: its
// weighted relus are summed over the tiles, then over the quad; with one token the warps' two
// head halves meet in shared memory. Decode steps take one token per block (each its own
// keys); shared keys (prefill) two, so a staged key tile serves both and a block walks many
// tiles per staging of q. Same outputs and visibility as `indexer_scores` (another summation
// order, and products ~2^-22 off); `tokens` bounds the last block's second token.
template <int TOK>
__device__ __forceinline__ void index_tc_impl(const float* q, const float* hw, const float* keys, int pos0, int m,
                                              int n, float wscale, float dscale, float* scores, int ld_scores,
                                              const SeqLayer* seqs, const int* positions, int tokens) {
    constexpr int KP = INDEX_KP, NT = 4 * TOK;
    extern __shared__ __align__(16) float xs[];  // q [64 TOK][KP], then two key buffers [64][KP]
    __shared__ float part[2][64];
    __shared__ float sw[64 * TOK];
    __shared__ int s_valid[TOK];
    const int t0 = blockIdx.y * TOK, ntok = min(TOK, tokens - t0);
    // (Shared keys: each token's visible count; the block's last token sees the most.)
    int vmax = 0;
    for (int j = 0; j < TOK; j++) {
        const int v = j < ntok ? index_visible(keys, n, t0 + j, pos0, m, seqs, positions) : 0;
        if (threadIdx.x == 0) s_valid[j] = v;
        vmax = max(vmax, v);
    }
    if (blockIdx.x * 64 >= n) return;
    float* qs = xs;
    float* kb = xs + 64 * TOK * KP;
    for (int i = threadIdx.x; i < 64 * TOK * 32; i += blockDim.x) {
        const int row = i >> 5;  // token · 64 + head
        if (row < 64 * ntok) cp_async16(qs + row * KP + 4 * (i & 31), q + (size_t)t0 * 64 * 128 + 4 * i);
    }
    for (int i = threadIdx.x; i < 64 * TOK; i += blockDim.x)
        sw[i] = i < 64 * ntok ? hw[(size_t)t0 * 64 + i] * wscale : 0.f;
    // Rows [base, base + 64) into buffer b (the first group holds q's copies too).
    auto stage = [&](int b, int base) { index_stage_keys<64>(kb + b * 64 * KP, keys, base, vmax); };
    const int step = gridDim.x * 64;
    stage(0, blockIdx.x * 64);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int mt = warp & 3, cg = warp >> 2;
    int b = 0;
    for (int base = blockIdx.x * 64; base < n; base += step, b ^= 1) {
        index_tile_ready(stage, b, base, step, n);
        float s0 = 0.f, s1 = 0.f;
        if (base < vmax) {  // (block-uniform: a tile no token sees is all -inf)
            const float* ka = kb + (b * 64 + 16 * mt + g) * KP + t4;
            const float* qb = qs + (32 * TOK * cg + g) * KP + t4;
            float acc[NT][4] = {};
#pragma unroll 4
            for (int d0 = 0; d0 < 128; d0 += 8) {
                uint32_t ah[4], al[4];
                tf32_split_a(ka + d0, KP, ah, al);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    uint32_t bh0, bl0, bh1, bl1;
                    tf32_split_b(qb + 8 * j * KP + d0, 1, bh0, bl0, bh1, bl1);
                    mma_tf32x3(acc[j], ah, al, bh0, bh1, bl0, bl1);
                }
            }
            // Rows g (acc[j][0..1]) and g + 8 (acc[j][2..3]) of the warp's 16 entries; columns
            // 32 TOK cg + 8 j + 2 t4 (+1).
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int c = 32 * TOK * cg + 8 * j + 2 * t4;
                s0 += sw[c] * fmaxf(acc[j][0], 0.f) * dscale + sw[c + 1] * fmaxf(acc[j][1], 0.f) * dscale;
                s1 += sw[c] * fmaxf(acc[j][2], 0.f) * dscale + sw[c + 1] * fmaxf(acc[j][3], 0.f) * dscale;
            }
            quad_sum2(s0, s1);
        }
        if (t4 == 0) {
            part[cg][16 * mt + g] = s0;
            part[cg][16 * mt + g + 8] = s1;
        }
        __syncthreads();
        // One token: its two head halves; two: part[j] is token j's whole sum.
        if (threadIdx.x < 64 * TOK) {
            const int j = TOK == 1 ? 0 : threadIdx.x >> 6, r = threadIdx.x & 63, e = base + r;
            const float v = TOK == 1 ? part[0][r] + part[1][r] : part[j][r];
            if (j < ntok && e < n) scores[(size_t)(t0 + j) * ld_scores + e] = e < s_valid[j] ? v : -INFINITY;
        }
        __syncthreads();  // (buffer b is staged again two rounds on)
    }
}

extern "C" __global__ void __launch_bounds__(256)
indexer_scores_tc(const float* q, const float* hw, const float* keys, int hi, int di, int pos0, int m, int n,
                  float wscale, float dscale, float* scores, int ld_scores, const SeqLayer* seqs, const int* positions,
                  int tokens) {
    pdl_entry();
    if (hi != 64 || di != 128 || blockDim.x != 256) __trap();  // (the host launches no other)
    if (seqs)
        index_tc_impl<1>(q, hw, keys, pos0, m, n, wscale, dscale, scores, ld_scores, seqs, positions, tokens);
    else
        index_tc_impl<2>(q, hw, keys, pos0, m, n, wscale, dscale, scores, ld_scores, seqs, positions, tokens);
}

// `attention_partial` on the tensor cores for the release's head dim (512) and heads in groups
// of 32 (the host takes it for prefill calls with a block per SM; `DSV4_CUDA_ATTN_TC=0` keeps
// attention_partial; splits and per-token caches work too, tested but unused). Block (t, split, group of 32
// heads), the same partials (unnormalized output, max, sum) for `attn_combine`. The group's
// queries (scaled) stay in shared memory and the token's keys go through it 32 at a time, the
// next chunk's copies in flight while this one is used: each key is staged once per 32 heads
// (the SIMT kernel: once per 8). Per chunk S = q·kᵀ (32 heads × 32 keys) and then O += P·V,
// both as m16n8k8 products with every operand split into two TF32 parts and multiplied three
// ways (hi·hi + hi·lo + lo·hi: ~2^-22 of each product, sums in f32), the online softmax in f32
// between them. Warp w takes heads 16 (w & 1).. and, for S, keys 8 (w >> 1).. (the chunk's
// row maxima meet in shared memory), for O the 128 channels 128 (w >> 1)... Keys past the
// token's last are zero rows with probability 0.
#define ATT_TC_HEADS 32
#define ATT_TC_QP 516  // floats per staged q / key row: q, key and P fragment reads on distinct
                       // banks (P·V's V reads meet 2-way)
#define ATT_TC_PP 36   // floats per row of P
// Shared floats: q [32][QP], keys [2][32][QP], P [32][PP], the warps' row values [4][32]
// (ops::ATT_TC_SMEM).
extern "C" __global__ void __launch_bounds__(256, 1) attention_tc(AttnArgs a, float* part, int nsplit) {
    pdl_entry();
    constexpr int DH = ATT_DMAX, QP = ATT_TC_QP, PP = ATT_TC_PP;
    unsigned dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    // (The host's gate, and its shared memory: ops::ATT_TC_SMEM.)
    if (a.dh != DH || a.H % ATT_TC_HEADS != 0 || blockDim.x != 256 ||
        dyn_smem < (3 * 32 * QP + 32 * PP + 4 * 32) * sizeof(float))
        __trap();
    extern __shared__ __align__(16) float tsm[];
    float* qs = tsm;
    float* kb = qs + 32 * QP;
    float* ps = kb + 2 * 32 * QP;
    float* red = ps + 32 * PP;
    const int t = blockIdx.x, split = blockIdx.y, h0 = blockIdx.z * ATT_TC_HEADS;
    const AttnView view = attn_view(a, t);
    const AttnKeys ak = attn_keys(a, view, t);
    const int lo = ak.lo, nwin = ak.nwin, nk = ak.nk;
    const int nchunks = (nk + ATT_KEYS - 1) / ATT_KEYS;
    float* ob = part + ((size_t)t * nsplit + split) * a.H * (DH + 2);
    if (split >= nchunks) {  // no keys here: weight 0 in attn_combine, as attention_partial
        if (threadIdx.x < ATT_TC_HEADS) {
            ob[(size_t)(h0 + threadIdx.x) * (DH + 2) + DH] = -INFINITY;
            ob[(size_t)(h0 + threadIdx.x) * (DH + 2) + DH + 1] = 0.f;
        }
        return;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int mt = warp & 1, nq = warp >> 1;
    // Chunk ch's keys into buffer b as one commit group; rows past the token's keys zeroed.
    auto stage = [&](int b, int ch) {
        const int j0 = ch * ATT_KEYS, nj = min(ATT_KEYS, nk - j0);
        float* dst = kb + b * 32 * QP;
        for (int r = warp; r < ATT_KEYS; r += 8) {
            if (r < nj) {
                const float* k = attn_key(a, view, t, lo, nwin, j0 + r);
                for (int c = lane * 4; c < DH; c += 128) cp_async16(dst + r * QP + c, k + c);
            } else {
                for (int c = lane * 4; c < DH; c += 128) *(float4*)(dst + r * QP + c) = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
        cp_async_commit();
    };
    stage(0, split);
    const float* qg = a.q + ((size_t)t * a.H + h0) * DH;
    for (int i = threadIdx.x; i < ATT_TC_HEADS * (DH / 4); i += blockDim.x) {
        const int r = i / (DH / 4), c = 4 * (i % (DH / 4));
        float4 v = *(const float4*)(qg + (size_t)r * DH + c);
        v.x *= a.scale;
        v.y *= a.scale;
        v.z *= a.scale;
        v.w *= a.scale;
        *(float4*)(qs + r * QP + c) = v;
    }
    float o[16][4] = {};
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8 of the warp's 16
    const float* qa = qs + (16 * mt + g) * QP + t4;
    const float* pa = ps + (16 * mt + g) * PP + t4;
    int b = 0;
    for (int ch = split; ch < nchunks; ch += nsplit, b ^= 1) {
        index_tile_ready(stage, b, ch, nsplit, nchunks);  // (also orders the q rows' stores)
        const int nj = min(ATT_KEYS, nk - ch * ATT_KEYS);
        const float* ks = kb + b * 32 * QP;
        // Scores of heads 16 mt + g (+8) and keys 8 nq + 2 t4 (+1): four independent chains.
        float sa[4][4] = {};
        const float* kp = ks + (8 * nq + g) * QP + t4;
        for (int d0 = 0; d0 < DH; d0 += 32) {
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int d = d0 + 8 * u;
                uint32_t ah[4], al[4], bh0, bl0, bh1, bl1;
                tf32_split_a(qa + d, QP, ah, al);
                tf32_split_b(kp + d, 1, bh0, bl0, bh1, bl1);
                mma_tf32x3(sa[u], ah, al, bh0, bh1, bl0, bl1);
            }
        }
        float s[4];
#pragma unroll
        for (int e = 0; e < 4; e++) s[e] = (sa[0][e] + sa[1][e]) + (sa[2][e] + sa[3][e]);
        const int c0 = 8 * nq + 2 * t4;
        if (c0 >= nj) s[0] = s[2] = -INFINITY;
        if (c0 + 1 >= nj) s[1] = s[3] = -INFINITY;
        // The chunk's row maxima: the quad's, then the four key quarters' (shared memory).
        float x0 = fmaxf(s[0], s[1]), x1 = fmaxf(s[2], s[3]);
        quad_max2(x0, x1);
        if (t4 == 0) {
            red[nq * 32 + 16 * mt + g] = x0;
            red[nq * 32 + 16 * mt + g + 8] = x1;
        }
        __syncthreads();
        float mc0 = red[16 * mt + g], mc1 = red[16 * mt + g + 8];
#pragma unroll
        for (int q = 1; q < 4; q++) {
            mc0 = fmaxf(mc0, red[q * 32 + 16 * mt + g]);
            mc1 = fmaxf(mc1, red[q * 32 + 16 * mt + g + 8]);
        }
        // (Key 0 of every chunk is a real key: the maxima are finite.)
        const float mn0 = fmaxf(m0, mc0), mn1 = fmaxf(m1, mc1);
        const float corr0 = expf(m0 - mn0), corr1 = expf(m1 - mn1);  // 0 on the first chunk
        const float p0 = expf(s[0] - mn0), p1 = expf(s[1] - mn0);
        const float p2 = expf(s[2] - mn1), p3 = expf(s[3] - mn1);
        // This warp's share of the row sums (the quarters' shares are added at the end: the
        // same corrections apply to all four).
        float y0 = p0 + p1, y1 = p2 + p3;
        quad_sum2(y0, y1);
        l0 = l0 * corr0 + y0;
        l1 = l1 * corr1 + y1;
        m0 = mn0;
        m1 = mn1;
        *(float2*)(ps + (16 * mt + g) * PP + c0) = make_float2(p0, p1);
        *(float2*)(ps + (16 * mt + g + 8) * PP + c0) = make_float2(p2, p3);
        __syncthreads();
        // O (heads 16 mt + g (+8), channels 128 nq + 8 j + 2 t4 (+1)) += P · V.
#pragma unroll
        for (int j = 0; j < 16; j++) {
            o[j][0] *= corr0;
            o[j][1] *= corr0;
            o[j][2] *= corr1;
            o[j][3] *= corr1;
        }
        const float* vb = ks + t4 * QP + 128 * nq + g;
#pragma unroll
        for (int k0 = 0; k0 < ATT_KEYS; k0 += 8) {
            uint32_t ah[4], al[4];
            tf32_split_a(pa + k0, PP, ah, al);
#pragma unroll
            for (int j = 0; j < 16; j++) {
                uint32_t bh0, bl0, bh1, bl1;
                tf32_split_b(vb + k0 * QP + 8 * j, QP, bh0, bl0, bh1, bl1);
                mma_tf32x3(o[j], ah, al, bh0, bh1, bl0, bl1);
            }
        }
        __syncthreads();  // every read of this buffer, P and the maxima done before they are refilled
    }
    const int ha = h0 + 16 * mt + g, hb = ha + 8;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int c = 128 * nq + 8 * j + 2 * t4;
        *(float2*)(ob + (size_t)ha * (DH + 2) + c) = make_float2(o[j][0], o[j][1]);
        *(float2*)(ob + (size_t)hb * (DH + 2) + c) = make_float2(o[j][2], o[j][3]);
    }
    if (t4 == 0) {
        red[nq * 32 + 16 * mt + g] = l0;
        red[nq * 32 + 16 * mt + g + 8] = l1;
    }
    __syncthreads();
    if (nq == 0 && t4 == 0) {
        const float s0 = (red[16 * mt + g] + red[32 + 16 * mt + g]) + (red[64 + 16 * mt + g] + red[96 + 16 * mt + g]);
        const float s1 = (red[16 * mt + g + 8] + red[32 + 16 * mt + g + 8]) +
                         (red[64 + 16 * mt + g + 8] + red[96 + 16 * mt + g + 8]);
        ob[(size_t)ha * (DH + 2) + DH] = m0;
        ob[(size_t)ha * (DH + 2) + DH + 1] = s0;
        ob[(size_t)hb * (DH + 2) + DH] = m1;
        ob[(size_t)hb * (DH + 2) + DH + 1] = s1;
    }
}

__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TOPK_THREADS 1024
#define TOPK_WARPS (TOPK_THREADS / 32)
static_assert(TOPK_WARPS == 32, "topk_select: a warp's lanes hold the per-warp counts");

// Stamps of block 0 of `topk_select` (tools/gpu/indexer_bench.cu defines TOPK_STAMPS): the
// global timer (ns) after the wait, once staged, after each radix pass, at the end.
#ifdef TOPK_STAMPS
__device__ long long topk_stamps[8];
#define TOPK_STAMP(i)                                                                   \
    do {                                                                                \
        if (blockIdx.x == 0 && threadIdx.x == 0) {                                      \
            long long t_;                                                               \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                      \
            topk_stamps[i] = t_;                                                        \
        }                                                                               \
    } while (0)
#else
#define TOPK_STAMP(i) \
    do {              \
    } while (0)
#endif

// Token t's visible entries (with `positions`, token t is its own sequence: decode steps);
// where they are no more than k, all of them are the picks, written here.
__device__ __forceinline__ int topk_visible(int t, int pos0, int m, int n, int k, int* out, int* nsel,
                                            const int* positions) {
    const int valid = entries_visible(t, pos0, m, n, positions);
    if (valid <= k) {
        for (int i = threadIdx.x; i < valid; i += blockDim.x) out[i] = i;
        if (threadIdx.x == 0) nsel[t] = valid;
    }
    return valid;
}

// A token's order keys: in shared memory where its row fits the launch's stage (read once,
// every load in flight; the passes that follow then cost no global round trips), else from
// its scores row on every read.
struct TopkKeys {
    const float* sc;
    const uint32_t* staged;  // or nullptr
    __device__ __forceinline__ uint32_t operator[](int i) const { return staged ? staged[i] : order_key(sc[i]); }
};

// Copies sc[0, valid) into `stage` as order keys: eight loads per thread issued before any
// store (the stage and the scores cannot alias, but the compiler cannot know it).
__device__ __forceinline__ void topk_stage(const float* sc, int valid, uint32_t* stage) {
    for (int base = 0; base < valid; base += 8 * TOPK_THREADS) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int i = base + j * TOPK_THREADS + threadIdx.x;
            v[j] = i < valid ? sc[i] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int i = base + j * TOPK_THREADS + threadIdx.x;
            if (i < valid) stage[i] = order_key(v[j]);
        }
    }
    __syncthreads();
}

// One radix pass's digit, by the block's warp 0 (its lanes own the bins): the digit (bits
// `shift`..) holding the need-th largest key of the histogram, scanning bins from the top:
// lane l owns bins [8l, 8l + 8); a suffix sum over lanes finds the one lane whose bins cross
// `need`, which then walks its 8 (a serial walk of 256 bins took µs per pass). That lane
// writes the extended prefix and what is still needed of it.
__device__ __forceinline__ void topk_digit(const int* hist, int shift, uint32_t prefix, int need,
                                           uint32_t* s_prefix, int* s_need) {
    const int lane = threadIdx.x & 31;
    int own = 0;
#pragma unroll
    for (int b = 0; b < 8; b++) own += hist[8 * lane + b];
    int suf = own;  // sum over lanes >= lane
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_down_sync(0xffffffffu, suf, o);
        if (lane + o < 32) suf += v;
    }
    int cum = suf - own;  // keys in the bins above this lane's
    if (cum < need && need <= suf) {
        int dsel = 8 * lane;
        for (int dg = 8 * lane + 7; dg >= 8 * lane; dg--) {
            if (cum + hist[dg] >= need) { dsel = dg; break; }
            cum += hist[dg];
        }
        *s_prefix = prefix | ((uint32_t)dsel << shift);
        *s_need = need - cum;
    }
}

// Counts key u in the histogram of radix digit `shift` if it matches the prefix so far.
__device__ __forceinline__ void topk_count(uint32_t u, uint32_t mask, uint32_t prefix, int shift, int* hist) {
    if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xff], 1);
}

// The k-th largest order key of keys[0, valid) (`prefix`) and how many keys equal to it are
// to be taken (`need`), by four passes of 8-bit digits; called by the whole block, the s_* in
// shared memory. Staged keys are read four at a time. (One shared atomic per key: grouping a
// warp's equal digits by __match_any_sync first measured slower, 5.2 against 2.4 µs for the
// first pass over 16K entries on an H100, though most share the top digit.)
__device__ __forceinline__ void topk_radix(TopkKeys keys, int valid, int k, int* hist, uint32_t* s_prefix,
                                           int* s_need, uint32_t& prefix, int& need) {
    uint32_t mask = 0;
    prefix = 0;
    need = k;  // how many of the keys matching `prefix` are still to be taken
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        int i = threadIdx.x;
        if (keys.staged) {
            const uint4* s4 = (const uint4*)keys.staged;
            for (; 4 * i + 3 < valid; i += blockDim.x) {
                const uint4 u = s4[i];
                topk_count(u.x, mask, prefix, shift, hist);
                topk_count(u.y, mask, prefix, shift, hist);
                topk_count(u.z, mask, prefix, shift, hist);
                topk_count(u.w, mask, prefix, shift, hist);
            }
            i = valid / 4 * 4 + threadIdx.x;  // the last valid % 4
        }
        for (; i < valid; i += blockDim.x) topk_count(keys[i], mask, prefix, shift, hist);
        __syncthreads();
        if (threadIdx.x < 32) topk_digit(hist, shift, prefix, need, s_prefix, s_need);
        __syncthreads();
        prefix = *s_prefix;
        need = *s_need;
        mask |= 0xffu << shift;
        __syncthreads();
        TOPK_STAMP(2 + (24 - shift) / 8);
    }
}

// Exclusive prefix sum over a warp's lanes.
__device__ __forceinline__ int warp_exclusive_sum(int v) {
    const int lane = threadIdx.x & 31;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int x = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += x;
    }
    return incl - v;
}

// Per token (one block each): the k best-scoring visible entries (ties -> lower index),
// ascending, into sel[t, :], their count into nsel[t]. Exact radix select on the scores' order
// keys (`topk_radix`), staged in the dynamic shared memory where a token's visible entries are
// at most `stage_cap`; then every warp takes a contiguous run of entries in index order and two
// ballot passes write the picks ascending (no sort).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_select(const float* scores, int ld_scores, int pos0, int m, int n, int k, int* sel, int sel_cap, int* nsel,
            const int* positions, int stage_cap) {
    pdl_entry();
    extern __shared__ __align__(16) uint32_t stage[];  // [stage_cap]
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need;
    __shared__ int w_gt[TOPK_WARPS], w_eq[TOPK_WARPS];
    const int t = blockIdx.x;
    const float* sc = scores + (size_t)t * ld_scores;
    int* out = sel + (size_t)t * sel_cap;
    TOPK_STAMP(0);
    const int valid = topk_visible(t, pos0, m, n, k, out, nsel, positions);
    if (valid <= k) return;
    TopkKeys keys{sc, nullptr};
    if (valid <= stage_cap) {
        topk_stage(sc, valid, stage);
        keys.staged = stage;
    }
    TOPK_STAMP(1);
    uint32_t prefix;
    int need;
    topk_radix(keys, valid, k, hist, &s_prefix, &s_need, prefix, need);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // prefix is the k-th largest key: take every larger key and the first `need` equal ones in
    // index order. Warp w owns entries [lo, hi) (whole 32-entry rows), read row by row.
    const int per = (valid + TOPK_WARPS * 32 - 1) / (TOPK_WARPS * 32) * 32;
    const int lo = warp * per, hi = min(valid, lo + per);
    const unsigned below = (1u << lane) - 1;
    int gt = 0, eq = 0;  // the warp's keys above the k-th and equal to it (lo is 4-aligned)
    for (int i = lo + 4 * lane; i < hi; i += 128) {
        uint32_t u[4];
        if (keys.staged && i + 3 < hi) {
            const uint4 v = *(const uint4*)(keys.staged + i);
            u[0] = v.x, u[1] = v.y, u[2] = v.z, u[3] = v.w;
        } else {
#pragma unroll
            for (int x = 0; x < 4; x++) u[x] = i + x < hi ? keys[i + x] : 0u;
        }
#pragma unroll
        for (int x = 0; x < 4; x++) {
            gt += i + x < hi && u[x] > prefix;
            eq += i + x < hi && u[x] == prefix;
        }
    }
    gt = __reduce_add_sync(0xffffffffu, gt);
    eq = __reduce_add_sync(0xffffffffu, eq);
    if (lane == 0) {
        w_gt[warp] = gt;
        w_eq[warp] = eq;
    }
    __syncthreads();
    // Where warp w's picks start: lane v holds warp v's counts (TOPK_WARPS is 32).
    const int eq_v = w_eq[lane];
    const int eq_before_v = warp_exclusive_sum(eq_v);
    const int took_v = w_gt[lane] + min(eq_v, max(0, need - eq_before_v));
    const int took_before_v = warp_exclusive_sum(took_v);
    int at = __shfl_sync(0xffffffffu, took_before_v, warp);
    int eq_seen = __shfl_sync(0xffffffffu, eq_before_v, warp);
    for (int r = lo; r < hi; r += 32) {
        const int i = r + lane;
        const uint32_t u = i < hi ? keys[i] : 0u;
        const bool is_eq = i < hi && u == prefix;
        const unsigned eqb = __ballot_sync(0xffffffffu, is_eq);
        const bool take = (i < hi && u > prefix) || (is_eq && eq_seen + __popc(eqb & below) < need);
        const unsigned tb = __ballot_sync(0xffffffffu, take);
        if (take) out[at + __popc(tb & below)] = i;
        at += __popc(tb);
        eq_seen += __popc(eqb);
    }
    if (threadIdx.x == 0) nsel[t] = k;
    TOPK_STAMP(6);
}
