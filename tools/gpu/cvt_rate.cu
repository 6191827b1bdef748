// How fast does an SM decode FP8 for the one-token consumers? Stop 33's stamps put the bulk
// GEMVs' consumers at ~2200-2450 cycles per 32 KB stage, the SIMT ones and stop 32's tensor-core
// ones alike, though the latter issue a quarter of the instructions; what both do alike is 64
// e4m3-pair conversions per warp and stage. This times each way of decoding on its own, with
// 8 warps per SM (as the consumers run) and with 32, as the SM's lane-operations per cycle and
// as the cycles a 32 KB stage (16384 pairs) would take on one SM:
// - `e4m3x2 -> f16x2` (`F2FP.F16.E4M3.UNPACK_B`, what both consumers use);
// - the same pair then to two f32 (`HADD2.F32` twice, the SIMT consumers' path);
// - integer decode (the pair's codes placed in f32 exponent/mantissa bits: shifts and masks, a
//   2^120 factor left to the block scale; stop 21's variant).
// Each lane runs 8 independent chains so latency does not hide the rate; the results are summed
// into a store so nothing is dropped.
//   nvcc -std=c++17 -O3 -arch=sm_90a -o cvt_rate tools/gpu/cvt_rate.cu && ./cvt_rate
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#define CK(x)                                                                             \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } \
    } while (0)

constexpr int CHAINS = 8;

__device__ __forceinline__ uint32_t to_half2(uint32_t two) {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffff), __NV_E4M3);
    return (uint32_t)r.x | ((uint32_t)r.y << 16);
}

// MODE 0: pairs to f16x2; 1: pairs to f16x2 to two f32; 2: integer decode to two f32.
template <int MODE>
__global__ void decode(const uint32_t* seed, int iters, float* out, long long* cycles) {
    uint32_t v[CHAINS];
    float acc[CHAINS];
#pragma unroll
    for (int c = 0; c < CHAINS; c++) {
        v[c] = seed[(threadIdx.x + c) & 255];
        acc[c] = 0.f;
    }
    __syncthreads();
    const long long t0 = clock64();
    for (int i = 0; i < iters; i++) {
#pragma unroll
        for (int c = 0; c < CHAINS; c++) {
            if constexpr (MODE == 0) {
                const uint32_t h = to_half2(v[c]);
                v[c] ^= h;  // the next input depends on this output: nothing is hoisted
            } else if constexpr (MODE == 1) {
                const uint32_t h = to_half2(v[c]);
                const float2 f = __half22float2(*(const __half2*)&h);
                acc[c] += f.x;
                v[c] ^= __float_as_uint(f.y);
            } else {
                const uint32_t w = v[c];
                const float lo = __uint_as_float(((w & 0x80u) << 24) | ((w & 0x7fu) << 20));
                const float hi = __uint_as_float(((w & 0x8000u) << 16) | ((w & 0x7f00u) << 12));
                acc[c] += lo;
                v[c] ^= __float_as_uint(hi);
            }
        }
    }
    const long long t1 = clock64();
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < CHAINS; c++) s += acc[c] + (float)(v[c] & 0xff);
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
    if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int MODE>
static void run(const char* what, int sms, int warps, const uint32_t* seed, float* out, long long* cyc) {
    const int iters = 4096, threads = 32 * warps;
    decode<MODE><<<sms, threads>>>(seed, 16, out, cyc);  // warm-up
    decode<MODE><<<sms, threads>>>(seed, iters, out, cyc);
    CK(cudaDeviceSynchronize());
    long long c[1024];
    CK(cudaMemcpy(c, cyc, sizeof(long long) * sms, cudaMemcpyDeviceToHost));
    double mean = 0;
    for (int b = 0; b < sms; b++) mean += (double)c[b] / sms;
    const double pairs = (double)iters * CHAINS * threads;  // e4m3 pairs per SM
    printf("%-34s %2d warps/SM: %6.1f pairs per cycle per SM, a 32 KB stage %6.0f cycles\n", what, warps,
           pairs / mean, 16384.0 / (pairs / mean));
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    uint32_t h[256];
    for (int i = 0; i < 256; i++) h[i] = (uint32_t)(i * 2654435761u) & 0x7e7e7e7eu;  // no NaN codes
    uint32_t* seed;
    float* out;
    long long* cyc;
    CK(cudaMalloc(&seed, sizeof h));
    CK(cudaMemcpy(seed, h, sizeof h, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&out, sizeof(float) * sms * 1024));
    CK(cudaMalloc(&cyc, sizeof(long long) * sms));
    for (int warps : {8, 32}) {
        run<0>("e4m3x2 -> f16x2 (F2FP)", sms, warps, seed, out, cyc);
        run<1>("e4m3x2 -> f16x2 -> 2 f32 (+HADD2)", sms, warps, seed, out, cyc);
        run<2>("integer decode -> 2 f32", sms, warps, seed, out, cyc);
    }
    return 0;
}
