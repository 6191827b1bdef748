#!/usr/bin/env bash
# Builds the CUDA binary and the GPU test binary here (no GPU needed) and packs them, stripped
# and xz-compressed, into .devcarry/ (git-ignored) for a GPU machine that has no Rust toolchain:
# carry .devcarry there and run `scripts/gpu-check.sh` from the repository root. (A copy of the
# working tree that must stay small — tests/ alone is ~53 MB — should carry nothing else.)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvcc.sh
cargo build --release -p dsv4-cli --features cuda
test_bin=$(cargo test --release -p dsv4-cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
mkdir -p .devcarry
rm -rf .devcarry/*
strip -o .devcarry/dsv4 target/release/dsv4
strip -o .devcarry/gpu "$test_bin"
xz -6 -T2 .devcarry/dsv4 .devcarry/gpu
ls -la .devcarry
