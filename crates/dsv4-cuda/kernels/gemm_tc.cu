// Tensor-core versions of the multi-token GEMMs of gemm.cu for BF16, FP8 and FP4 weights, with
// f32 results equal to the SIMT kernels' up to f32 rounding:
//  - the weight tile is decoded into shared memory as bf16 with its scale applied. The host
//    takes this path only when that is exact (bf16 weights; e4m3 or e2m1 values times a
//    power-of-two scale that keeps every product a normal number: `GpuLinear::tc`);
//  - the f32 activations are split into `terms` bf16 parts hi + mid + lo (3 parts carry all 24
//    bits of an f32 significand; 1 is exact when x already holds bf16 values), each multiplied
//    on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate); each K step's products
//    are summed from zero and added to the f32 accumulators (see tc_step).
// A block computes a 128-row x BN-token tile with 8 warps (4 along the rows x 2 along the
// tokens, each 32 rows x BN/2 tokens); the K loop steps by BK through two shared-memory stages,
// the next step's global loads in flight in registers while this step's MMAs run.
#pragma once
#include "gemm.cu"

#define TC_BM 128
// BK: inputs per K step, 64 or 32 (the `_k32` kernels), a template parameter throughout.
// bf16 per shared row: BK + 8, the pad putting the 8 rows of an ldmatrix in distinct banks.
template <int BK>
__host__ __device__ constexpr int tc_ld() { return BK + 8; }
#define TC_THREADS 256

typedef uint16_t bf16_t;  // raw bf16 bits in shared memory

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16_t* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t half2_bits(float a, float b) {
    return (uint32_t)__half_as_ushort(__float2half_rn(a)) |
           ((uint32_t)__half_as_ushort(__float2half_rn(b)) << 16);
}

