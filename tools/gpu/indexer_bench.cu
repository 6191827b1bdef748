// The CSA layers' indexer chain of one decode token at long contexts, alone: `indexer_scores`
// (the release's 64 heads × 128) and `indexer_scores_tc` (the same on the tensor cores) over n
// visible entries, then `topk_select` (k = 512) of them,
// each timed per launch (median of 30) with its inputs cold (a 128 MB write between launches
// evicts L2, as the step's weight streams do) and warm, and `topk_select`'s phases (its
// TOPK_STAMPS: the wait, the staging, four radix passes, the picks) from the last launch.
// Variants are -D flags of kernels/attention.cu. The top-k stages every row here (the engine up
// to ops::TOPK_STAGE_MAX entries); "topk global" is its path for longer rows.
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o indexer_bench tools/gpu/indexer_bench.cu
#include <algorithm>
#include <cmath>
#include <vector>
#include <cuda_runtime.h>
#define TOPK_STAMPS
#include "linear.cu"
#include "elementwise.cu"
#include "attention.cu"
#include "bench_util.cuh"

static float* upload_random(size_t n, uint32_t seed) {
    std::vector<float> h(n);
    for (auto& v : h) v = (float)(lcg(seed) >> 8) / (float)(1u << 24) * 2.f - 1.f;
    float* d;
    CK(cudaMalloc(&d, n * 4));
    CK(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice));
    return d;
}

// Median µs of `launch` over 30 timed runs; `cold`: L2 flushed before each.
template <class F>
static float time_us(F launch, bool cold, char* flush, size_t flush_bytes) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < 33; i++) {
        if (cold) CK(cudaMemsetAsync(flush, i, flush_bytes));
        CK(cudaEventRecord(a));
        launch();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (i >= 3) ts.push_back(ms * 1000.f);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t flush_bytes = 128u << 20;
    char* flush;
    CK(cudaMalloc(&flush, flush_bytes));
    const int k = 512, ratio = 4;
    const int smem_scores = (64 * 128 + 2 * 32 * 132) * 4;
    const int smem_tc = 3 * 64 * 132 * 4;
    CK(cudaFuncSetAttribute(indexer_scores, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_scores));
    CK(cudaFuncSetAttribute(indexer_scores_tc, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_tc));
    CK(cudaFuncSetAttribute(topk_select, cudaFuncAttributeMaxDynamicSharedMemorySize, 49152 * 4));
    printf("%8s %12s %12s %12s %12s %12s %12s %12s | topk phases (µs, last launch): stage, passes 1-4, picks\n",
           "entries", "scores cold", "scores warm", "tc cold", "tc warm", "topk cold", "topk warm", "topk global");
    for (int n : {1024, 4096, 16384, 32768, 49152}) {
        float* q = upload_random(64 * 128, 1);
        float* hw = upload_random(64, 2);
        float* keys = upload_random((size_t)n * 128, 3);
        float *scores;
        int *sel, *nsel, *pos;
        CK(cudaMalloc(&scores, (size_t)n * 4));
        CK(cudaMalloc(&sel, k * 4));
        CK(cudaMalloc(&nsel, 4));
        CK(cudaMalloc(&pos, 4));
        const int p = n * ratio - 1;
        CK(cudaMemcpy(pos, &p, 4, cudaMemcpyHostToDevice));
        const float wscale = 1.f / 8.f, dscale = 1.f / sqrtf(128.f);
        // As a decode step launches them: the token's own key table and position.
        SeqLayer seq = {};
        seq.i_entries = keys;
        SeqLayer* seqs;
        CK(cudaMalloc(&seqs, sizeof seq));
        CK(cudaMemcpy(seqs, &seq, sizeof seq, cudaMemcpyHostToDevice));
        auto run_scores = [&] {
            indexer_scores<<<2 * sms, 256, smem_scores>>>(q, hw, nullptr, 64, 128, 0, ratio, 0, wscale, dscale, scores,
                                                        n, seqs, pos);
        };
        auto run_tc = [&] {
            indexer_scores_tc<<<2 * sms, 256, smem_tc>>>(q, hw, nullptr, 64, 128, 0, ratio, 0, wscale, dscale, scores,
                                                         n, seqs, pos, 1);
        };
        auto run_topk = [&](int cap) {
            return [=] {
                topk_select<<<1, TOPK_THREADS, cap * 4>>>(scores, n, 0, ratio, 0, k, sel, k, nsel, pos, cap);
            };
        };
        const float sc = time_us(run_scores, true, flush, flush_bytes);
        const float sw = time_us(run_scores, false, flush, flush_bytes);
        const float xc = time_us(run_tc, true, flush, flush_bytes);
        const float xw = time_us(run_tc, false, flush, flush_bytes);
        const float tc = time_us(run_topk(n), true, flush, flush_bytes);
        const float tg = time_us(run_topk(0), false, flush, flush_bytes);
        const float tw = time_us(run_topk(n), false, flush, flush_bytes);
        CK(cudaGetLastError());
        long long st[8];
        CK(cudaMemcpyFromSymbol(st, topk_stamps, sizeof st));
        printf("%8d %12.2f %12.2f %12.2f %12.2f %12.2f %12.2f %12.2f |", n, sc, sw, xc, xw, tc, tw, tg);
        for (int i = 1; i <= 6; i++) printf(" %6.2f", (st[i] - st[i - 1]) / 1000.0);
        printf("\n");
        CK(cudaFree(q));
        CK(cudaFree(hw));
        CK(cudaFree(keys));
        CK(cudaFree(scores));
        CK(cudaFree(sel));
        CK(cudaFree(nsel));
        CK(cudaFree(pos));
        CK(cudaFree(seqs));
    }
    CK(cudaFree(flush));
    return 0;
}
