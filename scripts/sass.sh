#!/usr/bin/env bash
# The static schedule of kernels, here, without a GPU: compiles a kernel file (default all of
# kernels/ through all.cu) for sm_90a with the given -D flags, dumps the SASS of the kernels
# whose names match, and summarizes it with tools/sass_sched.py (instructions, scheduled stall
# cycles, scoreboard waits per basic block). Installs cuobjdump from PyPI into .nvcc/ once.
#   scripts/sass.sh KERNEL_REGEX [-DFLAG ...] [-- sass_sched.py options]
#   e.g. scripts/sass.sh 'gemv_bulk_fp8_1_r4$' -DBULK_LDS_AHEAD -- --top 4
#   SRC=tools/gpu/cvt_rate.cu scripts/sass.sh decode
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,8p "$0"; exit 2; }
re=$1
shift
flags=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
[ $# -gt 0 ] && shift
./scripts/install-nvcc.sh
bin=$(ls -d .nvcc/lib/python3*/site-packages/nvidia/cu13/bin)
[ -x "$bin/nvdisasm" ] || .nvcc/bin/pip install -q nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
src=${SRC:-crates/dsv4-cuda/kernels/all.cu}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$bin/nvcc" -std=c++17 -O3 -arch=sm_90a -cubin "${flags[@]}" -I crates/dsv4-cuda/kernels -o "$dir/k.cubin" "$src"
"$bin/cuobjdump" -sass "$dir/k.cubin" >"$dir/all.sass"
# Keep the functions whose names match (a listing is "Function : name" then its instructions).
awk -v re="$re" '/^[ \t]*Function[ \t]*:/ { keep = ($3 ~ re) } keep' "$dir/all.sass" >"$dir/k.sass"
[ -s "$dir/k.sass" ] || { echo "no kernel matches '$re'" >&2; exit 1; }
python3 tools/sass_sched.py "$dir/k.sass" "$@"
