#!/usr/bin/env bash
# The test command of the README and of CI: sets up what the tests need on a fresh machine, then
# runs every test that needs no GPU and builds the CUDA binary (its GPU tests are opt-in:
# `cargo test --release -p dsv4-cuda -- --ignored` on a machine with a Hopper GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvcc.sh
cargo test --workspace
cargo build --release -p dsv4-cli --features cuda
