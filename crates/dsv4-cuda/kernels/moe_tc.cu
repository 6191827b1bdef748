// The routed experts of decode batches on the tensor cores (FP4 weights). The SIMT per-pair
// kernels (moe.cu) spend about four instructions per weight decoding e2m1 into f32 and are
// compute-bound at ~1.2 of 4.2 TB/s; here a weight costs ~1.4 (nibbles -> f16 bit fields, no
// conversion to f32) and the products run as mma.sync m16n8k16 f16 -> f32.
//
// Layout of one MMA (16 rows × 16 inputs): lane (g, t) of a warp owns one 32-input scale group
// of rows g and g+8 per step, and the four lanes t of a row hold four different groups. The
// activation matrix B is block-diagonal: column n = 4p + j carries part p (of two f16 parts,
// so the split keeps 22 bits) of the inputs owned by lane j only. So D[row][4p + j] is the
// dot product of one scale group with one part: each column's 32 products are summed from zero
// by the tensor core (as the tile GEMMs do, since its accumulation truncates), then scaled by
// its own e8m0 and added in f32.
//
// Activations are scaled per token by a power of two into f16 range (max |x| in [2^14, 2^15))
// and the scale undone at the end, so the split is exact for every magnitude f32 holds.
//
// Block x is a pair (token, slot); only the first pair that picked an expert works, and it
// serves every pair of that expert, up to MT tokens per pass, so an expert's weights are read
// once however many tokens picked it. Block y is a tile of rows: 8 gate + 8 up rows per warp
// (SwiGLU in the warp) for `up`, 16 rows per warp for `down`.
#include "linear.cuh"  // MoeArgs: moe.cu, before this file in all.cu

#define MOE_TC_WARPS 4

__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Eight e2m1 nibbles (a little-endian word: byte b holds elements 2b, 2b+1) as four half2 of
// 2^-14 times their values (see `e2m1_half_bits`), pairing elements (0,4), (2,6), (1,5), (3,7).
// Each byte lane turns a nibble into its f16 high byte, sign << 7 | magnitude << 1.
__device__ __forceinline__ void fp4x8_to_half2(uint32_t w, uint32_t (&p)[4]) {
    const uint32_t odd = ((w >> 3) & 0x0e0e0e0eu) | (w & 0x80808080u);
    const uint32_t even = ((w << 1) & 0x0e0e0e0eu) | ((w << 4) & 0x80808080u);
    p[0] = __byte_perm(even, 0, 0x2404);
    p[1] = even & 0xff00ff00u;
    p[2] = __byte_perm(odd, 0, 0x2404);
    p[3] = odd & 0xff00ff00u;
}

__device__ __forceinline__ uint32_t half2_bits(float a, float b) {
    return (uint32_t)__half_as_ushort(__float2half_rn(a)) |
           ((uint32_t)__half_as_ushort(__float2half_rn(b)) << 16);
}

// The B operand of one token: per 32-input group G and part p, 16 words in the order the lanes
// read them (word i of the group's nibbles feeds MMAs 2i and 2i+1, see fp4x8_to_half2):
// [half2(x8i, x8i+4), half2(x8i+2, x8i+6), half2(x8i+1, x8i+5), half2(x8i+3, x8i+7)].
// Returns the factor that undoes the token's scaling and the 2^-14 of the weights.
__device__ float moe_tc_prep(const float* x, int K, uint4* B, float* red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float amax = 0.f;
    for (int c = tid; c < K / 8; c += blockDim.x) {
        const float4 u = __ldg((const float4*)x + 2 * c), v = __ldg((const float4*)x + 2 * c + 1);
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(u.x), fabsf(u.y)), fmaxf(fabsf(u.z), fabsf(u.w))));
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        // NaN must win the max (fmaxf drops it): keep it as a NaN flag.
        if (isnan(u.x + u.y + u.z + u.w + v.x + v.y + v.z + v.w)) amax = INFINITY;
    }
    amax = warp_max(amax);
    __syncthreads();  // red[] may still be read by the previous pass
    if (lane == 0) red[warp] = amax;
    __syncthreads();
    amax = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) amax = fmaxf(amax, red[w]);
    // 2^sh brings max |x| into [2^14, 2^15); inf/NaN and zero rows keep sh = 0.
    int sh = 0;
    if (amax > 0.f && amax < INFINITY) {
        const int e = (int)((__float_as_uint(amax) >> 23) & 0xff) - 127;
        sh = min(max(14 - e, -100), 100);
    }
    const float up = __uint_as_float((uint32_t)(127 + sh) << 23);
    for (int c = tid; c < K / 8; c += blockDim.x) {
        const float4 u = __ldg((const float4*)x + 2 * c), v = __ldg((const float4*)x + 2 * c + 1);
        const float f[8] = {u.x * up, u.y * up, u.z * up, u.w * up, v.x * up, v.y * up, v.z * up, v.w * up};
        float hi[8], lo[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            hi[j] = __half2float(__float2half_rn(f[j]));
            lo[j] = f[j] - hi[j];  // exact
        }
        const int G = c >> 2, i = c & 3;
        B[(G * 2) * 4 + i] = make_uint4(half2_bits(hi[0], hi[4]), half2_bits(hi[2], hi[6]),
                                        half2_bits(hi[1], hi[5]), half2_bits(hi[3], hi[7]));
        B[(G * 2 + 1) * 4 + i] = make_uint4(half2_bits(lo[0], lo[4]), half2_bits(lo[2], lo[6]),
                                            half2_bits(lo[1], lo[5]), half2_bits(lo[3], lo[7]));
    }
    return __uint_as_float((uint32_t)(127 + 14 - sh) << 23);
}

