// The routed experts of one decode token through kernels/moe_bulk.cu, alone: Flash's shapes
// (6 picks of 64 random FP4 experts, D = 4096, I = 2048), the launch the host makes (a block
// per SM, as many whole-tile stages as fit), picks rotated every launch so no expert is in L2.
// Prints each kernel's time and rate, then one block's timeline (SM clock stamps: when its
// producer requests each item and when its consumers see it arrive).
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o moe_bulk_bench tools/gpu/moe_bulk_bench.cu
#define MB_STAMPS
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#include "all.cu"
#include "bench_util.cuh"

// The host's launch shape (ops::moe_bulk_launch): planes for the inputs a block's run spans.
struct Shape { int blocks, stages, planes, smem; };
static Shape shape(int sms, int k, int pairs, int tiles, int kin, bool up) {
    const int items = pairs * tiles, nb = sms < items ? sms : items;
    int planes = 0;
    for (int b = 0; b < nb; b++) {
        const long long i0 = (long long)items * b / nb, i1 = (long long)items * (b + 1) / nb;
        auto input = [&](long long it) { return up ? it / tiles / k : it / tiles; };
        if (i0 < i1) planes = std::max(planes, (int)(input(i1 - 1) - input(i0) + 1));
    }
    const int tile = moe_bulk_tile_bytes(kin), fixed = 64 + planes * (kin * 4 + kin / 8);
    const int stages = std::min((227 * 1024 - 3072 - fixed) / tile, MB_MAX_STAGES);
    return {nb, stages, planes, stages * tile + fixed};
}

