// Helpers of the standalone bulk-copy benches (bulk_copy_bw.cu, l2_bulk.cu): shared-memory
// addresses, an mbarrier phase wait, the bulk-copy ring they time, and a plain 16-byte read over
// the grid (the reference read, and the 1 GB L2 flush).
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

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// One block per SM streams `total` bytes (its contiguous share) into a ring of STAGES stages of
// `stage_bytes` through `cp.async.bulk` copies of `copy` bytes: warp 8 issues the copies, warps
// 0-7 take each stage and release it. `rowstride` reads each copy from a different row (rows
// that far apart), the way a K slice of several matrix rows is read; 0 reads the stage
// contiguously. With `stamps`: [0] = the earliest block start, [1] = the latest block end
// (globaltimer ns; atomicMin / atomicMax, so set them to ~0 and 0 first). `hint`: the copies'
// L2 eviction priority (0 none, 1 evict-first as kernels/gemv_bulk.cu streams weights, 2
// evict-last).
template <int STAGES>
__global__ void __launch_bounds__(288, 1)
    ring(const uint8_t* src, size_t total, int copy, int stage_bytes, int rowstride, float* sink,
         unsigned long long* stamps = nullptr, int hint = 0) {
    extern __shared__ __align__(128) uint8_t sm[];
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        if (stamps) atomicMin(&stamps[0], now_ns());
        for (int i = 0; i < STAGES; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[i])));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 8;" ::"r"(smem_addr(&empty[i])));
        }
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    __syncthreads();
    const size_t per = total / gridDim.x / stage_bytes * stage_bytes, base = per * blockIdx.x;
    const int nst = (int)(per / stage_bytes), ncopies = stage_bytes / copy;
    if (warp == 8) {
        uint64_t policy = 0;
        if (hint == 1) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        if (hint == 2) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
        for (int n = 0; n < nst; n++) {
            const int slot = n % STAGES;
            if (n >= STAGES) wait_phase(&empty[slot], ((n / STAGES) - 1) & 1);
            if (lane == 0)
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(&full[slot])),
                             "r"(stage_bytes)
                             : "memory");
            __syncwarp();
            for (int c = lane; c < ncopies; c += 32) {
                // Row-strided: stage n reads slice n % (rowstride / copy) of `ncopies` rows.
                const int per_row = rowstride / copy;
                const uint8_t* from =
                    rowstride ? src + base + (size_t)(n / per_row) * per_row * stage_bytes + (size_t)c * rowstride +
                                    (size_t)(n % per_row) * copy
                              : src + base + (size_t)n * stage_bytes + (size_t)c * copy;
                if (hint)
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], "
                        "%2, [%3], %4;" ::"r"(smem_addr(sm + slot * stage_bytes + c * copy)),
                        "l"(from), "r"(copy), "r"(smem_addr(&full[slot])), "l"(policy)
                        : "memory");
                else
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                            smem_addr(sm + slot * stage_bytes + c * copy)),
                        "l"(from), "r"(copy), "r"(smem_addr(&full[slot]))
                        : "memory");
            }
        }
        return;
    }
    float acc = 0.f;
    for (int n = 0; n < nst; n++) {
        const int slot = n % STAGES;
        wait_phase(&full[slot], (n / STAGES) & 1);
        acc += ((const float*)(sm + slot * stage_bytes))[threadIdx.x];
        __syncwarp();
        if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(&empty[slot])) : "memory");
    }
    if (acc == 12345.f) sink[0] = acc;  // keeps the reads
    if (stamps) {
        asm volatile("bar.sync 1, 256;" ::: "memory");  // the consumer warps (the producer has left)
        if (threadIdx.x == 0) atomicMax(&stamps[1], now_ns());
    }
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
