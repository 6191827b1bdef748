// Row norms, rotary embeddings, embeddings and the hyper-connection mixing, in the CPU
// reference's f32 arithmetic and order wherever the order is observable.
#include "common.cuh"

// x[row] <- x[row] / sqrt(mean(x[row]^2) + eps) (* w when given); one block per row.
extern "C" __global__ void rms_norm(float* x, const float* w, int width, float eps) {
    __shared__ float sh[32];
    float* row = x + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss = fmaf(row[i], row[i], ss);
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = row[i] * r;
        row[i] = w ? v * w[i] : v;
    }
}

// out[row] = 1 / sqrt(mean(x[row]^2) + eps); one block per row.
extern "C" __global__ void inv_rms(const float* x, float* out, int width, float eps) {
    __shared__ float sh[32];
    const float* row = x + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss = fmaf(row[i], row[i], ss);
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = 1.0f / sqrtf(ss / (float)width + eps);
}

// Rotates the trailing 2*half channels of rows of width `width` in interleaved pairs. Row i
// belongs to token i / rows_per_token at position pos0 + token * pos_step. The angle is the
// f32 product pos * inv_freq, its cos/sin taken in double (as the CPU reference).
extern "C" __global__ void rope(float* x, int rows, int width, int rows_per_token, int half,
                                const float* inv_freq, float factor, int pos0, int pos_step,
                                int inverse) {
    int i = blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= rows) return;
    int tok = i / rows_per_token;
    float p = (float)(pos0 + tok * pos_step);
    float* tail = x + (size_t)i * width + (width - 2 * half);
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double a = (double)(p * inv_freq[j]);
        float c = (float)cos(a) * factor, s = (float)sin(a) * factor;
        if (inverse) s = -s;
        float u = tail[2 * j], v = tail[2 * j + 1];
        tail[2 * j] = u * c - v * s;
        tail[2 * j + 1] = v * c + u * s;
    }
}

// x[t, s, :] = E[ids[t], :] for each of the n streams.
extern "C" __global__ void embed(LinearW E, const int* ids, float* x, int n) {
    int t = blockIdx.x;
    int id = ids[t];
    int d = E.in;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float v = load_elem(E, id, k);
        for (int s = 0; s < n; s++) x[((size_t)t * n + s) * d + k] = v;
    }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Per token: mu (raw fn·x, scaled here by the stream rms) -> pre [n], post [n], comb [n, n]
// (Sinkhorn: row softmax + eps, one column normalization, then iters-1 row/column rounds).
extern "C" __global__ void hc_mix(const float* mu, const float* rinv, const float* base,
                                  const float* scale, float* pre, float* post, float* comb, int n,
                                  int iters, float eps, int T) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int rows = (2 + n) * n;
    const float r = rinv[t];
    const float* m = mu + (size_t)t * rows;
    for (int i = 0; i < n; i++) {
        pre[t * n + i] = sigmoidf_((m[i] * r) * scale[0] + base[i]) + eps;
        post[t * n + i] = 2.0f * sigmoidf_((m[n + i] * r) * scale[1] + base[n + i]);
    }
    float* c = comb + (size_t)t * n * n;
    for (int k = 0; k < n * n; k++) c[k] = (m[2 * n + k] * r) * scale[2] + base[2 * n + k];
    for (int i = 0; i < n; i++) {
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = fmaxf(mx, c[i * n + j]);
        float s = 0.f;
        for (int j = 0; j < n; j++) { c[i * n + j] = expf(c[i * n + j] - mx); s += c[i * n + j]; }
        for (int j = 0; j < n; j++) c[i * n + j] = c[i * n + j] / s + eps;
    }
    const int rounds = iters > 0 ? iters : 1;
    for (int it = 0; it < rounds; it++) {
        if (it > 0) {
            for (int i = 0; i < n; i++) {
                float s = 0.f;
                for (int j = 0; j < n; j++) s += c[i * n + j];
                s += eps;
                for (int j = 0; j < n; j++) c[i * n + j] /= s;
            }
        }
        for (int j = 0; j < n; j++) {
            float s = 0.f;
            for (int i = 0; i < n; i++) s += c[i * n + j];
            s += eps;
            for (int i = 0; i < n; i++) c[i * n + j] /= s;
        }
    }
}

// h[t, d] = sum_i pre[t, i] * x[t, i, d].
extern "C" __global__ void hc_collapse(const float* x, const float* pre, float* h, int n, int d, int T) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    int t = idx / d, k = idx % d;
    float o = 0.f;
    for (int i = 0; i < n; i++) o = fmaf(pre[t * n + i], x[((size_t)t * n + i) * d + k], o);
    h[idx] = o;
}

// x[t, k, :] = post[t, k] * f[t, :] + sum_j comb[t, j, k] * x[t, j, :], in place (n <= 16).
extern "C" __global__ void hc_post(const float* f, float* x, const float* post, const float* comb,
                                   int n, int d, int T) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    int t = idx / d, e = idx % d;
    float xs[16], out[16];
    for (int j = 0; j < n; j++) xs[j] = x[((size_t)t * n + j) * d + e];
    float fv = f[idx];
    const float* c = comb + (size_t)t * n * n;
    for (int k = 0; k < n; k++) {
        float o = post[t * n + k] * fv;
        for (int j = 0; j < n; j++) o = fmaf(c[j * n + k], xs[j], o);
        out[k] = o;
    }
    for (int k = 0; k < n; k++) x[((size_t)t * n + k) * d + e] = out[k];
}

// The hyper-head: y[t, :] = sum_i (sigmoid(mu_i * r * scale + base_i) + eps) * x[t, i, :].
extern "C" __global__ void hc_head(const float* x, const float* mu, const float* rinv,
                                   const float* base, const float* scale, float* y, int n, int d,
                                   float eps, int T) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * d) return;
    int t = idx / d, k = idx % d;
    float o = 0.f;
    for (int i = 0; i < n; i++) {
        float p = sigmoidf_((mu[t * n + i] * rinv[t]) * scale[0] + base[i]) + eps;
        o = fmaf(p, x[((size_t)t * n + i) * d + k], o);
    }
    y[idx] = o;
}

// g <- silu(min(g, lim)) * clamp(u, -lim, lim) (no clamp when lim is NaN), then * rw[row]
// when given.
extern "C" __global__ void swiglu(float* g, const float* u, int width, size_t total, float lim,
                                  const float* rw) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    float gv = g[idx], uv = u[idx];
    if (!isnan(lim)) { gv = fminf(gv, lim); uv = fminf(fmaxf(uv, -lim), lim); }
    float v = gv / (1.0f + expf(-gv)) * uv;
    if (rw) v *= rw[idx / width];
    g[idx] = v;
}

// dst[i, :] = src[i, :] for rows of `width` floats with their own strides.
extern "C" __global__ void copy_rows(const float* src, int lds, float* dst, int ldd, int width, int rows) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)rows * width) return;
    int i = idx / width, k = idx % width;
    dst[(size_t)i * ldd + k] = src[(size_t)i * lds + k];
}

// Writes the new K=V rows of positions >= max(pos0, pos0 + T - win) into the window ring.
extern "C" __global__ void ring_store(const float* kv, float* ring, int dh, int win, int pos0, int T) {
    int t = blockIdx.x;
    if (t < T - win) return;
    int slot = (pos0 + t) % win;
    for (int k = threadIdx.x; k < dh; k += blockDim.x) ring[(size_t)slot * dh + k] = kv[(size_t)t * dh + k];
}