// d = a b (a zero accumulator, with no registers to clear).
__device__ __forceinline__ void mma_bf16_zero(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// Four e4m3 bytes as two bf16x2 words worth 2^-112 times their values: e4m3 -> f16 exactly
// (cvt), then the f16 exponent and top mantissa bits moved down into bf16's fields (an f16 of
// exponent field e is 2^(e-15)(1.m), the bf16 of the same field 2^(e-127)(1.m); e4m3 values are
// f16 normals or zero, so no subnormal arises).
__device__ __forceinline__ void e4m3x4_to_bf16(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t ha = e4m3x2_half_bits(w), hb = e4m3x2_half_bits(w >> 16);
    lo = ((ha >> 3) & 0x0fff0fffu) | (ha & 0x80008000u);
    hi = ((hb >> 3) & 0x0fff0fffu) | (hb & 0x80008000u);
}

// An FP8 block scale as the bf16x2 that e4m3x4_to_bf16's words are multiplied by: 2^112 times
// the scale (undoing the decode's 2^-112) in both halves.
__device__ __forceinline__ uint32_t fp8_scale_bf16x2(float sc) {
    const __nv_bfloat16 v = __float2bfloat16_rn(sc * 0x1p112f);
    const uint32_t b = *(const uint16_t*)&v;
    return b | (b << 16);
}

// Eight e2m1 nibbles (element 2b in the low nibble of byte b) as four bf16x2 words of their
// exact values: byte-permute tables give the low and high bytes of the bf16 of each magnitude
// (0, 0.5, 1, 1.5, 2, 3, 4, 6), the sign bits are permuted into the high bytes, and the bytes
// are interleaved into pairs.
__device__ __forceinline__ void e2m1x8_to_bf16(uint32_t w, uint32_t (&p)[4]) {
    const uint32_t lo_a = 0xC0800000u, lo_b = 0xC0804000u, hi_a = 0x3F3F3F00u, hi_b = 0x40404040u;
    const uint32_t mag = w & 0x77777777u;
    const uint32_t l0 = __byte_perm(lo_a, lo_b, mag), l1 = __byte_perm(lo_a, lo_b, mag >> 16);
    uint32_t h0 = __byte_perm(hi_a, hi_b, mag), h1 = __byte_perm(hi_a, hi_b, mag >> 16);
    // Bit 7 of byte b: the sign of element 2b (t) and 2b + 1 (u).
    const uint32_t t = (w << 4) & 0x80808080u, u = w & 0x80808080u;
    h0 |= __byte_perm(t, u, 0x5140);
    h1 |= __byte_perm(t, u, 0x7362);
    p[0] = __byte_perm(l0, h0, 0x5140);
    p[1] = __byte_perm(l0, h0, 0x7362);
    p[2] = __byte_perm(l1, h1, 0x5140);
    p[3] = __byte_perm(l1, h1, 0x7362);
}

// The next K step's weight chunks of one thread, loaded from global memory but not yet decoded.
// Shared row r of the tile is row row0 + r of W0 for r < split, else row row0 + r - split of W1
// (the gated MoE tile stacks 64 gate rows over 64 up rows).
template <int FMT, int BK>
struct TcWLoad {
    static constexpr int N = Chunk<FMT>::N;
    static constexpr int LD = tc_ld<BK>();
    static constexpr int PER_ROW = BK / N;
    static constexpr int CHUNKS = TC_BM * PER_ROW;
    static constexpr int L = (CHUNKS + TC_THREADS - 1) / TC_THREADS;
    uint4 q[L];
    uint32_t s[L];  // the chunk's scale as a bf16x2 pair (see scale_bf16x2)

    __device__ __forceinline__ void load(const LinearW& W0, const LinearW& W1, int split, int row0, int k0) {
#pragma unroll
        for (int l = 0; l < L; l++) {
            const int ci = threadIdx.x + l * TC_THREADS;
            q[l] = make_uint4(0, 0, 0, 0);
            s[l] = 0;
            if (CHUNKS % TC_THREADS != 0 && ci >= CHUNKS) continue;
            const int r = ci / PER_ROW, c = ci % PER_ROW;
            // W1 has W0's shape: select its pointers field by field (a reference to either
            // struct would put both on the stack).
            LinearW W = W0;
            if (r >= split) {
                W.w = W1.w;
                W.scales = W1.scales;
            }
            const int g = row0 + (r < split ? r : r - split);
            // The host takes this path only with the 16-byte layout (W.in a multiple of N), so
            // a chunk lies wholly inside or outside the matrix.
            if (g >= W.out || k0 + c * N >= W.in) continue;
            const size_t row_bytes = (FMT == FMT_FP4) ? (size_t)W.in / 2 : (size_t)W.in * (FMT == FMT_FP8 ? 1 : 2);
            const int chunk = k0 / N + c;
            q[l] = __ldg((const uint4*)(W.w + (size_t)g * row_bytes) + chunk);
            s[l] = scale_bf16x2(W, g, chunk);
        }
    }

    // The scale of chunk `chunk` of row g, as the bf16 both halves of a bf16x2 are multiplied
    // by: FP8 2^112 times the f32 block scale (undoing e4m3x4_to_bf16's 2^-112), FP4 the e8m0
    // byte u as a bf16 (exponent field u). Exact, like the products, for the scales the host
    // lets through (`tc_exact` in weights.rs).
    __device__ __forceinline__ uint32_t scale_bf16x2(const LinearW& W, int g, int chunk) const {
        uint32_t b = 0;
        if constexpr (FMT == FMT_FP8) {
            // Block row and column by shifts when the block shape is a power of two (it is
            // 128 x 128 in the releases): no integer division per chunk and K step.
            const int k = chunk * N;
            const int br = (W.bo & (W.bo - 1)) == 0 ? g >> (__ffs(W.bo) - 1) : g / W.bo;
            const int bc = (W.bi & (W.bi - 1)) == 0 ? k >> (__ffs(W.bi) - 1) : k / W.bi;
            return fp8_scale_bf16x2(((const float*)W.scales)[(size_t)br * W.scale_cols + bc]);
        } else if constexpr (FMT == FMT_FP4) {
            b = (uint32_t)((const uint8_t*)W.scales)[(size_t)g * (W.in / 32) + chunk] << 7;
        }
        return b | (b << 16);
    }

    // Decodes the chunks into the shared tile A[TC_BM][LD] as bf16, scale applied (zero chunks
    // outside the matrix: zero codes times a zero scale).
    __device__ __forceinline__ void store(bf16_t* A) const {
#pragma unroll
        for (int l = 0; l < L; l++) {
            const int ci = threadIdx.x + l * TC_THREADS;
            if (CHUNKS % TC_THREADS != 0 && ci >= CHUNKS) continue;
            const int r = ci / PER_ROW, c = ci % PER_ROW;
            uint4* dst = (uint4*)(A + r * LD + c * N);
            if constexpr (FMT == FMT_BF16) {
                dst[0] = q[l];  // already bf16 (zeros outside the matrix)
            } else {
                const uint32_t w[4] = {q[l].x, q[l].y, q[l].z, q[l].w};
                constexpr int PAIRS = N / 2;  // bf16x2 words of the chunk
                uint32_t p[PAIRS];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if constexpr (FMT == FMT_FP8) {
                        e4m3x4_to_bf16(w[i], p[2 * i], p[2 * i + 1]);
                    } else {
                        uint32_t v[4];
                        e2m1x8_to_bf16(w[i], v);
#pragma unroll
                        for (int j = 0; j < 4; j++) p[4 * i + j] = v[j];
                    }
                }
#pragma unroll
                for (int j = 0; j < PAIRS / 4; j++)
                    dst[j] = make_uint4(mul_bf16x2(p[4 * j], s[l]), mul_bf16x2(p[4 * j + 1], s[l]),
                                        mul_bf16x2(p[4 * j + 2], s[l]), mul_bf16x2(p[4 * j + 3], s[l]));
            }
        }
    }
};

