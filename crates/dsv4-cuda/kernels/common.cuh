// Shared definitions of the dsv4 CUDA kernels: weight formats, element decoders, reductions.
// Activations are f32 everywhere (the CPU reference's arithmetic); weights stay in their
// stored format and are decoded in registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

// Must match `Fmt` in src/weights.rs.
#define FMT_F32 0
#define FMT_BF16 1
#define FMT_F16 2
#define FMT_FP8 3
#define FMT_FP4 4
#define FMT_AFFINE 5  // MLX affine: little-endian bit stream of `bits`-wide codes, scale/bias per group
#define FMT_MXFP8 6   // MLX mxfp8: e4m3 codes, e8m0 per 32

// A `[out, in]` weight matrix on the device, passed by value (mirrors `LinearDesc` in Rust).
struct LinearW {
    const uint8_t* w;       // weight bytes, row-major
    const void* scales;     // FP8: f32 [ceil(out/bo), ceil(in/bi)]; FP4: e8m0 bytes [out, in/32]
    int32_t fmt;
    int32_t out, in;
    int32_t bo, bi;         // FP8 block shape
    int32_t scale_cols;     // FP8: ceil(in/bi)
    const void* biases;     // affine: [out, in/group]
    int32_t bits, group;    // affine
    int32_t sdt;            // affine scale/bias dtype: 0 f32, 1 bf16, 2 f16
    int32_t pad_;
};

__device__ __forceinline__ float e8m0_to_f32(uint8_t u) {
    if (u == 0xFF) return __int_as_float(0x7fc00000);
    if (u == 0) return __int_as_float(0x00400000);
    return __int_as_float(((int)u) << 23);
}

__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    return __half2float(__half(h));
}

// e2m1 nibble as an fp16 whose value is 2^-14 times the e2m1 value (exponent bits land in
// the low exponent field, the mantissa bit on top of the fraction): scale by 2^14 after.
__device__ __forceinline__ uint32_t e2m1_half_bits(uint32_t v) {
    return ((v & 8u) << 12) | ((v & 7u) << 9);
}

__device__ __forceinline__ float e2m1_to_f32(uint32_t v) {
    __half_raw h;
    h.x = (unsigned short)e2m1_half_bits(v);
    return __half2float(__half(h)) * 16384.0f;
}

__device__ __forceinline__ float load_f(const void* p, int dt, size_t i) {
    if (dt == 0) return ((const float*)p)[i];
    uint16_t u = ((const uint16_t*)p)[i];
    if (dt == 1) return __uint_as_float(((uint32_t)u) << 16);
    __half_raw h;
    h.x = u;
    return __half2float(__half(h));
}

// One element of a weight matrix, any format (slow path: tails, embeddings, MLX formats).
__device__ __forceinline__ float load_elem(const LinearW& W, int r, int k) {
    size_t idx = (size_t)r * W.in + k;
    switch (W.fmt) {
    case FMT_F32: return ((const float*)W.w)[idx];
    case FMT_BF16: return __uint_as_float(((uint32_t)((const uint16_t*)W.w)[idx]) << 16);
    case FMT_F16: { __half_raw h; h.x = ((const uint16_t*)W.w)[idx]; return __half2float(__half(h)); }
    case FMT_FP8: {
        float s = ((const float*)W.scales)[(r / W.bo) * W.scale_cols + k / W.bi];
        return e4m3_to_f32(W.w[idx]) * s;
    }
    case FMT_AFFINE: {
        const size_t row_bytes = (size_t)W.in * W.bits / 8;
        const size_t bit = (size_t)k * W.bits;
        const size_t at = (size_t)r * row_bytes + bit / 8;
        uint32_t v = W.w[at];
        if (bit / 8 + 1 < row_bytes) v |= (uint32_t)W.w[at + 1] << 8;
        const uint32_t code = (v >> (bit % 8)) & ((1u << W.bits) - 1);
        const size_t g = (size_t)r * (W.in / W.group) + k / W.group;
        return (float)code * load_f(W.scales, W.sdt, g) + load_f(W.biases, W.sdt, g);
    }
    case FMT_MXFP8:
        return e4m3_to_f32(W.w[idx]) * e8m0_to_f32(((const uint8_t*)W.scales)[(size_t)r * (W.in / 32) + k / 32]);
    default: {
        uint8_t b = W.w[idx >> 1];
        uint32_t v = (idx & 1) ? (b >> 4) : (b & 15);
        float s = e8m0_to_f32(((const uint8_t*)W.scales)[(size_t)r * (W.in / 32) + k / 32]);
        return e2m1_to_f32(v) * s;
    }
    }
}

// Programmatic dependent launch: dsv4 launches every kernel so that the next one in the stream
// may be scheduled while this one runs (its launch latency and, for weight-streaming kernels,
// its first weight loads overlap this kernel's tail). So every kernel calls pdl_launch() first
// and pdl_wait() — which returns once the previous kernel has finished and its writes are
// visible — before it touches memory another kernel writes or reads. Without the launch
// attribute both are no-ops. (tests: `every_kernel_waits_for_its_predecessor`.)
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// Marks a kernel that waits and lets its dependents launch at points inside its body that its
// comment explains (`moe_ffn_up_bulk`: not before its grid barrier).
__device__ __forceinline__ void pdl_inside() {}
__device__ __forceinline__ void pdl_entry() {
    pdl_launch();
    pdl_wait();
}

