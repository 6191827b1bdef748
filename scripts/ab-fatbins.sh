#!/usr/bin/env bash
# On a GPU machine, from the repository root, with .devcarry/dsv4(.xz) carried: builds the
# kernels once per set of -D flags (in parallel; "" is the binary's own kernels, not rebuilt)
# and alternates decode benches over them through DSV4_CUDA_FATBIN (scripts/ab-decode.sh;
# AB_ARGS as there). With the measurement flags of the weight-streaming kernels this bounds
# what their consumers cost a step: -DBULK_NO_MATH (dense GEMVs) and -DMB_NO_MATH (routed
# tiles) leave only the streams (outputs are zeros, so every value stays finite and the step's
# work is the same; the logits are meaningless).
# A word `root=DIR` builds from another copy of the kernels (`git archive BASE
# crates/dsv4-cuda/kernels | tar -x -C DIR`, carried), so one call compares two commits.
#   scripts/ab-fatbins.sh ROUNDS "" "-DBULK_NO_MATH" "-DMB_NO_MATH" "-DBULK_NO_MATH -DMB_NO_MATH" "root=scratch/base"
set -uo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
rounds=$1
shift
dir=$(mktemp -d)
cfgs=()
i=0
for v in "$@"; do
  if [ -z "$v" ]; then
    cfgs+=("")
  else
    root=. flags=()
    for w in $v; do
      case $w in root=*) root=${w#root=} ;; *) flags+=("$w") ;; esac
    done
    "$nvcc" -std=c++17 -O3 -fatbin -gencode=arch=compute_90a,code=sm_90a "${flags[@]}" \
      -o "$dir/k$i.fatbin" "$root/crates/dsv4-cuda/kernels/all.cu" >"$dir/k$i.log" 2>&1 &
    cfgs+=("DSV4_CUDA_FATBIN=$dir/k$i.fatbin")
  fi
  i=$((i + 1))
done
wait
i=0
for v in "$@"; do
  [ -z "$v" ] || [ -s "$dir/k$i.fatbin" ] || { echo "[$v] did not build:"; tail -5 "$dir/k$i.log"; exit 1; }
  echo "[${cfgs[$i]}] = [$v]"
  i=$((i + 1))
done
scripts/ab-decode.sh "$rounds" "${cfgs[@]}"
