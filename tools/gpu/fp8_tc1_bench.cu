// How fast can one token's FP8 GEMV consumers go on the tensor cores? A measurement for the
// decode step (docs/PERFORMANCE.md, stop 30): the SIMT bulk consumers (gemv_bulk.cu) reach
// 3.7–3.85 TB/s with no copies, barely above the ~3 TB/s stream, so weights that arrive early
// hardly shorten a product. Here each block keeps TILES 16-row tiles of an FP8 matrix (128×128
// f32 block scales) resident in shared memory and consumes them again and again: the rate of
// the consumers alone, as bytes of weights per second over all SMs.
//
// The consumer: 8 warps, warp w a K/8 slice of every tile. Lane (g, t) loads 16 bytes of rows g
// and g + 8 per 64 inputs (rows padded by 64 bytes, so a quarter-warp's eight 16-byte loads
// fall on distinct banks); its 4-byte word j feeds MMA j (m16n8k16 f16 -> f32) with inputs
// {2t, 2t+1, 2t+8, 2t+9} of that MMA taken from bytes 16t + 4j + {0, 1, 2, 3} (a permutation
// of K applied to the activations alike). The activations: per 128-input block a power of two
// brings max |x| into [2^14, 2^15), then two f16 parts (22 bits) in the B columns 0 and 1 (moe_tc.cu's
// split), held in registers for the whole run. Each 128-input block's 8 MMAs accumulate from
// zero; the lane adds them times the weight block scale and the activation factor in f32.
// The result is checked against a double-precision reference of the same rows.
//   TOOL=fp8_tc1_bench scripts/ffn-bench.sh ""      (K = 1024 and 4096; -DTC1_TILES=N)
// Stop 32 (H200): 15.1 TB/s at K = 1024, 15.9 at K = 4096. The same arithmetic as consumers of
// the bulk GEMVs' ring (stop 32's `tc1_steps`) ran no faster than the SIMT consumers there and
// was removed at stop 33 (docs/PERFORMANCE.md).
#include "all.cu"
#include "bench_util.cuh"
#include <algorithm>
#include <cmath>

#ifndef TC1_TILES
#define TC1_TILES 3  // resident 16-row tiles per block (K = 4096: 3 × 16 × 4160 B = 200 KB)
#endif
#define TC1_PAD 64

// A shared-memory load the compiler keeps in the repetition loop (a plain one, invariant there,
// ptxas hoisted out of it with one tile per block).
__device__ __forceinline__ uint4 lds128v(const uint8_t* p) {
    uint4 v;
    asm volatile("ld.volatile.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"((uint32_t)__cvta_generic_to_shared(p)));
    return v;
}

// Warp-slice consumer of one K = 64·GPW·8 matrix: GPW groups of 64 inputs per warp.
template <int GPW>
__global__ void __launch_bounds__(256, 1)
    tc1_consume(const uint8_t* w, const float* wscale, int scale_cols, const float* x, int iters, float* y) {
    constexpr int K = 64 * GPW * 8, STRIDE = K + TC1_PAD;
    extern __shared__ __align__(16) uint8_t sm[];
    __shared__ float red[8][TC1_TILES][16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int tile0 = blockIdx.x * TC1_TILES;
    // The block's tiles, once.
    for (int i = threadIdx.x; i < TC1_TILES * 16 * K / 16; i += blockDim.x) {
        const int r = i / (K / 16), c = i % (K / 16);
        *(uint4*)(sm + (size_t)r * STRIDE + 16 * c) = *(const uint4*)(w + ((size_t)tile0 * 16 + r) * K + 16 * c);
    }
    // The warp's activation parts: B words of group i, MMA j: b0 = (x[p+0], x[p+1]),
    // b1 = (x[p+2], x[p+3]) at p = k0 + 64i + 16t + 4j, part g (zero for columns g >= 2).
    const int k0 = warp * (K / 8);
    constexpr int KB = GPW / 2;  // 128-input blocks per warp
    float xf[KB];                // the factor undoing each block's power of two
    uint32_t b[GPW][4][2];
#pragma unroll
    for (int kb = 0; kb < KB; kb++) {
        float amax = 0.f;
        for (int k = lane; k < 128; k += 32) amax = fmaxf(amax, fabsf(x[k0 + 128 * kb + k]));
        const int sh = f16_part_shift(warp_max(amax));
        const float up = exp2i(sh);
        xf[kb] = exp2i(-sh);
#pragma unroll
        for (int gi = 0; gi < 2; gi++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int p = k0 + 128 * kb + 64 * gi + 16 * t + 4 * j + 2 * h;
                    float v[2];
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float s = x[p + e] * up;
                        const float hi = __half2float(__float2half_rn(s));
                        v[e] = g == 0 ? hi : g == 1 ? s - hi : 0.f;
                    }
                    b[2 * kb + gi][j][h] = half2_bits(v[0], v[1]);
                }
    }
    __syncthreads();
    float out[TC1_TILES][4] = {};
    for (int it = 0; it < iters; it++) {
#pragma unroll
        for (int tl = 0; tl < TC1_TILES; tl++) {
            const uint8_t* rg = sm + (size_t)(tl * 16 + g) * STRIDE + k0 + 16 * t;
            const uint8_t* rg8 = rg + 8 * STRIDE;
            const int srow = (tile0 + tl) * 16 / 128;
            float tot[4] = {};
#pragma unroll
            for (int kb = 0; kb < KB; kb++) {
                float acc[4] = {};
#pragma unroll
                for (int gi = 0; gi < 2; gi++) {
                    const uint4 wa = lds128v(rg + 64 * (2 * kb + gi));
                    const uint4 wb = lds128v(rg8 + 64 * (2 * kb + gi));
                    const uint32_t ua[4] = {wa.x, wa.y, wa.z, wa.w}, ub[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        mma_f16(acc, e4m3x2_half_bits(ua[j]), e4m3x2_half_bits(ub[j]), e4m3x2_half_bits(ua[j] >> 16),
                                e4m3x2_half_bits(ub[j] >> 16), b[2 * kb + gi][j][0], b[2 * kb + gi][j][1]);
                    }
                }
                const float f = wscale[(size_t)srow * scale_cols + (k0 / 128 + kb)] * xf[kb];
#pragma unroll
                for (int e = 0; e < 4; e++) tot[e] = fmaf(acc[e], f, tot[e]);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) out[tl][e] += tot[e];  // (the check runs one repetition)
        }
    }
    // Row g: columns 0 and 1 (lane t = 0: d0, d1); row g + 8: d2, d3. Warps' slices in order.
#pragma unroll
    for (int tl = 0; tl < TC1_TILES; tl++)
        if (t == 0) {
            red[warp][tl][g] = out[tl][0] + out[tl][1];
            red[warp][tl][g + 8] = out[tl][2] + out[tl][3];
        }
    __syncthreads();
    if (threadIdx.x < TC1_TILES * 16) {
        const int tl = threadIdx.x / 16, r = threadIdx.x % 16;
        float v = 0.f;
        for (int ww = 0; ww < 8; ww++) v += red[ww][tl][r];
        y[(size_t)(tile0 + tl) * 16 + r] = v;
    }
}

