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
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <cuda_runtime.h>

#define CK(x)                                                                   \
    do {                                                                        \
        cudaError_t e_ = (x);                                                   \
        if (e_ != cudaSuccess) {                                                \
            printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));   \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

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
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
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
                    cudaGraph_t graph;
                    cudaGraphExec_t exec;
                    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
                    CK(cudaMemsetAsync(done, 0, K * sizeof(unsigned), s));
                    for (int i = 0; i < K; i++) {
                        cudaLaunchConfig_t cfg = {};
                        cfg.gridDim = dim3(g);
                        cfg.blockDim = dim3(256);
                        cfg.dynamicSmemBytes = (size_t)kb * 1024;
                        cfg.stream = s;
                        cudaLaunchAttribute attr[1];
                        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                        attr[0].val.programmaticStreamSerializationAllowed = mode != PLAIN && i > 0;
                        cfg.attrs = attr;
                        cfg.numAttrs = 1;
                        CK(cudaLaunchKernelEx(&cfg, link, i ? (const unsigned*)bufs[i - 1] : nullptr, bufs[i], g,
                                              i ? done + i - 1 : nullptr, done + i, mode, work));
                    }
                    CK(cudaStreamEndCapture(s, &graph));
                    CK(cudaGraphInstantiate(&exec, graph, 0));
                    std::vector<float> ts;
                    for (int r = 0; r < 6; r++) {
                        CK(cudaEventRecord(e0, s));
                        CK(cudaGraphLaunch(exec, s));
                        CK(cudaEventRecord(e1, s));
                        CK(cudaStreamSynchronize(s));
                        float ms;
                        CK(cudaEventElapsedTime(&ms, e0, e1));
                        if (r) ts.push_back(ms);
                    }
                    std::sort(ts.begin(), ts.end());
                    unsigned last[1];
                    CK(cudaMemcpy(last, bufs[K - 1], sizeof(unsigned), cudaMemcpyDeviceToHost));
                    printf(" %8.2f%s", ts[ts.size() / 2] * 1000.f / K, last[0] == (unsigned)K ? "" : "!");
                    CK(cudaGraphExecDestroy(exec));
                    CK(cudaGraphDestroy(graph));
                }
                printf("\n");
            }
    printf("(! after a time: the last kernel read a stale value)\n");
    return 0;
}
