#!/usr/bin/env bash
# The main job: build flashmoe-train and run the smoke training on the embedded
# fact-recall data: configs/smoke.yaml on a GPU, configs/cpu-tiny.yaml where there is
# none. Each run writes its checkpoints and JSONL log under runs/<config>-<time>/.
# Extra arguments go to flashmoe-train (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
export PATH=/usr/local/cuda/bin:$PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)" --target flashmoe-train

if nvidia-smi -L >/dev/null 2>&1; then
  config=smoke
else
  config=cpu-tiny
  echo "no GPU found: running configs/cpu-tiny.yaml on the CPU backend instead of configs/smoke.yaml"
fi
run_dir=runs/$config-$(date +%Y%m%d-%H%M%S)
mkdir -p "$run_dir"
"$build/flashmoe-train" "configs/$config.yaml" \
  --set checkpoint.dir="$run_dir/checkpoints" --set log.file="$run_dir/log.jsonl" "$@"
echo "checkpoints and log.jsonl in $run_dir"
