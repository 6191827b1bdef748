#!/usr/bin/env bash
# On a GPU machine: what each group of kernels costs on a decode step's critical path. Runs the
# 8-layer synthetic Flash decode (batch 1, 1K context) once per group with the group's kernels
# left out (DSV4_CUDA_SKIP; results are wrong while set) and prints the step time without it.
# usage: skip-costs.sh DSV4_BINARY [group ...]   (a group is a comma list of name prefixes;
# `-` is the full step). Extra bench flags come from BENCH_ARGS; env like DSV4_CUDA_HC_FUSED
# passes through.
set -uo pipefail
bin=$1
shift
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(- inv_rms gemv_f32 hc_mix hc_collapse hc_post rms_norm rms_norm_rope
  gemv_multi rope attention_partial attn_combine ring_store moe_route moe_combine embed)
step() {
  "$bin" bench --device cuda --layers 8 --prompts 0 --contexts 1024 --batch 1 --decode 32 \
    ${BENCH_ARGS:-} 2>&1 | grep -E "^\| decode \| 1 \|" | head -1 | awk -F'|' '{print $5}'
}
for g in "${groups[@]}"; do
  if [ "$g" = - ]; then
    printf '%-40s %s\n' "(nothing left out)" "$(step)"
  else
    printf '%-40s %s\n' "$g" "$(DSV4_CUDA_SKIP=$g step)"
  fi
done
