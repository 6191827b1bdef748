// The decode GEMVs of kernels/gemv_bulk.cu alone, at the attention's FP8 shapes (wq_b: 32768
// rows of 1024; wo_a / wo_b: rows of 4096 / 8192) and at 128 MB (where a launch's start and
// tail no longer matter), launched as the host launches them (a block per SM, four stages,
// programmatic dependent launch), four copies of each matrix in turn so none is in L2.
// Build variants with -DBULK_NO_MATH (consumers only wait and release: the stream's own rate)
// and -DBULK_NO_COPY (the producer only signals: the consumers' own rate), -DBULK_NO_RING (no
// producer, no waits or releases: the consumers' rate without the ring's hand-offs), -DBULK_X_LOADS (the
// activations loaded per stage, as before stop 28), -DBULK_X_SLICES=2, -DBULK_WARPS=16,
// -DBULK_DEFER_SUMS (with -DBULK_DEFER_MAX=32 for the 128 MB rows);
// -DBULK_WAIT=1|2 (the rings' waits without suspending, or with a short suspend hint),
// -DBULK_STAMPS (block 0's clock per stage: where a stage's cycles go), -DBULK_WALK_S1=0 (the
// runtime divisions per stage, as before stop 34), -DBULK_LDS_AHEAD (a warp's shared loads of
// every u of a stage before their math: all of a stage's loads in flight together);
// Last, wo_a + wo_b as two launches and as the one-launch pair.
// scripts/ffn-bench.sh with TOOL=gemv_bulk_bench builds and runs them.
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o gemv_bulk_bench tools/gpu/gemv_bulk_bench.cu
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
// The kernels it times and what they need (not all.cu: a smaller build, ~2 min less nvcc).
#include "linear.cu"
#include "gemm_tc.cu"
#include "gemv_bulk.cu"
#include "bench_util.cuh"
#include "graph_util.cuh"

// Ring stages per launch (the host's default 4; -DBENCH_STAGES=6 for deeper rings).
#ifndef BENCH_STAGES
#define BENCH_STAGES 4
#endif

typedef void (*Kern)(LinearW, GemvArgs, int);

