// The decode GEMVs of kernels/gemv_bulk.cu alone, at the attention's FP8 shapes (wq_b: 32768
// rows of 1024; wo_a / wo_b: rows of 4096 / 8192) and at 128 MB (where a launch's start and
// tail no longer matter), launched as the host launches them (a block per SM, four stages,
// programmatic dependent launch), four copies of each matrix in turn so none is in L2.
// Build variants with -DBULK_NO_MATH (consumers only wait and release: the stream's own rate)
// and -DBULK_NO_COPY (the producer only signals: the consumers' own rate), -DBULK_X_LOADS (the
// activations loaded per stage, as before stop 28), -DBULK_X_SLICES=2, -DBULK_WARPS=16;
// scripts/ffn-bench.sh with TOOL=gemv_bulk_bench builds and runs them.
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o gemv_bulk_bench tools/gpu/gemv_bulk_bench.cu
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#include "all.cu"

#define CK(x)                                                                             \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } \
    } while (0)

static uint32_t lcg(uint32_t& s) { return s = s * 1664525u + 1013904223u; }

static void* up_bytes(const void* h, size_t n) {
    void* d;
    CK(cudaMalloc(&d, n));
    CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    return d;
}

// Random FP8 codes (no NaN), f32 128×128 block scales 2^-6..2^-3.
static LinearW fp8(int out, int in, uint32_t seed) {
    LinearW w{};
    w.fmt = FMT_FP8;
    w.out = out;
    w.in = in;
    w.bo = w.bi = 128;
    w.scale_cols = in / 128;
    std::vector<uint8_t> b((size_t)out * in);
    for (auto& v : b) {
        v = (uint8_t)(lcg(seed) >> 24);
        if ((v & 0x7f) == 0x7f) v = 0x7e;
    }
    w.w = (const uint8_t*)up_bytes(b.data(), b.size());
    std::vector<float> s((size_t)(out / 128) * w.scale_cols);
    for (auto& v : s) v = 1.0f / (float)(8 << ((lcg(seed) >> 24) % 4));
    w.scales = up_bytes(s.data(), s.size() * 4);
    return w;
}

// Random FP4 codes, e8m0 scales 120..127 (as moe_ffn_bench).
static LinearW fp4(int out, int in, uint32_t seed) {
    LinearW w{};
    w.fmt = FMT_FP4;
    w.out = out;
    w.in = in;
    std::vector<uint8_t> b((size_t)out * in / 2), sc((size_t)out * in / 32);
    for (auto& v : b) v = (uint8_t)(lcg(seed) >> 24);
    for (auto& v : sc) v = (uint8_t)(120 + (lcg(seed) >> 24) % 8);
    w.w = (const uint8_t*)up_bytes(b.data(), b.size());
    w.scales = up_bytes(sc.data(), sc.size());
    return w;
}

typedef void (*Kern)(LinearW, GemvArgs, int);

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    struct Case {
        const char* what;
        int out, in, rpw;
        Kern k;
        bool f4;
    } cases[] = {
        {"wq_b   32768 x 1024 (r4)", 32768, 1024, 4, gemv_bulk_fp8_1_r4},
        {"wo_a    8192 x 4096 (r1)", 8192, 4096, 1, gemv_bulk_fp8_1_r1},
        {"wo_a    8192 x 4096 (r2)", 8192, 4096, 2, gemv_bulk_fp8_1_r2},
        {"wo_b    4096 x 8192 (r1)", 4096, 8192, 1, gemv_bulk_fp8_1_r1},
        {"128 MB 131072 x 1024 (r4)", 131072, 1024, 4, gemv_bulk_fp8_1_r4},
        {"128 MB  32768 x 4096 (r1)", 32768, 4096, 1, gemv_bulk_fp8_1_r1},
        {"FP4 128 MB 65536 x 4096 (r2)", 65536, 4096, 2, gemv_bulk_fp4_1_r2, true},
    };
    float* x;
    float* y;
    CK(cudaMalloc(&x, 8192 * 4));
    CK(cudaMalloc(&y, 131072 * 4));
    {
        std::vector<float> h(8192);
        uint32_t s = 7;
        for (auto& v : h) v = ((lcg(s) >> 8) / 16777216.0f - 0.5f);
        CK(cudaMemcpy(x, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (const Case& c : cases) {
        const double bytes = (double)c.out * c.in / (c.f4 ? 2 : 1);
        const int copies = bytes >= (64u << 20) ? 1 : 4;
        std::vector<LinearW> ws;
        for (int i = 0; i < copies; i++) ws.push_back(c.f4 ? fp4(c.out, c.in, 11 + i) : fp8(c.out, c.in, 11 + i));
        GemvArgs a{};
        a.x = x;
        a.y = y;
        a.nrows = c.out;
        a.ldx = c.in;
        a.ldy = c.out;
        a.M = 1;
        a.S = 1;
        a.vec = 1;
        const int tiles = c.out / (8 * c.rpw);
        const int blocks = tiles < sms ? tiles : sms;
        const int smem = 4 * (32768 + (c.f4 ? 32768 / 16 : (4096 / c.rpw) / 32));
        const int nslices = c.in / (c.f4 ? 2 : 1) / (4096 / c.rpw);
        CK(cudaFuncSetAttribute((const void*)c.k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(blocks);
        cfg.blockDim = dim3(BULK_THREADS);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = st;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        auto run = [&](int n) {
            for (int i = 0; i < n; i++) CK(cudaLaunchKernelEx(&cfg, c.k, ws[i % copies], a, nslices));
        };
        run(8);
        CK(cudaStreamSynchronize(st));
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        const int reps = copies == 1 ? 20 : 100;
        CK(cudaEventRecord(e0, st));
        run(reps);
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1e3 / reps;
        printf("%-28s %8.2f us  %5.2f TB/s (%.0f MB, %d blocks)\n", c.what, us, bytes / us / 1e6, bytes / 1e6, blocks);
        for (auto& w : ws) {
            CK(cudaFree((void*)w.w));
            CK(cudaFree((void*)w.scales));
        }
    }
    return 0;
}