static float e4m3_host(uint8_t b) {
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    const float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.f + m / 8.f, e - 7);
    return s ? -v : v;
}

template <int GPW>
static void run(int sms) {
    constexpr int K = 64 * GPW * 8;
    const int rows = sms * TC1_TILES * 16;
    const int rows_alloc = (rows + 127) / 128 * 128;
    const LinearW W = matrix(FMT_FP8, rows_alloc, K, 7u + K);
    std::vector<float> xh(K);
    uint32_t seed = 99;
    for (auto& v : xh) v = ((int)(lcg(seed) >> 9) - (1 << 22)) * (1.0f / (1 << 20));
    float *x, *y;
    CK(cudaMalloc(&x, K * 4));
    CK(cudaMalloc(&y, (size_t)rows * 4));
    CK(cudaMemcpy(x, xh.data(), K * 4, cudaMemcpyHostToDevice));
    // (At least half an SM's shared memory: one block per SM, as the decode kernels run.)
    const size_t smem = std::max((size_t)TC1_TILES * 16 * (K + TC1_PAD), (size_t)120 * 1024);
    CK(cudaFuncSetAttribute(tc1_consume<GPW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const float* sc = (const float*)W.scales;
    tc1_consume<GPW><<<sms, 256, smem>>>(W.w, sc, W.scale_cols, x, 1, y);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    // Check against double precision.
    std::vector<uint8_t> wh((size_t)rows * K);
    std::vector<float> sh((size_t)(rows_alloc / 128) * W.scale_cols), yh(rows);
    CK(cudaMemcpy(wh.data(), W.w, wh.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(sh.data(), sc, sh.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(yh.data(), y, rows * 4, cudaMemcpyDeviceToHost));
    double worst = 0.0;
    for (int r = 0; r < rows; r++) {
        double ref = 0.0, mag = 0.0;
        for (int k = 0; k < K; k++) {
            const double p = (double)e4m3_host(wh[(size_t)r * K + k]) * sh[(size_t)(r / 128) * W.scale_cols + k / 128] * xh[k];
            ref += p;
            mag += fabs(p);
        }
        worst = fmax(worst, fabs(yh[r] - ref) / fmax(mag, 1e-30));
    }
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    const int iters = 2000;
    tc1_consume<GPW><<<sms, 256, smem>>>(W.w, sc, W.scale_cols, x, iters, y);
    CK(cudaEventRecord(a));
    tc1_consume<GPW><<<sms, 256, smem>>>(W.w, sc, W.scale_cols, x, iters, y);
    CK(cudaEventRecord(b));
    CK(cudaGetLastError());
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    const double bytes = (double)rows * K * iters;
    printf("K %5d: %d tiles of 16 rows per SM, consumers alone %.2f TB/s of FP8 weights "
           "(%.1f us per 34 MB); max error / sum |products| %.2e\n",
           K, TC1_TILES, bytes / (ms * 1e-3) / 1e12, 34.0e6 / (bytes / (ms * 1e-3)) * 1e6, worst);
    // Two f16 parts keep 22 bits of each activation; f32 sums of 4096 products.
    if (worst > 1e-5) printf("FAILED: the tensor-core sums are off by %.2e of their magnitude\n", worst);
}

int main() {
    int dev = 0, sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    run<2>(sms);  // K = 1024 (wq_b)
    run<8>(sms);  // K = 4096 (wo_a)
    return 0;
}
