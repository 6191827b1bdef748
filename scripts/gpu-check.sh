#!/usr/bin/env bash
# On a GPU machine, from the repository root, after `scripts/gpu-pack.sh` packed .devcarry/:
# the GPU tests (all of them, output in $OUT/gpu-tests.txt when OUT is set), then, with
# `--bench`, an 8-layer prefill + decode run of the synthetic Flash model, on one GPU and as a
# two-stage pipeline.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
# The two may travel in separate calls (the device tool's size limit): unpack what is here.
for f in dsv4 gpu; do
  [ -f .devcarry/$f.xz ] && xz -d -k -f .devcarry/$f.xz && chmod +x .devcarry/$f
done
export DSV4_FIXTURES=$PWD/tests/fixtures
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
[ -x .devcarry/gpu ] || { echo "no .devcarry/gpu"; exit 1; }
.devcarry/gpu --ignored --test-threads 1 --nocapture >"$out/gpu-tests.txt" 2>&1
status=$?
grep -E "^test |test result|panicked" "$out/gpu-tests.txt"
if [ "${1:-}" = "--bench" ]; then
  .devcarry/dsv4 bench --device cuda --layers 8 --prompts 1024,8192 --contexts 1024,65536 \
    --batch 1,8,32 --decode 24 2>&1 | grep -vE "layer [0-9]+/"
  # The same layers as a two-stage pipeline (on one GPU when only one is present).
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  dev=cuda:0,0
  [ "$gpus" -ge 2 ] && dev=cuda:0,1
  .devcarry/dsv4 bench --device $dev --layers 8 --prompts 1024 --contexts 1024 \
    --batch 1,8 --decode 24 2>&1 | grep -vE "layer [0-9]+/"
fi
exit $status
