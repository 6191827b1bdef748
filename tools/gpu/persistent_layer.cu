// What would a persistent decode kernel gain over a launch per phase? A model of Flash's
// batch-1 decode layers (an HCA layer as stop 39 traced it on an H100): the seven weight
// streams of a layer (213 MB) and the latency phases between them (boundaries, query norm, RoPE,
// attention, merge, routing: each waits for its input, then takes a fixed time), run three ways:
//   stream   the streams' bytes alone through the same rings, no waits (the floor);
//   launches a kernel per phase under programmatic dependent launch, as the engine runs a step:
//            a stream kernel's producer requests its weights before `griddepcontrol.wait`
//            (where the addresses come from the routing, once the routing's count is in); a
//            latency kernel holds no shared memory, so the next stream kernel's blocks can
//            stream beside it;
//   tail     launches as above but the attention tail (attention, merge, wo_a, wo_b) as one
//            launch of a block per SM, as kernels/persist.cu's `attn_tail` runs it;
//   persist  one kernel, a block per SM: the producer warp requests every phase's weights
//            through one ring as slots free (waiting only, for the routed experts, on the
//            routing), the consumer warps take the phases in order, each once a grid-wide
//            counter says its input is complete.
// The consumers only fold the stage's bytes (plus, with stage_ns, a spin per stage standing in
// for a GEMV's arithmetic), so the figures measure the latency structure, not the kernels. The
// latency times below are estimates of each phase's own time (its trace advance less the wait
// for its input); the launch model's layer should land near the traced ~148 µs to trust the rest.
// (Spins and stamps read %globaltimer, which may tick by ~1 µs: a single phase's figure is that
// coarse, the per-layer means are not.)
//   nvcc -std=c++17 -O3 -arch=sm_90a -o persistent_layer tools/gpu/persistent_layer.cu
//   ./persistent_layer [layers=8] [stage_ns=0] [latency_pct=100]
// (latency_pct scales every latency phase's own time: how much shorter windows would give each
// structure, e.g. 50 for phases at half their traced time.)
#include <cstdint>
#include "graph_util.cuh"
#include "ring_util.cuh"

constexpr int STAGE = 32 * 1024;  // bytes per ring stage, requested as 8 copies of 4 KB
constexpr int MAX_STAGES = 6;
constexpr int CONSUMERS = 256;  // eight consumer warps, then the producer warp
constexpr int THREADS = CONSUMERS + 32;
constexpr int MAX_PHASES = 400;

struct Phase {
    const uint8_t* src;  // stream: the weights, the blocks' shares end to end
    long long ns;        // latency: the phase's own time once its input is complete
    long long stages;    // stream: stages per block
    int stream;          // 1: a weight stream, 0: a latency phase
    int blocks;          // latency: blocks taking part (0: every block)
    int wait;            // phase whose completion the consumers wait for, or -1
    int pwait;           // stream: phase the producer waits for before its requests, or -1
};
__constant__ Phase ph[MAX_PHASES];

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void spin_ns(long long ns) {
    const unsigned long long t0 = now_ns();
    while ((long long)(now_ns() - t0) < ns) {
    }
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"r"(CONSUMERS) : "memory"); }
__device__ __forceinline__ int takes_part(const Phase& f) { return f.stream || !f.blocks || (int)blockIdx.x < f.blocks; }
// Blocks that count a phase done: every block of the persistent grid, or the latency phase's.
__device__ __forceinline__ unsigned need(int p, int grid) {
    return ph[p].stream || !ph[p].blocks ? grid : min(ph[p].blocks, grid);
}
__device__ __forceinline__ void wait_count(const unsigned* done, int p, int grid) {
    while (ld_acquire(done + p) < need(p, grid)) {
    }
}