// µs per call of run(i) queued back to back on st: 8 calls to warm up, then `reps` timed.
template <class Run>
static double us_per_call(cudaStream_t st, int reps, Run&& run) {
    for (int i = 0; i < 8; i++) run(i);
    CK(cudaStreamSynchronize(st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < reps; i++) run(i);
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms * 1e3 / reps;
}

// wo_a (8192 x 4096) then wo_b (4096 x 8192) of one token, FP8, as two launches under PDL and
// as `gemv_bulk_pair` (one ring, a grid barrier between the products; DSV4_CUDA_BULK_PAIR=1 in
// the engine, ~5% slower in the step): whether the pair loses alone, or only beside the
// attention before it. Four copies of each matrix in turn, so none is in L2.
static void pair_vs_two_launches(int sms, float* x, float* y, cudaStream_t st) {
    constexpr int C = 4;
    std::vector<LinearW> wa, wb;
    for (int i = 0; i < C; i++) {
        wa.push_back(matrix(FMT_FP8, 8192, 4096, 31 + i));
        wb.push_back(matrix(FMT_FP8, 4096, 8192, 41 + i));
    }
    float* z;  // wo_a's output, wo_b's input
    unsigned* bar;
    CK(cudaMalloc(&z, 8192 * 4));
    CK(cudaMalloc(&bar, 2 * sizeof(unsigned)));
    CK(cudaMemset(bar, 0, 2 * sizeof(unsigned)));
    GemvArgs a0{}, a1{};
    a0.x = x, a0.y = z, a0.nrows = 8192, a0.ldx = 4096, a0.ldy = 8192;
    a1.x = z, a1.y = y, a1.nrows = 4096, a1.ldx = 8192, a1.ldy = 4096;
    for (GemvArgs* a : {&a0, &a1}) a->M = 1, a->S = 1, a->vec = 1;
    const int ns0 = 4096 / 4096, ns1 = 8192 / 4096;  // K slices of 4 KB (r1)
    const int stage = bulk_stage_bytes<FMT_FP8, 1>(), smem = BENCH_STAGES * stage;
    const int blocks = std::min(8192 / 8, sms);
    CK(cudaFuncSetAttribute((const void*)gemv_bulk_fp8_1_r1, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute((const void*)gemv_bulk_pair_fp8_r1_fp8_r1_1,
                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(blocks), block(BULK_THREADS);
    auto two = [&](int i) {
        launch_pdl(gemv_bulk_fp8_1_r1, grid, block, smem, st, true, wa[i % C], a0, ns0);
        launch_pdl(gemv_bulk_fp8_1_r1, grid, block, smem, st, true, wb[i % C], a1, ns1);
    };
    auto pair = [&](int i) {
        launch_pdl(gemv_bulk_pair_fp8_r1_fp8_r1_1, grid, block, smem, st, true, wa[i % C], a0, ns0, wb[i % C], a1,
                   ns1, bar);
    };
    const double bytes = 2.0 * 8192 * 4096;
    for (bool paired : {false, true}) {
        const double us = paired ? us_per_call(st, 100, pair) : us_per_call(st, 100, two);
        printf("wo_a + wo_b, %-20s %8.2f us  %5.2f TB/s (%.0f MB, %d blocks)\n",
               paired ? "one launch (pair)" : "two launches", us, bytes / us / 1e6, bytes / 1e6, blocks);
    }
    for (auto* v : {&wa, &wb})
        for (auto& w : *v) {
            CK(cudaFree((void*)w.w));
            CK(cudaFree((void*)w.scales));
        }
    CK(cudaFree(z));
    CK(cudaFree(bar));
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    struct Case {
        const char* what;
        int out, in, rpw;
        Kern k;
        int stage;  // bytes of a ring slot (the host's bulk_smem per stage)
        bool f4;
    } cases[] = {
        {"wq_b   32768 x 1024 (r4)", 32768, 1024, 4, gemv_bulk_fp8_1_r4, bulk_stage_bytes<FMT_FP8, 4>()},
        {"wo_a    8192 x 4096 (r1)", 8192, 4096, 1, gemv_bulk_fp8_1_r1, bulk_stage_bytes<FMT_FP8, 1>()},
        {"wo_a    8192 x 4096 (r2)", 8192, 4096, 2, gemv_bulk_fp8_1_r2, bulk_stage_bytes<FMT_FP8, 2>()},
        {"wo_b    4096 x 8192 (r1)", 4096, 8192, 1, gemv_bulk_fp8_1_r1, bulk_stage_bytes<FMT_FP8, 1>()},
        {"128 MB 131072 x 1024 (r4)", 131072, 1024, 4, gemv_bulk_fp8_1_r4, bulk_stage_bytes<FMT_FP8, 4>()},
        {"128 MB  32768 x 4096 (r1)", 32768, 4096, 1, gemv_bulk_fp8_1_r1, bulk_stage_bytes<FMT_FP8, 1>()},
        {"FP4 128 MB 65536 x 4096 (r2)", 65536, 4096, 2, gemv_bulk_fp4_1_r2, bulk_stage_bytes<FMT_FP4, 2>(), true},
    };
    float* x;
    float* y;
    CK(cudaMalloc(&x, 8192 * 4));
    CK(cudaMalloc(&y, 131072 * 4));
    {
        std::vector<float> h(8192);
        uint32_t s = 7;
        for (auto& v : h) v = (float)(lcg(s) >> 8) / 16777216.0f - 0.5f;
        CK(cudaMemcpy(x, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (const Case& c : cases) {
        const double bytes = (double)c.out * c.in / (c.f4 ? 2 : 1);
        const int copies = bytes >= (64u << 20) ? 1 : 4;
        std::vector<LinearW> ws;
        for (int i = 0; i < copies; i++) ws.push_back(matrix(c.f4 ? FMT_FP4 : FMT_FP8, c.out, c.in, 11 + i));
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
        const int smem = BENCH_STAGES * c.stage;
        const int nslices = c.in / (c.f4 ? 2 : 1) / (4096 / c.rpw);
        CK(cudaFuncSetAttribute((const void*)c.k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        auto run = [&](int i) {
            launch_pdl(c.k, dim3(blocks), dim3(BULK_THREADS), smem, st, true, ws[i % copies], a, nslices);
        };
        const double us = us_per_call(st, copies == 1 ? 20 : 100, run);
        printf("%-28s %8.2f us  %5.2f TB/s (%.0f MB, %d blocks)\n", c.what, us,
               bytes / us / 1e6, bytes / 1e6, blocks);
#ifdef BULK_STAMPS
        // One more launch with block 0's stamps: per stage, the cycles a consumer warp waited
        // for it, held it, and from one wait to the next; the producer's wait for a free slot.
        {
            static long long stamp[BULK_WARPS + 1][BULK_STAMP_N][3];
            memset(stamp, 0, sizeof stamp);
            CK(cudaMemcpyToSymbol(bulk_stamps, stamp, sizeof stamp));
            run(0);
            CK(cudaStreamSynchronize(st));
            CK(cudaMemcpyFromSymbol(stamp, bulk_stamps, sizeof stamp));
            int ns = 0;
            while (ns < BULK_STAMP_N && stamp[0][ns][0] != 0) ns++;
            auto mean = [&](int w, int k1, int k0, bool next) {
                double sum = 0;
                int cnt = 0;
                for (int n = 1; n + (next ? 1 : 0) < ns; n++) {
                    sum += next ? (double)(stamp[w][n + 1][k1] - stamp[w][n][k0]) : (double)(stamp[w][n][k1] - stamp[w][n][k0]);
                    cnt++;
                }
                return cnt ? sum / cnt : 0.0;
            };
            printf("    block 0, %d stages; cycles per stage (stages 1..): ", ns);
            for (int w : {0, BULK_WARPS - 1})
                printf("warp %d wait %.0f held %.0f period %.0f; ", w, mean(w, 1, 0, false), mean(w, 2, 1, false),
                       mean(w, 0, 0, true));
            printf("producer slot wait %.0f period %.0f; first stage ready after %lld\n", mean(BULK_WARPS, 1, 0, false),
                   mean(BULK_WARPS, 0, 0, true), stamp[0][0][1] - stamp[BULK_WARPS][0][0]);
        }
#endif
        for (auto& w : ws) {
            CK(cudaFree((void*)w.w));
            CK(cudaFree((void*)w.scales));
        }
    }
    pair_vs_two_launches(sms, x, y, st);
    return 0;
}
