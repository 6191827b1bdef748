// Steps toward a persistent decode kernel (docs/PERSISTENT_DECODE.md).
//
// `attn_tail_*`: one token's attention tail — the split attention, its merge with the sinks (and
// the outputs' inverse RoPE), then `wo_a` and `wo_b` — in one launch of a block per SM, where
// the launch path runs three (`attention_partial`, `attn_combine`, `gemv_bulk_pair_*`). The
// producer warp streams `wo_a`'s and then `wo_b`'s weights into the ring from the launch's
// start, so they load while the consumer warps run the attention and the merge (in the launch
// path `wo_a`'s blocks find no SM until the attention's blocks leave). The phases meet at grid
// barriers. Each phase is the launch path's own device function on a "virtual" block, so the
// results are the launch path's bit for bit: the attention's blocks (0, split, head group) and
// the merge's (0, head, 256 channels) are dealt out over the grid, the products walk their
// tiles as the pair does.
//
// Shared memory: the ring (its stages from the dynamic size less the keys), then the
// attention's [ATT_KEYS, 512] staged keys.

struct ConsumerSync {
    __device__ __forceinline__ void operator()() const { consumers_sync(); }
};

// `attn_combine`'s arguments that AttnArgs does not hold (it has the sinks and the output).
struct CombineArgs {
    const float* inv_freq;
    const int* positions;
    int half;
    float factor;
};
static_assert(sizeof(CombineArgs) == 24, "CombineArgs: the layout of ops::CombineArgs");
// The attention's virtual blocks are the consumer warps, a head each.
static_assert(BULK_CONSUMERS == 32 * ATT_HEADS, "attn_tail: a consumer warp per head of a group");

template <int F0, int R0, int F1, int R1>
__device__ __forceinline__ void attn_tail_impl(const AttnArgs& a, float* part, int nsplit, const CombineArgs& cb,
                                               const LinearW& W0, const GemvArgs& a0, int ns0, const LinearW& W1,
                                               const GemvArgs& a1, int ns1, unsigned* bar) {
    constexpr int S0 = bulk_stage_bytes<F0, R0>(), S1 = bulk_stage_bytes<F1, R1>();
    constexpr int STRIDE = S0 > S1 ? S0 : S1;
    constexpr unsigned KEYS_BYTES = ATT_KEYS * ATT_DMAX * sizeof(float);
    if (a.T != 1 || a.dh != ATT_DMAX) __trap();  // the host's gate
    BulkRing ring = bulk_ring_init(STRIDE, KEYS_BYTES);
    extern __shared__ __align__(128) uint8_t bulk_smem[];
    float* keys = (float*)(bulk_smem + ring.stages * STRIDE);
    const DenseSrc<F0, 1, R0> s0{W0, a0};
    const DenseSrc<F1, 1, R1> s1{W1, a1};
    if (threadIdx.x < BULK_CONSUMERS) {
        pdl_wait();
        const int groups = (a.H + ATT_HEADS - 1) / ATT_HEADS;
        for (int v = blockIdx.x; v < nsplit * groups; v += gridDim.x)
            attention_partial_impl<ATT_DMAX>(a, part, nsplit, VBlock{0, v % nsplit, v / nsplit}, keys,
                                             ConsumerSync{});
        grid_barrier_consumers(bar);
        const int cols = (a.dh + BULK_CONSUMERS - 1) / BULK_CONSUMERS;
        for (int v = blockIdx.x; v < a.H * cols; v += gridDim.x) {
            // (A block's next merge rewrites the split weights in shared memory: not before
            // all of its threads have read the last ones. The attention's chunks meet before
            // their keys are staged.)
            if (v != (int)blockIdx.x) consumers_sync();
            attn_combine_impl<true>(part, a.sinks, a.out, a.H, a.dh, nsplit, cb.inv_freq, cb.half, cb.factor,
                                    cb.positions, VBlock{0, v / cols, v % cols}, BULK_CONSUMERS, ConsumerSync{});
        }
        grid_barrier_consumers(bar);
    }
    // (The producer warp reaches here at once and streams both matrices' stages as slots free.)
    gemv_bulk_steps<F0, 1, R0, STRIDE, true>(s0, block_items(s0.tiles() * a0.S), ns0, a0.S, ring);
    // (wo_a's split-K partials are summed, and their counters reset, before the barrier: wo_b
    // reuses the workspace.)
    if (threadIdx.x < BULK_CONSUMERS) grid_barrier_consumers(bar);
    gemv_bulk_steps<F1, 1, R1, STRIDE, true>(s1, block_items(s1.tiles() * a1.S), ns1, a1.S, ring);
}

#define ATTN_TAIL(F0, N0, F1, N1)                                                                             \
    extern "C" __global__ void __launch_bounds__(BULK_THREADS, 1)                                              \
        attn_tail_##N0##_##N1(AttnArgs a, float* part, int nsplit, CombineArgs cb, LinearW W0, GemvArgs a0,   \
                              int ns0, LinearW W1, GemvArgs a1, int ns1, unsigned* bar) {                     \
        pdl_launch(); /* every block is resident before a dependent can take an SM */                         \
        attn_tail_impl<F0, 1, F1, 1>(a, part, nsplit, cb, W0, a0, ns0, W1, a1, ns1, bar);                     \
    }
// wo_a (rows of 4 KB) then wo_b, FP8 as released or BF16, as `gemv_bulk_pair_*`.
ATTN_TAIL(FMT_FP8, fp8, FMT_FP8, fp8)
ATTN_TAIL(FMT_BF16, bf16, FMT_BF16, bf16)