// Phases [p0, p1). pdl: a launch of its own, after the launch before it by griddepcontrol
// (then its phases after the first by the counters); else the persistent kernel, ordered by the
// `done` counters (`grid`: its block count). Every phase counts its blocks done, and a producer that waits for an address (the
// routed experts' for the routing) waits on that count in both structures.
__global__ void __launch_bounds__(THREADS, 1)
    run_phases(int p0, int p1, int nstages, unsigned* done, int grid, int pdl, long long stage_ns, unsigned* sink,
               unsigned long long* begin) {
    extern __shared__ __align__(128) uint8_t sm[];
    __shared__ __align__(8) uint64_t full[MAX_STAGES], empty[MAX_STAGES];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (pdl) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (threadIdx.x == 0) {
        for (int i = 0; i < nstages; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[i])));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 8;" ::"r"(smem_addr(&empty[i])));
        }
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    __syncthreads();
    if (warp == CONSUMERS / 32) {
        long long n = 0;  // stages requested
        for (int p = p0; p < p1; p++) {
            const Phase& f = ph[p];
            if (!f.stream) continue;
            if (f.pwait >= 0) {  // (a flag in either structure, as the engine's routed producers wait)
                if (lane == 0) wait_count(done, f.pwait, grid);
                __syncwarp();
            }
            const uint8_t* base = f.src + (size_t)blockIdx.x * f.stages * STAGE;
            for (long long i = 0; i < f.stages; i++, n++) {
                const int slot = (int)(n % nstages);
                if (n >= nstages) wait_phase(&empty[slot], (unsigned)((n / nstages) - 1) & 1);
                if (lane == 0)
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(&full[slot])),
                                 "r"(STAGE)
                                 : "memory");
                __syncwarp();
                if (lane < STAGE / 4096)
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                            smem_addr(sm + (size_t)slot * STAGE + lane * 4096)),
                        "l"(base + (size_t)i * STAGE + lane * 4096), "r"(4096), "r"(smem_addr(&full[slot]))
                        : "memory");
            }
        }
        return;
    }
    unsigned h = 0;
    long long n = 0;  // stages taken
    for (int p = p0; p < p1; p++) {
        const Phase& f = ph[p];
        if (!takes_part(f)) continue;
        // (A launch of several phases — the attention tail below — waits for the launch before
        // it, then orders its own phases by the counters.)
        if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
        if (f.wait >= 0 && (!pdl || p > p0)) {
            if (threadIdx.x == 0) wait_count(done, f.wait, grid);
            consumers_sync();
        }
        if (blockIdx.x == 0 && threadIdx.x == 0) begin[p] = now_ns();  // block 0 starts phase p
        if (f.stream) {
            for (long long i = 0; i < f.stages; i++, n++) {
                const int slot = (int)(n % nstages);
                wait_phase(&full[slot], (unsigned)(n / nstages) & 1);
                const uint4* st = (const uint4*)(sm + (size_t)slot * STAGE) + warp * (STAGE / 16 / 8);
#pragma unroll
                for (int j = lane; j < STAGE / 16 / 8; j += 32) {
                    const uint4 v = st[j];
                    h ^= v.x + v.y + v.z + v.w;
                }
                if (stage_ns) spin_ns(stage_ns);
                __syncwarp();
                if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(&empty[slot])) : "memory");
            }
        } else if (threadIdx.x < 32) {
            spin_ns(f.ns);
        }
        consumers_sync();
        if (threadIdx.x == 0) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            atomicAdd(done + p, 1u);
        }
    }
    if (h == 0x9e3779b9u) sink[0] = h;  // keeps the reads
}

struct Spec {
    const char* name;
    int stream;
    double mb;     // stream: MB of weights
    long long ns;  // latency: own time
    int blocks;    // latency: grid (0: every SM)
    int routed;    // stream: addresses known only after the routing
};

