#!/usr/bin/env bash
# On a GPU machine with Nsight Compute, from the repository root, with .devcarry/dsv4(.xz):
# why a decode step's latency-bound kernels wait. Profiles one 2-layer batch-1 decode step at
# 1K with the warp-state sampling (`--section WarpStateStats`), caches and clocks left as the
# step leaves them and the whole application replayed per pass (so every kernel runs as cold or
# warm as in the step: kernel replay would rerun each kernel with its code already fetched),
# then prints each kernel's largest stall reasons (tools/ncu_stalls.py). "no_instruction" stalls
# are instruction fetches: a kernel whose code is not in the SM's instruction cache.
#   scripts/stall-reasons.sh [kernel regex]   (default: the step's short kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
[ -f .devcarry/dsv4.xz ] && xz -d -k -f .devcarry/dsv4.xz && chmod +x .devcarry/dsv4
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
re=${1:-'regex:hc_boundary|moe_router_route|moe_ffn|rms_norm|attention_partial|attn_combine|moe_up_bulk|gemv_bulk_multi'}
"$ncu" --replay-mode application --cache-control none --clock-control none \
  --section WarpStateStats --metrics gpu__time_duration.sum --kernel-name "$re" --launch-skip 0 --launch-count 60 \
  --csv --page raw --log-file "$out/ncu-stalls.csv" \
  .devcarry/dsv4 bench --device cuda --layers 2 --prompts 0 --contexts 1024 --batch 1 \
  --decode 2 >/dev/null 2>&1 || true
python3 tools/ncu_stalls.py "$out/ncu-stalls.csv"