// TcWLoad for FP4 at 32 inputs per step, where a row is one 16-byte chunk and only half the
// threads would decode: each thread takes half a chunk (8 bytes, 16 values), the same bf16 into
// the same places, so all 8 warps share the decode.
template <int BK>
struct TcWLoadFp4Half {
    static constexpr int LD = tc_ld<BK>();
    static constexpr int PER_ROW = BK / 32;
    static constexpr int UNITS = 2 * TC_BM * PER_ROW;
    static_assert(UNITS <= TC_THREADS, "one half chunk per thread at most");
    uint2 q;
    uint32_t s;

    __device__ __forceinline__ void load(const LinearW& W0, const LinearW& W1, int split, int row0, int k0) {
        const int u = threadIdx.x, ch = u >> 1, h = u & 1;
        const int r = ch / PER_ROW, c = ch % PER_ROW;
        q = make_uint2(0, 0);
        s = 0;
        if (UNITS < TC_THREADS && u >= UNITS) return;
        LinearW W = W0;
        if (r >= split) {
            W.w = W1.w;
            W.scales = W1.scales;
        }
        const int g = row0 + (r < split ? r : r - split);
        if (g >= W.out || k0 + c * 32 >= W.in) return;
        const int chunk = k0 / 32 + c;
        q = __ldg((const uint2*)(W.w + (size_t)g * (W.in / 2)) + 2 * chunk + h);
        const uint32_t b = (uint32_t)((const uint8_t*)W.scales)[(size_t)g * (W.in / 32) + chunk] << 7;
        s = b | (b << 16);
    }

    __device__ __forceinline__ void store(bf16_t* A) const {
        const int u = threadIdx.x, ch = u >> 1, h = u & 1;
        if (UNITS < TC_THREADS && u >= UNITS) return;
        const int r = ch / PER_ROW, c = ch % PER_ROW;
        uint4* dst = (uint4*)(A + r * LD + c * 32 + h * 16);
        uint32_t v0[4], v1[4];
        e2m1x8_to_bf16(q.x, v0);
        e2m1x8_to_bf16(q.y, v1);
        dst[0] = make_uint4(mul_bf16x2(v0[0], s), mul_bf16x2(v0[1], s), mul_bf16x2(v0[2], s), mul_bf16x2(v0[3], s));
        dst[1] = make_uint4(mul_bf16x2(v1[0], s), mul_bf16x2(v1[1], s), mul_bf16x2(v1[2], s), mul_bf16x2(v1[3], s));
    }
};

// The weight loader of the `_xs` kernels.
template <int FMT, int BK>
struct TcWSel {
    using T = TcWLoad<FMT, BK>;
};
template <>
struct TcWSel<FMT_FP4, 32> {
    using T = TcWLoadFp4Half<32>;
};

// The bf16 parts of one f32 quartet: the in-block split (TcXLoad::store) and the pre-split
// planes (tc_split_x) both take them from here, so they hold the very same bits.
__device__ __forceinline__ void tc_split4(float (&cur)[4], int terms, uint2 (&out)[3]) {
#pragma unroll
    for (int term = 0; term < 3; term++) {
        if (term >= terms) break;
        uint32_t w[2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const __nv_bfloat162 b = __floats2bfloat162_rn(cur[2 * j], cur[2 * j + 1]);
            w[j] = *(const uint32_t*)&b;
            cur[2 * j] -= __low2float(b);
            cur[2 * j + 1] -= __high2float(b);
        }
        out[term] = make_uint2(w[0], w[1]);
    }
}

// The next K step's activations of one thread: BN tokens x BK inputs as float4 pieces
// (piece i: token i / XP, inputs 4 (i % XP) ..+4); zeros past the tokens or K.
template <int BN, int BK>
struct TcXLoad {
    static constexpr int LD = tc_ld<BK>();
    static constexpr int XP = BK / 4;
    static constexpr int L = BN * XP / TC_THREADS;
    float4 v[L];

