// One decode token's FFN half through kernels/moe_ffn.cu, alone: Flash's shapes (256 experts,
// 64 distinct random FP4 matrices behind them, top-6; an FP8 shared expert with 128×128 f32
// scales; a BF16 router), launched as the host launches them (a block per SM, programmatic
// dependent launch), the token's input changed every launch so the picks move. Prints the
// time of up + down, then, for one launch of up, where its blocks are (global-timer stamps,
// µs from the first block's entry: min / median / max over the blocks); then the same for the
// whole half in one launch (moe_ffn_bulk), whose outputs must equal the two launches' bit for
// bit (the exit status says whether they do). `up, right after an up launch` shows up with its
// code already fetched (scripts/ffn-bench.sh builds and runs variants; -DMB_NO_COPY /
// -DMB_NO_MATH time the routed tiles' consumers / stream alone, their outputs garbage).
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o moe_ffn_bench tools/gpu/moe_ffn_bench.cu
#define FFN_STAMPS
#ifndef FFN_SHARED_PRE
#define FFN_SHARED_PRE 2  // FfnArgs::shared_pre (ops' SHARED_PRE); -DFFN_SHARED_PRE=N to compare
#endif
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
#include "all.cu"
#include "bench_util.cuh"

int main() {
    const int E = 256, distinct = 64, k = 6, D = 4096, I = 2048, reps = 100;
    std::vector<LinearW> m1, m3, m2;
    for (int e = 0; e < distinct; e++) {
        m1.push_back(matrix(FMT_FP4, I, D, 3 * e + 1));
        m3.push_back(matrix(FMT_FP4, I, D, 3 * e + 2));
        m2.push_back(matrix(FMT_FP4, D, I, 3 * e + 3));
    }
    auto table = [&](const std::vector<LinearW>& v) {
        std::vector<LinearW> t(E);
        for (int e = 0; e < E; e++) t[e] = v[e % distinct];
        LinearW* d;
        CK(cudaMalloc(&d, E * sizeof(LinearW)));
        CK(cudaMemcpy(d, t.data(), E * sizeof(LinearW), cudaMemcpyHostToDevice));
        return d;
    };
    MoeArgs a{};
    a.w1 = table(m1);
    a.w3 = table(m3);
    a.w2 = table(m2);
    FfnArgs f{};
    f.gate = matrix(FMT_BF16, E, D, 99);
    f.sg = matrix(FMT_FP8, I, D, 101);
    f.su = matrix(FMT_FP8, I, D, 102);
    f.sd = matrix(FMT_FP8, D, I, 103);
    // Inputs: reps different tokens, so the routing moves from launch to launch.
    std::vector<float> hx((size_t)reps * D);
    uint32_t seed = 7;
    for (auto& v : hx) v = (float)(lcg(seed) >> 8) / (float)(1 << 24) * 2.f - 1.f;
    float *x, *h, *out, *rw, *scores, *sh, *sout, *bias;
    int* picks;
    unsigned* sync;
    CK(cudaMalloc(&x, hx.size() * 4));
    CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&h, k * I * 4));
    CK(cudaMalloc(&out, k * D * 4));
    CK(cudaMalloc(&rw, k * 4));
    CK(cudaMalloc(&picks, k * 4));
    CK(cudaMalloc(&scores, E * 4));
    CK(cudaMalloc(&sh, I * 4));
    CK(cudaMalloc(&sout, D * 4));
    CK(cudaMalloc(&bias, E * 4));
    CK(cudaMemset(bias, 0, E * 4));
    CK(cudaMalloc(&sync, 256));  // the barrier, then moe_ffn_bulk's 1 + k counters
    CK(cudaMemset(sync, 0, 256));
    a.picks = picks;
    a.rw = rw;
    a.h = h;
    a.out = out;
    a.k = k;
    a.D = D;
    a.I = I;
    a.vec = 1;
    a.lim = 10.f;
    f.scores = scores;
    f.sync = sync;
    f.bias = bias;
    f.route_scale = 2.5f;
    f.shared_pre = FFN_SHARED_PRE;
#ifdef FFN_DYN
    f.dyn_tiles = 1;  // up's routed tiles claimed as ring slots free (the two launches only)
