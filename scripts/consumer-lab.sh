#!/usr/bin/env bash
# On a GPU machine with Nsight Compute, from the repository root (nothing carried): what holds
# the one-token bulk consumers (kernels/gemv_bulk.cu) near ~1.1 µs per 32 KB stage, whatever
# their arithmetic (the SIMT and the tensor-core consumers alike, docs/PERFORMANCE.md stop 33)?
#  1. tools/gpu/cvt_rate.cu: the FP8 decode's own rate per SM;
#  2. tools/gpu/gemv_bulk_bench.cu as shipped, its consumers alone (-DBULK_NO_COPY), and each
#     variant given (words of -D flags, or root=DIR, as scripts/ffn-bench.sh takes them);
#  3. Nsight Compute's warp-state samples per SASS instruction of wq_b (`gemv_bulk_fp8_1_r4`)
#     and wo_a (`gemv_bulk_fp8_1_r1`) in the consumers-alone build: where each warp waits
#     (tools/ncu_sass_stalls.py; the raw source pages go to $OUT).
#   scripts/consumer-lab.sh ["-DBULK_LDS_AHEAD" "-DBULK_LDS_AHEAD -DBULK_NO_COPY" ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
dir=$(mktemp -d)
"$nvcc" -std=c++17 -O3 -arch=sm_90a -o "$dir/cvt" tools/gpu/cvt_rate.cu >"$dir/cvt.log" 2>&1 &
"$nvcc" -std=c++17 -O3 -arch=sm_90a -DBULK_NO_COPY -lineinfo -Icrates/dsv4-cuda/kernels -o "$dir/nocopy" \
  tools/gpu/gemv_bulk_bench.cu >"$dir/nocopy.log" 2>&1 &
wait
echo "== cvt_rate"
timeout 60 "$dir/cvt" || tail -3 "$dir/cvt.log"
echo "== gemv_bulk_bench"
TOOL=gemv_bulk_bench timeout 240 scripts/ffn-bench.sh "" "-DBULK_NO_COPY" "$@"
if [ -z "$ncu" ] || [ ! -x "$dir/nocopy" ]; then
  echo "no ncu or no build: per-instruction samples skipped"
  exit 0
fi
for k in gemv_bulk_fp8_1_r4 gemv_bulk_fp8_1_r1; do
  echo "== $k (consumers alone): warp-state samples per instruction"
  # (Past the warm-up launches of the first case that runs it: wq_b for r4, wo_a for r1.)
  timeout 120 "$ncu" --section SourceCounters --section WarpStateStats -k "regex:^$k\$" -s 10 -c 1 \
    -f -o "$dir/$k" "$dir/nocopy" >/dev/null 2>&1
  "$ncu" -i "$dir/$k.ncu-rep" --page source --print-source sass --csv >"$out/sass-$k.csv" 2>&1
  python3 tools/ncu_sass_stalls.py "$out/sass-$k.csv" 25 || head -5 "$out/sass-$k.csv"
done
