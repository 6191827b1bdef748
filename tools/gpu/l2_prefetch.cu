// Does an L2 prefetch (cp.async.bulk.prefetch.L2, as kernels/prefetch.cu issues it) leave a
// matrix in L2 for the kernel that reads it next, and how much faster is that read? Times a
// read of `mb` MB (16-byte loads over all SMs, or bulk copies into shared memory) after a 1 GB
// flush, after a prefetch and a pause, and right after reading it once (L2 as warm as it gets).
//   nvcc -std=c++17 -O3 -arch=sm_90a -o l2_prefetch tools/gpu/l2_prefetch.cu && ./l2_prefetch
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#define PIECE (32 * 1024)

__global__ void prefetch(const uint8_t* p, size_t bytes) {
    const size_t threads = (size_t)gridDim.x * blockDim.x;
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q * PIECE < bytes; q += threads) {
        size_t left = bytes - q * PIECE;
        unsigned n = (unsigned)(left < PIECE ? left : PIECE) & ~15u;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + q * PIECE), "r"(n) : "memory");
    }
}

// Plain 16-byte loads, each thread a strided run, summed so nothing is optimized out.
__global__ void __launch_bounds__(512) read16(const uint4* p, size_t n, unsigned* sink) {
    unsigned acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

__global__ void spin(long long ns) {
    long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    for (;;) {
        long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 > ns) break;
    }
}

int main() {
    int sms;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    int l2;
    cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0);
    printf("SMs %d, L2 %d MB\n", sms, l2 >> 20);
    const size_t flush_bytes = 1ull << 30;
    uint8_t *a, *flush;
    unsigned* sink;
    cudaMalloc(&a, 64 << 20);
    cudaMalloc(&flush, flush_bytes);
    cudaMalloc(&sink, 4);
    cudaMemset(a, 1, 64 << 20);
    cudaMemset(flush, 2, flush_bytes);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    auto timed_read = [&](size_t bytes) {
        cudaEventRecord(e0);
        read16<<<sms * 4, 512>>>((const uint4*)a, bytes / 16, sink);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        return ms * 1e3f;
    };
    auto do_flush = [&] { read16<<<sms * 4, 512>>>((const uint4*)flush, flush_bytes / 16, sink); };
    for (int mb : {8, 16, 24, 32, 40, 48}) {
        size_t bytes = (size_t)mb << 20;
        float cold = 0, pf = 0, pf_nowait = 0, warm = 0;
        const int reps = 5;
        for (int r = 0; r < reps; r++) {
            do_flush();
            cold += timed_read(bytes);
            do_flush();
            prefetch<<<64, 32>>>(a, bytes);
            spin<<<1, 1>>>(30000);
            pf += timed_read(bytes);
            do_flush();
            prefetch<<<64, 32>>>(a, bytes);
            pf_nowait += timed_read(bytes);
            do_flush();
            timed_read(bytes);
            warm += timed_read(bytes);
        }
        printf("%2d MB: cold %6.1f us, prefetched 30 us before %6.1f us, prefetched just before %6.1f us, "
               "read twice %6.1f us\n",
               mb, cold / reps, pf / reps, pf_nowait / reps, warm / reps);
    }
    cudaError_t err = cudaDeviceSynchronize();
    printf("%s\n", cudaGetErrorString(err));
    return 0;
}
