// What the latency-bound kernels of a decode step cost on their own: each launched 2000 times
// back to back (no PDL, so each waits for the one before) on Flash shapes (n = 4 streams,
// d = 4096, 256 experts). Compares hc_boundary's variants (Sinkhorn iterations, with and without
// the post step), hc_mix, moe_route, a one-row rms_norm and an empty kernel.
//   nvcc -std=c++17 -O3 -arch=sm_90a -Icrates/dsv4-cuda/kernels -o hc_tail tools/gpu/hc_tail.cu
#include <cstdio>
#include <vector>
#include <cuda_runtime.h>
#include "linear.cu"
#include "elementwise.cu"
#include "moe.cu"

__global__ void empty_kernel() {}

#define CK(x)                                                                       \
    do {                                                                            \
        cudaError_t e = (x);                                                        \
        if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } \
    } while (0)

template <class F>
float time_us(F launch, int reps = 2000) {
    for (int i = 0; i < 50; i++) launch();
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < reps; i++) launch();
    cudaEventRecord(b);
    CK(cudaEventSynchronize(b));
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    CK(cudaGetLastError());
    return ms * 1000.f / reps;
}

float* rnd(size_t n, float lo, float hi) {
    std::vector<float> h(n);
    uint32_t s = 12345u + (uint32_t)n;
    for (auto& v : h) {
        s = s * 1664525u + 1013904223u;
        v = lo + (hi - lo) * (float)(s >> 8) / 16777216.f;
    }
    float* d;
    CK(cudaMalloc(&d, n * 4));
    CK(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice));
    return d;
}

int main() {
    const int n = 4, d = 4096, rows = (2 + n) * n, S = d / HC_COLS, k = 6, E = 256;
    HcArgs a{};
    a.x = rnd((size_t)n * d, -1, 1);
    a.f = rnd(d, -1, 1);
    a.eout = rnd((size_t)k * d, -1, 1);
    a.rw = rnd(k, 0, 1);
    a.fn = rnd((size_t)rows * n * d, -0.01f, 0.01f);
    a.base = rnd(rows, -1, 1);
    a.scale = rnd(3, 0, 1);
    a.norm_w = rnd(d, 0.5f, 1.5f);
    a.partial = rnd((size_t)S * (rows + 1), 0, 0);
    a.pre = rnd(n, 0, 1);
    a.post = rnd(n, 0, 1);
    a.comb = rnd(n * n, 0, 0.3f);
    a.h = rnd(d, 0, 0);
    CK(cudaMalloc(&a.count, 4));
    CK(cudaMemset(a.count, 0, 4));
    a.n = n; a.d = d; a.iters = 20; a.S = S; a.k = k; a.rw_inside = 0;
    a.hc_eps = 1e-6f; a.norm_eps = 1e-6f;
    // The post step keeps x bounded: post in (0, 2) scales f, comb's columns sum below 1.2.
    auto hc = [&](HcArgs v) { return [=] { hc_boundary<<<dim3(S, 1), HC_THREADS>>>(v); }; };
    printf("empty kernel                         %6.2f us\n", time_us([] { empty_kernel<<<1, 32>>>(); }));
    float* row = rnd(d, -1, 1);
    printf("rms_norm, one row of 4096            %6.2f us\n",
           time_us([=] { rms_norm<<<1, 256>>>(row, a.norm_w, d, 1e-6f); }));
    HcArgs v = a;
    printf("hc_boundary, post + experts, 20 it.  %6.2f us\n", time_us(hc(v)));
    v.iters = 1;
    printf("hc_boundary, post + experts, 1 it.   %6.2f us\n", time_us(hc(v)));
    v = a; v.eout = nullptr;
    printf("hc_boundary, post, 20 it.            %6.2f us\n", time_us(hc(v)));
    v.f = nullptr;
    printf("hc_boundary, no post, 20 it.         %6.2f us\n", time_us(hc(v)));
    v.iters = 1;
    printf("hc_boundary, no post, 1 it.          %6.2f us\n", time_us(hc(v)));
    float* mu = rnd(rows, -1, 1);
    float* rinv = rnd(1, 1, 1);
    for (int it : {20, 1})
        printf("hc_mix (one warp), %2d it.            %6.2f us\n", it, time_us([=] {
                   hc_mix<<<1, 32>>>(mu, rinv, a.base, a.scale, a.pre, a.post, a.comb, n, it, 1e-6f, 1);
               }));
    float* logits = rnd(E, -4, 4);
    float* bias = rnd(E, -0.1f, 0.1f);
    int* picks;
    float* rw;
    CK(cudaMalloc(&picks, 4 * k));
    CK(cudaMalloc(&rw, 4 * k));
    printf("moe_route, %d experts, top %d       %6.2f us\n", E, k, time_us([=] {
               moe_route<<<1, 32>>>(logits, E, k, bias, nullptr, nullptr, 1.5f, picks, rw);
           }));
    return 0;
}
