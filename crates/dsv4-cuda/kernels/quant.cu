// The roundings of DeepSeek's official inference (NUMERICS.md §1): FP8 e4m3 activation
// quantization with power-of-two scales (the input of the cuBLASLt block-scaled GEMM and the
// in-place round trips of the K/V rows), and the Hadamard-128 + FP4 e2m1 round trip of the
// indexer. Each reproduces `dsv4_core::numerics` bit for bit: the operations are the same f32
// operations in the same order (the roundings themselves are exact).
#include "common.cuh"

// `round_scale_e8m0` of numerics.rs: the e8m0 byte of 2^ceil(log2(amax·inv_max)) as the
// official `fast_round_scale` computes it (exponent of t, plus one unless t is a power of two).
__device__ __forceinline__ uint8_t round_scale_e8m0(float amax, float inv_max) {
    const uint32_t bits = __float_as_uint(amax * inv_max);
    int e = (int)((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0);
    e += 127;
    return (uint8_t)(e < 0 ? 0 : (e > 254 ? 254 : e));
}

__device__ __forceinline__ uint8_t e4m3_encode(float v) {
    return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// Max of |x| over a warp's block of `len` (≤ 128) values starting at `x`, floored.
__device__ __forceinline__ float block_amax(const float* x, int len, float floor_) {
    const int lane = threadIdx.x & 31;
    float m = 0.f;
    for (int i = lane; i < len; i += 32) m = fmaxf(m, fabsf(x[i]));
    return fmaxf(warp_max(m), floor_);
}

// Activation quantization before an FP8 GEMM (`act_quant(x, 128)`): x f32 [m, k] (row stride
// ldx) → e4m3 codes [mp, kp] (row stride kp) and f32 scales [kp/128, mp] (m contiguous, the
// layout of cuBLASLt's VEC128_32F operand scales). Rows m..mp and columns k..kp are padding:
// zero codes, scale 1. One warp per 128-block; grid (kp/128, ceil(mp/8)), 256 threads.
extern "C" __global__ void act_quant_fp8(const float* __restrict__ x, int ldx, int m, int k,
                                         uint8_t* __restrict__ codes, float* __restrict__ scales,
                                         int mp, int kp) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.y * 8 + warp, kb = blockIdx.x;
    if (row >= mp) return;
    const int k0 = kb * 128;
    const int len = row < m ? min(128, k - k0) : 0;
    const float* xr = x + (size_t)row * ldx + k0;
    const float amax = block_amax(xr, len > 0 ? len : 0, 1e-4f);
    const uint8_t se = round_scale_e8m0(amax, 1.0f / 448.0f);
    const float s = len > 0 ? e8m0_to_f32(se) : 1.0f;
    const float inv = 1.0f / s;
    uint8_t* cr = codes + (size_t)row * kp + k0;
    // 4 consecutive values per lane: one 32-bit store.
    const int c0 = lane * 4;
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int c = c0 + j;
        const uint8_t q = c < len ? e4m3_encode(xr[c] * inv) : 0;
        packed |= (uint32_t)q << (8 * j);
    }
    *(uint32_t*)(cr + c0) = packed;
    if (lane == 0) scales[(size_t)kb * mp + row] = s;
}

// In-place FP8 round trip (`act_quant(x, block, inplace=True)`) of the first `width` values of
// each of `rows` rows (row stride ld), in blocks of `block` (≤ 128; the last may be shorter).
// Serves the GEMV inputs in official mode (block 128, width = the whole row) and the K/V rows
// (block 64, width = the nope channels). One warp per block; grid (ceil(width/block),
// ceil(rows/8)), 256 threads.
extern "C" __global__ void fp8_round_trip(float* __restrict__ x, int ld, int rows, int width,
                                          int block) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.y * 8 + warp;
    if (row >= rows) return;
    const int k0 = blockIdx.x * block;
    const int len = min(block, width - k0);
    float* xr = x + (size_t)row * ld + k0;
    const float amax = block_amax(xr, len, 1e-4f);
    const float s = e8m0_to_f32(round_scale_e8m0(amax, 1.0f / 448.0f));
    const float inv = 1.0f / s;
    for (int i = lane; i < len; i += 32) xr[i] = e4m3_to_f32(e4m3_encode(xr[i] * inv)) * s;
}

// e2m1 rounding of |v| ≤ 6 (ties to even mantissa), as `e2m1_encode` of numerics.rs.
__device__ __forceinline__ float e2m1_round(float v) {
    const float a = fminf(fabsf(v), 6.0f);
    const float quantum = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
    return copysignf(rintf(a / quantum) * quantum, v);
}

// Indexer queries and keys (NUMERICS.md §2.3/§2.4): each 128-wide row of x (row stride ld)
// ← FP4 round trip (blocks of 32) of x·H/√128. One warp per row, 4 consecutive values per
// lane; the butterfly is the CPU's (`numerics::hadamard`): at stride h the lower element
// becomes a+b and the upper a−b, so every value is the same f32 expression. `inv_sqrt` is the
// host's `1/sqrt(128)`. Grid ceil(rows/8), 256 threads.
extern "C" __global__ void hadamard128_fp4_round_trip(float* __restrict__ x, int ld, int rows,
                                                      float inv_sqrt) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + warp;
    if (row >= rows) return;
    float* xr = x + (size_t)row * ld;
    float4 t = *(const float4*)(xr + lane * 4);
    float v[4] = {t.x, t.y, t.z, t.w};
    // Strides 1 and 2: inside the lane.
    float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    v[0] = a0 + a2;
    v[2] = a0 - a2;
    v[1] = a1 + a3;
    v[3] = a1 - a3;
    // Strides 4..64: lanes 1..16 apart.
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const bool upper = lane & d;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float other = __shfl_xor_sync(0xffffffffu, v[j], d);
            v[j] = upper ? other - v[j] : v[j] + other;
        }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) v[j] *= inv_sqrt;
    // FP4 blocks of 32 values = 8 lanes.
    float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    m = fmaxf(m, 6.0f * 1.17549435e-38f);
    const float s = e8m0_to_f32(round_scale_e8m0(m, 1.0f / 6.0f));
    const float inv = 1.0f / s;
#pragma unroll
    for (int j = 0; j < 4; j++) v[j] = e2m1_round(v[j] * inv) * s;
    *(float4*)(xr + lane * 4) = make_float4(v[0], v[1], v[2], v[3]);
}

// A stored FP8 weight in the tensor-core layout: codes [n, k] → [n, kp] (zero columns past k),
// f32 block scales [nb, kb] → [nb, kbp] (rows padded to whole 16-byte groups with 1.0).
extern "C" __global__ void pad_fp8_weight(const uint8_t* __restrict__ w, int n, int k,
                                          uint8_t* __restrict__ wp, int kp) {
    pdl_entry();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * kp) return;
    const int r = (int)(i / kp), c = (int)(i % kp);
    wp[i] = c < k ? w[(size_t)r * k + c] : 0;
}

extern "C" __global__ void pad_scales(const float* __restrict__ s, int nb, int kb,
                                      float* __restrict__ sp, int kbp) {
    pdl_entry();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nb * kbp) return;
    const int r = i / kbp, c = i % kbp;
    sp[i] = c < kb ? s[r * kb + c] : 1.0f;
}
