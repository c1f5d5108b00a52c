#!/usr/bin/env bash
# On a machine with several GPUs: the expert-parallel tests over NCCL (one rank per
# GPU), weak scaling of training (the smoke model with TOKENS tokens per GPU on 1, 2, 4
# GPUs: configs/smoke.yaml, ep2.yaml, ep4.yaml; REPS repetitions, their runs
# interleaved, of STEPS steps with moe.balance_loss BALANCE, summed up by
# scripts/weak_scaling.py as docs/benchmarks.md reports it) and flashmoe-bench-ep (the
# layer and its exchanges against a plain all-to-all). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/flashmoe-multi}
tokens=${TOKENS:-16384} reps=${REPS:-3} steps=${STEPS:-400} balance=${BALANCE:-0.1}
mkdir -p "$out"
rm -f "$out"/train-*gpu-*.log  # the summary reads every such log here
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build build-gpu -j "$(nproc)" --target flashmoe-train flashmoe-tests-mpi flashmoe-bench-ep 2>&1 | grep -E "\berror\b"
mpi="mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"
for p in 2 4; do
  [ "$p" -le "$gpus" ] || continue
  echo "== mpi tests on $p GPUs"
  timeout 240 $mpi -np "$p" ./build-gpu/tests/flashmoe-tests-mpi --gtest_brief=1 >"$out/mpi-np$p.log" 2>&1
  echo "exit $?"; grep -E "PASSED|FAILED|Skipped|error" "$out/mpi-np$p.log" | sort | uniq -c | head -12
done
train() {  # ranks config repetition
  local log="$out/train-$1gpu-$3.log"
  rm -rf "/tmp/ck-$2"
  timeout 300 $mpi -np "$1" ./build-gpu/flashmoe-train "configs/$2.yaml" --set train.steps="$steps" \
    --set train.batch_tokens=$(($1 * tokens)) --set moe.balance_loss="$balance" \
    --set train.eval_every=0 --set checkpoint.every=0 --set checkpoint.dir="/tmp/ck-$2" \
    --set log.every=$((steps >= 8 ? steps / 4 : 1)) >"$log" 2>&1
  echo "== $2 on $1 GPU(s), repetition $3: exit $?"; grep -E "error" "$log"
}
for rep in $(seq "$reps"); do
  train 1 smoke "$rep"
  [ "$gpus" -ge 2 ] && train 2 ep2 "$rep"
  [ "$gpus" -ge 4 ] && train 4 ep4 "$rep"
done
python3 scripts/weak_scaling.py "$out"/train-*gpu-*.log | tee "$out/weak-scaling.md"
for p in 2 4; do
  [ "$p" -le "$gpus" ] || continue
  timeout 240 $mpi -np "$p" ./build-gpu/flashmoe-bench-ep 2>&1 | tee "$out/bench-ep-np$p.md"
done
