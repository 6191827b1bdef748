// Can a weight stream of bulk copies (cp.async.bulk into a shared-memory ring, as
// kernels/gemv_bulk.cu streams) run faster than HBM when the matrix is already in L2? This bounds
// any scheme that prefetches the next products into L2 while the latency-bound kernels of a
// decode step run (stop 19's l2_prefetch.cu, since retired, measured plain 16-byte loads with launch-inclusive
// event times; this times the stream inside the kernel: first block start to last block end).
// Per size: cold (after a 1 GB flush), prefetched (cp.async.bulk.prefetch.L2 by 64 one-warp
// blocks, then a 40 us pause), and read twice (the second read timed). Then the ways a step could
// warm L2 during its latency-bound kernels: bulk prefetches of 4, 16 or 64 KB pieces, one
// prefetch per line (normal or evict-last priority), and real reads by the same ring kernel on
// only N SMs (how long the warming takes, and the full read after). Last, whether a matrix
// warmed with the evict-last priority survives the stream a decode step runs meanwhile (100 MB of
// evict-first copies, as the FFN half's weights pass), warmed by the ring on a third of the SMs
// or by plain loads from a few small blocks (the retired engine warming: a kernel on a stream of
// its own that fit beside any other, measured slower in a decode step).
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o l2_bulk tools/gpu/l2_bulk.cu && ./l2_bulk
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>
#include "common.cuh"
#include "ring_util.cuh"

#define STAGES 4
#define STAGE (32 * 1024)
#define COPY 4096

__global__ void prefetch(const uint8_t* p, size_t bytes, size_t piece) {
    const size_t threads = (size_t)gridDim.x * blockDim.x;
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q * piece < bytes; q += threads) {
        const size_t left = bytes - q * piece;
        const unsigned n = (unsigned)(left < piece ? left : piece);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + q * piece), "r"(n) : "memory");
    }
}

// One prefetch per 128-byte line, spread over the grid: `prefetch.global.L2` (mode 0) or with
// the evict-last priority (mode 1), as a kernel's spare threads could issue them.
__global__ void prefetch_lines(const uint8_t* p, size_t bytes, int mode) {
    const size_t threads = (size_t)gridDim.x * blockDim.x;
    for (size_t l = (size_t)blockIdx.x * blockDim.x + threadIdx.x; l * 128 < bytes; l += threads) {
        if (mode == 1) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p + l * 128) : "memory");
        else asm volatile("prefetch.global.L2 [%0];" ::"l"(p + l * 128) : "memory");
    }
}

// Real reads of [p, p + bytes) into L2 by the whole grid, while the kernels beside it leave the
// HBM idle: one 4-byte load per 32-byte sector, eight in flight per thread, with the evict-last
// priority when `evict_last`. Only the lines they leave in L2 matter, but ptxas drops loads
// whose values nothing uses (an empty asm is not a use): they are folded into a store to `sink`
// that never happens in practice (a null `sink`: never at all). (The retired engine warming's
// loop, `l2_warm_reads` on a third stream: measured slower in a decode step, and removed.)
__device__ __forceinline__ void warm_reads(const unsigned char* p, unsigned long long bytes, bool evict_last,
                                           float* sink) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    const unsigned long long sectors = bytes / 32, threads = (unsigned long long)gridDim.x * blockDim.x;
    uint32_t acc = 0;
    for (unsigned long long q0 = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; q0 < sectors;
         q0 += 8 * threads) {
        uint32_t v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const unsigned long long q = q0 + i * threads;
            v[i] = 0;
            if (q >= sectors) continue;
            if (evict_last)
                asm volatile("ld.global.L1::no_allocate.L2::cache_hint.b32 %0, [%1], %2;"
                             : "=r"(v[i])
                             : "l"(p + q * 32), "l"(policy));
            else
                asm volatile("ld.global.L1::no_allocate.b32 %0, [%1];" : "=r"(v[i]) : "l"(p + q * 32));
        }
#pragma unroll
        for (int i = 0; i < 8; i++) acc ^= v[i];
    }
    if (acc == 0x9e3779b9u && sink) *sink = (float)acc;
}

