#!/usr/bin/env bash
# On the GPU machine (no network): install the wheels carried in bench/wheels (git-ignored; fill
# it on the CPU machine with bench/wheelhouse.sh), make the workspace packages importable from
# source, then run the benchmarks. Results and logs go to $OUT when set.
#   NAM_COMMIT=<sha> bash bench/gpu.sh [NAME ...]   (the tree travels without .git)
# then: cp $OUT/triton-cache.txz bench/  (carried next time with the wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}; mkdir -p "$out"
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench/wheels/*.whl
  # mamba-ssm imports its Mamba-1 CUDA op at package import; the SSD Triton kernels we use do not
  # need it, and it is not built for this machine: a placeholder lets the package import.
  [ -n "$(ls /tmp/site/selective_scan_cuda* 2>/dev/null)" ] || echo '# placeholder: Mamba-1 op not built' > /tmp/site/selective_scan_cuda.py
fi
# The trainer's needs (module=wheel name), each installed only where the machine cannot import it.
for pair in tokenizers=tokenizers tensorboard=tensorboard tensorboard_data_server=tensorboard_data_server \
            google.protobuf=protobuf absl=absl_py grpc=grpcio markdown=markdown werkzeug=werkzeug \
            markupsafe=markupsafe psutil=psutil; do
  wheel=$(compgen -G "bench/wheels/optional/${pair#*=}-*.whl" | head -1 || true)
  [ -z "$wheel" ] || PYTHONPATH=/tmp/site python3 -c "import ${pair%%=*}" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel"
done
src=$(ls -d "$PWD"/packages/*/src "$PWD"/apps/*/src | paste -sd:)
export PYTHONPATH=/tmp/site:$src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# Triton keeps its autotuning results on disk: each case bench/world.py spawns would otherwise
# autotune every kernel again (~100 s of the first step of each trainer case on the H200)
export TRITON_CACHE_AUTOTUNING=1
# ... and that disk is the machine's, which a later call does not get: the cache comes back in $out
# and travels with the next call's tree when carried (bench/triton-cache.txz, git-ignored; Triton
# keys each entry by kernel source and GPU, so an entry of changed code is never used)
export TRITON_CACHE_DIR=/tmp/triton-cache
[ ! -f bench/triton-cache.txz ] || python3 bench/triton_cache.py unpack bench/triton-cache.txz
trap 'python3 bench/triton_cache.py pack "$out/triton-cache.txz" 2>/dev/null || true' EXIT
set -o pipefail
python3 bench/run.py --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
