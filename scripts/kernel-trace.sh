#!/usr/bin/env bash
# On a GPU machine without Nsight Systems, from the repository root, with .devcarry/dsv4(.xz):
# builds the CUPTI tracer (tools/gpu/kernel_trace.cpp) and traces a decode bench, then
# summarises the median graph step and the eager kernels (tools/ktrace_summary.py). Output in
# $OUT (or .).
#   scripts/kernel-trace.sh [bench args...]   (default: 8 layers, batch 1 at 1K, 32 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
cuda=${CUDA_HOME:-/usr/local/cuda}
[ -f .devcarry/dsv4.xz ] && xz -d -k -f .devcarry/dsv4.xz && chmod +x .devcarry/dsv4
inc=$(dirname "$(find "$cuda"/ "$cuda"/extras -name cupti_activity.h 2>/dev/null | head -1)")
lib=$(dirname "$(find "$cuda"/ -name 'libcupti.so*' 2>/dev/null | head -1)")
# The newest kernel record the header declares (its fields used here exist in all of them).
krec=$(grep -o 'CUpti_ActivityKernel[0-9]*;' "$inc"/cupti_activity*.h | sed 's/.*://; s/;//' | sort -V | tail -1)
nvcc -O2 -shared -Xcompiler -fPIC -DKREC="$krec" -I"$inc" -o "$out/libktrace.so" \
  tools/gpu/kernel_trace.cpp -L"$lib" -lcupti
export LD_LIBRARY_PATH=$lib:$cuda/lib64:${LD_LIBRARY_PATH:-}
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--layers 8 --prompts 0 --contexts 1024 --batch 1 --decode 32)
CUDA_INJECTION64_PATH=$out/libktrace.so KTRACE_OUT=$out/ktrace.csv \
  .devcarry/dsv4 bench --device cuda "${args[@]}" 2>&1 | grep -E '^decode @|^prefill @'
# The kernels outside graphs (a prefill's), then the median graph step.
python3 tools/ktrace_summary.py "$out/ktrace.csv" --eager > "$out/ktrace-eager.txt" || true
python3 tools/ktrace_summary.py "$out/ktrace.csv" --timeline --layers > "$out/ktrace-summary.txt"
grep -E '^layer [0-9]+:' "$out/ktrace-summary.txt" | head -4
sed -n '/^kernel /,$p' "$out/ktrace-summary.txt"
head -1 "$out/ktrace-summary.txt"
