// Device-side roundings of DeepSeek's official inference (NUMERICS.md §1), shared by the
// quantization kernels (quant.cu) and the kernels that round what they produce in place
// (`comp_decode`). Each reproduces `dsv4_core::numerics` bit for bit: the same f32 operations
// in the same order (the roundings themselves are exact).
#pragma once
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

// One warp: the FP8 round trip of `len` (≤ 128) values at `x` (one power-of-two scale), in
// place (`act_quant(x, block, inplace=True)` of one block).
__device__ __forceinline__ void warp_fp8_round_block(float* x, int len) {
    const float amax = block_amax(x, len, 1e-4f);
    const float s = e8m0_to_f32(round_scale_e8m0(amax, 1.0f / 448.0f));
    const float inv = 1.0f / s;
    __syncwarp();
    for (int i = threadIdx.x & 31; i < len; i += 32) x[i] = e4m3_to_f32(e4m3_encode(x[i] * inv)) * s;
}

// e2m1 rounding of |v| ≤ 6 (ties to even mantissa), as `e2m1_encode` of numerics.rs.
__device__ __forceinline__ float e2m1_round(float v) {
    const float a = fminf(fabsf(v), 6.0f);
    const float quantum = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
    return copysignf(rintf(a / quantum) * quantum, v);
}

// One warp: the n = 32·V values at `x` (aligned to V floats) ← FP4 round trip (blocks of 32)
// of x·H/√n (the indexer's queries and keys, NUMERICS.md §2.3/§2.4). V consecutive values per
// lane; the butterfly is the CPU's (`numerics::hadamard`): at stride h the lower element
// becomes a+b and the upper a−b, so every value is the same f32 expression. `inv_sqrt` is the
// host's `1/sqrt(n)`.
template <int V>
__device__ __forceinline__ void warp_hadamard_fp4(float* x, float inv_sqrt) {
    const int lane = threadIdx.x & 31;
    float v[V];
#pragma unroll
    for (int j = 0; j < V; j++) v[j] = x[lane * V + j];
    // Strides below V: inside the lane.
#pragma unroll
    for (int h = 1; h < V; h <<= 1) {
#pragma unroll
        for (int j = 0; j < V; j++) {
            if (j & h) continue;
            const float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
        }
    }
    // Strides V..16V: lanes 1..16 apart.
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const bool upper = lane & d;
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float other = __shfl_xor_sync(0xffffffffu, v[j], d);
            v[j] = upper ? other - v[j] : v[j] + other;
        }
    }
#pragma unroll
    for (int j = 0; j < V; j++) v[j] *= inv_sqrt;
    // FP4 blocks of 32 values = 32/V lanes.
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < V; j++) m = fmaxf(m, fabsf(v[j]));
#pragma unroll
    for (int o = 1; o < 32 / V; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    m = fmaxf(m, 6.0f * 1.17549435e-38f);
    const float s = e8m0_to_f32(round_scale_e8m0(m, 1.0f / 6.0f));
    const float inv = 1.0f / s;
#pragma unroll
    for (int j = 0; j < V; j++) x[lane * V + j] = e2m1_round(v[j] * inv) * s;
}

// `warp_hadamard_fp4` for a row of n ∈ {32, 64, 128} values.
__device__ __forceinline__ void warp_hadamard_fp4_n(float* x, int n, float inv_sqrt) {
    if (n == 128) warp_hadamard_fp4<4>(x, inv_sqrt);
    else if (n == 64) warp_hadamard_fp4<2>(x, inv_sqrt);
    else warp_hadamard_fp4<1>(x, inv_sqrt);
}

// Rounding modes of a stored K/V or indexer row (`comp_decode`'s `round` argument).
#define ROUND_NONE 0
#define ROUND_FP8_NOPE 1     // FP8 e4m3 round trip of the nope channels, blocks of 64
#define ROUND_HADAMARD_FP4 2 // Hadamard (n = d) then FP4 e2m1 round trip, blocks of 32

// A block of threads (whole warps): the row `x` of `d` values (rotary channels last, `rope`
// of them) rounded in place per `mode`. Callers synchronize before and after.
__device__ __forceinline__ void block_round_row(float* x, int d, int rope, int mode, float inv_sqrt) {
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (mode == ROUND_FP8_NOPE) {
        const int nope = d - rope;
        for (int b = warp; b * 64 < nope; b += nw) warp_fp8_round_block(x + b * 64, min(64, nope - b * 64));
    } else if (mode == ROUND_HADAMARD_FP4 && warp == 0) {
        warp_hadamard_fp4_n(x, d, inv_sqrt);
    }
}
