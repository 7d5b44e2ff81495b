#!/usr/bin/env bash
# On the CPU machine: fill bench/wheels (git-ignored) with what the GPU machine lacks, for CPython
# 3.12 x86-64: megatron-core, mamba-ssm (pure Python, its Triton kernels), causal-conv1d's sm_90
# CUDA op, tree-sitter and its C++ grammar (the team's scripts in ../shared/gpu); and, in
# bench/wheels/optional, the trainer's own needs at uv.lock's versions, which bench/gpu.sh installs
# only where the GPU machine cannot already import them (its transformers pins its own tokenizers).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${NAM_SHARED:-../shared}
mkdir -p bench/wheels/optional
[ -n "$(ls bench/wheels/mamba_ssm-*.whl 2>/dev/null)" ] || TORCH_FOR_BUILD=2.11.0 bash "$shared/gpu/wheelhouse.sh" bench/wheels
cp -n "$shared"/gpu/wheels/*.whl bench/wheels/
locked() { awk -v n="$1" '$0 == "name = \"" n "\"" {getline; gsub(/version = |"/, ""); print; exit}' uv.lock; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in tokenizers tensorboard tensorboard-data-server protobuf absl-py grpcio markdown werkzeug markupsafe psutil; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d bench/wheels/optional "$name==$(locked "$name")"
done
ls -la bench/wheels bench/wheels/optional