    template <typename XRow>
    __device__ __forceinline__ void load(XRow xrow, int ntok, int k0, int K, bool xvec) {
#pragma unroll
        for (int l = 0; l < L; l++) {
            const int i = threadIdx.x + l * TC_THREADS;
            const int t = i / XP, k = k0 + (i % XP) * 4;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t < ntok) {
                const float* p = xrow(t) + k;
                if (xvec) {
                    if (k < K) x = __ldg((const float4*)p);  // K % 4 == 0 here
                } else {
                    if (k < K) x.x = p[0];
                    if (k + 1 < K) x.y = p[1];
                    if (k + 2 < K) x.z = p[2];
                    if (k + 3 < K) x.w = p[3];
                }
            }
            v[l] = x;
        }
    }

    // Splits into bf16 parts X[term][BN][LD]: x = hi + mid + lo (+ what lies below f32's
    // 24 bits of significand), the first `terms` of them stored. Each remainder x - bf16(x) is
    // exact in f32.
    __device__ __forceinline__ void store(bf16_t* X, int terms) const {
#pragma unroll
        for (int l = 0; l < L; l++) {
            const int i = threadIdx.x + l * TC_THREADS;
            const int t = i / XP, kq = (i % XP) * 4;
            float cur[4] = {v[l].x, v[l].y, v[l].z, v[l].w};
            uint2 parts[3];
            tc_split4(cur, terms, parts);
#pragma unroll
            for (int term = 0; term < 3; term++) {
                if (term >= terms) break;
                *(uint2*)(X + (term * BN + t) * LD + kq) = parts[term];
            }
        }
    }
};


// Pre-split activations ("xs" kernels): x [rows, cols] f32 (row stride ldx) into bf16 parts,
// row r's part j at out + (r * terms + j) * cols (cols % 8 == 0), once per GEMM instead of once
// per block and K step; each thread splits 8 inputs.
extern "C" __global__ void __launch_bounds__(256) tc_split_x(const float* __restrict__ x, int ldx, int rows,
                                                             int cols, int terms, bf16_t* __restrict__ out) {
    pdl_entry();
    const int c8 = cols / 8;
    const size_t n = (size_t)rows * c8;
    const bool vec = ((uintptr_t)x % 16 == 0) && ldx % 4 == 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / c8;
        const int c = (int)(i % c8) * 8;
        const float* p = x + r * ldx + c;
        float v[8];
        if (vec) {
            const float4 a = __ldg((const float4*)p), b = __ldg((const float4*)p + 1);
            v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = p[j];
        }
        float lo[4] = {v[0], v[1], v[2], v[3]}, hi[4] = {v[4], v[5], v[6], v[7]};
        uint2 pl[3], ph[3];
        tc_split4(lo, terms, pl);
        tc_split4(hi, terms, ph);
#pragma unroll
        for (int term = 0; term < 3; term++)
            if (term < terms)
                *(uint4*)(out + (r * terms + term) * cols + c) =
                    make_uint4(pl[term].x, pl[term].y, ph[term].x, ph[term].y);
    }
}


// The activation tile from pre-split planes: BN tokens x BK inputs of each part copied
// asynchronously into X[term][BN][LD], the same layout and values TcXLoad::store writes
// (zeros past the tokens or K; K % 8 == 0, so a 16-byte piece is wholly inside or outside).
// xrow(t): token t's part 0; part j lies j * ld further.
template <int BN, int BK>
struct TcXsLoad {
    static constexpr int LD = tc_ld<BK>();
    static constexpr int XP = BK / 8;  // 16-byte pieces per token and part
    static constexpr int L = BN * XP / TC_THREADS;
    static_assert(BN * XP % TC_THREADS == 0, "tile shape");

    template <typename XRow>
    __device__ __forceinline__ static void issue(bf16_t* X, XRow xrow, int ntok, int k0, int K, int ld, int terms) {
#pragma unroll
        for (int l = 0; l < L; l++) {
            const int i = threadIdx.x + l * TC_THREADS;
            const int t = i / XP, kq = (i % XP) * 8, k = k0 + kq;
            const bool ok = t < ntok && k < K;
            // Nothing is read where !ok; the address is token 0's (a block has one at least).
            const bf16_t* src = ok ? xrow(t) + k : xrow(0);
            for (int term = 0; term < terms; term++)
                cp_async16_zfill(X + (term * BN + t) * LD + kq, src + (ok ? (size_t)term * ld : 0), ok);
        }
    }
};

// Shared bytes of the two stages: the 128-row weight tile and `terms` BN-token activation tiles.
template <int BK>
__host__ __device__ constexpr int tc_stage_elems(int bn, int terms) { return (TC_BM + terms * bn) * tc_ld<BK>(); }
// The `_xs` kernels: two weight stages and three activation stages (`tc_xs_smem` in ops.rs).

