// What does a dependent kernel boundary cost inside a CUDA graph, and how much of it is
// `griddepcontrol.wait` (which returns once the whole previous grid has finished and flushed)
// rather than the data dependency itself? Times a graph of K dependent kernels, each block
// reading one value the previous kernel wrote and writing it plus one, three ways:
//   plain  no programmatic dependent launch: each kernel starts after the previous one ends;
//   pdl    launched early (launch_dependents at entry), griddepcontrol.wait before the read;
//   flag   launched early, then spinning on a counter the previous kernel's blocks increment
//          after their writes (release/acquire at GPU scope) instead of griddepcontrol.wait.
// Each configuration checks that the last kernel read K (so no read saw a stale value).
//   nvcc -std=c++17 -O3 -arch=sm_90a -o pdl_chain tools/gpu/pdl_chain.cu && ./pdl_chain
#include <cstdint>
#include "graph_util.cuh"

enum Mode { PLAIN = 0, PDL = 1, FLAG = 2 };

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Kernel i of the chain: reads prev[b % gprev], writes cur[b] = that + 1 (+ `work` ns of spin,
// standing in for a kernel's own time). `done[i]` counts its finished blocks. The launch's
// dynamic shared memory (unused) only decides how many blocks fit on an SM.
__global__ void link(const unsigned* prev, unsigned* cur, int gprev, unsigned* done_prev, unsigned* done_cur,
                     int mode, long long work) {
    if (mode != PLAIN) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (mode == PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (threadIdx.x == 0) {
        if (mode == FLAG && done_prev)
            while (ld_acquire(done_prev) < (unsigned)gprev) {
            }
        unsigned v = prev ? __ldcg(prev + blockIdx.x % gprev) : 0u;
        long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        do {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        } while (t - t0 < work);
        cur[blockIdx.x] = v + 1;
        if (mode == FLAG) {
            __threadfence();
            atomicAdd(done_cur, 1u);
        }
    }
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaFuncSetAttribute(link, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
    const int K = 256;
    std::vector<unsigned*> bufs(K);
    for (auto& b : bufs) CK(cudaMalloc(&b, 1024 * sizeof(unsigned)));
    unsigned* done;
    CK(cudaMalloc(&done, K * sizeof(unsigned)));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("SMs %d; %d dependent kernels per graph; microseconds per kernel (median of 5 replays)\n", sms, K);
    printf("%6s %8s %9s %8s %8s %8s\n", "blocks", "smem KB", "work ns", "plain", "pdl", "flag");
    const int grids[] = {1, 32, sms};
    const int smems[] = {0, 100, 200};
    const long long works[] = {0, 2000};
    for (long long work : works)
        for (int g : grids)
            for (int kb : smems) {
                printf("%6d %8d %9lld", g, kb, work);
                for (int mode = 0; mode < 3; mode++) {
                    const float ms = graph_median_ms(s, [&] {
                        CK(cudaMemsetAsync(done, 0, K * sizeof(unsigned), s));
                        for (int i = 0; i < K; i++)
                            launch_pdl(link, dim3(g), dim3(256), (size_t)kb * 1024, s, mode != PLAIN && i > 0,
                                       i ? (const unsigned*)bufs[i - 1] : nullptr, bufs[i], g,
                                       i ? done + i - 1 : nullptr, done + i, mode, work);
                    });
                    unsigned last[1];
                    CK(cudaMemcpy(last, bufs[K - 1], sizeof(unsigned), cudaMemcpyDeviceToHost));
                    printf(" %8.2f%s", ms * 1000.f / K, last[0] == (unsigned)K ? "" : "!");
                }
                printf("\n");
            }
    printf("(! after a time: the last kernel read a stale value)\n");
    return 0;
}
