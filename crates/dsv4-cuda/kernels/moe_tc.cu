// The routed experts of decode batches on the tensor cores (FP4 weights). The SIMT per-pair
// kernels (moe.cu) spend about four instructions per weight decoding e2m1 into f32 and are
// compute-bound at ~1.2 of 4.2 TB/s; here a weight costs ~1.4 (nibbles -> f16 bit fields, no
// conversion to f32) and the products run as mma.sync m16n8k16 f16 -> f32.
//
// Layout: a step is 256 inputs (128 bytes of each row). Lane (g, t) of a warp loads 32 bytes of
// rows g and g+8 — two 32-input scale groups, taken one after the other (`ng`) — so in each
// MMA (16 rows × 16 inputs) the four lanes t of a row hold four different groups. The
// activation operand B is block-diagonal: column n = 4p + j carries part p (of two f16 parts,
// 22 bits) of the inputs of lane j only. So D[row][4p + j] is one scale group's dot product
// with one part: its 32 products are summed from zero by the tensor core (as the tile GEMMs
// do, since its accumulation truncates), then the lane scales it by the group's weight e8m0
// and activation factor and adds it in f32. `tools/check_moe_tc.py` emulates this layout.
//
// Activations are scaled per 32-input group by a power of two into f16 range, undone in that
// f32 scaling, so the split keeps 22 bits at every magnitude f32 holds.
//
// Block x is a pair (token, slot). An expert's pairs go in chunks of up to MT to the blocks of
// each chunk's first pair (the others exit), so an expert's weights are read once per MT tokens
// that picked it, and an expert many tokens picked still spreads over many blocks. Warps take
// 16-row tiles: 8 gate + 8 up rows (SwiGLU in the warp) for `up`, 16 rows for `down`; each
// lane keeps PF steps of loads in flight.
#include "linear.cuh"  // MoeArgs: moe.cu, before this file in all.cu

#define MOE_TC_WARPS 4

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

// The B operand of one token: per 32-input group G and part p, 16 words in the order the lanes
// read them (word i of the group's nibbles feeds MMAs 2i and 2i+1, see fp4x8_to_half2):
// [half2(x8i, x8i+4), half2(x8i+2, x8i+6), half2(x8i+1, x8i+5), half2(x8i+3, x8i+7)].
// Each group is scaled by a power of two that brings its max |x| into [2^14, 2^15) (so two
// f16 parts keep 22 bits at any magnitude); gs[G] gets the factor that undoes it and the
// weights' 2^-14. One pass, no block-wide step: the 4 threads of a group share their max.
// Threads 0..nthreads-1 take part (a multiple of 32; K / 8 too, so whole warps shuffle).
__device__ void moe_tc_prep(const float* x, int K, uint4* B, float* gs, int nthreads) {
    for (int c = threadIdx.x; c < K / 8; c += nthreads) {
        // (Coherent loads: moe_ffn_bulk reads hidden rows other blocks wrote in the same launch.)
        const float4 u = __ldcg((const float4*)x + 2 * c), v = __ldcg((const float4*)x + 2 * c + 1);
        const float f[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
        float amax = 0.f;
        bool nan = false;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            amax = fmaxf(amax, fabsf(f[j]));
            nan |= isnan(f[j]);
        }
        if (nan) amax = INFINITY;  // fmaxf drops NaN
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const int sh = f16_part_shift(amax);  // (0 for inf/NaN and zero groups)
        const float up = exp2i(sh);
        float hi[8], lo[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float y = f[j] * up;
            hi[j] = __half2float(__float2half_rn(y));
            lo[j] = isfinite(hi[j]) ? y - hi[j] : 0.f;  // exact; an inf stays inf, not NaN
        }
        const int G = c >> 2, i = c & 3;
        B[(G * 2) * 4 + i] = make_uint4(half2_bits(hi[0], hi[4]), half2_bits(hi[2], hi[6]),
                                        half2_bits(hi[1], hi[5]), half2_bits(hi[3], hi[7]));
        B[(G * 2 + 1) * 4 + i] = make_uint4(half2_bits(lo[0], lo[4]), half2_bits(lo[2], lo[6]),
                                            half2_bits(lo[1], lo[5]), half2_bits(lo[3], lo[7]));
        if (i == 0) gs[G] = exp2i(14 - sh);
    }
}