int main(int argc, char** argv) {
    const int E = 64, k = 6, D = 4096, I = 2048, reps = 200;
    const int block = argc > 1 ? atoi(argv[1]) : 0;
    CK(cudaMemcpyToSymbol(mb_stamp_block, &block, sizeof block));
    std::vector<LinearW> w1, w3, w2;
    for (int e = 0; e < E; e++) {
        w1.push_back(matrix(FMT_FP4, I, D, 3 * e + 1));
        w3.push_back(matrix(FMT_FP4, I, D, 3 * e + 2));
        w2.push_back(matrix(FMT_FP4, D, I, 3 * e + 3));
    }
    auto dev = [](const std::vector<LinearW>& v) {
        LinearW* d;
        CK(cudaMalloc(&d, v.size() * sizeof(LinearW)));
        CK(cudaMemcpy(d, v.data(), v.size() * sizeof(LinearW), cudaMemcpyHostToDevice));
        return d;
    };
    MoeArgs a{};
    a.w1 = dev(w1);
    a.w3 = dev(w3);
    a.w2 = dev(w2);
    // Picks of launch r at picks + 8 r: experts 6r .. 6r + 5 (mod E).
    std::vector<int> picks(8 * reps);
    for (int r = 0; r < reps; r++)
        for (int j = 0; j < k; j++) picks[8 * r + j] = (k * r + j) % E;
    int* pk;
    CK(cudaMalloc(&pk, picks.size() * 4));
    CK(cudaMemcpy(pk, picks.data(), picks.size() * 4, cudaMemcpyHostToDevice));
    std::vector<float> hx(D);
    for (int i = 0; i < D; i++) hx[i] = (float)((i * 7919) % 2001) / 1000.f - 1.f;
    float *x, *h, *out, *rw;
    CK(cudaMalloc(&x, D * 4));
    CK(cudaMemcpy(x, hx.data(), D * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&h, k * I * 4));
    CK(cudaMalloc(&out, k * D * 4));
    CK(cudaMalloc(&rw, k * 4));
    CK(cudaMemset(rw, 0, k * 4));
    a.rw = rw;
    a.x = x;
    a.h = h;
    a.out = out;
    a.k = k;
    a.D = D;
    a.I = I;
    a.vec = 1;
    a.rw_inside = 0;
    a.lim = 10.f;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const Shape su = shape(sms, k, k, I / 8, D, true), sd = shape(sms, k, k, D / 16, I, false);
    CK(cudaFuncSetAttribute(moe_up_bulk_fp4, cudaFuncAttributeMaxDynamicSharedMemorySize, su.smem));
    CK(cudaFuncSetAttribute(moe_down_bulk_fp4, cudaFuncAttributeMaxDynamicSharedMemorySize, sd.smem));
    printf("up: %d blocks, %d stages, %d planes, %d B; down: %d blocks, %d stages, %d planes, %d B\n",
           su.blocks, su.stages, su.planes, su.smem, sd.blocks, sd.stages, sd.planes, sd.smem);
    auto up = [&](int r) {
        MoeArgs v = a;
        v.picks = pk + 8 * (r % reps);
        moe_up_bulk_fp4<<<su.blocks, 288, su.smem>>>(v, k, su.stages, su.planes);
    };
    auto down = [&](int r) {
        MoeArgs v = a;
        v.picks = pk + 8 * (r % reps);
        moe_down_bulk_fp4<<<sd.blocks, 288, sd.smem>>>(v, k, sd.stages, sd.planes);
    };
    const double up_bytes = 2.0 * k * ((double)I * D / 2 + (double)I * D / 32);
    const double down_bytes = (double)k * ((double)I * D / 2 + (double)I * D / 32);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    auto time = [&](const char* what, double bytes, auto f) {
        for (int r = 0; r < 20; r++) f(r);
        CK(cudaEventRecord(e0));
        for (int r = 0; r < reps; r++) f(r);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        CK(cudaGetLastError());
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1000.0 / reps;
        printf("%-28s %7.2f us  %6.2f TB/s (%.1f MB)\n", what, us, bytes / us / 1e6, bytes / 1e6);
    };
    time("moe_up_bulk_fp4", up_bytes, up);
    time("moe_down_bulk_fp4", down_bytes, down);
    time("up then down", up_bytes + down_bytes, [&](int r) { up(r); down(r); });
    // Four launches back to back (up, up, up, up; then up, down, up, down): every block's
    // entry and end on the global timer, against the first launch's first entry.
    CK(cudaMemcpyToSymbol(mb_span_base, &pk, sizeof pk));
    for (int seq = 0; seq < 2; seq++) {
        for (int r = 0; r < 4; r++) (seq && (r & 1)) ? down(r) : up(r);
        CK(cudaDeviceSynchronize());
        static unsigned long long span[4][2][1024];
        CK(cudaMemcpyFromSymbol(span, mb_span, sizeof span));
        unsigned long long t0 = ~0ull;
        for (int b = 0; b < su.blocks; b++) t0 = std::min(t0, span[0][0][b]);
        printf("%s: per launch, us from the first entry: entries first..last, ends first..last\n",
               seq ? "up, down, up, down" : "up x4");
        for (int r = 0; r < 4; r++) {
            const int nb = (seq && (r & 1)) ? sd.blocks : su.blocks;
            unsigned long long s0 = ~0ull, s1 = 0, e0 = ~0ull, e1 = 0;
            for (int b = 0; b < nb; b++) {
                s0 = std::min(s0, span[r][0][b]), s1 = std::max(s1, span[r][0][b]);
                e0 = std::min(e0, span[r][1][b]), e1 = std::max(e1, span[r][1][b]);
            }
            printf("  launch %d: entries %7.2f .. %7.2f  ends %7.2f .. %7.2f\n", r, (s0 - t0) / 1e3,
                   (s1 - t0) / 1e3, (e0 - t0) / 1e3, (e1 - t0) / 1e3);
        }
    }
    int khz;
    CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    const double mhz = khz / 1e3;
    for (int which = 0; which < 2; which++) {
        which ? down(7) : up(7);
        CK(cudaDeviceSynchronize());
        long long req[MB_NSTAMP], got[MB_NSTAMP], misc[4];
        CK(cudaMemcpyFromSymbol(req, mb_stamp_req, sizeof req));
        CK(cudaMemcpyFromSymbol(got, mb_stamp_got, sizeof got));
        CK(cudaMemcpyFromSymbol(misc, mb_stamp_misc, sizeof misc));
        const Shape s = which ? sd : su;
        const int items = k * (which ? D / 16 : I / 8);
        const int n = (int)((long long)items * (block + 1) / s.blocks - (long long)items * block / s.blocks);
        printf("%s block %d (%d items, us from entry at %.0f MHz): planes ready %.2f, end %.2f\n",
               which ? "down" : "up", block, n, mhz, (misc[1] - misc[0]) / mhz, (misc[2] - misc[0]) / mhz);
        for (int i = 0; i < n && i < MB_NSTAMP; i++)
            printf("  item %2d requested %6.2f arrived %6.2f\n", i, (req[i] - misc[0]) / mhz,
                   (got[i] - misc[0]) / mhz);
    }
    return 0;
}