#endif
    f.picks = picks;
    f.rw = rw;
    f.sh = sh;
    f.sout = sout;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // The host's layout (src/moe_ffn.rs): up 6 stages of an FP4 tile, down 8, one plane (132
    // blocks cut the pairs at their boundaries; other SM counts may need two).
    const int up_stage = moe_bulk_tile_bytes(D), up_stages = 6;
    const int up_smem = up_stages * up_stage + 64 + D * 4 + D / 8;
    const int dn_stage = moe_bulk_tile_bytes(I), dn_stages = 8, planes = 2;
    const int dn_smem = dn_stages * dn_stage + 64 + planes * (I * 4 + I / 8);
    CK(cudaFuncSetAttribute(moe_ffn_up_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, up_smem));
    CK(cudaFuncSetAttribute(moe_ffn_down_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, dn_smem));
    // One launch: stages of the larger (up) tile; the planes' room is the same for up's one
    // input and down's two pairs.
    const int all_planes = 2;
    const int all_smem = up_stages * up_stage + 64 + std::max(D * 4 + D / 8, all_planes * (I * 4 + I / 8));
    CK(cudaFuncSetAttribute(moe_ffn_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, all_smem));
    bool one = false;      // launch() takes moe_ffn_bulk
    bool up_only = false;  // launch() stops after up
    cudaLaunchAttribute pdl{};
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
    auto launch = [&](int r) {
        MoeArgs va = a;
        FfnArgs vf = f;
        va.x = x + (size_t)(r % reps) * D;
        vf.hr = va.x;
        cudaLaunchConfig_t c{};
        c.gridDim = dim3(sms);
        c.blockDim = dim3(288);
        c.dynamicSmemBytes = up_smem;
        c.attrs = &pdl;
        c.numAttrs = 1;
        if (one) {
            c.dynamicSmemBytes = all_smem;
            CK(cudaLaunchKernelEx(&c, moe_ffn_bulk, va, vf, up_stages, up_stage, all_planes));
            return;
        }
        CK(cudaLaunchKernelEx(&c, moe_ffn_up_bulk, va, vf, up_stages, up_stage));
        if (up_only) return;
        c.dynamicSmemBytes = dn_smem;
        CK(cudaLaunchKernelEx(&c, moe_ffn_down_bulk, va, vf, dn_stages, dn_stage, planes));
    };
    const double bytes = 3.0 * k * ((double)I * D / 2 + (double)I * D / 32) + 3.0 * I * D + 2.0 * E * D;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    auto timed = [&](const char* what) {
        for (int r = 0; r < 10; r++) launch(r);
        CK(cudaEventRecord(e0));
        for (int r = 0; r < reps; r++) launch(r);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        CK(cudaGetLastError());
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1000.0 / reps;
        printf("%s: %.2f us per token, %.2f TB/s (%.1f MB)\n", what, us, bytes / us / 1e6, bytes / 1e6);
    };
    // The outputs of one token, poisoned first (NaN) so that a missed write shows.
    auto outputs = [&](int r) {
        CK(cudaMemset(h, 0xff, k * I * 4));
        CK(cudaMemset(out, 0xff, k * D * 4));
        CK(cudaMemset(sout, 0xff, D * 4));
        CK(cudaMemset(sh, 0xff, I * 4));
        launch(r);
        CK(cudaDeviceSynchronize());
        std::vector<uint32_t> v((size_t)k * I + (size_t)k * D + D + I + k);
        uint32_t* p = v.data();
        CK(cudaMemcpy(p, h, k * I * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(p + k * I, out, k * D * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(p + k * I + k * D, sout, D * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(p + k * I + k * D + D, sh, I * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(p + k * I + k * D + D + I, picks, k * 4, cudaMemcpyDeviceToHost));
        return v;
    };
    // Stamps of launch(3); `up_twice`: of up's second launch right after its first (its code
    // still in the SMs' instruction caches), without down.
    auto stamps = [&](const char* what, const std::vector<int>& order, bool up_twice = false) {
        static unsigned long long st[FFN_NSTAMP][1024];
        memset(st, 0, sizeof st);
        CK(cudaMemcpyToSymbol(ffn_stamp, st, sizeof st));
        up_only = up_twice;
        if (up_twice) launch(2);
        launch(3);
        up_only = false;
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpyFromSymbol(st, ffn_stamp, sizeof st));
        unsigned long long t0 = ~0ull;
        for (int b = 0; b < sms; b++) t0 = std::min(t0, st[0][b]);
        const char* names[FFN_NSTAMP] = {"entry",        "wait over",      "arrived",     "shared done",
                                         "barrier over", "picks known",    "first routed", "up end",
                                         "inputs in",    "routed (prod.)", "sh in",        "h in",
                                         "end",          "router sums",    "scores out"};
        printf("%s, us from the first entry (min / median / max over %d blocks):\n", what, sms);
        for (int i : order) {
            std::vector<double> v;
            for (int b = 0; b < sms; b++)
                if (st[i][b] >= t0) v.push_back((st[i][b] - t0) / 1e3);
            std::sort(v.begin(), v.end());
            if (v.empty()) continue;
            printf("  %-14s %7.2f %7.2f %7.2f\n", names[i], v.front(), v[v.size() / 2], v.back());
        }
    };
    timed("up + down");
    const std::vector<uint32_t> ref = outputs(5);
    const std::vector<int> up_order = {0, 1, 13, 14, 2, 8, 4, 9, 3, 5, 6, 7};
    stamps("up", up_order);
    stamps("up, right after an up launch", up_order, true);
    one = true;
    timed("one launch");
    const std::vector<uint32_t> got = outputs(5);
    size_t diff = 0;
    for (size_t i = 0; i < ref.size(); i++) diff += ref[i] != got[i];
    printf("one launch against up + down: %zu of %zu output words differ\n", diff, ref.size());
    std::vector<int> one_order = up_order;
    for (int i : {10, 11, 12}) one_order.push_back(i);
    stamps("one launch", one_order);
    return diff != 0;
}
