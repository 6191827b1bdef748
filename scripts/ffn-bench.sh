#!/usr/bin/env bash
# On a GPU machine, from the repository root (nothing carried): builds tools/gpu/moe_ffn_bench.cu
# once per variant, in parallel, and runs each: the fused FFN half alone, its stamps, and one
# launch against two. Variants are -D flags of kernels/moe_ffn.cu; "" is the build as shipped. A word
# `root=DIR` builds from another copy of the sources (`git archive BASE crates/dsv4-cuda/kernels
# tools/gpu | tar -x -C DIR`, carried), so one call compares two commits.
# TOOL names another bench of tools/gpu built the same way (e.g. TOOL=hc_tail for the boundary
# and the routing kernels alone, TOOL=gemv_bulk_bench for the decode GEMVs with
# "" -DBULK_NO_MATH -DBULK_NO_COPY).
#   [TOOL=hc_tail] scripts/ffn-bench.sh ["" "-DFFN_SHARED_PRE=1" "root=scratch/base" ...]
set -uo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ $# -gt 0 ] || set -- ""
dir=$(mktemp -d)
i=0
for v in "$@"; do
  root=. flags=()
  for w in $v; do
    case $w in root=*) root=${w#root=} ;; *) flags+=("$w") ;; esac
  done
  "$nvcc" -std=c++17 -O3 -arch=sm_90a "${flags[@]}" -I"$root/crates/dsv4-cuda/kernels" -o "$dir/b$i" \
    "$root/tools/gpu/${TOOL:-moe_ffn_bench}.cu" >"$dir/b$i.log" 2>&1 &
  i=$((i + 1))
done
wait
status=0
i=0
for v in "$@"; do
  echo "== variant [${v}]"
  if [ -x "$dir/b$i" ]; then
    timeout 60 "$dir/b$i" || status=1
  else
    tail -5 "$dir/b$i.log"
    status=1
  fi
  i=$((i + 1))
done
exit $status
