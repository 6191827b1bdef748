// The roundings of DeepSeek's official inference (NUMERICS.md §1): FP8 e4m3 activation
// quantization with power-of-two scales (the input of the cuBLASLt block-scaled GEMM and the
// in-place round trips of the K/V rows), and the Hadamard-128 + FP4 e2m1 round trip of the
// indexer. Each reproduces `dsv4_core::numerics` bit for bit: the operations are the same f32
// operations in the same order (the roundings themselves are exact).
#include "quant.cuh"

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

// FP8 round trip (`act_quant(x, block, inplace=True)`) of the first `width` values of each of
// `rows` rows (row stride ld), in blocks of `block` (≤ 128; the last may be shorter), in place —
// or, with `src`, of src's rows (stride lds) written to x. With `row_scale`, row r is first
// multiplied by row_scale[r] (the routing weight the official experts apply before `w2`).
// Serves the GEMM inputs in official mode (block 128, width = the whole row) and the K/V rows
// (block 64, width = the nope channels). One warp per block; grid (ceil(width/block),
// ceil(rows/8)), 256 threads.
extern "C" __global__ void fp8_round_trip(float* __restrict__ x, int ld, int rows, int width,
                                          int block, const float* __restrict__ row_scale,
                                          const float* __restrict__ src, int lds) {
    pdl_entry();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.y * 8 + warp;
    if (row >= rows) return;
    const int k0 = blockIdx.x * block;
    const int len = min(block, width - k0);
    float* xr = x + (size_t)row * ld + k0;
    const float* sr = src ? src + (size_t)row * lds + k0 : xr;
    const float w = row_scale ? row_scale[row] : 1.0f;
    if (src || row_scale) {
        for (int i = lane; i < len; i += 32) xr[i] = row_scale ? sr[i] * w : sr[i];
        __syncwarp();
    }
    warp_fp8_round_block(xr, len);
}

// Indexer queries and keys: each n-wide row of x (row stride ld; n ∈ {32, 64, 128}) ← FP4
// round trip (blocks of 32) of x·H/√n. One warp per row; grid ceil(rows/8), 256 threads.
extern "C" __global__ void hadamard_fp4_round_trip(float* __restrict__ x, int ld, int rows, int n,
                                                   float inv_sqrt) {
    pdl_entry();
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= rows) return;
    warp_hadamard_fp4_n(x + (size_t)row * ld, n, inv_sqrt);
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
