// Weight-streaming matrix-vector products over stored formats: one warp computes two output
// rows for up to MT tokens, each lane consuming 16 bytes of each row per step, so every weight
// byte is read once per call and each x value loaded is used for both rows.
#pragma once
#include "common.cuh"

template <int FMT> struct Chunk;
template <> struct Chunk<FMT_F32> { static constexpr int N = 4; };
template <> struct Chunk<FMT_BF16> { static constexpr int N = 8; };
template <> struct Chunk<FMT_F16> { static constexpr int N = 8; };
template <> struct Chunk<FMT_FP8> { static constexpr int N = 16; };
template <> struct Chunk<FMT_FP4> { static constexpr int N = 32; };

// Decodes 16 stored bytes into f[N], before the chunk's scale (`RowScale`; FP4 values come out
// 2^-14 times too small, which its scale undoes).
template <int FMT>
__device__ __forceinline__ void decode_vals(uint4 q, float* f) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
    if constexpr (FMT == FMT_F32) {
#pragma unroll
        for (int i = 0; i < 4; i++) f[i] = __uint_as_float(w[i]);
    } else if constexpr (FMT == FMT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else if constexpr (FMT == FMT_F16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2_raw h;
            h.x = (unsigned short)(w[i] & 0xffff);
            h.y = (unsigned short)(w[i] >> 16);
            float2 v = __half22float2(__half2(h));
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    } else if constexpr (FMT == FMT_FP8) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[i] & 0xffff), __NV_E4M3);
            __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[i] >> 16), __NV_E4M3);
            float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
            f[4 * i] = a.x;
            f[4 * i + 1] = a.y;
            f[4 * i + 2] = b.x;
            f[4 * i + 3] = b.y;
        }
    } else {
        // Each byte holds elements 2b (low nibble) and 2b+1 (high nibble). An e2m1 nibble v is
        // the high byte ((v & 8) << 4) | ((v & 7) << 1) of an fp16 worth 2^-14 v (scaled back
        // below); four nibbles at a time in byte lanes, then byte_perm into half2 pairs.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t lo = w[i] & 0x0f0f0f0fu, hi = (w[i] >> 4) & 0x0f0f0f0fu;
            const uint32_t hlo = ((lo & 0x08080808u) << 4) | ((lo & 0x07070707u) << 1);
            const uint32_t hhi = ((hi & 0x08080808u) << 4) | ((hi & 0x07070707u) << 1);
            // [_, lo_b, _, hi_b] masked to [0, lo_b, 0, hi_b] = half2(element 2b, 2b+1).
            const uint32_t sel[4] = {0x4400u, 0x5511u, 0x6622u, 0x7733u};
#pragma unroll
            for (int b = 0; b < 4; b++) {
                uint32_t pair = __byte_perm(hlo, hhi, sel[b]) & 0xff00ff00u;
                __half2_raw h;
                h.x = (unsigned short)(pair & 0xffff);
                h.y = (unsigned short)(pair >> 16);
                float2 v = __half22float2(__half2(h));
                f[8 * i + 2 * b] = v.x;
                f[8 * i + 2 * b + 1] = v.y;
            }
        }
    }
}

// The scales of one row's chunks, with the row's part of the lookup done once: FP8 reads the
// row's 128×128 block row (a shift when the block width is a power of two), FP4 one e8m0 per
// 32-element chunk (times 2^14, see decode_vals).
template <int FMT>
struct RowScale {
    const void* base;
    int shift;  // FP8: chunk -> block column by shift, or -1: divide by bi
    int bi;
    RowScale() = default;
    __device__ __forceinline__ RowScale(const LinearW& W, int r) {
        if constexpr (FMT == FMT_FP8) {
            base = (const float*)W.scales + (size_t)(r / W.bo) * W.scale_cols;
            bi = W.bi;
            shift = (bi >= 16 && (bi & (bi - 1)) == 0) ? __ffs(bi) - 1 - 4 : -1;
        } else if constexpr (FMT == FMT_FP4) {
            base = (const uint8_t*)W.scales + (size_t)r * (W.in / 32);
        }
    }
    __device__ __forceinline__ float at(int c) const {
        if constexpr (FMT == FMT_FP8) {
            const int col = shift >= 0 ? c >> shift : (c * 16) / bi;
            return ((const float*)base)[col];
        } else if constexpr (FMT == FMT_FP4) {
            return e8m0_to_f32(((const uint8_t*)base)[c]) * 16384.0f;
        } else {
            return 1.f;
        }
    }
};

// Decodes 16 stored bytes (chunk `c` of row `r`) into f[N]; returns the chunk's scale.
template <int FMT>
__device__ __forceinline__ float decode_chunk(const LinearW& W, int r, int c, uint4 q, float* f) {
    decode_vals<FMT>(q, f);
    return RowScale<FMT>(W, r).at(c);
}

