#!/usr/bin/env bash
# The device tool copies the working tree (tracked files plus carried paths) to the GPU machine,
# 64 MiB in all. The tracked tree is ~59 MB, so the CUDA binary and the GPU test binary
# (.devcarry/dsv4.xz + gpu.xz, ~12.5 MB) do not travel together. `out` moves what no GPU-side
# script reads (the Rust sources but the kernels, docs, the fixture generators and their MLX
# sources: ~5.6 MB) to a folder beside the checkout; `in` puts it back. Run `in` right after the
# call: the checkout does not build while they are out.
#   scripts/device-slim.sh out && <device call carrying .devcarry/dsv4.xz and gpu.xz>; scripts/device-slim.sh in
set -euo pipefail
cd "$(dirname "$0")/.."
aside=../.dsv4-aside
items=(crates/dsv4-core crates/dsv4-server crates/dsv4-cli crates/dsv4-cuda/src crates/dsv4-cuda/tests
  docs tests/fixtures/mlx-src tools/make_fixtures.py tools/make_official_fixtures.py)
case ${1:-} in
out)
  [ ! -e "$aside" ] || { echo "$aside exists: run '$0 in' first" >&2; exit 1; }
  for i in "${items[@]}"; do
    mkdir -p "$aside/$(dirname "$i")"
    mv "$i" "$aside/$i"
  done
  echo "moved aside; tracked tree now $(git ls-files -z | du -c --files0-from=- -b 2>/dev/null | tail -1 | cut -f1) bytes"
  ;;
in)
  [ -d "$aside" ] || { echo "nothing aside" >&2; exit 1; }
  for i in "${items[@]}"; do
    [ ! -e "$i" ] || { echo "$i exists here too; left $aside as it is" >&2; exit 1; }
  done
  for i in "${items[@]}"; do
    mkdir -p "$(dirname "$i")"
    mv "$aside/$i" "$i"
  done
  rm -r "$aside"
  git status --short
  ;;
*)
  echo "usage: $0 out|in" >&2
  exit 2
  ;;
esac