// Byte j of w as an e8m0 scale in 1..254 (no zero or NaN code: the f32 of exponent field b).
__device__ __forceinline__ float e8m0_normal(uint32_t w, int j) {
    return __uint_as_float(__byte_perm(w, 0, 0x4440 + j) << 23);
}

// One step's loads of a lane: 32 bytes of each of its two rows (two scale groups) and the
// rows' scale words.
struct MoeTcStep {
    uint4 q[2][2];
    uint32_t s[2];
    // Step n from the lane's row pointers (weights: 8 uint4 per step, scales: 2 words).
    __device__ __forceinline__ void load(const uint4* pa, const uint4* pb, const uint32_t* sa,
                                         const uint32_t* sb, int n) {
        q[0][0] = __ldg(pa + 8 * n);
        q[0][1] = __ldg(pa + 8 * n + 1);
        q[1][0] = __ldg(pb + 8 * n);
        q[1][1] = __ldg(pb + 8 * n + 1);
        s[0] = __ldg(sa + 2 * n);
        s[1] = __ldg(sb + 2 * n);
    }
};

// One step (256 inputs) of the warp's 16 rows · the pass's tokens, folded into acc: `st` holds
// the lane's loads of the step, `bf(m, ng, i)` the lane's B fragment of token m for word i of
// scale group ng (zero in the lanes whose column is another lane's) and `xf(m, ng, h)` the
// activation factor of the group in its accumulator column 2t + h (MoeTcLane). The B side
// comes from shared memory (`moe_tc_step`) or from registers a warp keeps across tiles
// (moe_bulk.cu).
template <int MT, class BF, class XF>
__device__ __forceinline__ void moe_tc_step_with(const MoeTcStep& st, int nm, float (&acc)[MT][4], BF bf, XF xf) {
#pragma unroll
    for (int ng = 0; ng < 2; ng++) {
        // Two accumulator chains (words 0-1, 2-3) for more independent MMAs in flight.
        float d[MT][4] = {}, d2[MT][4] = {};
        const uint4 qa = st.q[0][ng], qb = st.q[1][ng];
        const uint32_t wa[4] = {qa.x, qa.y, qa.z, qa.w};
        const uint32_t wb[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t xa[4], xb[4];
            fp4x8_to_half2(wa[i], xa);
            fp4x8_to_half2(wb[i], xb);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < nm) {
                    const uint4 b = bf(m, ng, i);
                    float(&dd)[4] = i < 2 ? d[m] : d2[m];
                    mma_f16(dd, xa[0], xb[0], xa[1], xb[1], b.x, b.y);
                    mma_f16(dd, xa[2], xb[2], xa[3], xb[3], b.z, b.w);
                }
            }
        }
        // (The scales are 2..252: GpuLinear::tc, checked by the caller.)
        const float a0 = e8m0_normal(st.s[0], ng), a1 = e8m0_normal(st.s[0], 2 + ng);
        const float b0 = e8m0_normal(st.s[1], ng), b1 = e8m0_normal(st.s[1], 2 + ng);
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m < nm) {
                const float xa = xf(m, ng, 0), xb = xf(m, ng, 1);
                acc[m][0] = fmaf(d[m][0] + d2[m][0], a0 * xa, acc[m][0]);
                acc[m][1] = fmaf(d[m][1] + d2[m][1], a1 * xb, acc[m][1]);
                acc[m][2] = fmaf(d[m][2] + d2[m][2], b0 * xa, acc[m][2]);
                acc[m][3] = fmaf(d[m][3] + d2[m][3], b1 * xb, acc[m][3]);
            }
        }
    }
}

// Lane (g, t) feeds B's column g, which is nonzero for the inputs of lane t = g % 4 only (part
// g / 4); the other lanes read a zero block. Its accumulator column 2t (+1) is the group of lane
// j = (2t) % 4 (+1): group 2j + ng of the step, two groups on for the next column pair.
struct MoeTcLane {
    bool active;
    int part, j0;
    __device__ __forceinline__ MoeTcLane() {
        const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
        active = (g & 3) == t;
        part = g >> 2;
        j0 = (2 * t) & 3;
    }
    // Group of scale group ng of step stp that this lane's B fragment carries.
    __device__ __forceinline__ int group(int stp, int ng) const { return stp * 8 + 2 * (threadIdx.x & 3) + ng; }
    // The first of the two groups its accumulator columns hold.
    __device__ __forceinline__ int acc_group(int stp, int ng) const { return stp * 8 + 2 * j0 + ng; }
};