// A block's place in a launch's grid and how its threads meet, passed to a phase's device
// function so that the phase can also run inside a persistent kernel, on the blocks (and the
// consumer warps) that kernel assigns it (docs/PERSISTENT_DECODE.md). A launch of its own passes
// `launch_block()` and `BlockSync`.
struct VBlock {
    int x, y, z;
};
__device__ __forceinline__ VBlock launch_block() { return VBlock{(int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z}; }
struct BlockSync {
    __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// 2^e as a float, for e in -126..127 (a normal float: no subnormal, no overflow).
__device__ __forceinline__ float exp2i(int e) { return __uint_as_float((uint32_t)(127 + e) << 23); }

// The activations of the experts' tensor-core products go in as f16 parts of a block scaled by
// 2^sh: the sh that brings the block's max |x| (amax) into [2^14, 2^15), so the parts keep their
// bits at any magnitude f32 holds; 0 for zero, inf and NaN blocks. 2^sh and 2^(14 - sh) stay
// normal floats. (`moe_tc_prep`.)
__device__ __forceinline__ int f16_part_shift(float amax) {
    if (!(amax > 0.f && amax < INFINITY)) return 0;
    const int e = (int)((__float_as_uint(amax) >> 23) & 0xff) - 127;
    return min(max(14 - e, -113), 127);
}

// Two e4m3 bytes (the low 16 bits of `two`, the lower byte first) as the bits of an f16 pair:
// exact, every e4m3 value is an f16 normal or zero.
__device__ __forceinline__ uint32_t e4m3x2_half_bits(uint32_t two) {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffff), __NV_E4M3);
    return (uint32_t)r.x | ((uint32_t)r.y << 16);
}

// The experts' gated activation: silu(min(g, lim)) * clamp(u, -lim, lim), no clamp when lim
// is NaN (the model has no swiglu_limit).
__device__ __forceinline__ float swiglu_clamped(float g, float u, float lim) {
    if (!isnan(lim)) { g = fminf(g, lim); u = fminf(fmaxf(u, -lim), lim); }
    return g / (1.0f + expf(-g)) * u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Two values summed (quad_sum2) or maxed (quad_max2) over the four lanes of a quad (lanes
// 4g..4g+3, which hold one row of an MMA accumulator tile), the result in all four.
__device__ __forceinline__ void quad_sum2(float& a, float& b) {
    a += __shfl_xor_sync(0xffffffffu, a, 1);
    b += __shfl_xor_sync(0xffffffffu, b, 1);
    a += __shfl_xor_sync(0xffffffffu, a, 2);
    b += __shfl_xor_sync(0xffffffffu, b, 2);
}
__device__ __forceinline__ void quad_max2(float& a, float& b) {
    a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
    b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, 1));
    a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
    b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, 2));
}

// One round of warp_sum_transposed: lanes with bit O keep the upper half of v[0, 2O). (Rounds
// 4, 2, 1 over 8 values leave value lane % 8's partial sum in each lane: moe_ffn.cu.)
template <int O, int N>
__device__ __forceinline__ void transposed_round(float (&v)[N], int lane) {
    const bool upper = lane & O;
#pragma unroll
    for (int k = 0; k < O; k++) {
        const float keep = upper ? v[k + O] : v[k];
        const float send = upper ? v[k] : v[k + O];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
}

// v[j] summed over the warp lands in lane j (32 values in 31 shuffles instead of 32 warp_sums):
// each round a lane keeps the half of its values whose index has its lane bit and trades the
// other half with its partner.
__device__ __forceinline__ float warp_sum_transposed(float (&v)[32]) {
    const int lane = threadIdx.x & 31;
    transposed_round<16>(v, lane);
    transposed_round<8>(v, lane);
    transposed_round<4>(v, lane);
    transposed_round<2>(v, lane);
    transposed_round<1>(v, lane);
    return v[0];
}

// Thread-block clusters (sm_90): a barrier split in its arrive and wait halves (every thread
// of the cluster arrives once per phase; writes before the arrive are visible after the wait),
// and loads from another block's shared memory (distributed shared memory).
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
}
// Block `rank`'s copy of the shared variable at p.
__device__ __forceinline__ float cluster_ld(const float* p, unsigned rank) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
// The sum over the first `ranks` (<= MAXR) blocks of the cluster of the shared variable at p,
// in rank order, every load issued before the adds.
template <int MAXR>
__device__ __forceinline__ float cluster_sum(const float* p, int ranks) {
    float q[MAXR];
#pragma unroll
    for (int r = 0; r < MAXR; r++) q[r] = r < ranks ? cluster_ld(p, r) : 0.f;
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < MAXR; r++) s += q[r];
    return s;
}

// 16-byte asynchronous global -> shared copies (sm_80+): many in flight per thread.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
// The same, zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}
// The thread's copies issued since the last commit form a group; wait until at most N groups
// are still in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Block-wide sum; `sh` holds at least 32 floats. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; i++) t += sh[i];
    return t;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int i = 0; i < nw; i++) t = fmaxf(t, sh[i]);
    return t;
}