// One HCA layer (stop 39's H100 trace: advances 10 / 6 / 3.4 / 9.2 / 4.2 µs for the boundary,
// query norm, norm + RoPE, attention, merge; the router inside the FFN launch ~5 µs).
// The attention tail: phases [kTail0, kTail1) of a layer (`attn_tail`'s launch).
constexpr int kTail0 = 5, kTail1 = 9;
static const Spec kLayer[] = {
    {"boundary (attention side)", 0, 0, 9000, 64, 0},
    {"projections of h", 1, 14, 0, 0, 0},
    {"query norm", 0, 0, 3000, 1, 0},
    {"wq_b", 1, 32, 0, 0, 0},
    {"norm + RoPE", 0, 0, 2500, 8, 0},
    {"attention", 0, 0, 8000, 0, 0},
    {"merge", 0, 0, 3000, 64, 0},
    {"wo_a", 1, 32, 0, 0, 0},
    {"wo_b", 1, 32, 0, 0, 0},
    {"boundary (FFN side)", 0, 0, 9000, 64, 0},
    {"routing", 0, 0, 4000, 1, 0},
    {"shared expert gate/up", 1, 17, 0, 0, 0},
    {"routed experts gate/up", 1, 52, 0, 0, 1},
    {"experts down", 1, 34, 0, 0, 1},
};