// `moe_tc_step_with` with the B side from shared memory: `zero` four zero uint4s (the B operand
// of inactive lanes), `plane` token 0's B plane (token m's at m · plane_u4) and `gsc` token 0's
// group factors (K / 32 per token).
template <int MT>
__device__ __forceinline__ void moe_tc_step(const MoeTcStep& st, int stp, const uint4* zero,
                                            const uint4* plane, int plane_u4, const float* gsc,
                                            int G32, int nm, float (&acc)[MT][4]) {
    const MoeTcLane ln;
    const int tok_stride = ln.active ? plane_u4 : 0;
    moe_tc_step_with<MT>(
        st, nm, acc,
        [&](int m, int ng, int i) {
            const uint4* bp = ln.active ? plane + (ln.group(stp, ng) * 2 + ln.part) * 4 : zero;
            return bp[m * tok_stride + i];
        },
        [&](int m, int ng, int h) { return gsc[m * G32 + ln.acc_group(stp, ng) + 2 * h]; });
}

// The quad's sums of acc: per token, rows g (ya) and g + 8 (yb), complete in every lane of the
// quad.
template <int MT>
__device__ __forceinline__ void moe_tc_quad_sums(const float (&acc)[MT][4], float (&ya)[MT],
                                                 float (&yb)[MT]) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
        float u = acc[m][0] + acc[m][1], v = acc[m][2] + acc[m][3];
        quad_sum2(u, v);
        ya[m] = u;
        yb[m] = v;
    }
}

// Rows (ra of A, rb of Bw) · the pass's tokens, for the warp's 16 rows: ra/rb are this lane's
// rows g and g + 8; `st` holds the first PF steps' loads. Returns per token the two rows' sums,
// complete in every lane of the quad.
template <int MT, int PF>
__device__ __forceinline__ void moe_tc_dot(const uint4* pa, const uint4* pb, const uint32_t* sa,
                                           const uint32_t* sb, int K, MoeTcStep (&st)[PF],
                                           const uint4* Bs, const float* gsc, int nm,
                                           float (&ya)[MT], float (&yb)[MT]) {
    const int G32 = K / 32;
    const int plane_u4 = G32 * 2 * 4;  // uint4s per token
    float acc[MT][4] = {};
    const int steps = K / 256;  // 8 groups (256 inputs, 128 bytes per row) per step
    for (int s0 = 0; s0 < steps; s0 += PF) {
#pragma unroll
        for (int u = 0; u < PF; u++) {
            const int stp = s0 + u;
            if (stp >= steps) break;
            moe_tc_step<MT>(st[u], stp, Bs, Bs + 4, plane_u4, gsc, G32, nm, acc);
            // This buffer now takes the step PF ahead.
            const int nx = stp + PF;
            if (nx < steps) st[u].load(pa, pb, sa, sb, nx);
        }
    }
    moe_tc_quad_sums<MT>(acc, ya, yb);
}

// The (up to MT) pairs from `from` on that picked expert e, in pair order (warp-wide).
template <int MT>
__device__ int moe_tc_members(const int* picks, int P, int e, int from, int* mem) {
    const int lane = threadIdx.x & 31;
    int n = 0;
    for (int p0 = from; n < MT && p0 < P; p0 += 32) {
        unsigned b = __ballot_sync(0xffffffffu, p0 + lane < P && picks[p0 + lane] == e);
        for (; b && n < MT; b &= b - 1, n++)
            if (lane == 0) mem[n] = p0 + __ffs(b) - 1;
    }
    return n;
}

