#!/usr/bin/env bash
# On the CPU machine: fill bench/wheels (git-ignored) with what the GPU machine lacks, for CPython
# 3.12 x86-64: megatron-core, mamba-ssm (pure Python, its Triton kernels), causal-conv1d's sm_90
# CUDA op, tree-sitter and its C++ grammar. Uses the team's scripts in ../shared/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${NAM_SHARED:-../shared}
mkdir -p bench/wheels
[ -n "$(ls bench/wheels/mamba_ssm-*.whl 2>/dev/null)" ] || TORCH_FOR_BUILD=2.11.0 bash "$shared/gpu/wheelhouse.sh" bench/wheels
cp -n "$shared"/gpu/wheels/*.whl bench/wheels/
ls -la bench/wheels
