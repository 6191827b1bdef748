// How fast bulk asynchronous copies (cp.async.bulk, the 1-D TMA form) stream global memory into
// a shared-memory ring, by copy size and stage size, against plain 16-byte loads. No compute:
// one block per SM, a producer warp issuing the copies, eight warps that wait for each stage and
// release it. `rowstride` reads each copy from a different row (rows that far apart), the way
// a K slice of several matrix rows is read; 0 reads the stage contiguously.
//
// This sized the stages of crates/dsv4-cuda/kernels/gemv_bulk.cu (docs/PERFORMANCE.md, "GPU:
// decode GEMVs through bulk copies"). On a GPU machine:
//   nvcc -std=c++17 -O3 -arch=sm_90a -o bulk_copy_bw tools/gpu/bulk_copy_bw.cu && ./bulk_copy_bw
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>
#include "ring_util.cuh"

int main() {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const size_t total = (size_t)1 << 30;
    uint8_t* buf;
    float* sink;
    if (cudaMalloc(&buf, total + (64 << 20)) != cudaSuccess || cudaMalloc(&sink, 64) != cudaSuccess) {
        printf("no GPU memory\n");
        return 1;
    }
    cudaMemset(buf, 1, total);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float ms = 0.f;
    auto time = [&](auto launch) {
        for (int r = 0; r < 2; r++) {  // the second run is reported
            cudaEventRecord(a);
            launch();
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            cudaEventElapsedTime(&ms, a, b);
        }
    };
    for (size_t sz : {(size_t)32 << 20, total}) {
        time([&] { plain_loads<<<sms * 4, 512>>>((const uint4*)buf, sz / 16, sink); });
        printf("16-byte loads, %zu MB: %.1f us, %.0f GB/s\n", sz >> 20, ms * 1e3, sz / ms / 1e6);
        for (int stage : {16384, 32768}) {
            for (int copy : {512, 1024, 2048, 4096, 16384}) {
                if (copy > stage) continue;
                const int stages = stage == 32768 ? 4 : 6, smem = stages * stage;
                auto k = stage == 32768 ? ring<4> : ring<6>;
                cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
                for (int rs : {0, 4096, 8192}) {
                    if (rs && (copy > 2048 || stage / copy > 32)) continue;
                    time([&] { k<<<sms, 288, smem>>>(buf, sz, copy, stage, rs, sink, nullptr, 0); });
                    const size_t moved = sz / sms / stage * stage * sms;
                    printf("bulk, %zu MB, %d stages of %d, copies of %d, rowstride %d: %.1f us, %.0f GB/s (%s)\n",
                           sz >> 20, stages, stage, copy, rs, ms * 1e3, moved / ms / 1e6,
                           cudaGetErrorString(cudaGetLastError()));
                }
            }
        }
    }
    return 0;
}