// MMAs of one 16-input slice: the warp's two 16-row tiles (A fragments `a`) times TG 8-token
// tiles from token `n0` of the activation part at Xt (offset to the slice), into `part`
// (overwritten when FIRST).
template <bool FIRST, int TG, int LD>
__device__ __forceinline__ void tc_mma_slice(float (&part)[2][TG][4], const uint32_t (&a)[2][4], const bf16_t* Xt,
                                             int n0) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int jp = 0; jp < TG / 2; jp++) {
        // B fragments of two 8-token tiles: matrices (tokens 0-7, k 0-7), (0-7, 8-15),
        // (8-15, 0-7), (8-15, 8-15), the shared rows being tokens (the .col operand).
        uint32_t b[4];
        const int n = n0 + jp * 16 + (lane & 7) + (lane >> 4) * 8;
        ldsm_x4(b, Xt + n * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if constexpr (FIRST) {
                mma_bf16_zero(part[i][2 * jp], a[i], b[0], b[1]);
                mma_bf16_zero(part[i][2 * jp + 1], a[i], b[2], b[3]);
            } else {
                mma_bf16(part[i][2 * jp], a[i], b[0], b[1]);
                mma_bf16(part[i][2 * jp + 1], a[i], b[2], b[3]);
            }
        }
    }
}

// One K step (BK inputs) of a warp's 32 x BN/2 accumulators from a shared stage. The warp's
// two 16-row MMA tiles start at shared rows m0 and m1; its tokens at wn * BN/2.
// The tensor cores truncate (round toward zero) each MMA's f32 sum, a bias that grows with the
// number of MMAs feeding one accumulator (K / 16 x terms): so each step's products are summed
// from zero in a partial accumulator, then added to acc with an ordinary (rounded) add; up to
// 4 token tiles at a time (8 independent MMA chains).
template <int BN, int BK>
__device__ __forceinline__ void tc_step(const bf16_t* A, const bf16_t* X, int terms, int m0, int m1,
                                        float (&acc)[2][BN / 16][4]) {
    constexpr int NT = BN / 16;            // 8-token MMA tiles per warp
    constexpr int TG = NT < 4 ? NT : 4;    // token tiles per partial accumulator group
    constexpr int KS = BK / 16;            // 16-input slices per step
    constexpr int LD = tc_ld<BK>();
    static_assert(BK % 16 == 0 && NT % TG == 0 && TG % 2 == 0, "tile shape");
    const int lane = threadIdx.x & 31, wn = (threadIdx.x >> 5) >> 2;
    // A fragments of every slice: lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows
    // at k + 8.
    uint32_t a[KS][2][4];
#pragma unroll
    for (int h = 0; h < KS; h++) {
        ldsm_x4(a[h][0], A + (m0 + (lane & 15)) * LD + 16 * h + (lane >> 4) * 8);
        ldsm_x4(a[h][1], A + (m1 + (lane & 15)) * LD + 16 * h + (lane >> 4) * 8);
    }
#pragma unroll
    for (int g = 0; g < NT; g += TG) {
        const int n0 = wn * (BN / 2) + g * 8;
        float part[2][TG][4];
        tc_mma_slice<true, TG, LD>(part, a[0], X, n0);
        for (int term = 1; term < terms; term++) tc_mma_slice<false, TG, LD>(part, a[0], X + term * BN * LD, n0);
#pragma unroll
        for (int h = 1; h < KS; h++)
            for (int term = 0; term < terms; term++)
                tc_mma_slice<false, TG, LD>(part, a[h], X + term * BN * LD + 16 * h, n0);
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < TG; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[i][g + j][e] += part[i][j][e];
    }
}