// N consecutive activations (16-byte aligned) into registers: through the read-only path, or
// through L2 (`COH`) when other blocks of the same launch wrote them, which that path may not
// see.
template <int N, bool COH = false>
__device__ __forceinline__ void load_x(const float* x, float (&xv)[N]) {
    const float4* xp = (const float4*)x;
#pragma unroll
    for (int j = 0; j < N / 4; j++) {
        float4 v = COH ? __ldcg(xp + j) : __ldg(xp + j);
        xv[4 * j] = v.x;
        xv[4 * j + 1] = v.y;
        xv[4 * j + 2] = v.z;
        xv[4 * j + 3] = v.w;
    }
}

// acc[i][m] += Ws[i][rows[i], k] · xm[m][xoff + k] for R rows (all of one format and width K)
// over chunks [c0, c1) (lanes stride 32 chunks), plus the scalar tail k in [kt, K) when `tail`.
// The next chunk's loads of all R rows are in flight while this one is computed; each x chunk
// is loaded once per token and shared by the R rows.
template <int FMT, int MT, int R>
__device__ __forceinline__ void warp_dot_rows(const LinearW* const (&Ws)[R], const int (&rows)[R],
                                              const float* const* xm, int M, int xoff, int c0,
                                              int c1, bool tail, int kt, float (&acc)[R][MT]) {
    constexpr int N = Chunk<FMT>::N;
    const int lane = threadIdx.x & 31;
    const int K = Ws[0]->in;
    const size_t row_bytes = (FMT == FMT_FP4) ? (size_t)K / 2
                           : (size_t)K * (FMT == FMT_F32 ? 4 : (FMT == FMT_FP8 ? 1 : 2));
    const uint4* p[R];
#pragma unroll
    for (int i = 0; i < R; i++) p[i] = (const uint4*)(Ws[i]->w + (size_t)rows[i] * row_bytes);
    int c = c0 + lane;
    RowScale<FMT> rs[R];
#pragma unroll
    for (int i = 0; i < R; i++) rs[i] = RowScale<FMT>(*Ws[i], rows[i]);
    uint4 q[R];
#pragma unroll
    for (int i = 0; i < R; i++) q[i] = c < c1 ? __ldg(p[i] + c) : make_uint4(0, 0, 0, 0);
    pdl_wait();  // x is the previous kernel's output; the first weights are already requested
    for (; c < c1; c += 32) {
        uint4 nq[R];
#pragma unroll
        for (int i = 0; i < R; i++) nq[i] = c + 32 < c1 ? __ldg(p[i] + c + 32) : q[i];
        if constexpr (MT == 1) {
            float xv[N];
            load_x<N>(xm[0] + xoff + c * N, xv);
#pragma unroll
            for (int i = 0; i < R; i++) {
                float f[N];
                decode_vals<FMT>(q[i], f);
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) d = fmaf(f[j], xv[j], d);
                acc[i][0] = fmaf(d, rs[i].at(c), acc[i][0]);
            }
        } else {
            // Each row chunk is decoded once, then each token's x chunk is loaded once and
            // serves all R rows.
            float f[R][N], sc[R];
#pragma unroll
            for (int i = 0; i < R; i++) {
                decode_vals<FMT>(q[i], f[i]);
                sc[i] = rs[i].at(c);
            }
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < M) {
                    float xv[N];
                    load_x<N>(xm[m] + xoff + c * N, xv);
#pragma unroll
                    for (int i = 0; i < R; i++) {
                        float d = 0.f;
#pragma unroll
                        for (int j = 0; j < N; j++) d = fmaf(f[i][j], xv[j], d);
                        acc[i][m] = fmaf(d, sc[i], acc[i][m]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < R; i++) q[i] = nq[i];
    }
    pdl_wait();
    if (tail) {
        for (int k = kt + lane; k < K; k += 32) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                float v = load_elem(*Ws[i], rows[i], k);
#pragma unroll
                for (int m = 0; m < MT; m++)
                    if (m < M) acc[i][m] = fmaf(v, xm[m][xoff + k], acc[i][m]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[i][m] = warp_sum(acc[i][m]);
}

// Two consecutive rows r0, r0+1 of one matrix (r0+1 repeats r0 when nr == 1).
template <int FMT, int MT>
__device__ __forceinline__ void warp_dot2(const LinearW& W, int r0, int nr, const float* const* xm,
                                          int M, int xoff, int c0, int c1, bool tail, int kt,
                                          float (&acc)[2][MT]) {
    const LinearW* ws[2] = {&W, &W};
    const int rows[2] = {r0, nr > 1 ? r0 + 1 : r0};
    warp_dot_rows<FMT, MT, 2>(ws, rows, xm, M, xoff, c0, c1, tail, kt, acc);
}