// `warm_reads` as a kernel of its own (as the retired engine warming launched it): evict-last
// (`hint` 2) or no priority; its time in stamps as `ring` records it.
__global__ void warm_loads(const uint8_t* p, size_t bytes, int hint, float* sink, unsigned long long* stamps) {
    if (threadIdx.x == 0) atomicMin(&stamps[0], now_ns());
    warm_reads(p, bytes, hint == 2, sink);
    __syncthreads();
    if (threadIdx.x == 0) atomicMax(&stamps[1], now_ns());
}

__global__ void spin(long long ns) {
    const unsigned long long t0 = now_ns();
    while (now_ns() - t0 < (unsigned long long)ns) {
    }
}

int main() {
    int sms = 0, l2 = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0);
    const size_t flush_bytes = (size_t)1 << 30, max_mb = 1024;
    uint8_t *a, *flush;
    float* sink;
    unsigned long long *stamps, host[2];
    if (cudaMalloc(&a, max_mb << 20) != cudaSuccess || cudaMalloc(&flush, flush_bytes) != cudaSuccess ||
        cudaMalloc(&sink, 64) != cudaSuccess || cudaMalloc(&stamps, 16) != cudaSuccess) {
        printf("no GPU memory\n");
        return 1;
    }
    cudaMemset(a, 1, max_mb << 20);
    cudaMemset(flush, 2, flush_bytes);
    const int smem = STAGES * STAGE;
    cudaFuncSetAttribute(ring<STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    printf("SMs %d, L2 %d MB; bulk ring of %d x %d KB per SM, %d B copies\n", sms, l2 >> 20, STAGES, STAGE >> 10,
           COPY);
    auto do_flush = [&] { plain_loads<<<sms * 4, 512>>>((const uint4*)flush, flush_bytes / 16, sink); };
    auto timed = [&](size_t bytes) {
        host[0] = ~0ull;
        host[1] = 0;
        cudaMemcpy(stamps, host, 16, cudaMemcpyHostToDevice);
        ring<STAGES><<<sms, 288, smem>>>(a, bytes, COPY, STAGE, 0, sink, stamps);
        cudaMemcpy(host, stamps, 16, cudaMemcpyDeviceToHost);
        return (host[1] - host[0]) * 1e-3;  // us
    };
    for (size_t mb : {8, 16, 24, 32, 40, 48, 1024}) {
        const size_t bytes = mb << 20, moved = bytes / sms / STAGE * STAGE * sms;
        double cold = 0, pf = 0, warm = 0;
        const int reps = 5;
        for (int r = 0; r < reps; r++) {
            do_flush();
            cold += timed(bytes);
            do_flush();
            prefetch<<<64, 32>>>(a, bytes, 64 * 1024);
            spin<<<1, 1>>>(40000);
            pf += timed(bytes);
            do_flush();
            timed(bytes);
            warm += timed(bytes);
        }
        cold /= reps, pf /= reps, warm /= reps;
        printf("%4zu MB: cold %7.1f us %5.0f GB/s | prefetched %7.1f us %5.0f GB/s | read twice %7.1f us %5.0f GB/s\n",
               mb, cold, moved / cold / 1e3, pf, moved / pf / 1e3, warm, moved / warm / 1e3);
    }
    // Warming L2 for a later read: by prefetch pieces, or by real reads on a few SMs.
    for (size_t mb : {16, 32}) {
        const size_t bytes = mb << 20, moved = bytes / sms / STAGE * STAGE * sms;
        const int reps = 5;
        for (size_t piece : {4096, 16384, 65536}) {
            double rd = 0;
            for (int r = 0; r < reps; r++) {
                do_flush();
                prefetch<<<sms, 32>>>(a, bytes, piece);
                spin<<<1, 1>>>(40000);
                rd += timed(bytes);
            }
            rd /= reps;
            printf("%3zu MB after prefetches of %2zu KB pieces (%d one-warp blocks, 40 us pause): read %6.1f us %5.0f GB/s\n",
                   mb, piece >> 10, sms, rd, moved / rd / 1e3);
        }
        for (int mode : {0, 1}) {
            double rd = 0;
            for (int r = 0; r < reps; r++) {
                do_flush();
                prefetch_lines<<<sms * 2, 256>>>(a, bytes, mode);
                spin<<<1, 1>>>(40000);
                rd += timed(bytes);
            }
            rd /= reps;
            printf("%3zu MB after line prefetches%s (40 us pause): read %6.1f us %5.0f GB/s\n", mb,
                   mode ? " (evict-last)" : "", rd, moved / rd / 1e3);
        }
        for (int n : {8, 16, 33, 66}) {
            double warm = 0, rd = 0;
            for (int r = 0; r < reps; r++) {
                do_flush();
                host[0] = ~0ull;
                host[1] = 0;
                cudaMemcpy(stamps, host, 16, cudaMemcpyHostToDevice);
                ring<STAGES><<<n, 288, smem>>>(a, bytes, COPY, STAGE, 0, sink, stamps);
                cudaMemcpy(host, stamps, 16, cudaMemcpyDeviceToHost);
                warm += (host[1] - host[0]) * 1e-3;
                rd += timed(bytes);
            }
            warm /= reps, rd /= reps;
            printf("%3zu MB warmed by reads on %2d SMs in %6.1f us (%5.0f GB/s): read %6.1f us %5.0f GB/s\n", mb, n,
                   warm, bytes / warm / 1e3, rd, moved / rd / 1e3);
        }
    }
    // Does a warmed matrix survive the FFN half's evict-first stream (100 MB of other weights)?
    {
        const size_t bytes = 32 << 20, moved = bytes / sms / STAGE * STAGE * sms;
        const size_t other = 100 << 20;
        const uint8_t* ffn = flush + (512 << 20);
        const int reps = 5;
        auto stamped = [&](auto launch) {
            host[0] = ~0ull;
            host[1] = 0;
            cudaMemcpy(stamps, host, 16, cudaMemcpyHostToDevice);
            launch();
            cudaMemcpy(host, stamps, 16, cudaMemcpyDeviceToHost);
            return (host[1] - host[0]) * 1e-3;
        };
        // warm: 0 none, 1 ring on sms / 4 SMs, 2 plain loads by 16 blocks of 256; hint: the
        // warming's priority; between: the evict-first stream of `other` bytes or not.
        for (int warm : {1, 2})
            for (int hint : {0, 2})
                for (bool between : {false, true}) {
                    double w = 0, rd = 0;
                    for (int r = 0; r < reps; r++) {
                        do_flush();
                        w += stamped([&] {
                            if (warm == 1) ring<STAGES><<<sms / 4, 288, smem>>>(a, bytes, COPY, STAGE, 0, sink, stamps, hint);
                            else warm_loads<<<16, 256>>>(a, bytes, hint, sink, stamps);
                        });
                        if (between) ring<STAGES><<<sms, 288, smem>>>(ffn, other, COPY, STAGE, 0, sink, nullptr, 1);
                        rd += stamped([&] { ring<STAGES><<<sms, 288, smem>>>(a, bytes, COPY, STAGE, 0, sink, stamps, 1); });
                    }
                    w /= reps, rd /= reps;
                    printf("32 MB warmed by %s%s in %6.1f us (%5.0f GB/s), %s: read (evict-first) %6.1f us %5.0f GB/s\n",
                           warm == 1 ? "the ring on a quarter of the SMs" : "loads of 16 small blocks",
                           hint == 2 ? " (evict-last)" : "", w, bytes / w / 1e3,
                           between ? "then 100 MB streamed evict-first" : "nothing between", rd, moved / rd / 1e3);
                }
        do_flush();
        const double cold = stamped([&] { ring<STAGES><<<sms, 288, smem>>>(a, bytes, COPY, STAGE, 0, sink, stamps, 1); });
        printf("32 MB cold (evict-first): read %6.1f us %5.0f GB/s\n", cold, moved / cold / 1e3);
    }
    const cudaError_t err = cudaDeviceSynchronize();
    printf("%s\n", cudaGetErrorString(err));
    return err == cudaSuccess ? 0 : 1;
}
