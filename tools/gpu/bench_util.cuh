// Helpers of the standalone GPU benches in tools/gpu (include after kernels/all.cu): a CUDA
// call checked, a small LCG, uploads, and random weight matrices in the stored formats.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>

#define CK(x)                                                                             \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } \
    } while (0)

static inline uint32_t lcg(uint32_t& s) { return s = s * 1664525u + 1013904223u; }

static inline void* up_bytes(const std::vector<uint8_t>& h) {
    void* d;
    CK(cudaMalloc(&d, h.size()));
    CK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice));
    return d;
}

// Random codes; scales near 1 (FP4: e8m0 120..127; FP8: f32 128×128 block scales 2^-6..2^-3).
static inline LinearW matrix(int fmt, int out, int in, uint32_t seed) {
    LinearW w{};
    w.fmt = fmt;
    w.out = out;
    w.in = in;
    const size_t n = fmt == FMT_FP4 ? (size_t)out * in / 2 : (size_t)out * in * (fmt == FMT_BF16 ? 2 : 1);
    std::vector<uint8_t> b(n);
    for (auto& v : b) v = (uint8_t)(lcg(seed) >> 24);
    if (fmt == FMT_BF16)  // small values: exponent bits of 2^-8..2^-5
        for (size_t i = 1; i < n; i += 2) b[i] = (uint8_t)(0x3b + (b[i] & 1)) | (b[i] & 0x80);
    if (fmt == FMT_FP8)  // no NaN codes
        for (auto& v : b) v = (v & 0x7f) == 0x7f ? 0x7e : v;
    w.w = (const uint8_t*)up_bytes(b);
    if (fmt == FMT_FP4) {
        std::vector<uint8_t> s((size_t)out * in / 32);
        for (auto& v : s) v = (uint8_t)(120 + (lcg(seed) >> 24) % 8);
        w.scales = up_bytes(s);
    } else if (fmt == FMT_FP8) {
        w.bo = w.bi = 128;
        w.scale_cols = in / 128;
        std::vector<float> s((size_t)(out / 128) * w.scale_cols);
        for (auto& v : s) v = 1.0f / (float)(8 << ((lcg(seed) >> 24) % 4));
        std::vector<uint8_t> raw(s.size() * 4);
        memcpy(raw.data(), s.data(), raw.size());
        w.scales = up_bytes(raw);
    }
    return w;
}