// Rows (ra of A, rb of Bw) · the pass's tokens, for the warp's 16 rows: ra/rb are this lane's
// rows g and g + 8. Returns per token the two rows' sums, complete in every lane of the quad.
template <int MT>
__device__ __forceinline__ void moe_tc_dot(const LinearW& A, int ra, const LinearW& Bw, int rb,
                                           int K, const uint4* Bs, int nm, float (&ya)[MT],
                                           float (&yb)[MT]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t rowb = (size_t)K / 2, srow = (size_t)K / 32;
    const uint4* pa = (const uint4*)(A.w + ra * rowb) + 2 * t;
    const uint4* pb = (const uint4*)(Bw.w + rb * rowb) + 2 * t;
    const uint32_t* sa = (const uint32_t*)((const uint8_t*)A.scales + ra * srow) + (t & 1);
    const uint32_t* sb = (const uint32_t*)((const uint8_t*)Bw.scales + rb * srow) + (t & 1);
    // Lane (g, t) feeds B's column g, which is nonzero for the inputs of lane t = g % 4 only
    // (part g / 4); the other lanes read a zero block.
    const bool active = (g & 3) == t;
    const int part = g >> 2;
    const int tok_stride = active ? K / 32 * 2 * 4 : 0;  // uint4s per token
    float acc[MT][4] = {};
    const int steps = K / 256;  // 8 groups (256 inputs, 128 bytes per row) per step
    uint4 q[2][2] = {{__ldg(pa), __ldg(pa + 1)}, {__ldg(pb), __ldg(pb + 1)}};
    uint32_t s[2] = {__ldg(sa), __ldg(sb)};
    for (int st = 0; st < steps; st++) {
        uint4 nq[2][2] = {{q[0][0], q[0][1]}, {q[1][0], q[1][1]}};
        uint32_t ns[2] = {s[0], s[1]};
        if (st + 1 < steps) {
            nq[0][0] = __ldg(pa + 8 * (st + 1));
            nq[0][1] = __ldg(pa + 8 * (st + 1) + 1);
            nq[1][0] = __ldg(pb + 8 * (st + 1));
            nq[1][1] = __ldg(pb + 8 * (st + 1) + 1);
            ns[0] = __ldg(sa + 2 * (st + 1));
            ns[1] = __ldg(sb + 2 * (st + 1));
        }
#pragma unroll
        for (int ng = 0; ng < 2; ng++) {
            const int G = st * 8 + 2 * t + ng;
            const uint4* bp = active ? Bs + 4 + (G * 2 + part) * 4 : Bs;  // Bs[0..3]: zeros
            float d[MT][4] = {};
            const uint32_t wa[4] = {q[0][ng].x, q[0][ng].y, q[0][ng].z, q[0][ng].w};
            const uint32_t wb[4] = {q[1][ng].x, q[1][ng].y, q[1][ng].z, q[1][ng].w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                uint32_t xa[4], xb[4];
                fp4x8_to_half2(wa[i], xa);
                fp4x8_to_half2(wb[i], xb);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if (m < nm) {
                        const uint4 b = bp[m * tok_stride + i];
                        mma_f16(d[m], xa[0], xb[0], xa[1], xb[1], b.x, b.y);
                        mma_f16(d[m], xa[2], xb[2], xa[3], xb[3], b.z, b.w);
                    }
                }
            }
            // Column 2t (+1) is group lane (2t) % 4 (+1): groups 2j + ng of the step, bytes
            // ng and 2 + ng of this lane's scale word.
            const float a0 = e8m0_to_f32((uint8_t)(s[0] >> (8 * ng)));
            const float a1 = e8m0_to_f32((uint8_t)(s[0] >> (8 * (2 + ng))));
            const float b0 = e8m0_to_f32((uint8_t)(s[1] >> (8 * ng)));
            const float b1 = e8m0_to_f32((uint8_t)(s[1] >> (8 * (2 + ng))));
#pragma unroll
            for (int m = 0; m < MT; m++) {
                acc[m][0] = fmaf(d[m][0], a0, acc[m][0]);
                acc[m][1] = fmaf(d[m][1], a1, acc[m][1]);
                acc[m][2] = fmaf(d[m][2], b0, acc[m][2]);
                acc[m][3] = fmaf(d[m][3], b1, acc[m][3]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            q[r][0] = nq[r][0];
            q[r][1] = nq[r][1];
            s[r] = ns[r];
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
        float u = acc[m][0] + acc[m][1], v = acc[m][2] + acc[m][3];
        u += __shfl_xor_sync(0xffffffffu, u, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        u += __shfl_xor_sync(0xffffffffu, u, 2);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        ya[m] = u;
        yb[m] = v;
    }
}

// The next (up to MT) pairs at or after *next that picked expert e, in pair order.
template <int MT>
__device__ int moe_tc_members(const int* picks, int P, int e, int* next, int* mem) {
    const int lane = threadIdx.x & 31;
    int n = 0, p0 = *next, stop = P;
    while (n < MT && p0 < P) {
        const bool hit = p0 + lane < P && picks[p0 + lane] == e;
        unsigned b = __ballot_sync(0xffffffffu, hit);
        while (b && n < MT) {
            const int l = __ffs(b) - 1;
            if (lane == 0) mem[n] = p0 + l;
            n++;
            b &= b - 1;
            if (n == MT) stop = p0 + l + 1;
        }
        p0 += 32;
    }
    *next = n == MT ? stop : P;
    return n;
}

// Shared memory: zeros (4 uint4), then MT tokens' B planes (K * 4 bytes each).
template <int MT, bool UP>
__device__ void moe_tc_impl(const MoeArgs& a) {
    extern __shared__ uint4 smem_u4[];
    __shared__ int mem[MT];
    __shared__ float fac[MT];
    __shared__ float red[MOE_TC_WARPS];
    __shared__ int nm_s, next_s;
    const int P = gridDim.x, pair = blockIdx.x;
    const int e = a.picks[pair];
    // Only the first pair of each expert works (it serves the others).
    int dup = 0;
    for (int p = threadIdx.x; p < pair; p += blockDim.x) dup |= a.picks[p] == e;
    if (__syncthreads_or(dup)) return;
    const int K = UP ? a.D : a.I;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    if (tid < 16) ((uint32_t*)smem_u4)[tid] = 0u;
    const int tile = blockIdx.y * MOE_TC_WARPS + warp;
    const LinearW Wa = UP ? a.w1[e] : a.w2[e];
    const LinearW Wb = UP ? a.w3[e] : Wa;
    const int ra = UP ? tile * 8 + g : tile * 16 + g;
    const int rb = UP ? ra : ra + 8;
    const size_t plane = (size_t)K / 32 * 2 * 4;  // uint4s per token
    if (tid == 0) next_s = pair;
    __syncthreads();
    for (;;) {
        if (warp == 0) {
            int next = next_s;
            const int n = moe_tc_members<MT>(a.picks, P, e, &next, mem);
            if (lane == 0) {
                nm_s = n;
                next_s = next;
            }
        }
        __syncthreads();
        const int nm = nm_s;
        if (nm == 0) return;
        for (int m = 0; m < nm; m++) {
            const int p = mem[m];
            const float* x = UP ? a.x + (size_t)(p / a.k) * a.D : a.h + (size_t)p * a.I;
            const float f = moe_tc_prep(x, K, smem_u4 + 4 + m * plane, red);
            if (tid == 0) fac[m] = f;
        }
        __syncthreads();
        float ya[MT], yb[MT];
        moe_tc_dot<MT>(Wa, ra, Wb, rb, K, smem_u4, nm, ya, yb);
        if (t == 0) {
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= nm) break;
                const int p = mem[m];
                if (UP) {
                    float gv = ya[m] * fac[m], uv = yb[m] * fac[m];
                    if (!isnan(a.lim)) { gv = fminf(gv, a.lim); uv = fminf(fmaxf(uv, -a.lim), a.lim); }
                    float v = gv / (1.0f + expf(-gv)) * uv;
                    if (a.rw_inside) v *= a.rw[p];
                    a.h[(size_t)p * a.I + ra] = v;
                } else {
                    a.out[(size_t)p * a.D + ra] = ya[m] * fac[m];
                    a.out[(size_t)p * a.D + rb] = yb[m] * fac[m];
                }
            }
        }
        __syncthreads();  // mem / fac / the planes are rewritten by the next pass
    }
}

#define MOE_TC(MT)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * MOE_TC_WARPS) moe_up_tc_fp4_m##MT(MoeArgs a) { \
        pdl_entry();                                                                        \
        moe_tc_impl<MT, true>(a);                                                           \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * MOE_TC_WARPS) moe_down_tc_fp4_m##MT(MoeArgs a) { \
        pdl_entry();                                                                        \
        moe_tc_impl<MT, false>(a);                                                          \
    }
MOE_TC(1)
MOE_TC(2)
MOE_TC(4)