// The K loop of one block tile (see the top of the file); acc as in tc_step. XS: xrow gives
// pre-split bf16 planes (part j of a row xs_ld after part j - 1), copied with cp.async straight
// into the next stage while this step's MMAs run; else f32 rows split here.
template <int FMT, int BN, int BK, bool XS = false, typename XRow>
__device__ __forceinline__ void tc_mainloop(const LinearW& W0, const LinearW& W1, int split, int row0, int K,
                                            XRow xrow, int ntok, bool xvec, int terms, int m0, int m1,
                                            float (&acc)[2][BN / 16][4], int xs_ld = 0) {
    extern __shared__ __align__(16) uint8_t tc_smem[];
    bf16_t* sm = (bf16_t*)tc_smem;
    constexpr int LD = tc_ld<BK>();
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < BN / 16; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
    if constexpr (XS) {
        // Deeper than the in-block split: the weight codes of step s load into register set
        // s & 1 two steps ahead (issued after the store of step s - 2, decoded at the end of step
        // s - 1), and the activations of step s copy into X stage s % 3 two steps ahead
        // (cp.async groups, one per step, empty ones too, so wait_group 1 leaves just the
        // newest in flight). Shared: W stages 0 and 1, then X stages 0-2 (tc_xs_smem).
        bf16_t* xsm = sm + 2 * TC_BM * LD;
        const int xstage = terms * BN * LD;
        const int nk = (K + BK - 1) / BK;
        typename TcWSel<FMT, BK>::T wl, wl2;
        wl.load(W0, W1, split, row0, 0);
        TcXsLoad<BN, BK>::issue(xsm, xrow, ntok, 0, K, xs_ld, terms);
        cp_async_commit();
        if (nk > 1) {
            wl2.load(W0, W1, split, row0, BK);
            TcXsLoad<BN, BK>::issue(xsm + xstage, xrow, ntok, BK, K, xs_ld, terms);
        }
        cp_async_commit();
        wl.store(sm);
        if (nk > 2) wl.load(W0, W1, split, row0, 2 * BK);
        cp_async_wait<1>();
        __syncthreads();
        // Step kt with `next` the register set of step kt + 1 (and kt + 3).
        auto step = [&](int kt, typename TcWSel<FMT, BK>::T& next) {
            // X stage (kt + 2) % 3 and W stage (kt + 1) & 1 were last read in step kt - 1,
            // before the previous barrier.
            if (kt + 2 < nk)
                TcXsLoad<BN, BK>::issue(xsm + ((kt + 2) % 3) * xstage, xrow, ntok, (kt + 2) * BK, K, xs_ld, terms);
            cp_async_commit();
            tc_step<BN, BK>(sm + (kt & 1) * TC_BM * LD, xsm + (kt % 3) * xstage, terms, m0, m1, acc);
            if (kt + 1 < nk) next.store(sm + ((kt + 1) & 1) * TC_BM * LD);
            if (kt + 3 < nk) next.load(W0, W1, split, row0, (kt + 3) * BK);
            cp_async_wait<1>();  // step kt + 1's activations
            __syncthreads();
        };
        for (int kt = 0; kt < nk; kt += 2) {
            step(kt, wl2);
            if (kt + 1 < nk) step(kt + 1, wl);
        }
    } else {
        const int stage = tc_stage_elems<BK>(BN, terms);
        TcWLoad<FMT, BK> wl;
        TcXLoad<BN, BK> xl;
        wl.load(W0, W1, split, row0, 0);
        xl.load(xrow, ntok, 0, K, xvec);
        wl.store(sm);
        xl.store(sm + TC_BM * LD, terms);
        __syncthreads();
        const int nk = (K + BK - 1) / BK;
        for (int kt = 0; kt < nk; kt++) {
            const bf16_t* cur = sm + (kt & 1) * stage;
            const bool more = kt + 1 < nk;
            if (more) {
                wl.load(W0, W1, split, row0, (kt + 1) * BK);
                xl.load(xrow, ntok, (kt + 1) * BK, K, xvec);
            }
            tc_step<BN, BK>(cur, cur + TC_BM * LD, terms, m0, m1, acc);
            if (more) {
                // The other stage was last read before the previous barrier.
                bf16_t* nxt = sm + ((kt + 1) & 1) * stage;
                wl.store(nxt);
                xl.store(nxt + TC_BM * LD, terms);
            }
            __syncthreads();
        }
    }
}

// Accumulator element e of MMA tile (i, j): row offset within the 16-row tile, token offset
// within the warp's tokens.
__device__ __forceinline__ int tc_row(int e) { return ((threadIdx.x & 31) >> 2) + (e >> 1) * 8; }
template <int BN>
__device__ __forceinline__ int tc_tok(int j, int e) {
    return ((threadIdx.x >> 5) >> 2) * (BN / 2) + j * 8 + 2 * (threadIdx.x & 3) + (e & 1);
}

// y = W x for a 128-row x BN-token tile (semantics of gemm_impl). XS (the `_xs` kernels): a.x
// holds tc_split_x's planes of rows a.ldx inputs long (a.terms parts per token, a.ldx % 8 == 0,
// xg_stride % 8 == 0 and W.in % 8 == 0: whole 16-byte pieces).
template <int FMT, int BN, int BK, bool XS = false>
__device__ void gemm_tc_impl(const LinearW& W, const GemmArgs& a) {
    const int row0 = blockIdx.x * TC_BM, tok0 = blockIdx.y * BN;
    const int ntok = min(BN, a.M - tok0);
    // Grouped input (wo_a): the host keeps a tile's rows inside one group (xg_rows % 128 == 0).
    const int xoff = a.xg_rows ? (row0 / a.xg_rows) * a.xg_stride : 0;
    const int wm = (threadIdx.x >> 5) & 3;
    float acc[2][BN / 16][4];
    if constexpr (XS) {
        const size_t rs = (size_t)a.terms * a.ldx;  // elements per token (all its parts)
        const bf16_t* xb = (const bf16_t*)a.x + (size_t)tok0 * rs + xoff;
        auto xrow = [&](int t) { return xb + (size_t)t * rs; };
        tc_mainloop<FMT, BN, BK, true>(W, W, TC_BM, row0, W.in, xrow, ntok, true, a.terms, wm * 32, wm * 32 + 16,
                                       acc, a.ldx);
    } else {
        const float* xb = a.x + (size_t)tok0 * a.ldx + xoff;
        const int ldx = a.ldx;
        const bool xvec = ((uintptr_t)xb % 16 == 0) && ldx % 4 == 0 && W.in % 4 == 0;
        auto xrow = [&](int t) { return xb + (size_t)t * ldx; };
        tc_mainloop<FMT, BN, BK>(W, W, TC_BM, row0, W.in, xrow, ntok, xvec, a.terms, wm * 32, wm * 32 + 16, acc);
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < BN / 16; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = row0 + wm * 32 + i * 16 + tc_row(e), t = tc_tok<BN>(j, e);
                if (r < W.out && t < ntok) a.y[(size_t)(tok0 + t) * a.ldy + r] = acc[i][j][e];
            }
}

