// Helpers of the standalone bulk-copy benches (bulk_copy_bw.cu, l2_bulk.cu): shared-memory
// addresses, an mbarrier phase wait, and a plain 16-byte read over the grid (the reference
// read, and the 1 GB L2 flush).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void wait_phase(uint64_t* bar, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
}

// Reads n 16-byte words over the grid, folded so that nothing is optimized out.
__global__ void plain_loads(const uint4* src, size_t n, float* sink) {
    uint32_t a = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(src + i);
        a ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (a == 0x12345u) sink[0] = (float)a;
}
