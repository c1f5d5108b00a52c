#!/usr/bin/env bash
# On a GPU machine, after scripts/gpu_tests.sh built build-gpu: flashmoe-bench, the
# PyTorch reference on the same shapes, and the smoke training run beside PyTorch's.
# Everything lands in $OUT (or /tmp/flashmoe-gpu) for docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/flashmoe-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 240 ./build-gpu/flashmoe-bench --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
timeout 300 python3 bench/torch_reference.py layer --case quickstart --case peer-1m --case heavy \
  2>&1 | tee "$out/torch-layer-eager.jsonl" | tail -3
timeout 300 python3 bench/torch_reference.py layer --case quickstart --case peer-1m --compile \
  2>&1 | tee "$out/torch-layer-compile.jsonl" | tail -2
rm -rf checkpoints/smoke
/usr/bin/time -f "smoke wall %e s" timeout 300 ./build-gpu/flashmoe-train configs/smoke.yaml \
  --set log.file="$out/smoke.jsonl" 2>&1 | tee "$out/smoke.log" | grep -E "step (10|100|200|300|400|500)/|eval|wall|error"
timeout 200 python3 bench/torch_reference.py model --config configs/smoke.yaml --steps 20 \
  2>&1 | tee "$out/torch-model.jsonl" | tail -1