// Shared memory: zeros (4 uint4), then MT tokens' B planes (K * 4 bytes each), then their
// group factors (K / 32 floats each). Warps stride over the matrix's 16-row tiles (8 gate + 8
// up rows for `up`), so a grid of fewer blocks reuses each block's planes for more rows.
template <int MT, int PF, bool UP>
__device__ void moe_tc_impl(const MoeArgs& a) {
    extern __shared__ uint4 smem_u4[];
    __shared__ int mem[MT];
    __shared__ int nm_s;
    const int P = gridDim.x, pair = blockIdx.x;
    const int e = a.picks[pair];
    // The pairs of an expert go in chunks of MT (in pair order) to the blocks of each chunk's
    // first pair; the others exit.
    int rank = 0;
    for (int p0 = 0; p0 < pair; p0 += blockDim.x) {
        const int p = p0 + threadIdx.x;
        rank += __syncthreads_count(p < pair && a.picks[p] == e);
    }
    if (rank % MT != 0) return;
    const int K = UP ? a.D : a.I;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    if (tid < 16) ((uint32_t*)smem_u4)[tid] = 0u;
    const size_t plane = (size_t)K / 32 * 2 * 4;  // uint4s per token
    float* gsc = (float*)(smem_u4 + 4 + MT * plane);
    const LinearW Wa = UP ? a.w1[e] : a.w2[e];
    const LinearW Wb = UP ? a.w3[e] : Wa;
    const int tiles = UP ? a.I / 8 : a.D / 16;
    const int warps = gridDim.y * MOE_TC_WARPS;
    const size_t rowb = (size_t)K / 2, srow = (size_t)K / 32;
    const int steps = K / 256;
    if (warp == 0) {
        const int n = moe_tc_members<MT>(a.picks, P, e, pair, mem);
        if (lane == 0) nm_s = n;
    }
    __syncthreads();
    const int nm = nm_s;
    bool first = true;
    for (int tile = blockIdx.y * MOE_TC_WARPS + warp; tile < tiles; tile += warps) {
        const int ra = UP ? tile * 8 + g : tile * 16 + g;
        const int rb = UP ? ra : ra + 8;
        const uint4* pa = (const uint4*)(Wa.w + ra * rowb) + 2 * t;
        const uint4* pb = (const uint4*)(Wb.w + rb * rowb) + 2 * t;
        const uint32_t* sa = (const uint32_t*)((const uint8_t*)Wa.scales + ra * srow) + (t & 1);
        const uint32_t* sb = (const uint32_t*)((const uint8_t*)Wb.scales + rb * srow) + (t & 1);
        MoeTcStep st[PF];
#pragma unroll
        for (int u = 0; u < PF; u++) {
            if (u < steps) st[u].load(pa, pb, sa, sb, u);
        }
        if (first) {
            // The activations' planes, while the first weights are on their way. (Every
            // warp has at least one tile: the grid never has more warps than tiles.)
            for (int m = 0; m < nm; m++) {
                const int p = mem[m];
                const float* x = UP ? a.x + (size_t)(p / a.k) * a.D : a.h + (size_t)p * a.I;
                moe_tc_prep(x, K, smem_u4 + 4 + m * plane, gsc + m * (K / 32), blockDim.x);
            }
            __syncthreads();
            first = false;
        }
        float ya[MT], yb[MT];
        moe_tc_dot<MT, PF>(pa, pb, sa, sb, K, st, smem_u4, gsc, nm, ya, yb);
        if (t == 0) {
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m >= nm) break;
                const int p = mem[m];
                if (UP) {
                    float v = swiglu_clamped(ya[m], yb[m], a.lim);
                    if (a.rw_inside) v *= a.rw[p];
                    a.h[(size_t)p * a.I + ra] = v;
                } else {
                    a.out[(size_t)p * a.D + ra] = ya[m];
                    a.out[(size_t)p * a.D + rb] = yb[m];
                }
            }
        }
    }
}

#define MOE_TC(MT, PF)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * MOE_TC_WARPS) moe_up_tc_fp4_m##MT(MoeArgs a) { \
        pdl_entry();                                                                        \
        moe_tc_impl<MT, PF, true>(a);                                                       \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * MOE_TC_WARPS) moe_down_tc_fp4_m##MT(MoeArgs a) { \
        pdl_entry();                                                                        \
        moe_tc_impl<MT, PF, false>(a);                                                      \
    }
MOE_TC(1, 4)
MOE_TC(2, 3)
MOE_TC(4, 2)