// Blocks per SM the `_xs` kernels are compiled for: two of 64 tokens x 32 inputs (128
// registers; three would spill).
#ifndef TC_XS_BLOCKS
#define TC_XS_BLOCKS 2
#endif
#define TC_XS_MINB(BN, BK) ((BN) == 64 && (BK) == 32 ? TC_XS_BLOCKS : 1)

// Dense kernels: 128 or 64 (`_n64`) tokens per block, K steps of 64 or 32 (`_k32`). 64 tokens
// need fewer registers (two blocks per SM at K step 32), 128 reuse each decoded weight tile more.
// `_xs`: the same on pre-split activations (tc_split_x), bit for bit.
#define GEMM_TC_K(FMT, NAME, BN, BK, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) gemm_tc_##NAME##SUFFIX(LinearW W, GemmArgs a) { \
        pdl_entry();                                                                                     \
        gemm_tc_impl<FMT, BN, BK>(W, a);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_XS_MINB(BN, BK)) gemm_tc_##NAME##SUFFIX##_xs(LinearW W, GemmArgs a) { \
        pdl_entry();                                                                                     \
        gemm_tc_impl<FMT, BN, BK, true>(W, a);                                                           \
    }
#define GEMM_TC(FMT, NAME)                \
    GEMM_TC_K(FMT, NAME, 128, 64, )       \
    GEMM_TC_K(FMT, NAME, 128, 32, _k32)   \
    GEMM_TC_K(FMT, NAME, 64, 64, _n64)    \
    GEMM_TC_K(FMT, NAME, 64, 32, _n64_k32)
GEMM_TC(FMT_BF16, bf16)
GEMM_TC(FMT_FP8, fp8)
GEMM_TC(FMT_FP4, fp4)

// The tile's pairs into shared memory (see load_pairs); GB_T (64) pairs per tile.
#define TC_MOE_BN GB_T

// Grid of the MoE kernels: (row blocks, tiles), row blocks varying fastest, so the blocks in
// flight share a few tiles' activations and their experts' weights in L2 (tiles first would
// spread them over all of x and re-read it from memory for every row block).

// Gate and up of 64 intermediate rows for a tile of pairs of one expert, SwiGLU fused
// (semantics of moe_up_gemm_impl): shared rows 0-63 are w1's, 64-127 w3's, so each warp holds
// the gate (MMA tile 0) and up (MMA tile 1) values of the same 16 rows. XS: a.x holds
// tc_split_x's planes of the tokens' rows (a.terms parts of a.D inputs per token, a.D % 8 == 0).
template <int FMT, int BK, bool XS = false>
__device__ void moe_up_gemm_tc_impl(const MoeGemmArgs& a) {
    __shared__ int pairs[GB_T];
    const int tile = blockIdx.y, row0 = blockIdx.x * (TC_BM / 2);
    const int e = a.tile_expert[tile], n = load_pairs(a, tile, pairs);
    const LinearW W1 = a.w1[e], W3 = a.w3[e];
    const int wm = (threadIdx.x >> 5) & 3;
    float acc[2][TC_MOE_BN / 16][4];
    if constexpr (XS) {
        // The tokens' rows, once per block (not a division per load and K step).
        __shared__ const bf16_t* xrows[GB_T];
        if (threadIdx.x < GB_T)
            xrows[threadIdx.x] = (const bf16_t*)a.x + (size_t)(pairs[threadIdx.x] / a.k) * a.terms * a.D;
        __syncthreads();
        auto xrow = [&](int t) { return xrows[t]; };
        tc_mainloop<FMT, TC_MOE_BN, BK, true>(W1, W3, TC_BM / 2, row0, a.D, xrow, n, true, a.terms, wm * 16,
                                              TC_BM / 2 + wm * 16, acc, a.D);
    } else {
        // The tokens' rows of x, once per block (not a division per load and K step).
        __shared__ const float* xrows[GB_T];
        if (threadIdx.x < GB_T) xrows[threadIdx.x] = a.x + (size_t)(pairs[threadIdx.x] / a.k) * a.D;
        __syncthreads();
        auto xrow = [&](int t) { return xrows[t]; };
        const bool xvec = ((uintptr_t)a.x % 16 == 0) && a.D % 4 == 0;
        tc_mainloop<FMT, TC_MOE_BN, BK>(W1, W3, TC_BM / 2, row0, a.D, xrow, n, xvec, a.terms, wm * 16,
                                        TC_BM / 2 + wm * 16, acc);
    }
#pragma unroll
    for (int j = 0; j < TC_MOE_BN / 16; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int r = row0 + wm * 16 + tc_row(c), t = tc_tok<TC_MOE_BN>(j, c);
            if (r >= a.I || t >= n) continue;
            const int p = pairs[t];
            float hv = swiglu_clamped(acc[0][j][c], acc[1][j][c], a.lim);
            if (a.rw_inside) hv *= a.rw[p];
            a.h[(size_t)p * a.I + r] = hv;
        }
}

