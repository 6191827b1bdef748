#!/usr/bin/env bash
# On a GPU machine, from the repository root, with .devcarry/dsv4(.xz) carried: alternates
# decode benches (8 layers, batch 1 at 1K context) over environment settings, one line each,
# so that kernel or launch variants are compared within one session.
#   scripts/ab-decode.sh ROUNDS "A=0 B=1" "A=1 B=1" ...   (output also in $OUT/ab.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .devcarry/dsv4.xz ] && xz -d -k -f .devcarry/dsv4.xz && chmod +x .devcarry/dsv4
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
rounds=$1
shift
args=${AB_ARGS:---layers 8 --prompts 0 --contexts 1024 --batch 1 --decode 32}
for r in $(seq "$rounds"); do
  for cfg in "$@"; do
    start=$(date +%s)
    line=$(env $cfg .devcarry/dsv4 bench --device cuda $args 2>&1 | grep -E '^decode @' | tr '\n' ' ')
    echo "[$cfg] $line ($(($(date +%s) - start)) s)" | tee -a "${OUT:-.}/ab.txt"
  done
done
