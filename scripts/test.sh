#!/usr/bin/env bash
# The test command of the README and of CI: sets up what the tests need on a fresh machine, then
# runs every test that needs no GPU and builds the CUDA binary (its GPU tests are opt-in:
# `cargo test --release -p dsv4-cuda -- --ignored` on a machine with a Hopper GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-nvcc.sh
cargo test --workspace

# The server driven by the official `openai` Python client, then a bounded load test
# (32 concurrent streams for 30 s). `cargo test` above built target/debug/dsv4 for the CLI tests.
venv=target/py-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai>=1.40,<3'
"$venv/bin/python" tools/server_client_test.py target/debug/dsv4 \
  --load-streams "${DSV4_LOAD_STREAMS:-32}" --load-seconds "${DSV4_LOAD_SECONDS:-30}"

# The CUDA binary builds (its GPU tests are opt-in, see above), and its CUDA-only modules' unit
# tests that need no GPU (the bench's layer sizing) pass.
cargo build --release -p dsv4-cli --features cuda
cargo test --release -p dsv4-cli --features cuda --bin dsv4
