#!/usr/bin/env bash
# The test command of the README and of CI: sets up what the tests need on a fresh machine, then
# runs every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
