#!/usr/bin/env bash
# On a GPU machine, from the repository root, with .devcarry/dsv4(.xz) carried: alternates
# decode benches (8 layers, batch 1 at 1K context) over environment settings, one line each,
# so that kernel or launch variants are compared within one session.
# A setting `BIN=PATH` runs another binary (e.g. a base build carried in an earlier call to
# the same warm machine as .devcarry/base.xz, which is unpacked to .devcarry/base).
#   scripts/ab-decode.sh ROUNDS "A=0 B=1" "A=1 B=1" "BIN=.devcarry/base" ...   (output also in $OUT/ab.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
for f in dsv4 base; do
  [ -f .devcarry/$f.xz ] && xz -d -k -f .devcarry/$f.xz && chmod +x .devcarry/$f
done
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
rounds=$1
shift
args=${AB_ARGS:---layers 8 --prompts 0 --contexts 1024 --batch 1 --decode 32}
for r in $(seq "$rounds"); do
  for cfg in "$@"; do
    start=$(date +%s)
    bin=.devcarry/dsv4
    for w in $cfg; do
      case $w in BIN=*) bin=${w#BIN=} ;; esac
    done
    line=$(env $cfg "$bin" bench --device cuda $args 2>&1 | grep -E '^decode @' | tr '\n' ' ')
    echo "[$cfg] $line ($(($(date +%s) - start)) s)" | tee -a "${OUT:-.}/ab.txt"
  done
done