int main(int argc, char** argv) {
    const int layers = std::max(3, argc > 1 ? atoi(argv[1]) : 8);
    const long long stage_ns = argc > 2 ? atoll(argv[2]) : 0;
    const int latency_pct = argc > 3 ? atoi(argv[3]) : 100;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaFuncSetAttribute(run_phases, cudaFuncAttributeMaxDynamicSharedMemorySize, MAX_STAGES * STAGE));
    // The persistent grid's blocks wait for each other: one must fit on every SM at once.
    int fit;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, run_phases, THREADS, MAX_STAGES * STAGE));
    if (fit < 1) {
        printf("a block of %d threads and %d KB does not fit an SM\n", THREADS, MAX_STAGES * STAGE / 1024);
        return 1;
    }
    const int per_layer = sizeof(kLayer) / sizeof(kLayer[0]);
    const int np = layers * per_layer;
    if (np > MAX_PHASES) {
        printf("at most %d phases\n", MAX_PHASES);
        return 1;
    }
    // The phases in order: a consumer waits for the phase before it; the routed experts' for
    // the routing, their producers too. With shared_beside the shared expert waits only for the
    // boundary (the routing runs beside it), as the engine's FFN half runs them.
    std::vector<size_t> off(np);
    size_t total = 0;
    auto phases = [&](bool shared_beside) {
        std::vector<Phase> host(np);
        total = 0;
        for (int p = 0; p < np; p++) {
            const Spec& s = kLayer[p % per_layer];
            Phase& f = host[p];
            f.stream = s.stream;
            f.ns = s.ns * latency_pct / 100;
            f.blocks = s.blocks;
            f.stages = s.stream ? std::llround(s.mb * 1e6 / sms / STAGE) : 0;
            f.wait = p - 1;
            f.pwait = -1;
            const int route = p - p % per_layer + 10;  // the layer's routing phase
            if (p % per_layer == 11 && shared_beside) f.wait = p - 2;  // the boundary
            if (p % per_layer == 12) f.wait = route;  // (the routing waited for the boundary)
            if (s.routed) f.pwait = route;
            off[p] = total;
            total += (size_t)f.stages * sms * STAGE;
        }
        return host;
    };
    std::vector<Phase> host = phases(true), serial = phases(false);
    uint8_t* w;
    CK(cudaMalloc(&w, total));
    CK(cudaMemset(w, 1, total));
    for (int p = 0; p < np; p++) host[p].src = serial[p].src = w + off[p];
    unsigned *done, *sink;
    unsigned long long* begin;
    CK(cudaMalloc(&done, np * sizeof(unsigned)));
    CK(cudaMalloc(&begin, np * sizeof(unsigned long long)));
    CK(cudaMalloc(&sink, sizeof(unsigned)));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    auto launch = [&](int p0, int p1, int grid, int nstages, int pdl, bool smem) {
        launch_pdl(run_phases, dim3(grid), dim3(THREADS), smem ? (size_t)nstages * STAGE : 0, s, pdl, p0, p1, nstages,
                   done, grid, pdl, stage_ns, sink, begin);
    };
    // µs per layer of a captured sequence of launches, the counters zeroed first.
    auto timed = [&](auto&& body) {
        return graph_median_ms(s, [&] {
                   CK(cudaMemsetAsync(done, 0, np * sizeof(unsigned), s));
                   body();
               }) *
               1e3 / layers;
    };
    double bytes = 0;
    for (int p = 0; p < per_layer; p++) bytes += (double)host[p].stages * sms * STAGE;
    printf("%d SMs, %d layers of %.1f MB in %d phases, stage spin %lld ns, latency phases at %d%%; µs per layer "
           "(TB/s)\n",
           sms, layers, bytes / 1e6, per_layer, stage_ns, latency_pct);
    for (int nstages : {4, 6}) {
        // The floor: the streams alone, nothing waited for.
        std::vector<Phase> bare = host;
        for (auto& f : bare) {
            f.wait = f.pwait = -1;
            if (!f.stream) f.ns = 0;
        }
        CK(cudaMemcpyToSymbol(ph, bare.data(), np * sizeof(Phase)));
        const double floor = timed([&] { launch(0, np, sms, nstages, 0, true); });
        CK(cudaMemcpyToSymbol(ph, host.data(), np * sizeof(Phase)));
        double adv[4][sizeof(kLayer) / sizeof(kLayer[0])] = {};
        // Block 0's phase starts of the last replay: each phase's mean time to the next's
        // start over the layers after the first (block 0 takes every one-block phase, so
        // those are its path, not necessarily the grid's).
        auto advances = [&](double* out) {
            std::vector<unsigned long long> b(np);
            CK(cudaMemcpy(b.data(), begin, np * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
            int n[sizeof(kLayer) / sizeof(kLayer[0])] = {};
            for (int p = per_layer; p + 1 < np; p++) {
                out[p % per_layer] += (double)(b[p + 1] - b[p]) / 1e3;
                n[p % per_layer]++;
            }
            for (int q = 0; q < per_layer; q++) out[q] /= n[q] ? n[q] : 1;
        };
        const double launches = timed([&] {
            for (int p = 0; p < np; p++) {
                const Phase& f = host[p];
                const int grid = f.stream || !f.blocks ? sms : f.blocks;
                launch(p, p + 1, grid, nstages, p > 0, f.stream);
            }
        });
        advances(adv[0]);
        const double tail = timed([&] {
            for (int p = 0; p < np;) {
                if (p % per_layer == kTail0) {
                    launch(p, p + kTail1 - kTail0, sms, nstages, p > 0, true);
                    p += kTail1 - kTail0;
                    continue;
                }
                const Phase& f = host[p];
                const int grid = f.stream || !f.blocks ? sms : f.blocks;
                launch(p, p + 1, grid, nstages, p > 0, f.stream);
                p++;
            }
        });
        advances(adv[3]);
        const double persist = timed([&] { launch(0, np, sms, nstages, 0, true); });
        advances(adv[1]);
        // The same with the shared expert after the routing, as the launches order them: what
        // the persistent kernel gains by its structure alone.
        CK(cudaMemcpyToSymbol(ph, serial.data(), np * sizeof(Phase)));
        const double persist_serial = timed([&] { launch(0, np, sms, nstages, 0, true); });
        advances(adv[2]);
        printf("ring of %d x 32 KB: stream %.1f (%.2f) | launches %.1f (%.2f) | attention tail in one %.1f (%.2f) | "
               "persist %.1f (%.2f) | persist, shared expert after the routing %.1f (%.2f)\n",
               nstages, floor, bytes / floor / 1e6, launches, bytes / launches / 1e6, tail, bytes / tail / 1e6, persist,
               bytes / persist / 1e6, persist_serial, bytes / persist_serial / 1e6);
        printf("  %-26s\n", "phase: µs from its start to");
        printf("  %-26s %9s %9s %9s %9s\n", "the next one's (block 0)", "launches", "tail", "persist", "serial");
        for (int q = 0; q < per_layer; q++)
            printf("  %-26s %9.1f %9.1f %9.1f %9.1f\n", kLayer[q].name, adv[0][q], adv[3][q], adv[1][q], adv[2][q]);
    }
    double lat = 0;
    for (int p = 0; p < per_layer; p++) lat += host[p].ns / 1e3;
    printf("latency phases' own time per layer: %.1f µs\n", lat);
    return 0;
}