// Down projection of a tile of pairs (semantics of moe_down_gemm_impl). XS: a.x (unused
// otherwise) holds tc_split_x's planes of h (a.terms parts of a.I inputs per pair,
// a.I % 8 == 0).
template <int FMT, int BK, bool XS = false>
__device__ void moe_down_gemm_tc_impl(const MoeGemmArgs& a) {
    __shared__ int pairs[GB_T];
    const int tile = blockIdx.y, row0 = blockIdx.x * TC_BM;
    const int e = a.tile_expert[tile], n = load_pairs(a, tile, pairs);
    const LinearW W2 = a.w2[e];
    const int wm = (threadIdx.x >> 5) & 3;
    float acc[2][TC_MOE_BN / 16][4];
    if constexpr (XS) {
        const bf16_t* hs = (const bf16_t*)a.x;
        const size_t rs = (size_t)a.terms * a.I;
        auto xrow = [&](int t) { return hs + (size_t)pairs[t] * rs; };
        tc_mainloop<FMT, TC_MOE_BN, BK, true>(W2, W2, TC_BM, row0, a.I, xrow, n, true, a.terms, wm * 32,
                                              wm * 32 + 16, acc, a.I);
    } else {
        auto xrow = [&](int t) { return a.h + (size_t)pairs[t] * a.I; };
        const bool xvec = ((uintptr_t)a.h % 16 == 0) && a.I % 4 == 0;
        tc_mainloop<FMT, TC_MOE_BN, BK>(W2, W2, TC_BM, row0, a.I, xrow, n, xvec, a.terms, wm * 32, wm * 32 + 16,
                                        acc);
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < TC_MOE_BN / 16; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int r = row0 + wm * 32 + i * 16 + tc_row(c), t = tc_tok<TC_MOE_BN>(j, c);
                if (r < a.D && t < n) a.out[(size_t)pairs[t] * a.D + r] = acc[i][j][c];
            }
}

#define MOE_GEMM_TC_K(FMT, NAME, BK, SUFFIX)                                                              \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) moe_up_gemm_tc_##NAME##SUFFIX(MoeGemmArgs a) {   \
        pdl_entry();                                                                                     \
        moe_up_gemm_tc_impl<FMT, BK>(a);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) moe_down_gemm_tc_##NAME##SUFFIX(MoeGemmArgs a) { \
        pdl_entry();                                                                                     \
        moe_down_gemm_tc_impl<FMT, BK>(a);                                                               \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_XS_MINB(TC_MOE_BN, BK)) moe_up_gemm_tc_##NAME##SUFFIX##_xs(MoeGemmArgs a) { \
        pdl_entry();                                                                                     \
        moe_up_gemm_tc_impl<FMT, BK, true>(a);                                                           \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_XS_MINB(TC_MOE_BN, BK)) moe_down_gemm_tc_##NAME##SUFFIX##_xs(MoeGemmArgs a) { \
        pdl_entry();                                                                                     \
        moe_down_gemm_tc_impl<FMT, BK, true>(a);                                                         \
    }
#define MOE_GEMM_TC(FMT, NAME)        \
    MOE_GEMM_TC_K(FMT, NAME, 64, )    \
    MOE_GEMM_TC_K(FMT, NAME, 32, _k32)
MOE_GEMM_TC(FMT_BF16, bf16)
MOE_GEMM_TC(FMT_FP8, fp8)
MOE_GEMM_TC(FMT_FP4, fp4)
