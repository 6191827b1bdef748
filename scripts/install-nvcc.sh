#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI wheels into .nvcc/ at the repository root (no root, no GPU
# needed); dsv4-cuda's build script finds it there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then exit 0; fi
python3 -m venv .nvcc
.nvcc/bin/pip install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
